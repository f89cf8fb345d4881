"""MoE adapter: against the loop reference, sparse softmax, aux loss by hand, router load, fast vs reference ops."""
import pytest
import torch

from eureka_fast.models import EurekaAdapterConfig, MoEAdapter
from eureka_reference import reference_adapter, reference_aux_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ENC, LLM = 24, 40


def _adapter(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = EurekaAdapterConfig(**{**dict(num_experts=6, top_k=3, expert_intermediate_size=20, hidden_size=32,
                                        num_shared_experts=1), **overrides})
    adapter = MoEAdapter(cfg, encoder_width=ENC, llm_width=LLM)
    for p in adapter.parameters():  # random everything (norm weights too), so each term matters
        torch.nn.init.normal_(p, std=0.3)
    return adapter


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shared", [0, 2])
def test_adapter_matches_loop_reference(renormalize, shared):
    adapter = _adapter(renormalize=renormalize, num_shared_experts=shared).double()
    frames = torch.randn(1, 4 * 9, ENC, dtype=torch.float64)
    out = adapter(frames)
    ref, ref_logits, ref_ids = reference_adapter(adapter, frames[0])
    assert out.embeddings.shape == (9, LLM)
    torch.testing.assert_close(out.router_logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.expert_ids.long(), ref_ids)
    torch.testing.assert_close(out.embeddings, ref, rtol=1e-9, atol=1e-9)


def test_sparse_softmax_is_softmax_over_kept_logits():
    adapter = _adapter(renormalize=True)
    x = torch.randn(11, 32)
    logits, weights, ids = adapter.route(x)
    kept = logits.gather(1, ids.long())
    torch.testing.assert_close(weights, torch.softmax(kept, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(11), rtol=1e-5, atol=1e-6)
    raw = _adapter(renormalize=False)
    _, w_raw, ids_raw = raw.route(x)
    torch.testing.assert_close(w_raw, torch.softmax(raw.router(x), -1).gather(1, ids_raw.long()))


def test_aux_loss_and_router_load_by_hand():
    adapter = _adapter()
    frames = torch.randn(2, 4 * 7, ENC)
    out = adapter(frames)
    assert out.embeddings.shape == (14, LLM)
    expected = reference_aux_loss(out.router_logits, out.expert_ids, 6)
    torch.testing.assert_close(out.aux_loss.double(), expected, rtol=1e-5, atol=1e-6)
    counts = torch.stack([(out.expert_ids == e).sum() for e in range(6)]).float()
    torch.testing.assert_close(out.router_load, counts / (14 * 3))
    assert out.router_load.sum().item() == pytest.approx(1.0)
    # perfectly uniform routing gives exactly 1 (E * sum (1/E)(1/E) * E ... = 1)
    ids = torch.arange(6).repeat(2).view(4, 3)
    assert reference_aux_loss(torch.zeros(4, 6), ids, 6).item() == pytest.approx(1.0)


def test_experts_are_passed_to_fused_experts_without_copies(monkeypatch):
    from eureka_fast import ops

    adapter = _adapter()
    seen = {}
    real = ops.fused_experts

    def spy(x, w_gate_up, w_down, weights, ids, **kw):
        seen["gate_up"], seen["down"] = w_gate_up, w_down
        return real(x, w_gate_up, w_down, weights, ids, **kw)

    monkeypatch.setattr(ops, "fused_experts", spy)
    adapter(torch.randn(1, 8, ENC))
    assert seen["gate_up"] is adapter.experts.gate_up_proj and seen["down"] is adapter.experts.down_proj
    assert adapter.experts.gate_up_proj.shape == (6, 40, 32) and adapter.experts.down_proj.shape == (6, 32, 20)


def test_fast_and_reference_ops_agree_forward_and_backward():
    adapter = _adapter()
    frames = torch.randn(2, 4 * 5 + 2, ENC)  # ragged last group: zero-padded, as stack_norm_project defines
    results = []
    for use_reference in (False, True):
        adapter.zero_grad()
        adapter.use_reference_ops = use_reference
        out = adapter(frames)
        (out.embeddings.square().mean() + 0.1 * out.aux_loss).backward()
        results.append((out.embeddings.detach(), out.aux_loss.detach(),
                        {n: p.grad.clone() for n, p in adapter.named_parameters()}))
    (e0, a0, g0), (e1, a1, g1) = results
    torch.testing.assert_close(e0, e1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a0, a1, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-3, atol=1e-5, msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        EurekaAdapterConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="router_scoring"):
        EurekaAdapterConfig(router_scoring="relu")
