"""`python -m eureka_fast.train` / `torchrun --nproc_per_node N -m eureka_fast.train --config X.yaml [...]`:
the same options as `eureka-audio train`."""
from __future__ import annotations

import argparse
import sys

from .cli import add_train_arguments, run_train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eureka_fast.train", description=__doc__)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
