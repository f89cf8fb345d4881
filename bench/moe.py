"""MoE expert-layer benchmark: fused_experts vs the transformers eager loop, torch._grouped_mm and the CPU roofline,
all measured in the same run. Prints the table and records it in bench/RESULTS.md (ops section).

    python bench/moe.py [--repeats 5] [--no-record] [--shapes "64,1024,512,64,8;1,1024,512,64,8"] [--dtype bf16]

--dtype bf16 runs the same layer with bf16 activations and weights (a transformers model in bf16); its roofline is
the bandwidth term at 2 bytes per weight or the fp32 GEMM term, and it is recorded in its own section.
"""
import argparse
import os
import sys

import torch

from eureka_fast import ops
from eureka_fast.benchmarks import MOE_SHAPES, record_section, run_moe_table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=None, help="T,H,I,E,k tuples separated by ';' (default: the issue's six)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not update bench/RESULTS.md")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    shapes = MOE_SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    print(f"backend: {ops.backend()}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    table, _ = run_moe_table(shapes, args.repeats, log=lambda m: print(m, flush=True), dtype=dtype)
    print(table)
    if not args.no_record:
        if dtype == torch.float32:
            record_section("ops-moe", "MoE expert layer (`python bench/moe.py`)", table, RESULTS)
        else:
            record_section("ops-moe-bf16", "MoE expert layer, bf16 (`python bench/moe.py --dtype bf16`)", table,
                           RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
