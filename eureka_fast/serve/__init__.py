"""`eureka-audio serve`: an OpenAI-compatible HTTP server with a continuous-batching engine (see docs/serving.md)."""
from .engine import Engine, EngineError, Event, Prompt, QueueFull, SamplingParams
from .metrics import Metrics

__all__ = ["Engine", "EngineError", "Event", "Prompt", "QueueFull", "SamplingParams", "Metrics", "create_app",
           "ServeOptions"]


def __getattr__(name):  # the HTTP layer needs the optional `serve` extra; the engine does not
    if name in ("create_app", "ServeOptions"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
