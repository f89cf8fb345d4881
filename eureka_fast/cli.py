"""The `eureka-audio` command line. Each subcommand lives next to the code it drives and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> the module that defines add_subcommand(subparsers), which adds its parser and sets `func`.
_SUBCOMMAND_MODULES = {
    "bench": "eureka_fast.benchmarks",
    "infer": "eureka_fast.inference",
    "train": "eureka_fast.train.cli",
    "eval": "eureka_fast.train.cli",
    "dataflux": "eureka_fast.dataflux.cli",
    "doctor": "eureka_fast.doctor",
}


def build_parser(command=None) -> argparse.ArgumentParser:
    """The full parser, or only `command`'s part of it (so `eureka-audio dataflux ...` never imports torch)."""
    parser = argparse.ArgumentParser(prog="eureka-audio", description="Eureka-Audio: fast kernels, model, training, DataFlux")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [_SUBCOMMAND_MODULES[command]] if command in _SUBCOMMAND_MODULES else _SUBCOMMAND_MODULES.values()
    for name in dict.fromkeys(names):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the package is not installed in this build
            raise
        module.add_subcommand(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
