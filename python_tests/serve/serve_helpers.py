"""Helpers of the serving tests: a small random Eureka-Audio model whose greedy answers are varied and depend on the
whole context (so a batching bug that mixes rows or drops positions changes the text), test audio, a server runner."""
import io
import threading
import time

import numpy as np
import soundfile as sf
import torch

LIGHT_AUDIO = {"n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1}


def build_model():
    from eureka_fast.models import EurekaAudioConfig, EurekaAudioForCausalLM, EurekaAudioProcessor

    torch.manual_seed(7)
    config = EurekaAudioConfig.preset("tiny", audio_config=LIGHT_AUDIO, text_config={"tie_word_embeddings": False})
    model = EurekaAudioForCausalLM(config).eval()
    with torch.no_grad():
        # Random init at the default scale makes every answer one repeated token. Larger attention / MLP weights
        # make the next token depend on the context, and a larger output head puts the top logits far apart
        # (greedy picks are then far from ties).
        for name, param in model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.mul_(4.0)
        model.language_model.lm_head.weight.mul_(20.0)
    return model, EurekaAudioProcessor.preset("tiny")


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


class ServerThread:
    """An ASGI app on uvicorn in a background thread, on 127.0.0.1 and a free port; always stopped on exit."""

    def __init__(self, app, start_timeout: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout = start_timeout
        self.url = None

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)

    def __exit__(self, *exc):
        self.stop()
        assert not self.thread.is_alive(), "the test server did not stop"
