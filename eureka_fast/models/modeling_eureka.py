"""EurekaAudioForCausalLM: Whisper encoder -> MoE adapter -> any transformers causal LM (Qwen3 by default).

Audio enters as mel windows ([W, n_mels, 3000], the windows of all requests of the batch in order); the encoder runs
on every window, each request's frames are concatenated in time and cut to 4 x (its number of audio-pad tokens),
the adapter turns every 4 frames into one LLM embedding, and these embeddings replace the embeddings of the
audio-pad positions of ``input_ids`` in row-major order (request by request, left to right).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .adapter import AdapterOutput, MoEExperts, build_adapter
from .configuration_eureka import AUDIO_TOKEN_TYPE, EurekaAudioConfig, EurekaAudioEncoderConfig

TRAINING_STAGES = ("align", "joint", "sft")


class AudioInputError(ValueError):
    """Inconsistent audio inputs (placeholder count vs features, token counts, windows)."""


@dataclass
class EurekaAudioCausalLMOutput(ModelOutput):
    """loss = ntp_loss + aux_loss_coef * aux_loss (when labels are given). aux_loss is 0 for text-only inputs.
    router_load: [E] fraction of routed token-slots per expert over the audio tokens of the batch (None w/o audio)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    ntp_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    router_load: torch.FloatTensor | None = None


def build_audio_encoder(audio_config: EurekaAudioEncoderConfig) -> nn.Module:
    """A randomly initialised Whisper encoder of the given dims (eureka_fast.models.whisper)."""
    from .whisper import WhisperDims, WhisperEncoder

    return WhisperEncoder(_whisper_dims(WhisperDims, audio_config.whisper_dims_kwargs()))


def _whisper_dims(dims_cls, audio_kwargs: dict):
    """WhisperDims from our audio dims; the text-decoder dims (unused by the encoder) get Whisper's own values
    when the dims class requires them."""
    import dataclasses
    import inspect

    filler = dict(n_vocab=51865, n_text_ctx=448, n_text_state=audio_kwargs["n_audio_state"],
                  n_text_head=audio_kwargs["n_audio_head"], n_text_layer=audio_kwargs["n_audio_layer"])
    if dataclasses.is_dataclass(dims_cls):
        names = {f.name for f in dataclasses.fields(dims_cls)}
    else:
        names = set(inspect.signature(dims_cls).parameters)
    kwargs = dict(audio_kwargs)
    kwargs.update({k: v for k, v in filler.items() if k in names and k not in kwargs})
    return dims_cls(**{k: v for k, v in kwargs.items() if k in names})


def _mark_initialized(module: nn.Module) -> None:
    # Modules handed in already trained (from_components) must not be re-initialised by post_init.
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor._is_hf_initialized = True


class EurekaAudioPreTrainedModel(PreTrainedModel):
    config: EurekaAudioConfig
    config_class = EurekaAudioConfig
    base_model_prefix = ""
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["MoEAdapter", "DenseAdapter"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.adapter_config.initializer_range
        if isinstance(module, MoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)


class EurekaAudioForCausalLM(EurekaAudioPreTrainedModel, GenerationMixin):
    """Eureka-Audio. ``language_model`` is a real transformers causal LM (``AutoModelForCausalLM`` of
    ``config.text_config``), ``audio_encoder`` the Whisper encoder, ``adapter`` the MoE adapter."""

    def __init__(self, config: EurekaAudioConfig, *, audio_encoder: nn.Module | None = None,
                 language_model: nn.Module | None = None):
        super().__init__(config)
        if audio_encoder is not None:
            _mark_initialized(audio_encoder)
        if language_model is not None:
            _mark_initialized(language_model)
        self.audio_encoder = audio_encoder if audio_encoder is not None else build_audio_encoder(config.audio_config)
        self.adapter = build_adapter(config.adapter_config, encoder_width=config.audio_config.n_audio_state,
                                  llm_width=config.text_config.hidden_size)
        self.language_model = (language_model if language_model is not None
                               else AutoModelForCausalLM.from_config(config.text_config))
        self.post_init()

    # --- transformers plumbing -----------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- switches ------------------------------------------------------------------------------------------------
    def set_reference_ops(self, use_reference: bool = True) -> None:
        """Run the adapter on the pure-PyTorch reference ops (True) or on the fast kernels (False, default)."""
        self.adapter.use_reference_ops = bool(use_reference)

    def freeze_audio_encoder(self, frozen: bool = True) -> None:
        self.audio_encoder.requires_grad_(not frozen)

    def freeze_adapter(self, frozen: bool = True) -> None:
        self.adapter.requires_grad_(not frozen)

    def freeze_language_model(self, frozen: bool = True) -> None:
        self.language_model.requires_grad_(not frozen)

    def set_training_stage(self, stage: str) -> int:
        """Training stages (docs/training.md#stages): "align" trains only the adapter (encoder and LLM frozen);
        "joint" and "sft" train everything. Returns the number of trainable parameters."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"unknown training stage {stage!r}; choose from {TRAINING_STAGES}")
        frozen_backbones = stage == "align"
        self.freeze_audio_encoder(frozen_backbones)
        self.freeze_language_model(frozen_backbones)
        self.freeze_adapter(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- audio path ----------------------------------------------------------------------------------------------
    def audio_positions(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Bool [B, S]: positions whose embedding is replaced by audio.

        token_type_ids == 3 when given (every such position must hold <|audio_pad|>; an <|audio_pad|> id typed as
        text, e.g. one the model generated, stays text), else input_ids == audio_pad_token_id."""
        by_id = input_ids == self.config.audio_pad_token_id
        if token_type_ids is None:
            return by_id
        if token_type_ids.shape != input_ids.shape:
            raise AudioInputError(f"token_type_ids shape {tuple(token_type_ids.shape)} != input_ids shape "
                                  f"{tuple(input_ids.shape)}")
        by_type = token_type_ids == AUDIO_TOKEN_TYPE
        wrong = by_type & ~by_id
        if bool(wrong.any()):
            b, s = (int(i) for i in wrong.nonzero()[0])
            raise AudioInputError(
                f"token_type_ids mark {int(wrong.sum())} audio position(s) that do not hold <|audio_pad|> "
                f"(id {self.config.audio_pad_token_id}), first at row {b}, position {s} (id {int(input_ids[b, s])})")
        return by_type

    def encode_audio(self, input_features: torch.Tensor, tokens_per_request: Sequence[int],
                     windows_per_request: Sequence[int] | None = None,
                     audio_token_counts: Iterable[int] | None = None) -> AdapterOutput:
        """Audio embeddings [sum(tokens_per_request), H_llm] for requests whose windows are stacked in
        ``input_features`` [W, n_mels, F]. A request with 0 tokens owns 0 windows.

        windows_per_request defaults to ceil(8 * tokens / F) per request (what the processor produces);
        audio_token_counts (one per audio item), when given, must add up to the same total.
        """
        if input_features.dim() != 3:
            raise AudioInputError(f"input_features must be [windows, n_mels, frames], got shape "
                                  f"{tuple(input_features.shape)}")
        n_windows, n_mels, n_frames = input_features.shape
        if n_mels != self.config.audio_config.n_mels:
            raise AudioInputError(f"input_features have {n_mels} mel bins, the audio encoder expects "
                                  f"{self.config.audio_config.n_mels}")
        stack = self.config.adapter_config.stack_factor
        if (n_frames // 2) % stack:
            raise AudioInputError(f"a window of {n_frames} mel frames gives {n_frames // 2} encoder frames, not a "
                                  f"multiple of the stack factor {stack}")
        tokens_per_request = [int(t) for t in tokens_per_request]
        total = sum(tokens_per_request)
        if audio_token_counts is not None:
            counts = [int(c) for c in (audio_token_counts.tolist() if torch.is_tensor(audio_token_counts)
                                       else audio_token_counts)]
            if sum(counts) != total:
                raise AudioInputError(
                    f"audio token count mismatch: the text holds {total} <|audio_pad|> positions "
                    f"({tokens_per_request} per request) but audio_token_counts add up to {sum(counts)} ({counts})")
        tokens_per_window = n_frames // 2 // stack
        if windows_per_request is None:
            windows_per_request = [-(-t // tokens_per_window) for t in tokens_per_request]
        else:
            windows_per_request = [int(w) for w in (windows_per_request.tolist() if torch.is_tensor(windows_per_request)
                                                    else windows_per_request)]
        if len(windows_per_request) != len(tokens_per_request):
            raise AudioInputError(f"windows_per_request has {len(windows_per_request)} entries for a batch of "
                                  f"{len(tokens_per_request)}")
        if sum(windows_per_request) != n_windows:
            raise AudioInputError(f"input_features hold {n_windows} windows but the requests need "
                                  f"{sum(windows_per_request)} ({windows_per_request}); audio token counts "
                                  f"per request: {tokens_per_request}")
        for b, (tokens, windows) in enumerate(zip(tokens_per_request, windows_per_request)):
            if tokens > windows * tokens_per_window:
                raise AudioInputError(f"request {b}: {tokens} <|audio_pad|> positions but its {windows} window(s) "
                                      f"hold only {windows * tokens_per_window} audio tokens")

        # Audio tokens each window contributes (the last window of a request is usually partly padding): only
        # their encoder frames go through the adapter. Stacking is row-local, so the kept rows are exactly those
        # of fusing whole windows.
        keep = []
        for tokens, windows in zip(tokens_per_request, windows_per_request):
            keep.extend(max(0, min(tokens_per_window, tokens - j * tokens_per_window)) for j in range(windows))
        frames = self.encode_windows(input_features, [stack * k for k in keep])  # [W, >= stack * max(keep), D]
        longest = max(keep, default=0)
        if longest:
            fused = self.adapter.fuse(frames[:, :stack * longest])  # [W, max(keep), d]
            kept = torch.cat([fused[w, :k] for w, k in enumerate(keep) if k], 0)
        else:
            kept = frames.new_zeros(0, self.adapter.input_proj.out_features)
        return self.adapter.mix(kept)

    def encode_windows(self, input_features: torch.Tensor, frames_needed: Sequence[int]) -> torch.Tensor:
        """Audio encoder output [W, T, D] (50 Hz) for mel windows [W, n_mels, F], T >= max(frames_needed).

        Window w's frames from frames_needed[w] on are never read by the caller (they belong to padding past the
        last audio token), so a replacement, e.g. a frozen-encoder feature cache, may leave anything there."""
        del frames_needed  # the plain encoder computes whole windows
        encoder_dtype = next(self.audio_encoder.parameters()).dtype
        return self.audio_encoder(input_features.to(encoder_dtype))

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_token_counts: torch.Tensor | Sequence[int] | None = None,
        windows_per_request: torch.Tensor | Sequence[int] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        assistant_mask: torch.Tensor | None = None,  # processor output for the training collator; unused here
        past_key_values: Cache | None = None,  # pre-5.x name of `cache`
        **kwargs,
    ) -> EurekaAudioCausalLMOutput:
        if cache is None and past_key_values is not None:
            cache = past_key_values
        aux_loss = router_load = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            audio_mask = self.audio_positions(input_ids, token_type_ids)
            # An empty [0, n_mels, F] input_features (the processor's output for a text-only batch) means no audio.
            if input_features is not None and (input_features.shape[0] > 0 or bool(audio_mask.any())):
                tokens_per_request = audio_mask.sum(1).tolist()
                adapted = self.encode_audio(input_features, tokens_per_request, windows_per_request,
                                            audio_token_counts)
                inputs_embeds = inputs_embeds.masked_scatter(audio_mask.unsqueeze(-1),
                                                             adapted.embeddings.to(inputs_embeds.dtype))
                aux_loss, router_load = adapted.aux_loss, adapted.router_load
            elif bool(audio_mask.any()):
                raise AudioInputError(
                    f"input_ids hold {int(audio_mask.sum())} <|audio_pad|> positions but no input_features were given")
        elif input_features is not None:
            raise ValueError("input_features cannot be combined with inputs_embeds (the audio is merged into the "
                             "embeddings of input_ids)")

        lm_out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        ntp_loss = lm_out.loss
        loss = None
        if ntp_loss is not None:
            loss = ntp_loss
            if aux_loss is not None:
                loss = ntp_loss + self.config.adapter_config.aux_loss_coef * aux_loss.to(ntp_loss.dtype)
        return EurekaAudioCausalLMOutput(
            loss=loss, logits=lm_out.logits, cache=lm_out.cache, hidden_states=lm_out.hidden_states,
            attentions=lm_out.attentions, ntp_loss=ntp_loss, aux_loss=aux_loss, router_load=router_load)

    # --- generation ----------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration,
                                                             **kwargs)
        # Audio enters once, at prefill: later steps feed only the new token(s), and the cache already holds the
        # audio positions. Without a cache every step re-runs the whole prompt, audio included.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("input_features", "audio_token_counts", "windows_per_request"):
                model_inputs.pop(key, None)
            # generated tokens are text, whatever their id
            model_inputs["token_type_ids"] = torch.zeros_like(model_inputs["input_ids"])
        return model_inputs

    def generate(self, inputs=None, *args, **kwargs):
        """transformers generate(); audio enters at prefill. token_type_ids, when not given, are derived from the
        prompt (3 on <|audio_pad|>), so that ids generated later are never taken for audio."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("token_type_ids") is None and input_ids is not None and input_ids.dim() == 2:
            kwargs["token_type_ids"] = (input_ids == self.config.audio_pad_token_id).long() * AUDIO_TOKEN_TYPE
        return super().generate(inputs, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        """num_return_sequences / beams: rows are repeated, so each request's block of mel windows is repeated too
        (input_features is per window, not per row)."""
        features = model_kwargs.get("input_features")
        if expand_size == 1 or features is None or features.shape[0] == 0:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        features = model_kwargs.pop("input_features")
        windows = model_kwargs.pop("windows_per_request", None)
        counts = model_kwargs.pop("audio_token_counts", None)
        tokens = self.audio_positions(input_ids, model_kwargs.get("token_type_ids")).sum(1).tolist()
        if counts is not None and int(torch.as_tensor(counts).sum()) != sum(tokens):
            raise AudioInputError(f"audio token count mismatch: the text holds {sum(tokens)} <|audio_pad|> positions "
                                  f"but audio_token_counts add up to {int(torch.as_tensor(counts).sum())}")
        if windows is None:
            per_window = features.shape[-1] // 2 // self.config.adapter_config.stack_factor
            windows = [-(-t // per_window) for t in tokens]
        windows = [int(w) for w in torch.as_tensor(windows).tolist()]
        if sum(windows) != features.shape[0]:
            raise AudioInputError(f"input_features hold {features.shape[0]} windows but windows_per_request adds up "
                                  f"to {sum(windows)}")
        blocks = features.split(windows)
        # the per-row tensors (ids, masks, windows_per_request) are repeated by transformers
        model_kwargs["windows_per_request"] = torch.tensor(windows, device=features.device)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        model_kwargs["input_features"] = torch.cat([b for b in blocks for _ in range(expand_size)])
        return input_ids, model_kwargs

    # --- building from parts -------------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, whisper, llm, *, adapter_config: dict | None = None, tokenizer=None,
                        dtype: torch.dtype | None = None):
        """A model from a Whisper checkpoint (anything ``load_whisper_encoder`` takes, or a loaded encoder) and a
        transformers causal LM (a directory or a loaded model; Qwen3 or any other). The adapter starts random.

        The audio special tokens come from ``tokenizer`` (a tokenizer or a directory; default: the LLM directory's
        tokenizer, if it has one): missing ones are added, and the LM embeddings grow to hold them.
        Returns (model, tokenizer); tokenizer is None when none was found.
        """
        from .processing_eureka import add_audio_special_tokens

        if isinstance(whisper, nn.Module):
            encoder = whisper
        else:
            from .whisper import load_whisper_encoder

            encoder = load_whisper_encoder(whisper, dtype=dtype or torch.float32)
        if isinstance(llm, nn.Module):
            language_model = llm
        else:
            language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype or "auto")
        if tokenizer is None and isinstance(llm, (str, os.PathLike)):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(llm)
            except (OSError, ValueError):
                tokenizer = None
        elif isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)

        dims = _encoder_dims(encoder)
        text_config = language_model.config
        token_ids = {}
        if tokenizer is not None:
            ids = add_audio_special_tokens(tokenizer)
            needed = max(len(tokenizer), max(ids.values()) + 1)
            if needed > text_config.vocab_size:
                language_model.resize_token_embeddings(needed)
                text_config = language_model.config
            token_ids = dict(audio_start_token_id=ids["start"], audio_pad_token_id=ids["pad"],
                             audio_end_token_id=ids["end"], text_vocab_size=len(tokenizer))
        else:
            # No tokenizer: put the audio tokens past the vocabulary and grow the embeddings to hold them.
            base = text_config.vocab_size
            language_model.resize_token_embeddings(base + 3)
            text_config = language_model.config
            token_ids = dict(audio_start_token_id=base, audio_end_token_id=base + 1, audio_pad_token_id=base + 2,
                             text_vocab_size=base)
        config = EurekaAudioConfig(audio_config=dims, adapter_config=dict(adapter_config or {}),
                                   text_config=text_config, **token_ids)
        model = cls(config, audio_encoder=encoder, language_model=language_model)
        if dtype is not None:
            model = model.to(dtype)
        return model, tokenizer


def _encoder_dims(encoder: nn.Module) -> dict:
    dims = getattr(encoder, "dims", None)
    if dims is None:
        raise ValueError("the Whisper encoder has no .dims; build it with eureka_fast.models.whisper")
    return dict(n_mels=dims.n_mels, n_audio_ctx=dims.n_audio_ctx, n_audio_state=dims.n_audio_state,
                n_audio_head=dims.n_audio_head, n_audio_layer=dims.n_audio_layer)


def _register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM resolve saved Eureka-Audio directories once eureka_fast.models is imported."""
    from transformers import AutoConfig

    from .configuration_eureka import EurekaAdapterConfig

    for config_cls in (EurekaAudioConfig, EurekaAudioEncoderConfig, EurekaAdapterConfig):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:  # already registered (module reloaded)
            pass
    try:
        AutoModelForCausalLM.register(EurekaAudioConfig, EurekaAudioForCausalLM)
    except ValueError:
        pass


_register_auto_classes()
