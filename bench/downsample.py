"""Fused audio downsampling benchmark: stack_norm_project vs the eager module chain (pad, reshape, norm, Linear,
activation, Linear, mask), full and ragged batches, measured in the same run, with the GEMM roofline (projection
FLOPs of the valid rows / the fp32 GEMM rate measured in the same run). Records the table in bench/RESULTS.md (ops
section).

Full-length batches are GEMM-bound: the Eureka preset's Linear(5120 -> 2048) is over 90% of the eager chain's time,
so the eager chain already runs close to the roofline there (bench/RESULTS.md); the fused op's gains come from
ragged batches (padding rows are never normalised or projected) and from the passes it saves around the GEMM
(stack + norm in one cache-resident pass, no masking pass).

    python bench/downsample.py [--repeats 3] [--no-record]
"""
import argparse
import os
import sys

import torch

from eureka_fast import ops
from eureka_fast.benchmarks import DOWNSAMPLE_CASES, record_section, run_downsample_table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only, do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    print(f"backend: {ops.backend()}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    table = run_downsample_table(DOWNSAMPLE_CASES, args.repeats)
    print(table)
    if not args.no_record:
        record_section("ops-downsample", "Fused audio downsampling (`python bench/downsample.py`)", table, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
