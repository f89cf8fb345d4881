"""eureka_fast as a drop-in MoE backend for transformers models: every family against its own unpatched twin.

The reference for each check is the same transformers model before patching (deep copy, same weights): logits,
greedy tokens, gradients, router logits and auxiliary loss must agree, and the state_dict must not change.
"""
from __future__ import annotations

import copy
import os
import re
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eureka_fast.integrations.transformers import (  # noqa: E402
    EXPERTS_IMPLEMENTATION,
    ROUTER_RULES,
    apply_fast_moe,
    remove_fast_moe,
)
from hf_moe_models import FAMILIES, moe_blocks, tiny_model  # noqa: E402

import eureka_fast  # noqa: E402

FP32 = dict(atol=2e-5, rtol=1e-4)


def _pair(family, **overrides):
    """(unpatched reference, patched copy, report) with identical weights."""
    reference = tiny_model(family, **overrides)
    fast = copy.deepcopy(reference)
    report = apply_fast_moe(fast)
    return reference, fast, report


def _tokens(batch=2, seq=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, seq), generator=g)


# --------------------------------------------------------------------------------------------------------------
# What gets patched
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_report_patches_every_router_and_experts_and_keeps_parameters(family):
    reference, fast, report = _pair(family)
    blocks = moe_blocks(reference)
    assert blocks, "the tiny config must contain MoE layers"
    assert report.untouched == []
    assert sorted(e.name for e in report.patched_experts) == sorted(f"{n}.experts" for n, _ in blocks)
    router_attr = "gate"
    assert sorted(e.name for e in report.patched_routers) == sorted(f"{n}.{router_attr}" for n, _ in blocks)
    assert eureka_fast.apply_fast_moe is apply_fast_moe  # the lazy top-level export
    # Same parameter names, shapes and values; the patched modules are still instances of the original classes
    # (transformers' output recorders find routers with isinstance).
    ref_sd, fast_sd = reference.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    for key in ref_sd:
        assert torch.equal(ref_sd[key], fast_sd[key]), key
    for name, block in moe_blocks(fast):
        ref_block = reference.get_submodule(name)
        assert isinstance(block.gate, type(ref_block.gate)) and type(block.gate) is not type(ref_block.gate)
        assert isinstance(block.experts, type(ref_block.experts))
    assert str(report).count("\n  patched ") == len(report.patched)


def test_apply_is_idempotent_and_remove_restores_original_classes():
    reference, fast, _ = _pair("qwen3_moe")
    again = apply_fast_moe(fast)
    assert all("already patched" in e.detail for e in again.patched) and again.untouched == []
    assert remove_fast_moe(fast) == 4
    for (name, block), (_, ref_block) in zip(moe_blocks(fast), moe_blocks(reference)):
        assert type(block.gate) is type(ref_block.gate) and type(block.experts) is type(ref_block.experts)
        assert "_eureka_fast_activation" not in vars(block.experts)
    assert remove_fast_moe(fast) == 0


def test_gpt_oss_is_left_whole_with_a_clear_reason():
    reference, fast, report = _pair("gpt_oss")
    assert report.patched == []
    experts = [e for e in report.untouched if e.name.endswith("experts")]
    routers = [e for e in report.untouched if e.name.endswith("router")]
    assert len(experts) == len(routers) == 2
    for entry in experts:
        assert "per-expert biases" in entry.detail and "clamped SwiGLU" in entry.detail
        assert "interleaved" in entry.detail and "transposed" in entry.detail
    for entry in routers:
        assert "unsupported experts" in entry.detail
    for module in fast.modules():
        assert not type(module).__name__.startswith("EurekaFast")
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, reference(x).logits, atol=0, rtol=0)


def test_gpt_oss_experts_implementation_raises_instead_of_computing_something_else():
    model = tiny_model("gpt_oss")
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)  # the name is valid; the module is not runnable
    with pytest.raises(NotImplementedError, match=r"GptOssExperts.*clamped SwiGLU.*grouped_mm"):
        with torch.no_grad():
            model(_tokens())


def test_unknown_router_keeps_transformers_routing_but_experts_run_fused():
    reference, fast = tiny_model("qwen3_moe"), None
    fast = copy.deepcopy(reference)
    custom = type("CustomTopKRouter", (type(fast.model.layers[0].mlp.gate),), {})
    for _, block in moe_blocks(fast):
        block.gate.__class__ = custom
    report = apply_fast_moe(fast)
    assert len(report.patched_experts) == 2 and report.patched_routers == []
    assert [e.class_name for e in report.untouched] == ["CustomTopKRouter"] * 2
    assert all("unknown router family" in e.detail for e in report.untouched)
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, reference(x).logits, **FP32)


# --------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_blocks_and_routers_match_fp32(family):
    reference, fast, _ = _pair(family)
    g = torch.Generator().manual_seed(3)
    for name, block in moe_blocks(fast):
        ref_block = reference.get_submodule(name)
        hidden = torch.randn(3, 50, reference.config.hidden_size, generator=g)
        with torch.no_grad():
            ref_logits, ref_w, ref_ids = ref_block.gate(hidden.view(-1, hidden.shape[-1]))
            logits, w, ids = block.gate(hidden.view(-1, hidden.shape[-1]))
            torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
            # Same experts per token (slot order may differ: DeepSeek uses an unsorted top-k) and same weights.
            ref_order, order = ref_ids.sort(-1), ids.sort(-1)
            assert ids.dtype == ref_ids.dtype == torch.int64 and w.dtype == ref_w.dtype
            assert torch.equal(order.values, ref_order.values)
            torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices), **FP32)
            out, ref_out = block(hidden), ref_block(hidden)
            out = out[0] if isinstance(out, tuple) else out
            ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
            torch.testing.assert_close(out, ref_out, **FP32)
            assert ref_out.abs().mean() > 1e-2  # the block output is not negligible


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_router_logits_and_aux_loss_match_fp32(family):
    reference, fast, _ = _pair(family, router_aux_loss_coef=1.0)
    x = _tokens()
    with torch.no_grad():
        ref_out = reference(x, output_router_logits=True)
        out = fast(x, output_router_logits=True)
        torch.testing.assert_close(out.logits, ref_out.logits, **FP32)
        # Sensitivity guard: switching the routed experts off moves the logits by far more than the tolerance.
        for _, block in moe_blocks(fast):
            block.experts.down_proj.mul_(0)
        assert (fast(x).logits - ref_out.logits).abs().max() > 0.1
    if getattr(ref_out, "router_logits", None) is not None:
        assert len(out.router_logits) == len(ref_out.router_logits) == len(moe_blocks(reference))
        # Layer 0 sees identical inputs; deeper layers see the (tolerance-level) differences of the layers before.
        torch.testing.assert_close(out.router_logits[0], ref_out.router_logits[0], atol=0, rtol=0)
        for a, b in zip(out.router_logits, ref_out.router_logits):
            torch.testing.assert_close(a, b, **FP32)
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_bf16(family):
    reference, fast, _ = _pair(family)
    reference.to(torch.bfloat16)
    fast.to(torch.bfloat16)
    fp32 = tiny_model(family)
    x = _tokens()
    with torch.no_grad():
        ref_logits = reference(x).logits.float()
        logits = fast(x).logits.float()
        exact = fp32(x).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # Both bf16 paths must sit as close to the fp32 model as each other: bf16 rounding of the whole model dominates.
    ref_err = (ref_logits - exact).abs().max().item()
    err = (logits - exact).abs().max().item()
    assert err <= max(2.0 * ref_err, 0.05), (err, ref_err)
    torch.testing.assert_close(logits, ref_logits, atol=max(2.5 * ref_err, 0.05), rtol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_identical_tokens(family):
    reference, fast, _ = _pair(family)
    x = _tokens(batch=2, seq=6, seed=5)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref_tokens = reference.generate(x, **kwargs)
    tokens = fast.generate(x, **kwargs)
    assert ref_tokens.shape == (2, 16)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_gives_the_same_gradients_and_update(family):
    reference, fast, _ = _pair(family, router_aux_loss_coef=0.5)
    x = _tokens(batch=2, seq=12, seed=7)
    results = []
    for model in (reference, fast):
        model.train()
        optim = torch.optim.SGD(model.parameters(), lr=0.05)
        out = model(x, labels=x, output_router_logits=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optim.step()
        model.eval()
        with torch.no_grad():
            after = model(x).logits
        results.append((out.loss.detach(), grads, after))
    (ref_loss, ref_grads, ref_after), (loss, grads, after) = results
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Routers and experts really learn: their gradients are not zero.
    for name, _ in moe_blocks(reference):
        assert ref_grads[f"{name}.gate.weight"].abs().max() > 0
        assert ref_grads[f"{name}.experts.gate_up_proj"].abs().max() > 0
        assert ref_grads[f"{name}.experts.down_proj"].abs().max() > 0
    torch.testing.assert_close(after, ref_after, **FP32)


# --------------------------------------------------------------------------------------------------------------
# transformers plumbing: save/load, experts_implementation registry, torch.compile
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_save_load_round_trip(family, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    reference, fast, _ = _pair(family)
    reference.save_pretrained(tmp_path / "reference")
    fast.save_pretrained(tmp_path / "fast")

    def keys(d):
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys(tmp_path / "fast") == keys(tmp_path / "reference")
    assert "eureka" not in (tmp_path / "fast" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast").eval()
    assert not any(type(m).__name__.startswith("EurekaFast") for m in loaded.modules())
    x = _tokens()
    with torch.no_grad():
        ref_logits = reference(x).logits
        torch.testing.assert_close(loaded(x).logits, ref_logits, atol=0, rtol=0)
        assert len(apply_fast_moe(loaded).patched) == 2 * len(moe_blocks(loaded))
        torch.testing.assert_close(loaded(x).logits, ref_logits, **FP32)
        # The registry path straight from disk.
        direct = AutoModelForCausalLM.from_pretrained(tmp_path / "fast", experts_implementation=EXPERTS_IMPLEMENTATION)
        assert direct.config._experts_implementation == EXPERTS_IMPLEMENTATION
        torch.testing.assert_close(direct.eval()(x).logits, ref_logits, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_experts_implementation_routes_experts_through_fused_experts(family, monkeypatch):
    from eureka_fast import ops

    reference = tiny_model(family)
    model = copy.deepcopy(reference)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    calls = []
    real = ops.fused_experts
    monkeypatch.setattr(ops, "fused_experts", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, **FP32)
    assert calls == ["silu"] * len(moe_blocks(model))


def test_unregistered_name_is_still_rejected_by_transformers():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="eureka_fast"):  # the error lists the valid names, ours included
        model.set_experts_implementation("no_such_impl")


def _fused_experts_is_a_compiled_op() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("eureka_fast::fused_experts", "CPU")
    except RuntimeError:
        return False


_STAND_IN = None


def _opaque_reference_fused_experts():
    """The reference fused_experts wrapped as a custom op with a fake implementation: what the compiled op gives
    dynamo, so that the integration's own code (routers, casts, block plumbing) is checked for graph breaks before
    the compiled kernels land."""
    global _STAND_IN
    if _STAND_IN is None:
        from eureka_fast.ops import reference

        @torch.library.custom_op("eureka_fast_tests::fused_experts", mutates_args=())
        def stand_in(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor, activation: str) -> torch.Tensor:
            return reference.fused_experts(x, w_gate_up, w_down, weights, ids, activation)

        @stand_in.register_fake
        def _(x, w_gate_up, w_down, weights, ids, activation):
            return torch.empty_like(x)

        _STAND_IN = lambda x, wgu, wd, w, i, *, activation="silu", use_reference=False: stand_in(  # noqa: E731
            x, wgu, wd, w, i, activation)
    return _STAND_IN


@pytest.mark.parametrize("family,path", [("qwen3_moe", "apply"), ("deepseek_v3", "apply"), ("qwen3_moe", "registry")])
def test_torch_compile_has_no_graph_breaks_in_moe_blocks(family, path, monkeypatch):
    from eureka_fast import ops

    if not _fused_experts_is_a_compiled_op():
        monkeypatch.setattr(ops, "fused_experts", _opaque_reference_fused_experts())
    if path == "apply":
        reference, fast, _ = _pair(family)
    else:  # experts_implementation="eureka_fast": its per-call support check must trace too
        reference = tiny_model(family)
        fast = copy.deepcopy(reference)
        fast.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    name, block = moe_blocks(fast)[0]
    hidden = torch.randn(2, 9, reference.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        block(hidden)  # one eager call first: the fresh-process case is test_torch_compile_in_a_fresh_process_...
        explanation = torch._dynamo.explain(block)(hidden)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(hidden), reference.get_submodule(name)(hidden), **FP32)
    torch._dynamo.reset()


def test_torch_compile_whole_patched_model_is_one_graph(monkeypatch):
    from eureka_fast import ops

    if not _fused_experts_is_a_compiled_op():
        monkeypatch.setattr(ops, "fused_experts", _opaque_reference_fused_experts())
    reference, fast, _ = _pair("qwen3_moe")
    x = _tokens()
    torch._dynamo.reset()
    with torch.no_grad():
        fast(x)  # one eager call first: the fresh-process case is test_torch_compile_in_a_fresh_process_...
        # fullgraph=True raises on the first graph break anywhere in the model, MoE layers included.
        compiled = torch.compile(fast, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x).logits, reference(x).logits, **FP32)
    torch._dynamo.reset()


_COLD_COMPILE = """
import sys, torch
sys.path.insert(0, {helpers!r})
from hf_moe_models import tiny_model, moe_blocks
import eureka_fast
model = tiny_model("qwen3_moe")
eureka_fast.apply_fast_moe(model)
block = moe_blocks(model)[0][1]
with torch.no_grad():
    explanation = torch._dynamo.explain(block)(torch.randn(2, 9, model.config.hidden_size))
print("graph_breaks", explanation.graph_break_count)
for reason in explanation.break_reasons:
    print(str(reason.reason).splitlines()[0], "|", reason.user_stack[-1])
"""


def test_torch_compile_in_a_fresh_process_has_no_graph_breaks():
    """Users compile right after patching, before any eager call: nothing may be lazily resolved inside the trace."""
    import subprocess
    import sys

    code = _COLD_COMPILE.format(helpers=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "graph_breaks 0" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------------------------
# The router table matches the installed transformers
# --------------------------------------------------------------------------------------------------------------
def _normalized_router_source(cls) -> str:
    src = inspect.getsource(cls)
    src = re.sub(r"#[^\n]*", "", src)
    src = re.sub(r"^@[^\n]*\n", "", src, flags=re.M)  # hub-kernel decorators do not change the forward we mirror
    src = src.replace(cls.__name__, "ROUTER")
    src = re.sub(r"config: \w+", "config", src)
    src = re.sub(r"\(\(self\.num_experts\)", "(self.num_experts", src)  # Glm4Moe's redundant parentheses
    return re.sub(r"\s+", " ", src).strip()


def _router_classes():
    import importlib
    import transformers.models as models_pkg

    found = {}
    for mod_name in sorted(os.listdir(os.path.dirname(models_pkg.__file__))):
        path = os.path.join(os.path.dirname(models_pkg.__file__), mod_name, f"modeling_{mod_name}.py")
        if not os.path.exists(path):
            continue
        source = open(path).read()
        for cls_name in ROUTER_RULES:
            if re.search(rf"^class {cls_name}\(", source, re.M):
                module = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
                found[cls_name] = getattr(module, cls_name)
    return found


def test_router_rule_groups_are_copies_of_one_implementation():
    """Each rule was written from one family's router; every other class mapped to it must be a verbatim copy."""
    classes = _router_classes()
    for canonical in ("Qwen3MoeTopKRouter", "MixtralTopKRouter", "DeepseekV3TopkRouter", "Qwen3VLMoeTextTopKRouter"):
        assert canonical in classes
    groups = {}
    for name, cls in classes.items():
        groups.setdefault(id(ROUTER_RULES[name]), []).append((name, _normalized_router_source(cls)))
    for members in groups.values():
        first_name, first_src = members[0]
        for name, src in members[1:]:
            assert src == first_src, f"{name} differs from {first_name}: its rule in ROUTER_RULES no longer applies"


# --------------------------------------------------------------------------------------------------------------
# Expert variants: activations, quantized weights
# --------------------------------------------------------------------------------------------------------------
def test_exact_gelu_experts_run_fused_and_match():
    reference, fast, report = _pair("qwen3_moe", hidden_act="gelu")
    assert {e.detail for e in report.patched_experts} == {"experts: fused_experts (gelu)"}
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, reference(x).logits, **FP32)


def test_tanh_gelu_experts_are_left_untouched_with_their_router():
    _, fast, report = _pair("olmoe", hidden_act="gelu_pytorch_tanh")
    assert report.patched == []
    assert all("GELUTanh" in e.detail or "unsupported experts" in e.detail for e in report.untouched)
    assert len(report.untouched) == 4


def test_quantized_expert_weights_are_refused():
    from eureka_fast.integrations.transformers import experts_unsupported_reasons

    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    assert experts_unsupported_reasons(experts) == []
    experts.gate_up_proj_scale_inv = torch.nn.Parameter(torch.ones(8, 1, 1))
    assert any("quantized" in r for r in experts_unsupported_reasons(experts))


def test_transformers4_style_block_is_reported_not_patched():
    class ExpertMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))

    class LegacySparseMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4, bias=False)
            self.experts = torch.nn.ModuleList(ExpertMLP() for _ in range(4))

    model = torch.nn.Sequential(LegacySparseMoeBlock())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_fast_moe(model)
    assert report.patched == []
    assert [(e.name, e.class_name) for e in report.untouched] == [("0.experts", "ModuleList"), ("0.gate", "Linear")]
    assert "ModuleList layout" in report.untouched[0].detail
    assert type(model[0].gate) is torch.nn.Linear and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
