"""`eureka-audio serve`: the command line of the OpenAI-compatible server."""
from __future__ import annotations

import logging
import os
import signal
import sys


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a saved Eureka-Audio model over an OpenAI-compatible API (/v1/chat/completions, "
                    "/v1/audio/transcriptions, /v1/models, /health, /metrics). See docs/serving.md.")
    p.add_argument("--model", required=True, help="model directory (model + processor save_pretrained output)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                                                             "directory's name)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key clients must send as 'Authorization: Bearer'")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-prefill-windows", type=int, default=1, metavar="W",
                   help="audio windows (30 s each) encoded per admission; more batch the encoder, fewer bound how "
                        "long a new request waits behind others' audio (default 1)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, metavar="T",
                   help="prompt tokens prefilled per admission (default 8192); a longer prompt is admitted alone")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429 (default 256)")
    p.add_argument("--queue-timeout", type=float, default=600.0,
                   help="seconds a request may wait for a slot before it gets 503 (default 600)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens, prompt + answer (default: the model's)")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest audio per part (default 600)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--allow-local-audio", default=None, metavar="DIR",
                   help="let audio_url parts name files (paths or file://) under DIR; nothing outside it")
    p.add_argument("--allow-remote-audio", action="store_true",
                   help="let audio_url parts be http(s) URLs that the server downloads")
    p.add_argument("--remote-audio-timeout", type=float, default=30.0, metavar="S",
                   help="seconds an http(s) audio download may take in all (default 30)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish (default 30)")
    p.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                   help="run N replicas on Ray Serve, each with its own engine, behind Ray's HTTP proxy")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")
    p.set_defaults(func=_run_serve)


def _fail(message: str) -> int:
    print(f"eureka-audio serve: {message}", file=sys.stderr)
    return 2


def _check_args(args) -> str | None:
    if not os.path.isdir(args.model):
        return f"--model {args.model!r} is not a directory"
    if not 0 <= args.port <= 65535:
        return f"--port must be in 0..65535, got {args.port}"
    for name in ("max_num_seqs", "max_prefill_windows", "max_prefill_tokens", "max_audio_seconds", "max_body_mb",
                 "queue_timeout", "remote_audio_timeout"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    if args.max_queue < 0:
        return f"--max-queue must be >= 0, got {args.max_queue}"
    if args.max_model_len is not None and args.max_model_len < 2:
        return f"--max-model-len must be >= 2, got {args.max_model_len}"
    if args.allow_local_audio and not os.path.isdir(args.allow_local_audio):
        return f"--allow-local-audio {args.allow_local_audio!r} is not a directory"
    if args.api_key_env and not os.environ.get(args.api_key_env):
        return f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty)"
    if args.ray_replicas < 0:
        return f"--ray-replicas must be >= 0, got {args.ray_replicas}"
    if args.ray_replicas and args.port == 0:
        return "--ray-replicas needs a fixed --port (Ray's HTTP proxy does not report a free port it picked)"
    return None


def build_engine(args):
    import torch

    from ..inference import EurekaAudio
    from .engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    loaded = EurekaAudio(args.model, device=device, dtype=dtype)
    return Engine(loaded.model, loaded.processor, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
                  queue_timeout_s=args.queue_timeout, max_model_len=args.max_model_len,
                  max_prefill_windows=args.max_prefill_windows, max_prefill_tokens=args.max_prefill_tokens)


def serve_options(args):
    from .app import ServeOptions

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return ServeOptions(served_model_name=name, api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                        max_audio_seconds=args.max_audio_seconds, max_body_mb=args.max_body_mb,
                        allow_local_audio=args.allow_local_audio, allow_remote_audio=args.allow_remote_audio,
                        remote_audio_timeout_s=args.remote_audio_timeout)


def _run_serve(args) -> int:
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    import importlib.util

    missing = [name for name in ("uvicorn", "starlette", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        return _fail(f"the server needs the 'serve' extra ({', '.join(missing)} missing): "
                     f"pip install 'eureka_fast[serve]'")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray_replicas:
        from .ray_deploy import run_ray

        return run_ray(args)
    import uvicorn

    from .app import create_app

    options = serve_options(args)
    engine = build_engine(args)
    app = create_app(engine, options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.graceful_timeout, lifespan="on")
    server = _GracefulServer(config)
    _announce_when_started(server, args, options)
    server.run()
    if server.stopped_by is not None:
        print(f"eureka-audio serve: stopped ({signal.Signals(server.stopped_by).name})", flush=True)
    return 0


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a handled SIGINT/SIGTERM ends the command with status 0 (uvicorn re-raises
        the signal after its graceful shutdown). The first signal stops accepting and lets in-flight requests
        finish (up to --graceful-timeout); a second one forces the exit."""

        stopped_by = None

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = sig
            if self.should_exit:
                self.force_exit = True
            else:
                self.should_exit = True

    return GracefulServer


def _GracefulServer(config):
    return _graceful_server_class()(config)


def ready_lines(host: str, port: int, options) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    auth = " -H 'Authorization: Bearer $KEY'" if options.api_key else ""
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
            % options.served_model_name)
    return (f"eureka-audio serve: ready at {base}/v1 (model {options.served_model_name!r})\n"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'")


def _announce_when_started(server, args, options) -> None:
    """Print the URL and a curl line once uvicorn listens (the port is known then, also for --port 0)."""
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        port = args.port
        for s in getattr(server, "servers", []):
            for sock in getattr(s, "sockets", []):
                port = sock.getsockname()[1]
        if server.started:
            print(ready_lines(args.host, port, options), flush=True)

    server.startup = startup
