"""DataFlux: the closed-loop pipeline that turns raw audio into verified instruction data (docs/dataflux.md).

caption -> query generation from a taxonomy -> two answerers -> judge -> regenerate failures (up to N rounds) ->
sharded JSONL training records (docs/INTERFACES.md conversation format) + rejected/ + stats.

Entry points: `eureka-audio dataflux run|resume|stats` (cli.py) or `run_dataflux(audio_dir, out, load_config(path))`.
Heavy optional packages (parselmouth, webrtcvad, aiohttp, ray, ASR) are imported only when a role needs them.
"""


def __getattr__(name):
    if name in ("run_dataflux", "load_config"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'eureka_fast.dataflux' has no attribute {name!r}")
