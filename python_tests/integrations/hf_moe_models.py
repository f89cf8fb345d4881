"""Tiny random transformers MoE models (no downloads) shared by the integration tests and bench/hf_moe.py."""
from __future__ import annotations

import torch

# Every family: 2 decoder layers, 8 experts, top-2, hidden 32 (not a multiple of 64: no lucky tile sizes), vocab 96.
# initializer_range 0.2 (10x the default) makes the routed experts move the logits by O(1): with the default init
# their contribution is ~1e-4 and a wrong MoE layer would hide inside the tolerance.
_COMMON = dict(vocab_size=96, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_config(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, head_dim=10, intermediate_size=24, num_local_experts=8,
                               num_experts_per_tok=2)
    elif family == "qwen2_moe":
        # Shared expert behind a sigmoid gate; no renormalisation of the top-k probabilities (the Qwen1.5-MoE default).
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=36, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, head_dim=10, intermediate_size=48, moe_intermediate_size=24,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False)
    elif family == "deepseek_v3":
        # Sigmoid scores + selection bias, 4 groups of 2 experts with the best 2 groups allowed, routed scaling 2.5,
        # one shared expert, layer 0 dense (first_k_dense_replace) so the model mixes dense and MoE layers.
        # MLA attention has no grouped KV heads: num_key_value_heads = num_attention_heads.
        cfg = tf.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                                  num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                  norm_topk_prob=True, n_shared_experts=1, first_k_dense_replace=1,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**_COMMON, head_dim=10, intermediate_size=24, num_local_experts=8,
                              num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    else:
        raise ValueError(f"unknown family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, *, seed: int = 0, **overrides):
    """A randomly initialised causal LM of ``family`` in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # DeepSeek-V3 starts with a zero selection bias; a random one checks that it moves the choice only.
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model.eval()


def moe_blocks(model):
    """(name, block) for each module with an experts child."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")]
