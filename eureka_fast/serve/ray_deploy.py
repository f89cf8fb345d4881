"""`eureka-audio serve --ray-replicas N`: the same app on Ray Serve, each replica its own model and engine, behind
Ray's HTTP proxy (which spreads requests over the replicas)."""
from __future__ import annotations

import os
import signal
import sys
import threading


def _replica_settings(args) -> dict:
    """What a replica needs to build its engine and app (plain values: they travel to the replica processes)."""
    keys = ("model", "device", "dtype", "max_num_seqs", "max_queue", "queue_timeout", "max_model_len",
            "max_prefill_windows", "max_prefill_tokens", "served_model_name", "api_key_env", "max_audio_seconds",
            "max_body_mb", "allow_local_audio", "allow_remote_audio", "remote_audio_timeout", "ray_replicas")
    settings = {k: getattr(args, k) for k in keys}
    settings["model"] = os.path.abspath(settings["model"])
    if settings["allow_local_audio"]:
        settings["allow_local_audio"] = os.path.abspath(settings["allow_local_audio"])
    # the key itself goes to the replicas (their environment is Ray's, not this shell's)
    settings["api_key"] = os.environ.get(args.api_key_env) if args.api_key_env else None
    return settings


def build_replica_app(settings: dict):
    """The ASGI app of one replica (runs inside the replica's process)."""
    import argparse

    import torch

    from .app import create_app
    from .cli import build_engine, serve_options

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, settings["ray_replicas"])))
    args = argparse.Namespace(**settings)
    options = serve_options(args)
    options.api_key = settings["api_key"]
    return create_app(build_engine(args), options)


def run_ray(args) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        print(f"eureka-audio serve: --ray-replicas needs Ray Serve ({exc.name} is missing): "
              f"pip install 'ray[serve]'", file=sys.stderr)
        return 2
    from .cli import ready_lines, serve_options

    settings = _replica_settings(args)
    options = serve_options(args)
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        # replicas need no whole CPU reserved each: the model's threads are set per replica
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(os.cpu_count() or 1, args.ray_replicas))
    stop = threading.Event()
    stopped_by = []

    def on_signal(sig, frame):
        stopped_by.append(sig)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deployment = serve.deployment(serve.ingress(lambda: build_replica_app(settings))(),
                                      name="eureka-audio", num_replicas=args.ray_replicas,
                                      ray_actor_options={"num_cpus": 1},
                                      max_ongoing_requests=max(args.max_num_seqs + args.max_queue, 1))
        serve.run(deployment.bind(), name="eureka-audio", route_prefix="/", blocking=False)
        if not stop.is_set():
            print(ready_lines(args.host, args.port, options) +
                  f"\n  ({args.ray_replicas} Ray Serve replicas behind Ray's HTTP proxy)", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if stopped_by:
        print(f"eureka-audio serve: stopped ({signal.Signals(stopped_by[0]).name})", flush=True)
    return 0
