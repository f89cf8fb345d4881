"""The `eureka-audio` command line. Each subcommand lives next to the code it drives and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand module -> it defines add_subcommand(subparsers), which adds its parser and sets `func`.
_SUBCOMMAND_MODULES = (
    "eureka_fast.benchmarks",  # bench
    "eureka_fast.inference",  # infer
    "eureka_fast.train.cli",  # train, eval
    "eureka_fast.dataflux.cli",  # dataflux run|stats|resume
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eureka-audio", description="Eureka-Audio: fast kernels, model, training, DataFlux")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the package is not installed in this build
            raise
        module.add_subcommand(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
