"""`python -m eureka_fast.train` / `torchrun --nproc_per_node N -m eureka_fast.train --config X.yaml [...]`:
`eureka-audio train` with the same options, errors and interruption handling."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from eureka_fast.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
