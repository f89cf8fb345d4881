"""The dense adapter of the MoE-vs-dense ablation (`adapter_type: dense`): same parameter count as the MoE adapter,
its output by hand, gradients, save/load, and old configs (no adapter_type) still building the MoE adapter."""
import json

import pytest
import torch
import torch.nn.functional as F

from eureka_fast.models import (DenseAdapter, EurekaAdapterConfig, EurekaAudioConfig, EurekaAudioForCausalLM,
                                MoEAdapter)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENC, LLM = 24, 40


def _config(**overrides):
    return EurekaAdapterConfig(**{**dict(num_experts=8, top_k=4, expert_intermediate_size=20, hidden_size=32,
                                         num_shared_experts=1), **overrides})


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("shape", [dict(), dict(num_shared_experts=0), dict(num_experts=4, top_k=1),
                                   dict(expert_intermediate_size=128, hidden_size=128, num_shared_experts=2)])
def test_dense_adapter_has_the_moe_adapters_parameter_count(shape):
    moe = MoEAdapter(_config(**shape), encoder_width=ENC, llm_width=LLM)
    dense = DenseAdapter(_config(adapter_type="dense", **shape), encoder_width=ENC, llm_width=LLM)
    mixing = [moe.router, moe.experts] + ([moe.shared_experts] if moe.shared_experts is not None else [])
    assert _count(dense.mlp) == pytest.approx(_count(*mixing), rel=0.01)
    assert _count(dense) == pytest.approx(_count(moe), rel=0.01)
    # the parts outside the mixing are the same modules with the same shapes
    for name in ("input_norm", "input_proj", "output_proj", "output_norm"):
        assert {k: v.shape for k, v in getattr(dense, name).state_dict().items()} == \
               {k: v.shape for k, v in getattr(moe, name).state_dict().items()}


def test_whole_tiny_models_have_equal_size():
    moe = EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny"))
    dense = EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny", adapter_config={"adapter_type": "dense"}))
    assert isinstance(moe.adapter, MoEAdapter) and isinstance(dense.adapter, DenseAdapter)
    assert _count(dense.adapter) == pytest.approx(_count(moe.adapter), rel=0.01)
    assert _count(dense) == pytest.approx(_count(moe), rel=0.01)


def test_dense_output_by_hand_and_zero_aux_loss():
    torch.manual_seed(0)
    dense = DenseAdapter(_config(adapter_type="dense"), encoder_width=ENC, llm_width=LLM).double()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    frames = torch.randn(2, 4 * 5, ENC, dtype=torch.float64)
    out = dense(frames)
    # by hand: stack 4 frames, LayerNorm, Linear, SiLU; SiLU-gated MLP; W_P; LayerNorm
    x = frames.reshape(2, 5, 4 * ENC)
    x = F.silu(dense.input_proj(F.layer_norm(x, (4 * ENC,), dense.input_norm.weight, dense.input_norm.bias)))
    x = x.reshape(10, -1)
    mlp = dense.mlp
    h = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    expected = F.layer_norm(dense.output_proj(h), (LLM,), dense.output_norm.weight, dense.output_norm.bias)
    assert out.embeddings.shape == (10, LLM)
    torch.testing.assert_close(out.embeddings, expected, rtol=1e-9, atol=1e-9)
    assert out.aux_loss.dtype == torch.float32 and float(out.aux_loss) == 0.0
    assert out.router_load is None and out.router_logits is None and out.expert_ids is None


def test_dense_adapter_trains_inside_the_model(tiny_eureka_processor, wav_dir):
    torch.manual_seed(0)
    config = EurekaAudioConfig.preset("tiny", adapter_config={"adapter_type": "dense"},
                                      audio_config={"n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1})
    model = EurekaAudioForCausalLM(config)
    conv = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": str(wav_dir / "tone.wav")}}]},
            {"role": "assistant", "content": "a tone"}]
    inputs = tiny_eureka_processor(conv)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss) and float(out.aux_loss) == 0.0 and out.router_load is None
    assert float(out.loss.detach()) == pytest.approx(float(out.ntp_loss.detach()))
    out.loss.backward()
    for name, p in model.adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dense_save_and_load_round_trip(tiny_eureka_processor, wav_dir, tmp_path):
    torch.manual_seed(0)
    config = EurekaAudioConfig.preset("tiny", adapter_config={"adapter_type": "dense"},
                                      audio_config={"n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1})
    model = EurekaAudioForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["adapter_config"]["adapter_type"] == "dense"
    loaded = EurekaAudioForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.adapter, DenseAdapter)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    inputs = tiny_eureka_processor([{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": str(wav_dir / "tone.wav")}}]}])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_config_without_adapter_type_builds_the_moe_adapter(tmp_path):
    """Checkpoints saved before adapter_type existed load unchanged, as MoE."""
    config = EurekaAudioConfig.preset("tiny", audio_config={"n_audio_state": 64, "n_audio_head": 2,
                                                            "n_audio_layer": 1})
    model = EurekaAudioForCausalLM(config)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["adapter_config"].pop("adapter_type")
    raw["adapter_config"].pop("dense_intermediate_size", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = EurekaAudioForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.adapter, MoEAdapter) and loaded.config.adapter_config.adapter_type == "moe"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_unknown_adapter_type_is_refused():
    with pytest.raises(ValueError, match="adapter_type must be 'moe' or 'dense'"):
        EurekaAdapterConfig(adapter_type="sparse")


def test_explicit_dense_width():
    dense = DenseAdapter(_config(adapter_type="dense", dense_intermediate_size=7), encoder_width=ENC, llm_width=LLM)
    assert dense.mlp.gate_proj.out_features == 7
