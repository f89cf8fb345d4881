"""CPU emulation of the tensor-core grouped GEMM kernel (csrc/cuda/gemm_kernels.cuh, tc_grouped_kernel).

Runs without a GPU. It replays the kernel's own index arithmetic -- device-side tile scheduling, the cp.async
loader (gather, gate/up interleave, zero-fill guards), the ldmatrix(.trans) fragment addresses and the epilogue --
on top of an independent model of the PTX instructions (ldmatrix m8n8.x4 with and without .trans, mma m16n8k16
row.col fragment layouts, as the PTX ISA documents them), and compares the result with a plain matrix product.
A wrong fragment address, loader mapping, gating interleave or guard shows up here as a wrong number.
Keep the transcription in step with the .cu file (the constants and formulas are copied one for one).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

BM, BN, BK, THREADS, PAD = 128, 128, 32, 256, 8
LDK, LDMN = BK + PAD, BM + PAD
TILE = max(BM * LDK, BK * LDMN)
_LANE = np.arange(32)
_G, _T = _LANE >> 2, _LANE & 3


# ---------------------------------------------------------------------------------------------------------------
# PTX model (independent of the kernel)
# ---------------------------------------------------------------------------------------------------------------
def ldmatrix_x4(smem, addr, trans):
    """addr[lane] = element offset of the row that lane provides (lane 8j+r -> row r of matrix j).
    Returns regs[lane, j, 2]: lane l holds (row l//4, cols 2(l%4), 2(l%4)+1) of matrix j, or of its transpose."""
    addr = np.asarray(addr)
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        mat = smem[addr[8 * j: 8 * j + 8][:, None] + np.arange(8)[None, :]]  # [8 rows][8 cols]
        if trans:
            mat = mat.T
        regs[:, j, 0] = mat[_G, 2 * _T]
        regs[:, j, 1] = mat[_G, 2 * _T + 1]
    return regs


def mma_m16n8k16(acc, a, b):
    """acc[lane, 4] += A(16x16, row) @ B(16x8, col) with the documented per-lane fragment layouts."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for e in range(2):
        A[_G, 2 * _T + e] = a[:, 0, e]
        A[_G + 8, 2 * _T + e] = a[:, 1, e]
        A[_G, 2 * _T + 8 + e] = a[:, 2, e]
        A[_G + 8, 2 * _T + 8 + e] = a[:, 3, e]
        B[2 * _T + e, _G] = b[:, 0, e]
        B[2 * _T + 8 + e, _G] = b[:, 1, e]
    C = A @ B
    acc[:, 0] += C[_G, 2 * _T]
    acc[:, 1] += C[_G, 2 * _T + 1]
    acc[:, 2] += C[_G + 8, 2 * _T]
    acc[:, 3] += C[_G + 8, 2 * _T + 1]


def silu(v):
    return v / (1.0 + np.exp(-v))


# ---------------------------------------------------------------------------------------------------------------
# The kernel, transcribed
# ---------------------------------------------------------------------------------------------------------------
def resolve_tile(p, group_k, bx, by, bz):
    if group_k:
        e = bz
        m0 = by * BM
        clamp = lambda v: min(max(v, 0), p["Kred"])  # noqa: E731  (Kred = number of rows S)
        return (m0 < p["M"]), dict(e=e, m0=m0, m_end=p["M"], k_begin=clamp(p["offsets"][e]),
                                   k_end=clamp(p["offsets"][e + 1]))
    slot, running = by, 0
    for e in range(p["E"]):  # the warp scan, sequentially
        lo, hi = p["offsets"][e], p["offsets"][e + 1]
        tiles = (hi - lo + BM - 1) // BM if hi > lo else 0
        if running <= slot < running + tiles:
            return True, dict(e=e, m0=lo + (slot - running) * BM, m_end=hi, k_begin=0, k_end=p["Kred"])
        running += tiles
    return False, None


def run_block(p, A_MC, B_NC, GROUP_K, GATED, GATHER, bx, by, bz, out):
    ok_tile, ti = resolve_tile(p, GROUP_K, bx, by, bz)
    if not ok_tile:
        return
    A, Bw = p["a"], p["b"]
    I = p["N"] // 2
    n0 = bx * (BN // 2 if GATED else BN)
    b_off = ti["e"] * p["b_es"]
    lda = p["a_sk"] if A_MC else p["a_sm"]
    ldb = p["b_sk"] if B_NC else p["b_sn"]

    def b_row(r):
        if GATED:
            h = (r & 31) >> 4
            c = n0 + (r >> 5) * 16 + (r & 15)
            return h * I + c, c < I
        n = n0 + r
        return n, n < p["N"]

    desc = []
    for tid in range(THREADS):
        for i in range(2):
            c = tid + i * THREADS
            d = {}
            if not A_MC:
                r, kc = c >> 2, (c & 3) * 8
                m = ti["m0"] + r
                d["a_ok"] = m < ti["m_end"]
                src_row = m
                if GATHER:
                    src_row = p["gather"][m] // p["gather_div"] if d["a_ok"] else 0
                d["a_base"], d["a_kr"], d["a_dst"] = src_row * lda + kc, kc, r * LDK + kc
            else:
                kr, mc = c >> 4, (c & 15) * 8
                m = ti["m0"] + mc
                d["a_ok"] = m < ti["m_end"]
                d["a_base"], d["a_kr"], d["a_dst"] = m, kr, kr * LDMN + mc
            if not B_NC:
                r, kc = c >> 2, (c & 3) * 8
                n, okb = b_row(r)
                d["b_ok"], d["b_base"], d["b_kr"], d["b_dst"] = okb, n * ldb + kc, kc, r * LDK + kc
            else:
                kr, nc = c >> 4, (c & 15) * 8
                n, okb = b_row(nc)
                d["b_ok"], d["b_base"], d["b_kr"], d["b_dst"] = okb, n, kr, kr * LDMN + nc
            desc.append(d)

    acc = np.zeros((8, 4, 4, 32, 4))  # [warp][mf][nf][lane][4]
    k_len = ti["k_end"] - ti["k_begin"]
    KT = (k_len + BK - 1) // BK if k_len > 0 else 0
    for kt in range(KT):
        sA = np.full(TILE, np.nan)
        sB = np.full(TILE, np.nan)  # never-written shared memory is NaN: reading it poisons the result
        kk0 = ti["k_begin"] + kt * BK
        for d in desc:
            kk = kk0 + d["a_kr"]
            ok = d["a_ok"] and kk < ti["k_end"]
            if ok:
                src = kk * lda + d["a_base"] if A_MC else d["a_base"] + kk0
                sA[d["a_dst"]: d["a_dst"] + 8] = A[src: src + 8]
            else:
                sA[d["a_dst"]: d["a_dst"] + 8] = 0.0
            kk = kk0 + d["b_kr"]
            ok = d["b_ok"] and kk < ti["k_end"]
            if ok:
                src = b_off + (kk * ldb + d["b_base"] if B_NC else d["b_base"] + kk0)
                sB[d["b_dst"]: d["b_dst"] + 8] = Bw[src: src + 8]
            else:
                sB[d["b_dst"]: d["b_dst"] + 8] = 0.0
        for warp in range(8):
            wm, wn = warp >> 2, warp & 3
            for ks in range(BK // 16):
                af = []
                for mf in range(4):
                    addr = []
                    for lane in range(32):
                        if not A_MC:
                            r = wm * 64 + mf * 16 + (lane & 15)
                            k = ks * 16 + (lane >> 4) * 8
                            addr.append(r * LDK + k)
                        else:
                            j = lane >> 3
                            k = ks * 16 + (j >> 1) * 8 + (lane & 7)
                            m = wm * 64 + mf * 16 + (j & 1) * 8
                            addr.append(k * LDMN + m)
                    af.append(ldmatrix_x4(sA, addr, A_MC))
                bfr = [None] * 4
                for pp in range(2):
                    addr = []
                    for lane in range(32):
                        j = lane >> 3
                        if not B_NC:
                            n = wn * 32 + pp * 16 + (j >> 1) * 8 + (lane & 7)
                            k = ks * 16 + (j & 1) * 8
                            addr.append(n * LDK + k)
                        else:
                            k = ks * 16 + (j & 1) * 8 + (lane & 7)
                            n = wn * 32 + pp * 16 + (j >> 1) * 8
                            addr.append(k * LDMN + n)
                    r4 = ldmatrix_x4(sB, addr, B_NC)
                    bfr[2 * pp] = r4[:, 0:2]
                    bfr[2 * pp + 1] = r4[:, 2:4]
                for mf in range(4):
                    for nf in range(4):
                        mma_m16n8k16(acc[warp, mf, nf], af[mf], bfr[nf])

    nout = I if GATED else p["N"]
    base = ti["e"] * p["out_es"] if GROUP_K else 0
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        for lane in range(32):
            g, t4 = lane >> 2, lane & 3
            for mf in range(4):
                for h in range(2):
                    row = ti["m0"] + wm * 64 + mf * 16 + g + h * 8
                    if row >= ti["m_end"]:
                        continue
                    if GATED:
                        for nf in range(2):
                            col = n0 + wn * 16 + nf * 8 + 2 * t4
                            for q in range(2):
                                if col + q < nout:
                                    gt = acc[warp, mf, nf, lane, 2 * h + q]
                                    up = acc[warp, mf, nf + 2, lane, 2 * h + q]
                                    out[base + row * p["ldo"] + col + q] = silu(gt) * up
                    else:
                        for nf in range(4):
                            col = n0 + wn * 32 + nf * 8 + 2 * t4
                            for q in range(2):
                                if col + q < nout:
                                    out[base + row * p["ldo"] + col + q] = acc[warp, mf, nf, lane, 2 * h + q]


def run_kernel(p, A_MC, B_NC, GROUP_K, GATED, GATHER, grid, out_size):
    out = np.full(out_size, np.nan)
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                run_block(p, A_MC, B_NC, GROUP_K, GATED, GATHER, bx, by, bz, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cases: the host-side setups of grouped_mm.cu (forward, gated + gather, dA, dW)
# ---------------------------------------------------------------------------------------------------------------
COUNTS = [3, 0, 140, 5]  # zero-token expert, one expert with two M tiles, partial tiles


def offsets_of(counts):
    return [0] + list(np.cumsum(counts))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("b_layout", ["k", "n"])
@pytest.mark.parametrize("gather", [False, True])
def test_forward_tile_math(gated, b_layout, gather):
    rng = np.random.default_rng(1)
    E, K, N = len(COUNTS), 48, (160 if gated else 144)
    offs = offsets_of(COUNTS)
    S = offs[-1]
    k_top = 2
    T_src = (S + k_top - 1) // k_top + 1 if gather else S
    x = rng.standard_normal((T_src, K))
    gidx = rng.permutation(T_src * k_top)[:S] if gather else None  # "sorted rows": source token = row // k
    a_logical = x[gidx // k_top] if gather else x[:S]
    w = rng.standard_normal((E, N, K))
    if b_layout == "k":
        wb, b_es, b_sn, b_sk = w.reshape(-1), N * K, K, 1
    else:  # the [E, N, K] view of a [E, K, N] tensor
        wb, b_es, b_sn, b_sk = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1), N * K, 1, N
    nout = N // 2 if gated else N
    p = dict(a=(x if gather else x[:S]).reshape(-1), a_sm=K, a_sk=1, gather=gidx, gather_div=k_top, b=wb, b_es=b_es,
             b_sn=b_sn, b_sk=b_sk, offsets=offs, E=E, M=S, N=N, Kred=K, ldo=nout, out_es=0)
    grid = (math.ceil(nout / (BN // 2 if gated else BN)), math.ceil(S / BM) + E, 1)
    out = run_kernel(p, False, b_layout == "n", False, gated, gather, grid, S * nout).reshape(S, nout)
    want = np.zeros((S, nout))
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        h = a_logical[lo:hi] @ w[e].T
        want[lo:hi] = silu(h[:, : N // 2]) * h[:, N // 2:] if gated else h
    assert not np.isnan(out).any(), "unwritten output elements"
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)


def test_grad_a_tile_math():
    """dA = dpre . W_e: A k-contiguous (dpre), B n-contiguous (W_e read as B(n=k_out, kk=n))."""
    rng = np.random.default_rng(2)
    E, K, N = len(COUNTS), 136, 64
    offs = offsets_of(COUNTS)
    S = offs[-1]
    dpre = rng.standard_normal((S, N))
    w = rng.standard_normal((E, N, K))
    p = dict(a=dpre.reshape(-1), a_sm=N, a_sk=1, gather=None, gather_div=1, b=w.reshape(-1), b_es=N * K, b_sn=1,
             b_sk=K, offsets=offs, E=E, M=S, N=K, Kred=N, ldo=K, out_es=0)
    grid = (math.ceil(K / BN), math.ceil(S / BM) + E, 1)
    out = run_kernel(p, False, True, False, False, False, grid, S * K).reshape(S, K)
    want = np.zeros((S, K))
    for e in range(E):
        want[offs[e]:offs[e + 1]] = dpre[offs[e]:offs[e + 1]] @ w[e]
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)


def test_grad_w_tile_math():
    """dW[e] = dpre[rows e]^T . a[rows e]: both operands row-strided, reduction over a ragged row range."""
    rng = np.random.default_rng(3)
    E, K, N = len(COUNTS), 40, 136
    offs = offsets_of(COUNTS)
    S = offs[-1]
    dpre = rng.standard_normal((S, N))
    a = rng.standard_normal((S, K))
    p = dict(a=dpre.reshape(-1), a_sm=1, a_sk=N, gather=None, gather_div=1, b=a.reshape(-1), b_es=0, b_sn=1, b_sk=K,
             offsets=offs, E=E, M=N, N=K, Kred=S, ldo=K, out_es=N * K)
    grid = (math.ceil(K / BN), math.ceil(N / BM), E)
    out = run_kernel(p, True, True, True, False, False, grid, E * N * K).reshape(E, N, K)
    want = np.stack([dpre[offs[e]:offs[e + 1]].T @ a[offs[e]:offs[e + 1]] for e in range(E)])
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)
    assert (out[1] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Hopper wgmma kernel (wgmma_grouped_kernel): swizzled cp.async writes, descriptor reads, accumulator layout
# ---------------------------------------------------------------------------------------------------------------
WG_BM, WG_BK = 128, 64


def wg_read_kmajor(smem_bytes, start, rows):
    """A K-major operand of `rows` x 16 elements read through an sm90 descriptor with 128-byte swizzle:
    8-row groups 1024 bytes apart (stride byte offset), rows 128 bytes apart, and the 16-byte chunk index within a
    row XOR-ed with address bits 7-9 (the row within its 8-row group when the tile is 1024-byte aligned)."""
    r = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    logical = start + (r // 8) * 1024 + (r % 8) * 128 + 2 * k
    phys = logical ^ (((logical >> 7) & 7) << 4)
    return smem_bytes[phys // 2]


def wg_accumulate(acc, A, B):
    """acc[warp in warpgroup][lane][N/2] += A(64x16) @ B(Nx16)^T in the wgmma m64nNk16 accumulator layout:
    warp w holds rows 16w..16w+15; n8 chunk i -> d[4i], d[4i+1] at (row g, cols 8i+2t, +1), d[4i+2], d[4i+3] at
    row g + 8."""
    C = A @ B.T
    for w in range(4):
        for i in range(B.shape[0] // 8):
            for q in range(2):
                acc[w, :, 4 * i + q] += C[16 * w + _G, 8 * i + 2 * _T + q]
                acc[w, :, 4 * i + 2 + q] += C[16 * w + _G + 8, 8 * i + 2 * _T + q]


def run_wg_block(p, WG_BN, GATED, GATHER, bx, by, out):
    ok_tile, ti = resolve_tile(p, False, bx, by, 0)
    if not ok_tile:
        return
    A, Bw = p["a"], p["b"]
    I = p["N"] // 2
    n0 = bx * (WG_BN // 2 if GATED else WG_BN)
    b_off = ti["e"] * p["b_es"]
    lda, ldb = p["a_sm"], p["b_sn"]
    a_desc, b_desc = [], []
    for tid in range(256):
        for i in range(4):
            c = tid + i * 256
            r, ch = c >> 3, c & 7
            d = dict(kc=ch * 8, dst=r * 128 + ((ch ^ (r & 7)) << 4))
            m = ti["m0"] + r
            d["ok"] = m < ti["m_end"]
            src_row = m
            if GATHER:
                src_row = p["gather"][m] // p["gather_div"] if d["ok"] else 0
            d["base"] = src_row * lda + d["kc"]
            a_desc.append(d)
        for i in range(WG_BN * 8 // 256):
            c = tid + i * 256
            r, ch = c >> 3, c & 7
            d = dict(kc=ch * 8, dst=r * 128 + ((ch ^ (r & 7)) << 4))
            if GATED:
                cc = n0 + (r & (WG_BN // 2 - 1))
                d["ok"], n = cc < I, (r // (WG_BN // 2)) * I + cc
            else:
                n = n0 + r
                d["ok"] = n < p["N"]
            d["base"] = b_off + n * ldb + d["kc"]
            b_desc.append(d)
    acc = np.zeros((2, 4, 32, WG_BN // 2))  # [warpgroup][warp][lane][N/2]
    KT = (ti["k_end"] + WG_BK - 1) // WG_BK
    for kt in range(KT):
        sA = np.full(WG_BM * WG_BK, np.nan)
        sB = np.full(WG_BN * WG_BK, np.nan)
        kk0 = kt * WG_BK
        for sm, src_arr, descs in ((sA, A, a_desc), (sB, Bw, b_desc)):
            for d in descs:
                j = d["dst"] // 2
                if d["ok"] and kk0 + d["kc"] < ti["k_end"]:
                    sm[j: j + 8] = src_arr[d["base"] + kk0: d["base"] + kk0 + 8]
                else:
                    sm[j: j + 8] = 0.0
        for wgi in range(2):
            for s in range(WG_BK // 16):
                Am = wg_read_kmajor(sA, wgi * 64 * 128 + s * 32, 64)
                Bm = wg_read_kmajor(sB, s * 32, WG_BN)
                wg_accumulate(acc[wgi], Am, Bm)
    nout = I if GATED else p["N"]
    for wgi in range(2):
        for wi in range(4):
            for lane in range(32):
                g, t4 = lane >> 2, lane & 3
                for h in range(2):
                    row = ti["m0"] + wgi * 64 + wi * 16 + g + h * 8
                    if row >= ti["m_end"]:
                        continue
                    a = acc[wgi, wi, lane]
                    chunks = WG_BN // 8
                    for i in range(chunks // 2 if GATED else chunks):
                        col = n0 + i * 8 + 2 * t4
                        for q in range(2):
                            if col + q >= nout:
                                continue
                            if GATED:
                                v = silu(a[4 * i + 2 * h + q]) * a[4 * (i + chunks // 2) + 2 * h + q]
                            else:
                                v = a[4 * i + 2 * h + q]
                            out[row * p["ldo"] + col + q] = v


@pytest.mark.parametrize("bn", [128, 256])
@pytest.mark.parametrize("gated,gather", [(False, False), (True, True)])
def test_wgmma_forward_tile_math(bn, gated, gather):
    rng = np.random.default_rng(4)
    counts = [3, 0, 133, 2]
    E, K, N = len(counts), 80, (144 if gated else 136) * (2 if bn == 256 else 1)
    offs = offsets_of(counts)
    S = offs[-1]
    k_top = 2
    T_src = (S + k_top - 1) // k_top + 1 if gather else S
    x = rng.standard_normal((T_src, K))
    gidx = rng.permutation(T_src * k_top)[:S] if gather else None
    a_logical = x[gidx // k_top] if gather else x
    w = rng.standard_normal((E, N, K))
    nout = N // 2 if gated else N
    p = dict(a=x.reshape(-1), a_sm=K, a_sk=1, gather=gidx, gather_div=k_top, b=w.reshape(-1), b_es=N * K, b_sn=K,
             b_sk=1, offsets=offs, E=E, M=S, N=N, Kred=K, ldo=nout, out_es=0)
    out = np.full(S * nout, np.nan)
    for by in range(math.ceil(S / WG_BM) + E):
        for bx in range(math.ceil(nout / (bn // 2 if gated else bn))):
            run_wg_block(p, bn, gated, gather, bx, by, out)
    out = out.reshape(S, nout)
    want = np.zeros((S, nout))
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        h = a_logical[lo:hi] @ w[e].T
        want[lo:hi] = silu(h[:, : N // 2]) * h[:, N // 2:] if gated else h
    assert not np.isnan(out).any(), "unwritten output elements"
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# moe_plan (csrc/cuda/moe_plan.cu): warp histogram, per-warp prefix, warp scan of offsets, stable warp scatter with
# __match_any_sync ranks. Both launch paths (one block; three launches over chunks) are replayed warp by warp.
# ---------------------------------------------------------------------------------------------------------------
def warp_scatter(ids, r0, r1, E, cursor, sorted_rows, inverse_rows):
    for r in range(r0, r1, 32):
        es = [int(ids[r + lane]) if r + lane < r1 and 0 <= ids[r + lane] < E else -1 for lane in range(32)]
        peers = [[m for m in range(32) if es[m] == es[lane]] for lane in range(32)]  # __match_any_sync
        pos = [cursor[es[lane]] + sum(1 for m in peers[lane] if m < lane) if es[lane] >= 0 else 0 for lane in range(32)]
        for lane in range(32):  # after __syncwarp
            e = es[lane]
            if e >= 0:
                sorted_rows[pos[lane]] = r + lane
                inverse_rows[r + lane] = pos[lane]
                if not any(m < lane for m in peers[lane]):
                    cursor[e] += len(peers[lane])


def scan_offsets(tot, E, block):
    counts = np.array(tot, dtype=np.int64)
    padded = (counts + block - 1) // block * block if block > 0 else counts
    offsets = np.concatenate([[0], np.cumsum(counts)])
    poffs = np.concatenate([[0], np.cumsum(padded)])
    return counts, offsets, poffs, offsets[:-1].copy()


def plan_small(ids, E, block, smem_budget=48 * 1024):
    n = len(ids)
    W = min(32, (smem_budget - 8 * E) // (4 * E))
    W = max(1, min(W, -(-n // 32)))
    chunk = max(32, -(-(-(-n // W)) // 32) * 32)
    hist = np.zeros((W, E), dtype=np.int64)
    for w in range(W):
        for r in range(min(n, w * chunk), min(n, (w + 1) * chunk)):
            if 0 <= ids[r] < E:
                hist[w, ids[r]] += 1
    tot = hist.sum(0)
    hist = np.cumsum(hist, 0) - hist  # exclusive prefix over warps
    counts, offsets, poffs, base = scan_offsets(tot, E, block)
    hist += base[None, :]
    srt, inv = np.full(n, -1), np.full(n, -1)
    for w in range(W):
        warp_scatter(ids, min(n, w * chunk), min(n, (w + 1) * chunk), E, hist[w], srt, inv)
    return counts, offsets, poffs, srt, inv


def plan_large(ids, E, block, chunk):
    n = len(ids)
    nchunks = -(-n // chunk)
    cc = np.zeros((nchunks, E), dtype=np.int64)
    for c in range(nchunks):
        for r in range(c * chunk, min(n, (c + 1) * chunk)):
            cc[c, ids[r]] += 1
    tot = cc.sum(0)
    cc = np.cumsum(cc, 0) - cc
    counts, offsets, poffs, base = scan_offsets(tot, E, block)
    cc += base[None, :]
    srt, inv = np.full(n, -1), np.full(n, -1)
    for c in range(nchunks):
        warp_scatter(ids, c * chunk, min(n, (c + 1) * chunk), E, cc[c], srt, inv)
    return counts, offsets, poffs, srt, inv


@pytest.mark.parametrize("n,E", [(0, 4), (1, 8), (33, 8), (700, 60), (2048, 128), (300, 3000)])
@pytest.mark.parametrize("path", ["small", "large"])
def test_plan_math(n, E, path):
    rng = np.random.default_rng(n + E)
    ids = (rng.zipf(1.5, n) - 1) % E if n else np.zeros(0, dtype=np.int64)  # skewed, repeats within a warp step
    block = 16
    got = plan_small(ids, E, block) if path == "small" else plan_large(ids, E, block, 64)
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=E)
    assert np.array_equal(got[0], counts)
    assert np.array_equal(got[1], np.concatenate([[0], np.cumsum(counts)]))
    assert np.array_equal(got[2], np.concatenate([[0], np.cumsum((counts + block - 1) // block * block)]))
    assert np.array_equal(got[3], order)
    assert np.array_equal(got[4][order], np.arange(n))
