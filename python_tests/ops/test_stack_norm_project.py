"""stack_norm_project against the reference, an eager chain written here, conv1d, and the published presets."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eureka_fast.ops as ops
from eureka_fast.ops import reference as ref
from eureka_fast.integrations.downsample_presets import DOWNSAMPLE_PRESETS, downsample_preset, ultravox_projector_args

pytestmark = [
    pytest.mark.skipif(ops.backend() != "compiled", reason="eureka_fast._C is not built"),
    pytest.mark.usefixtures("poisoned_empty_tensors"),
]

FP32 = dict(atol=2e-5, rtol=1e-4)


def eager_chain(x, k, norm, nw, nb, w1, b1, activation, w2, b2, eps=1e-5):
    """The plain module chain an adapter would write (full-length clips): pad, reshape, norm, Linear, act, Linear."""
    B, T, D = x.shape
    T_out = math.ceil(T / k)
    h = F.pad(x, (0, 0, 0, T_out * k - T)).reshape(B, T_out, k * D)
    if norm == "layer":
        h = F.layer_norm(h, (k * D,), nw, nb, eps)
    elif norm == "rms":
        h = F.rms_norm(h, (k * D,), nw, eps)
    h = F.linear(h, w1, b1)
    if activation == "silu":
        h = F.silu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    if w2 is not None:
        h = F.linear(h, w2, b2)
    return h


def params(width, hidden, out, gen, *, norm="layer", activation="silu", mlp=False):
    nw = torch.randn(width, generator=gen) * 0.2 + 1 if norm in ("layer", "rms") else None
    nb = torch.randn(width, generator=gen) * 0.1 if norm == "layer" else None
    n1 = 2 * hidden if activation == "swiglu" else hidden
    w1 = torch.randn(n1, width, generator=gen) / math.sqrt(width)
    b1 = torch.randn(n1, generator=gen) * 0.1
    w2 = torch.randn(out, hidden, generator=gen) / math.sqrt(hidden) if mlp else None
    b2 = torch.randn(out, generator=gen) * 0.1 if mlp else None
    return dict(norm=norm, norm_weight=nw, norm_bias=nb, w1=w1, b1=b1, activation=activation, w2=w2, b2=b2)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("norm,activation,mlp", [("layer", "silu", False), (None, "gelu", True), ("rms", "swiglu", True),
                                                 (None, None, False)])
def test_matches_eager_chain_and_reference(k, T, norm, activation, mlp):
    gen = torch.Generator().manual_seed(k * 100 + T)
    B, D = 3, 10
    x = torch.randn(B, T, D, generator=gen)
    p = params(k * D, 12, 9, gen, norm=norm, activation=activation, mlp=mlp)
    out = ops.stack_norm_project(x, k, **p)
    assert out.shape[:2] == (B, math.ceil(T / k))
    torch.testing.assert_close(out, ref.stack_norm_project(x, k, None, norm, p["norm_weight"], p["norm_bias"], p["w1"],
                                                           p["b1"], activation, p["w2"], p["b2"]), **FP32)
    # with T % k != 0 the eager chain zero-pads the tail frames before the norm, which is our semantics too
    torch.testing.assert_close(out, eager_chain(x, k, norm, p["norm_weight"], p["norm_bias"], p["w1"], p["b1"],
                                                activation, p["w2"], p["b2"]), **FP32)


@pytest.mark.parametrize("k,T", [(4, 16), (4, 10), (3, 7), (8, 8)])
def test_stack_linear_equals_conv1d(k, T):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, T, 6, generator=gen)
    w1 = torch.randn(5, k * 6, generator=gen)
    b1 = torch.randn(5, generator=gen)
    out = ops.stack_norm_project(x, k, norm=None, w1=w1, b1=b1, activation=None)
    torch.testing.assert_close(out, ref.conv1d_downsample(x, k, w1, b1), **FP32)


@pytest.mark.parametrize("pool", ["stack", "mean"])
@pytest.mark.parametrize("norm,activation,mlp", [("layer", "silu", False), ("rms", "swiglu", True), (None, None, False)])
def test_ragged_lengths(pool, norm, activation, mlp):
    gen = torch.Generator().manual_seed(9)
    B, T, D, k = 4, 19, 8, 4
    x = torch.randn(B, T, D, generator=gen)
    lengths = torch.tensor([19, 5, 0, 12])
    width = D if pool == "mean" else k * D
    p = params(width, 10, 6, gen, norm=norm, activation=activation, mlp=mlp)
    out = ops.stack_norm_project(x, k, lengths=lengths, pool=pool, **p)
    want = ref.stack_norm_project(x, k, lengths, norm, p["norm_weight"], p["norm_bias"], p["w1"], p["b1"], activation,
                                  p["w2"], p["b2"], 1e-5, pool)
    torch.testing.assert_close(out, want, **FP32)
    # each clip alone, cut to its own length, gives the same valid rows; rows past ceil(len / k) are zero
    for b, n in enumerate(lengths.tolist()):
        rows = math.ceil(n / k)
        assert bool((out[b, rows:] == 0).all())
        if n:
            alone = ops.stack_norm_project(x[b:b + 1, :n], k, pool=pool, **p)
            torch.testing.assert_close(out[b, :rows], alone[0], **FP32)


def test_mean_pool_matches_avg_pool():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 30, 16, generator=gen)
    out = ops.stack_norm_project(x, 2, pool="mean", norm=None, activation=None)
    torch.testing.assert_close(out, F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2), **FP32)


# ---- The published downsamplers, written here as the modules their projects define (not with our op) ----------
class StackFrames(nn.Module):
    """Ultravox's StackAudioFrames and Voxtral's reshape to [-1, k D]: zero-pad T to a multiple of k, then view
    k consecutive frames as one row (frame t*k+j in channels j*D..(j+1)*D)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        B, T, D = x.shape
        pad = -T % self.k
        return F.pad(x, (0, 0, 0, pad)).view(B, (T + pad) // self.k, self.k * D)


class LlamaRMSNorm(nn.Module):
    """Ultravox's RMSNorm (transformers LlamaRMSNorm, eps 1e-6)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, h):
        hf = h.float()
        return self.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)


class UltravoxSwiGLU(nn.Module):
    def forward(self, h):
        x, gate = h.chunk(2, dim=-1)  # Ultravox gates with the second half
        return F.silu(gate) * x


class UltravoxProjector(nn.Module):
    """stack -> ln_pre -> linear_1 -> SwiGLU -> ln_mid (v0.5+) -> linear_2 -> ln_post (v0.4.1-); trailing=None
    leaves both norms out (what the "ultravox" preset covers)."""

    def __init__(self, k, D, hidden, out, trailing):
        super().__init__()
        self.stack = StackFrames(k)
        self.ln_pre = LlamaRMSNorm(k * D)
        self.linear_1 = nn.Linear(k * D, hidden, bias=False)
        self.act = UltravoxSwiGLU()
        self.ln_mid = LlamaRMSNorm(hidden // 2) if trailing == "mid" else nn.Identity()
        self.linear_2 = nn.Linear(hidden // 2, out, bias=False)
        self.ln_post = LlamaRMSNorm(out) if trailing == "post" else nn.Identity()

    def forward(self, x):
        h = self.act(self.linear_1(self.ln_pre(self.stack(x))))
        return self.ln_post(self.linear_2(self.ln_mid(h)))


class VoxtralProjector(nn.Module):
    def __init__(self, D, hidden, out):
        super().__init__()
        self.stack = StackFrames(4)
        self.linear_1 = nn.Linear(4 * D, hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(self.stack(x))))


class Qwen2AudioPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.avg_pooler = nn.AvgPool1d(2, stride=2)

    def forward(self, x):
        return self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)


def swap_halves(w):
    """Ultravox's linear_1 rows <-> ours: its second (gate) half first. Its own inverse."""
    half = w.shape[0] // 2
    return torch.cat([w[half:], w[:half]])


def published_module(name, preset, D):
    """The published module for a preset, loaded (strictly: a bias the module lacks fails) with the preset's weights;
    and {preset key: (parameter name, map from that parameter to the preset's layout)}."""
    same = lambda t: t  # noqa: E731
    if name == "eureka":
        module = nn.Sequential(StackFrames(4), nn.LayerNorm(4 * D), nn.Linear(4 * D, preset["w1"].shape[0]), nn.SiLU())
        names = dict(norm_weight=("1.weight", same), norm_bias=("1.bias", same), w1=("2.weight", same),
                     b1=("2.bias", same))
    elif name == "voxtral":
        module = VoxtralProjector(D, preset["w1"].shape[0], preset["w2"].shape[0])
        names = dict(w1=("linear_1.weight", same), w2=("linear_2.weight", same))
    elif name == "ultravox":
        module = UltravoxProjector(8, D, preset["w1"].shape[0], preset["w2"].shape[0], trailing=None)
        names = dict(norm_weight=("ln_pre.weight", same), w1=("linear_1.weight", swap_halves),
                     w2=("linear_2.weight", same))
    else:
        module, names = Qwen2AudioPool(), {}
    for key in ("norm_bias", "b1", "b2"):
        if preset.get(key) is not None:
            names.setdefault(key, (f"<{key}: the published module has no such parameter>", same))
    module.load_state_dict({pname: fn(preset[key]) for key, (pname, fn) in names.items()}, strict=True)
    return module, names


def random_preset(name, D, gen):
    """A preset with every weight random (norm weights and biases included), so a misplaced one shows."""
    preset = downsample_preset(name, D, 10, hidden_dim=7, generator=gen)
    for key in ("norm_weight", "norm_bias"):
        if preset.get(key) is not None:
            preset[key] = torch.randn(preset[key].shape, generator=gen) * 0.2 + (1.0 if key == "norm_weight" else 0.0)
    return preset


def preset_case(name, seed, B, T, D):
    """(generator, random preset, its published module, the module's parameter names, frames [B, T, D]), all drawn
    in that order from one generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    preset = random_preset(name, D, gen)
    module, names = published_module(name, preset, D)
    return gen, preset, module, names, torch.randn(B, T, D, generator=gen)


@pytest.mark.parametrize("T", [24, 29, 5])  # a multiple of 8, a multiple of neither 2, 4 nor 8, shorter than one k
@pytest.mark.parametrize("name", sorted(DOWNSAMPLE_PRESETS))
def test_preset_matches_published_module(name, T):
    _, preset, module, _, x = preset_case(name, 12 + T, 2, T, 6)
    x = x * 0.05  # small frames: a wrong norm epsilon shows
    out = ops.stack_norm_project(x, **preset)
    k = preset["k"]
    assert out.shape[:2] == (2, math.ceil(T / k))
    want = module(x)
    if name == "qwen2-audio":
        # AvgPool1d drops an odd last frame; our op keeps it as a row of its own, the mean of the frames it has
        torch.testing.assert_close(out[:, :T // 2], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(out, F.avg_pool1d(x.transpose(1, 2), 2, 2, ceil_mode=True).transpose(1, 2))
        if T % 2:
            torch.testing.assert_close(out[:, -1], x[:, -1])
    else:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DOWNSAMPLE_PRESETS))
def test_preset_ragged_lengths(name):
    _, preset, module, _, x = preset_case(name, 13, 4, 27, 6)
    lengths = torch.tensor([27, 13, 1, 0])
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 1e3  # padding frames: must not leak into any row
    out = ops.stack_norm_project(x, lengths=lengths, **preset)
    k = preset["k"]
    for b, n in enumerate(lengths.tolist()):
        rows = math.ceil(n / k)
        assert bool((out[b, rows:] == 0).all()), f"clip {b}: rows past ceil({n} / {k}) must be zero"
        if n == 0:
            continue
        if name == "qwen2-audio":  # AvgPool1d keeps n // 2 rows (none for a 1-frame clip)
            if n >= 2:
                torch.testing.assert_close(out[b, :n // 2], module(x[b:b + 1, :n])[0], atol=1e-6, rtol=0)
            if n % 2:
                torch.testing.assert_close(out[b, rows - 1], x[b, n - 1])
        else:  # the clip alone, cut to its length
            torch.testing.assert_close(out[b, :rows], module(x[b:b + 1, :n])[0], atol=1e-5, rtol=1e-5)


def our_activation(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)  # ours: the first half gates
        return F.silu(gate) * up
    return {"silu": F.silu, "gelu": F.gelu, None: lambda t: t}[activation](h)


@pytest.mark.parametrize("name", [n for n in sorted(DOWNSAMPLE_PRESETS) if DOWNSAMPLE_PRESETS[n]["pool"] == "stack"])
def test_stacking_preset_equals_conv1d(name):
    # stack k + Linear is a conv1d with kernel = stride = k; the norm over a whole stacked row is not a convolution,
    # so it is left out here (the published-module test covers it)
    gen = torch.Generator().manual_seed(15)
    D, T = 6, 29
    preset = dict(random_preset(name, D, gen), norm=None, norm_weight=None, norm_bias=None)
    k, w1 = preset["k"], preset["w1"]
    x = torch.randn(2, T, D, generator=gen)
    w_conv = w1.view(w1.shape[0], k, D).permute(0, 2, 1)  # [out, D, k]: w_conv[o, d, j] = w1[o, j*D + d]
    h = F.conv1d(F.pad(x.transpose(1, 2), (0, -T % k)), w_conv, preset["b1"], stride=k).transpose(1, 2)
    h = our_activation(h, preset["activation"])
    if preset.get("w2") is not None:
        h = F.linear(h, preset["w2"], preset["b2"])
    torch.testing.assert_close(ops.stack_norm_project(x, **preset), h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DOWNSAMPLE_PRESETS))
def test_preset_gradients_match_published_module(name):
    gen, preset, module, names, x = preset_case(name, 17, 2, 19, 5)
    keys = sorted(names)
    leaves = [x.clone().requires_grad_()] + [preset[key].clone().requires_grad_() for key in keys]
    out = ops.stack_norm_project(leaves[0], **dict(preset, **dict(zip(keys, leaves[1:]))))
    upstream = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * upstream).sum(), leaves)
    x_eager = x.clone().requires_grad_()
    want_out = module(x_eager)
    rows = want_out.shape[1]  # qwen2-audio: AvgPool1d's floor(T / 2) rows, the same frames as ours
    (want_out * upstream[:, :rows]).sum().backward()
    want = [x_eager.grad]
    for key in keys:
        param_name, to_preset_layout = names[key]
        want.append(to_preset_layout(module.get_parameter(param_name).grad))
    if name == "qwen2-audio":  # our extra odd-tail row's upstream reaches the last frame alone
        want[0] = want[0].clone()
        want[0][:, -1] += upstream[:, -1]
    for label, g, w in zip(["x"] + keys, got, want):
        torch.testing.assert_close(g, w, atol=3e-5, rtol=1e-4, msg=lambda m: f"{name} d/d{label}: {m}")


# ---- real Ultravox weights through ultravox_projector_args ------------------------------------------------------
def random_ultravox(trailing, gen, D=6, hidden=14, out=9):
    module = UltravoxProjector(8, D, hidden, out, trailing)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() == 1 else 1 / math.sqrt(p.shape[1]))
                    + (1.0 if p.dim() == 1 else 0.0))
    return module


@pytest.mark.parametrize("T", [29, 16])
@pytest.mark.parametrize("trailing", ["mid", "post"])  # Ultravox v0.5+ (ln_mid) and v0.4.1- (ln_post)
def test_ultravox_projector_args_reproduces_ultravox(trailing, T):
    gen = torch.Generator().manual_seed(19)
    module = random_ultravox(trailing, gen)
    x = torch.randn(2, T, 6, generator=gen) * 0.05  # small frames: a wrong norm epsilon shows
    with torch.no_grad():
        want = module(x)
        kwargs, finish = ultravox_projector_args(module)
        got = finish(ops.stack_norm_project(x, **kwargs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # a checkpoint's state dict, under the model's prefix, gives the same
        wrapped = {f"multi_modal_projector.{key}": v for key, v in module.state_dict().items()}
        kwargs2, finish2 = ultravox_projector_args(wrapped)
        torch.testing.assert_close(finish2(ops.stack_norm_project(x, **kwargs2)), want, atol=1e-5, rtol=1e-5)
        # the half swap is what makes it right: Ultravox's rows as they are gate the wrong half
        unswapped = dict(kwargs, w1=module.linear_1.weight)
        assert not torch.allclose(finish(ops.stack_norm_project(x, **unswapped)), want, atol=1e-3)
        # ragged: each clip's rows match the clip alone, and rows past it stay zero through finish
        lengths = torch.tensor([T, 5])
        ragged = finish(ops.stack_norm_project(x, lengths=lengths, **kwargs))
        torch.testing.assert_close(ragged[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ragged[1, :1], module(x[1:2, :5])[0], atol=1e-5, rtol=1e-5)
        assert bool((ragged[1, 1:] == 0).all())


def test_ultravox_projector_args_rejects_bad_weights():
    gen = torch.Generator().manual_seed(21)
    state = random_ultravox("mid", gen).state_dict()
    with pytest.raises(ValueError, match="ln_pre.weight"):
        ultravox_projector_args({key: v for key, v in state.items() if key != "ln_pre.weight"})
    with pytest.raises(ValueError, match="exactly one of 'ln_mid.weight'"):
        ultravox_projector_args(dict(state, **{"ln_post.weight": torch.ones(9)}))
    with pytest.raises(ValueError, match="linear_1.bias"):
        ultravox_projector_args(dict(state, **{"linear_1.bias": torch.zeros(14)}))
    with pytest.raises(ValueError, match="not a multiple of stack_factor=5"):
        ultravox_projector_args(state, stack_factor=5)
    with pytest.raises(ValueError, match="linear_2.weight must have shape"):
        ultravox_projector_args(state, projector_act="gelu")
    with pytest.raises(ValueError, match="projector_act"):
        ultravox_projector_args(state, projector_act="relu")
    with pytest.raises(TypeError, match="projector must be"):
        ultravox_projector_args([1, 2])


@pytest.mark.parametrize("pool,norm,activation,mlp", [("stack", "layer", "silu", False), ("stack", "rms", "swiglu", True),
                                                      ("mean", "layer", "gelu", True), ("stack", None, "gelu", False)])
def test_gradients(pool, norm, activation, mlp):
    gen = torch.Generator().manual_seed(14)
    B, T, D, k = 3, 11, 6, 4
    lengths = torch.tensor([11, 6, 3])
    x = torch.randn(B, T, D, generator=gen)
    width = D if pool == "mean" else k * D
    p = params(width, 8, 5, gen, norm=norm, activation=activation, mlp=mlp)
    names = [n for n in ("norm_weight", "norm_bias", "w1", "b1", "w2", "b2") if p[n] is not None]
    leaves = [x.clone().requires_grad_()] + [p[n].clone().requires_grad_() for n in names]

    def run(use_reference, tensors):
        kw = dict(p, **dict(zip(names, tensors[1:])))
        return ops.stack_norm_project(tensors[0], k, lengths=lengths, pool=pool, use_reference=use_reference, **kw)

    upstream = torch.randn_like(run(True, leaves))
    got = torch.autograd.grad((run(False, leaves) * upstream).sum(), leaves)
    want = torch.autograd.grad((run(True, leaves) * upstream).sum(), leaves)
    for name, g, r in zip(["x"] + names, got, want):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-4, msg=name)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(lambda *ts: run(False, list(ts)), leaves64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_reference(dtype):
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 13, 8, generator=gen)
    p = params(32, 12, 6, gen, norm="layer", activation="gelu", mlp=True)
    low = {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in p.items()}
    out = ops.stack_norm_project(x.to(dtype), 4, lengths=torch.tensor([13, 6]), **low)
    assert out.dtype == dtype
    want = ref.stack_norm_project(x, 4, torch.tensor([13, 6]), "layer", p["norm_weight"], p["norm_bias"], p["w1"],
                                  p["b1"], "gelu", p["w2"], p["b2"])
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [1280, 7])  # a row of 5120 floats (the Eureka width) and one shorter than the 16 lanes
def test_norm_statistics_with_large_mean(norm, D):
    # encoder activations with a large common offset: the row statistics must not lose the small variance
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, D, generator=gen) * 0.5 + 100.0
    width = 4 * D
    nw = torch.rand(width, generator=gen) + 0.5
    nb = torch.randn(width, generator=gen) if norm == "layer" else None
    w1 = torch.randn(16, width, generator=gen) / math.sqrt(width)
    got = ops.stack_norm_project(x, 4, norm=norm, norm_weight=nw, norm_bias=nb, w1=w1, activation="silu")
    expected = ref.stack_norm_project(x.double(), 4, None, norm, nw.double(), None if nb is None else nb.double(),
                                      w1.double(), None, "silu", None, None, 1e-5, "stack")
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)
