"""Configuration of Eureka-Audio: Whisper encoder dims + MoE adapter + any transformers causal LM.

``EurekaAudioConfig.preset("tiny" | "eureka-1.7b")`` gives the two shipped sizes. Values that the paper does not
state (adapter sizes, aux-loss weight, weight renormalisation, shared experts) are our defaults and say so below.
"""
from __future__ import annotations

import copy

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

# The audio item markup of the Qwen3-Omni tokenizer the released model uses.
AUDIO_START_TOKEN = "<|audio_start|>"
AUDIO_PAD_TOKEN = "<|audio_pad|>"
AUDIO_END_TOKEN = "<|audio_end|>"
AUDIO_TOKEN_TYPE = 3  # token_type_ids value of an audio-pad position (0 = text), as in the official wrapper


class EurekaAudioEncoderConfig(PreTrainedConfig):
    """Whisper encoder dimensions (openai-whisper ``ModelDimensions`` names). Defaults: Whisper-large-v3."""

    model_type = "eureka_audio_encoder"

    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32

    def whisper_dims_kwargs(self) -> dict:
        return dict(n_mels=self.n_mels, n_audio_ctx=self.n_audio_ctx, n_audio_state=self.n_audio_state,
                    n_audio_head=self.n_audio_head, n_audio_layer=self.n_audio_layer)


class EurekaAdapterConfig(PreTrainedConfig):
    """The sparse MoE adapter between the Whisper encoder and the LLM (paper Eq. 1 and 3).

    stack_factor: encoder frames stacked into one audio token (50 Hz -> 12.5 Hz; our default 4, not stated).
    hidden_size: adapter width d; None = the LLM hidden size (companion-paper setting).
    num_experts / top_k / expert_intermediate_size: routed experts, each a SiLU-gated FFN d -> I -> d
        (8, 4, 1280: companion-paper setting, unverified for the release).
    num_shared_experts: always-on experts added to the routed mixture (0 = none); they are stored as one fused
        SiLU-gated FFN of width num_shared_experts * shared_expert_intermediate_size (None = expert width).
    router_scoring: "softmax" (paper) or "sigmoid".
    renormalize: "sparse softmax" in the paper = softmax over the kept top-k logits, which equals the full softmax
        weights renormalised to sum to 1 over the kept experts. True (default) does that; False keeps the raw
        full-softmax probabilities of the kept experts (Mixtral-off / Qwen2-MoE style).
    aux_loss_coef: lambda in L = L_ntp + lambda * L_aux (not given in the paper; default 0.01).
    adapter_type: "moe" (the paper's adapter, default) or "dense": the MoE-vs-dense ablation's adapter, where the
        router, routed experts and shared experts are replaced by one SiLU-gated MLP of the same total parameter
        count (width `dense_width`; the routing fields then only size it). Not in the paper; ours.
    dense_intermediate_size: the dense MLP's width; None = matched to the MoE parameters (see `dense_width`).
    """

    model_type = "eureka_moe_adapter"

    stack_factor: int = 4
    hidden_size: int | None = None
    num_experts: int = 8
    top_k: int = 4
    expert_intermediate_size: int = 1280
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    router_scoring: str = "softmax"
    renormalize: bool = True
    aux_loss_coef: float = 0.01
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    adapter_type: str = "moe"
    dense_intermediate_size: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.adapter_type not in ("moe", "dense"):
            raise ValueError(f"adapter adapter_type must be 'moe' or 'dense', got {self.adapter_type!r}")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"adapter router_scoring must be 'softmax' or 'sigmoid', got {self.router_scoring!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"adapter top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.stack_factor < 1:
            raise ValueError(f"adapter stack_factor must be >= 1, got {self.stack_factor}")

    def moe_mixing_parameters(self, width: int) -> int:
        """Parameters of the MoE adapter's mixing part at adapter width d = `width`: router (d x E), routed experts
        (E SiLU-gated FFNs, 3 d I each) and the fused shared experts (3 d I_shared)."""
        shared = self.num_shared_experts * (self.shared_expert_intermediate_size or self.expert_intermediate_size)
        return (width * self.num_experts + 3 * width * self.expert_intermediate_size * self.num_experts
                + 3 * width * shared)

    def dense_width(self, width: int) -> int:
        """The dense adapter's MLP width at adapter width d = `width`: `dense_intermediate_size`, or the width whose
        3 d I parameters come nearest to `moe_mixing_parameters(d)` (so both adapters have the same total)."""
        if self.dense_intermediate_size:
            return int(self.dense_intermediate_size)
        return max(1, round(self.moe_mixing_parameters(width) / (3 * width)))


_QWEN3_1_7B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)


class EurekaAudioConfig(PreTrainedConfig):
    """Eureka-Audio: ``audio_config`` (Whisper dims), ``adapter_config`` (MoE adapter), ``text_config`` (any causal
    LM config, Qwen3 by default) and the audio special-token ids.

    text_vocab_size: ids at or above it are not text and are dropped before detokenising (official behaviour);
    None = the tokenizer length is unknown here, so the processor's own length is used.
    """

    model_type = "eureka_audio"
    sub_configs_defaults = {
        "audio_config": EurekaAudioEncoderConfig,
        "adapter_config": EurekaAdapterConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3",
                                     init_kwargs={k: v for k, v in _QWEN3_1_7B.items() if k != "model_type"}),
    }

    audio_config: dict | PreTrainedConfig | None = None
    adapter_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    # Qwen3-Omni tokenizer ids; the processor and from_components overwrite them from the real tokenizer.
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670
    audio_pad_token_id: int = 151675
    text_vocab_size: int | None = None
    tie_word_embeddings: bool = False  # the language model ties its own embeddings according to text_config

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        vocab = self.text_config.vocab_size
        for name in ("audio_start_token_id", "audio_end_token_id", "audio_pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < vocab:
                raise ValueError(f"{name}={value} is outside the language model vocabulary (size {vocab})")

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    @property
    def adapter_hidden_size(self) -> int:
        return self.adapter_config.hidden_size or self.text_config.hidden_size

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "EurekaAudioConfig":
        """"tiny": Whisper-tiny dims (80 mels, 4 layers, 384) + 2-layer Qwen3 of width 64 + a small adapter, sized for
        the GPT-2 vocabulary of ``EurekaAudioProcessor.preset("tiny")``.
        "eureka-1.7b": Whisper-large-v3 dims + Qwen3-1.7B dims + our adapter defaults (docs/model.md#the-adapter).
        ``overrides`` replace top-level fields; pass ``text_config={...}`` etc. as dicts to change sub-fields
        (they are merged into the preset's dicts)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown EurekaAudioConfig preset {name!r}; choose from {sorted(_PRESETS)}")
        kwargs = copy.deepcopy(_PRESETS[name])
        for key, value in overrides.items():
            if key in ("audio_config", "adapter_config", "text_config") and isinstance(value, dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)


# Tiny tokenizer layout (see processing_eureka.TINY_SPECIAL_TOKENS): GPT-2's 50257 tokens, then 7 added ones.
_TINY_TEXT_VOCAB = 50257 + 7
_PRESETS = {
    "tiny": dict(
        audio_config=dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4),
        adapter_config=dict(stack_factor=4, num_experts=8, top_k=4, expert_intermediate_size=128,
                            num_shared_experts=1),
        text_config=dict(
            model_type="qwen3", vocab_size=50304, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            bos_token_id=50256, eos_token_id=50258, pad_token_id=50256,
        ),
        audio_start_token_id=50259, audio_end_token_id=50260, audio_pad_token_id=50261,
        text_vocab_size=_TINY_TEXT_VOCAB,
    ),
    "eureka-1.7b": dict(
        audio_config=dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32),
        adapter_config=dict(stack_factor=4, num_experts=8, top_k=4, expert_intermediate_size=1280,
                            num_shared_experts=0),
        text_config=dict(_QWEN3_1_7B),
        audio_start_token_id=151669, audio_end_token_id=151670, audio_pad_token_id=151675,
        text_vocab_size=None,
    ),
}
