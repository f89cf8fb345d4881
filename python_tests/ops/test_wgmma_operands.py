"""The generated wgmma specialisations (csrc/cuda/gemm_kernels.cuh): after preprocessing, each names its N / 2
accumulators %0 .. %(N/2 - 1) in order, binds d[0] .. d[N/2 - 1] to them in the same order, and takes the two
descriptors and the scale-d immediate as the next three operands, as PTX's wgmma.mma_async m64nNk16 expects.
Needs only a C preprocessor, no GPU."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "gemm_kernels.cuh")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cpp") is None, reason="no C preprocessor")
def test_wgmma_specialisations_bind_every_accumulator_in_order():
    text = open(SOURCE).read()
    start = text.index("#define EF_WG_REG(")
    end = text.index("\n", text.rindex("EF_WGMMA_SPECIALISATION("))
    cmd = ["g++", "-E", "-P", "-x", "c++", "-"] if shutil.which("g++") else ["cpp", "-P"]
    out = subprocess.run(cmd, input=text[start:end], capture_output=True, text=True, check=True).stdout
    out = re.sub(r'"\s*"', "", " ".join(out.split()))  # one line, adjacent string literals joined
    specs = re.findall(r"wgmma_m64nk16<(\d+), (\w+)>\(float ?\(&d\)\[[^\]]+\], uint64_t da, uint64_t db\) \{ "
                       r"asm volatile\( ?\"(.*?)\" ?: (.*?) ?: \"l\"\(da\), \"l\"\(db\), \"n\"\(1\)\); \}", out)
    assert sorted((int(n), t) for n, t, _, _ in specs) == [(128, "__half"), (128, "__nv_bfloat16"),
                                                          (256, "__half"), (256, "__nv_bfloat16")]
    for n, ctype, asm, operands in specs:
        n = int(n)
        acc = n // 2
        ptx_type = {"__nv_bfloat16": "bf16", "__half": "f16"}[ctype]
        assert f"setp.ne.b32 p, %{acc + 2}, 0;" in asm
        assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx_type}.{ptx_type} " in asm
        regs = re.search(r"\{(%[^}]*)\}, %(\d+), %(\d+), p, 1, 1, 0, 0;", asm)
        assert regs, asm
        assert regs.group(1) == ", ".join(f"%{i}" for i in range(acc))
        assert (int(regs.group(2)), int(regs.group(3))) == (acc, acc + 1)
        indices = [eval(e) for e in re.findall(r'"\+f"\(d\[([0-9() +]+)\]\)', operands)]  # noqa: S307 (digits)
        assert indices == list(range(acc))
