"""Whisper's text decoder (KV cache) and transcription.

`WhisperModel.transcribe` (the offline ASR of DataFlux) decodes 30 s windows without timestamps: greedy first, with
openai-whisper's fallback (compression ratio / log-probability tests, beam search, seeded temperature sampling), a
per-window token cap of n_text_ctx / 2 and an n-gram repetition stop. The tokenizer is a `tokenizer.json` (tokenizers
package) or openai-whisper's bundled tiktoken files; both packages are imported inside functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import (FusedSelfAttention, LayerNorm, WhisperDims, WhisperEncoder, int8_enabled, int8_linear,
                      int8_linears)

__all__ = ["WhisperDecoder", "WhisperModel", "WhisperTokenizer", "WindowDecoding", "compression_ratio",
           "repeated_suffix", "trimmed_frames", "COMPRESSION_RATIO_THRESHOLD", "LOGPROB_THRESHOLD",
           "FALLBACK_TEMPERATURES", "WINDOW_MODES", "COMPUTE_TYPES", "FIRST_PASSES"]

WINDOW_MODES = ("full", "trimmed")
COMPUTE_TYPES = ("float32", "int8")
FIRST_PASSES = ("greedy", "beam")
TRIM_STEP_FRAMES = 100  # a trimmed window is a whole number of seconds of mel frames (100 per second)...
TRIM_MARGIN_FRAMES = 300  # ...with at least 3 s of Whisper's silence padding (with 1-2 s tiny.en dropped words
# or said a sentence twice)


def trimmed_frames(samples: int) -> int:
    """Mel frames a window="trimmed" window encodes for `samples` of 16 kHz audio: the audio's frames plus
    TRIM_MARGIN_FRAMES of Whisper's padding, rounded up to a multiple of TRIM_STEP_FRAMES, at most the full 3000."""
    from ...audio import FRAMES_PER_WINDOW, HOP_LENGTH

    frames = -(-int(samples) // HOP_LENGTH) + TRIM_MARGIN_FRAMES
    return min(FRAMES_PER_WINDOW, -(-frames // TRIM_STEP_FRAMES) * TRIM_STEP_FRAMES)


def _trimmed_log_mel(waveform, n_mels: int, frames: int) -> Tensor:
    """The first `frames` columns of log_mel(waveform, mode="whisper") without computing the other 30 s: the
    waveform zero-padded to frames * 160 samples gives the same STFT frames (trimmed_frames leaves >= 3 s of zeros
    after the audio, so the reflect padding at the end reflects zeros too) and the same max for the dynamic-range
    clamp (the dropped frames are all at the log floor)."""
    from ...audio import FRAMES_PER_WINDOW, HOP_LENGTH, log_mel
    from ...audio import features

    if frames >= FRAMES_PER_WINDOW:
        return log_mel(waveform, n_mels, mode="whisper")
    tensor = features._as_tensor(waveform)
    return features._clamp_and_scale_(features._log10_mel(tensor, n_mels, frames * HOP_LENGTH))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError("%s must be one of %s, got %r" % (name, ", ".join(repr(c) for c in choices), value))


def _linear(module: nn.Module, name: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, or its dynamic int8 form inside `int8_linears()` (weights cached on `module` under `name`)."""
    if int8_enabled():
        return int8_linear(module, name, x, weight, bias)
    return F.linear(x, weight, bias)


def _load_clip(clip: Any, index: int):
    """One item of a clip list as a 16 kHz waveform; errors name the item's index."""
    from ...audio import AudioError, load_audio

    if clip is None:
        raise ValueError("clip %d is None, expected audio (a path, bytes, (array, rate) or a 1-D array)" % index)
    if isinstance(clip, list):
        raise ValueError("clip %d is a list; pass a flat list of clips" % index)
    try:
        waveform = load_audio(clip)
    except (AudioError, TypeError, ValueError) as exc:
        raise ValueError("clip %d: %s" % (index, exc)) from exc
    if len(waveform) == 0:
        raise ValueError("clip %d is empty (no samples)" % index)
    return waveform


class CrossAttention(nn.Module):
    """Decoder -> audio attention; k/v are projected once per utterance by one [2d, d] GEMM (k without bias)."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.kv_weight = nn.Parameter(torch.empty(2 * d, d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.out = nn.Linear(d, d)
        nn.init.uniform_(self.kv_weight, -1.0 / math.sqrt(d), 1.0 / math.sqrt(d))

    def project_kv(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        batch, length, d = audio.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = _linear(self, "kv", audio, self.kv_weight, bias).view(batch, length, 2, self.n_head, d // self.n_head)
        kv = kv.permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """key_mask [B, 1, 1, T] (True: attend): the audio frames of each row, where rows' windows differ in length."""
        batch, length, d = x.shape
        q = _linear(self, "q", x, self.q.weight, self.q.bias).view(batch, length, self.n_head, d // self.n_head)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=key_mask)
        return _linear(self, "out", attended.transpose(1, 2).reshape(batch, length, d), self.out.weight,
                       self.out.bias)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.attn_norm = LayerNorm(d)
        self.attn = FusedSelfAttention(d, n_head)
        self.cross_norm = LayerNorm(d)
        self.cross_attn = CrossAttention(d, n_head)
        self.mlp_norm = LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor, cache: dict, index: int) -> Tensor:
        h = self.attn_norm(x)
        if int8_enabled():
            batch, length, d = h.shape
            qkv = int8_linear(self.attn, "qkv", h, self.attn.qkv_weight, self.attn.qkv_bias())
            q, k, v = qkv.view(batch, length, 3, self.attn.n_head, d // self.attn.n_head).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.attn.project_qkv(h)
        past = cache.get(("self", index))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        cache[("self", index)] = (k, v)
        # Causal within the new tokens; every cached position precedes them all.
        new, total = q.shape[2], k.shape[2]
        mask = None
        if new > 1:
            mask = torch.ones(new, total, dtype=torch.bool, device=x.device).tril(diagonal=total - new)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if int8_enabled():
            batch, _, length, head_dim = attended.shape
            attended = attended.transpose(1, 2).reshape(batch, length, self.attn.n_head * head_dim)
            x = x + int8_linear(self.attn, "out", attended, self.attn.out.weight, self.attn.out.bias)
        else:
            x = x + self.attn.merge_heads(attended)
        cross_k, cross_v = cache[("cross", index)]
        x = x + self.cross_attn(self.cross_norm(x), cross_k, cross_v, cache.get("cross_mask"))
        hidden = F.gelu(_linear(self, "fc1", self.mlp_norm(x), self.fc1.weight, self.fc1.bias))
        return x + _linear(self, "fc2", hidden, self.fc2.weight, self.fc2.bias)


class WhisperDecoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        d = dims.n_text_state
        self.token_embedding = nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, d))
        self.layers = nn.ModuleList([DecoderLayer(d, dims.n_text_head) for _ in range(dims.n_text_layer)])
        self.final_norm = LayerNorm(d)

    def new_cache(self, audio_features: Tensor, lengths: Tensor | None = None) -> dict:
        """A KV cache over encoded windows [B, T, d]; `lengths` [B] (encoder frames per row, None: all T) limits
        each row's cross-attention to its own frames, as if it had been encoded and decoded alone."""
        cache: dict = {"length": 0, "cross_mask": None}
        for index, layer in enumerate(self.layers):
            cache[("cross", index)] = layer.cross_attn.project_kv(audio_features)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=audio_features.device)
            if bool((lengths < audio_features.shape[1]).any()):
                frames = torch.arange(audio_features.shape[1], device=audio_features.device)
                cache["cross_mask"] = (frames[None, :] < lengths[:, None])[:, None, None, :]
        return cache

    def forward(self, tokens: Tensor, cache: dict) -> Tensor:
        """tokens [B, n] continuing the cached prefix -> logits [B, n, vocab] (float32)."""
        offset = cache["length"]
        if offset + tokens.shape[1] > self.dims.n_text_ctx:
            raise ValueError("decoder context of %d tokens exceeded" % self.dims.n_text_ctx)
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + tokens.shape[1]]
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index)
        cache["length"] = offset + tokens.shape[1]
        x = self.final_norm(x)
        if int8_enabled():
            return int8_linear(self, "logits", x, self.token_embedding.weight)
        return (x @ self.token_embedding.weight.to(x.dtype).t()).float()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer glue


class WhisperTokenizer:
    """Text <-> ids plus the special ids greedy decoding needs.

    Backed by a `tokenizer.json` (tokenizers package) when the checkpoint ships one (CTranslate2 / transformers
    directories), else by openai-whisper's bundled tiktoken files (gpt2 / multilingual).
    """

    def __init__(self, encode, decode, special: dict[str, int], suppress: list[int], suppress_begin: list[int]):
        self._encode, self._decode = encode, decode
        self.special = special
        self.eot = special["<|endoftext|>"]
        self.sot = special["<|startoftranscript|>"]
        self.no_timestamps = special["<|notimestamps|>"]
        self.suppress = suppress
        self.suppress_begin = suppress_begin

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids if int(i) < self.eot])

    def prompt(self, multilingual: bool, language: str = "en", task: str = "transcribe") -> list[int]:
        ids = [self.sot]
        if multilingual:
            key = "<|%s|>" % language
            if key not in self.special:
                raise ValueError("language %r has no token in this tokenizer" % language)
            ids += [self.special[key], self.special["<|%s|>" % task]]
        return ids + [self.no_timestamps]

    @classmethod
    def from_tokenizer_json(cls, path: str, config: dict | None = None) -> "WhisperTokenizer":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        special = {tok: idx for tok, idx in vocab.items() if tok.startswith("<|") and tok.endswith("|>")}
        config = config or {}
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True), special,
                   list(config.get("suppress_ids", config.get("suppress_tokens", []))),
                   list(config.get("suppress_ids_begin", config.get("begin_suppress_tokens", []))))

    @classmethod
    def from_openai_whisper(cls, multilingual: bool, num_languages: int = 99) -> "WhisperTokenizer":
        from whisper.tokenizer import get_tokenizer

        tok = get_tokenizer(multilingual, num_languages=num_languages)
        special = dict(tok.special_tokens)
        suppress = sorted(set(tok.non_speech_tokens) | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev,
                                                        tok.sot_lm, tok.no_speech})
        return cls(tok.encode, tok.decode, special, suppress, [tok.encode(" ")[0], tok.eot])


# ----------------------------------------------------------------------------------------------------------------------
# Decoding guards (openai-whisper's fallback tests plus an n-gram loop stop)

COMPRESSION_RATIO_THRESHOLD = 2.4  # openai-whisper: above this a window's text is a repetition loop
LOGPROB_THRESHOLD = -1.0  # openai-whisper: below this average token log-probability a window is retried
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def compression_ratio(text: str) -> float:
    """len(utf-8 text) / len(zlib(text)), as openai-whisper computes it: loops compress far better than speech."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def repeated_suffix(tokens: list[int], min_repeats: int = 3, min_tokens: int = 16) -> tuple[int, int] | None:
    """(period, copies) when `tokens` ends in `copies` >= min_repeats back-to-back copies of one `period`-token
    n-gram covering >= min_tokens tokens (the shortest such period), else None. With the defaults a phrase said three
    times in a row is a loop only if the three copies span 16 tokens (one token needs 16 copies, two need 8)."""
    n = len(tokens)
    if min_repeats < 2 or n < max(min_tokens, 2):
        return None
    last = tokens[-1]
    for period in range(1, n // min_repeats + 1):
        if tokens[-1 - period] != last:
            continue
        block = tokens[n - period:]
        copies = 1
        while (copies + 1) * period <= n and tokens[n - (copies + 1) * period:n - copies * period] == block:
            copies += 1
        if copies >= min_repeats and copies * period >= min_tokens:
            return period, copies
    return None


@dataclass
class WindowDecoding:
    """One window's decode. `stop`: "eot", "repetition" (the n-gram guard cut a loop, keeping its first copy) or
    "length" (the token cap). `temperature` / `beam_size` say which attempt produced it (0.0 / 1 is greedy)."""

    tokens: list[int]
    text: str
    sum_logprob: float
    avg_logprob: float
    compression_ratio: float
    stop: str
    temperature: float = 0.0
    beam_size: int = 1
    attempts: int = 1

    @property
    def fell_back(self) -> bool:
        return self.attempts > 1


# ----------------------------------------------------------------------------------------------------------------------
# Full model


class WhisperModel(nn.Module):
    """Encoder + decoder; `transcribe(audio)` decodes 30 s windows without timestamps: greedy first, with
    openai-whisper-style fallback (beam search, then temperature sampling) for windows that fail its quality tests."""

    def __init__(self, dims: WhisperDims, tokenizer: WhisperTokenizer | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = WhisperEncoder(dims)
        self.decoder = WhisperDecoder(dims)
        self.tokenizer = tokenizer

    @property
    def max_window_tokens(self) -> int:
        """Hard cap on new tokens per window: half the decoder context (openai-whisper's sample_len)."""
        return self.dims.n_text_ctx // 2

    def _token_budget(self, prompt: list[int], max_new_tokens: int | None) -> int:
        limit = min(self.dims.n_text_ctx - len(prompt), self.max_window_tokens)
        return limit if max_new_tokens is None else max(0, min(max_new_tokens, limit))

    def _suppress_masks(self, device) -> tuple[Tensor, Tensor]:
        """(suppressed at every step, suppressed at the first step) boolean masks over the vocabulary."""
        tokenizer = self._require_tokenizer()
        suppress = torch.zeros(self.dims.n_vocab, dtype=torch.bool, device=device)
        suppress[[i for i in tokenizer.suppress if 0 <= i < self.dims.n_vocab]] = True
        # Only text and end-of-text are outputs here: every other special token (start/language/task/timestamps).
        suppress[tokenizer.eot + 1:] = True
        begin_suppress = suppress.clone()
        begin_suppress[[i for i in tokenizer.suppress_begin if 0 <= i < self.dims.n_vocab]] = True
        return suppress, begin_suppress

    def _decode_start(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None,
                      lengths: Tensor | None = None):
        """What every batched decode starts from: the tokenizer, the token budget, a fresh KV cache over the windows
        (`lengths`: each row's encoder frames, see WhisperDecoder.new_cache), the prompt repeated per row, and the
        (suppress, begin_suppress) logit masks."""
        tokenizer = self._require_tokenizer()
        device = audio_features.device
        tokens = torch.tensor([prompt] * audio_features.shape[0], dtype=torch.long, device=device)
        return (tokenizer, self._token_budget(prompt, max_new_tokens), self.decoder.new_cache(audio_features, lengths),
                tokens, self._suppress_masks(device))

    @staticmethod
    def _accept_token(row: int, token: int, logprob: float, eot: int, outputs: list[list[int]], sums: list[float],
                      stops: list[str], repetition: tuple[int, int] | None) -> bool:
        """Adds one decoded token to `row`'s output (its log-probability to the row's sum); False when the row ends
        here: the end token, or an n-gram loop that `repetition` cuts back to one copy."""
        sums[row] += logprob
        if token == eot:
            stops[row] = "eot"
            return False
        outputs[row].append(token)
        if repetition is not None:
            loop = repeated_suffix(outputs[row], *repetition)
            if loop is not None:
                period, copies = loop
                del outputs[row][len(outputs[row]) - (copies - 1) * period:]
                stops[row] = "repetition"
                return False
        return True

    @torch.inference_mode()
    def sample_decode(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None = None,
                      temperature: float = 0.0, generator: torch.Generator | None = None,
                      repetition: tuple[int, int] | None = None,
                      lengths: Tensor | None = None) -> list[tuple[list[int], float, str]]:
        """Greedy (temperature 0) or sampled decoding of a batch of encoded windows [B, T, d] from a shared prompt.

        Returns per item (new ids, sum of token log-probabilities including the end token, stop reason).
        `repetition` = (min_repeats, min_tokens) enables the n-gram loop stop (see `repeated_suffix`); `lengths`
        [B]: each row's encoder frames where they differ (trimmed windows)."""
        tokenizer, budget, cache, tokens, (suppress, begin_suppress) = self._decode_start(audio_features, prompt,
                                                                                         max_new_tokens, lengths)
        device, batch = audio_features.device, audio_features.shape[0]
        outputs: list[list[int]] = [[] for _ in range(batch)]
        sums = [0.0] * batch
        stops = ["length"] * batch
        finished = [False] * batch
        for step in range(budget):
            logits = self.decoder(tokens, cache)[:, -1]
            logits.masked_fill_(begin_suppress if step == 0 else suppress, -math.inf)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0].tolist()
            for b, token in enumerate(next_ids.tolist()):
                if not finished[b]:
                    finished[b] = not self._accept_token(b, token, logprobs[b], tokenizer.eot, outputs, sums, stops,
                                                         repetition)
            if all(finished):
                break
            tokens = torch.where(torch.tensor(finished, device=device), torch.full_like(next_ids, tokenizer.eot),
                                 next_ids)[:, None]
        return [(outputs[b], sums[b], stops[b]) for b in range(batch)]

    @torch.inference_mode()
    def greedy_decode(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None = None
                      ) -> list[list[int]]:
        """Greedy decoding (no guard) of a batch of encoded windows [B, T, d] from a shared prompt; returns the new
        ids. At most `max_window_tokens` (n_text_ctx / 2) new tokens per window."""
        return [ids for ids, _, _ in self.sample_decode(audio_features, prompt, max_new_tokens)]

    @torch.inference_mode()
    def beam_search(self, audio_features: Tensor, prompt: list[int], beam_size: int = 5,
                    max_new_tokens: int | None = None, patience: float = 1.0,
                    repetition: tuple[int, int] | None = None) -> tuple[list[int], float, str]:
        """Beam search over the KV-cached decoder for one encoded window [1, T, d] (openai-whisper's algorithm:
        each beam proposes its beam_size + 1 best tokens, the best beam_size unfinished continuations survive, and
        search ends once round(beam_size * patience) sequences have ended; the winner maximises sum log-probability
        / length). Returns (new ids, sum log-probability, stop reason). beam_size 1 is greedy decoding."""
        if audio_features.shape[0] != 1:
            raise ValueError("beam_search decodes one window at a time, got a batch of %d" % audio_features.shape[0])
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1, got %d" % beam_size)
        tokenizer = self._require_tokenizer()
        eot = tokenizer.eot
        device = audio_features.device
        budget = self._token_budget(prompt, max_new_tokens)
        max_finished = max(1, round(beam_size * patience))
        cache = self.decoder.new_cache(audio_features)
        cross = {key: value for key, value in cache.items() if isinstance(key, tuple) and key[0] == "cross"}
        suppress, begin_suppress = self._suppress_masks(device)
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (new ids, sum log-probability)
        finished: dict[tuple[int, ...], float] = {}
        looped: dict[tuple[int, ...], float] = {}  # beams cut by the n-gram guard: used only if nothing else ends
        tokens = torch.tensor([prompt], dtype=torch.long, device=device)
        for step in range(budget):
            logits = self.decoder(tokens, cache)[:, -1]
            logits.masked_fill_(begin_suppress if step == 0 else suppress, -math.inf)
            top_logprobs, top_ids = torch.log_softmax(logits, dim=-1).topk(beam_size + 1, dim=-1)
            scores: dict[tuple[int, ...], float] = {}
            sources: dict[tuple[int, ...], int] = {}
            for b, (prefix, score) in enumerate(beams):
                for logprob, token in zip(top_logprobs[b].tolist(), top_ids[b].tolist()):
                    if math.isinf(logprob):
                        continue
                    sequence = prefix + (token,)
                    if sequence not in scores:
                        scores[sequence], sources[sequence] = score + logprob, b
            new_beams, new_sources, newly_finished = [], [], {}
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == eot:
                    newly_finished[sequence[:-1]] = scores[sequence]
                    continue
                loop = repeated_suffix(list(sequence), *repetition) if repetition is not None else None
                if loop is not None:
                    period, copies = loop
                    looped.setdefault(sequence[:len(sequence) - (copies - 1) * period], scores[sequence])
                    continue
                new_beams.append((sequence, scores[sequence]))
                new_sources.append(sources[sequence])
                if len(new_beams) == beam_size:
                    break
            for sequence in sorted(newly_finished, key=newly_finished.get, reverse=True):
                if len(finished) >= max_finished:
                    break
                finished.setdefault(sequence, newly_finished[sequence])
            if len(finished) >= max_finished or not new_beams:
                break
            beams = new_beams
            index = torch.tensor(new_sources, dtype=torch.long, device=device)
            for key in list(cache):
                if isinstance(key, tuple) and key[0] == "self":
                    k, v = cache[key]
                    cache[key] = (k.index_select(0, index), v.index_select(0, index))
            for key, (k, v) in cross.items():
                cache[key] = (k.expand(len(beams), *k.shape[1:]), v.expand(len(beams), *v.shape[1:]))
            tokens = torch.tensor([[sequence[-1]] for sequence, _ in beams], dtype=torch.long, device=device)
        if finished:
            pool, stop = finished, "eot"
        elif looped:
            pool, stop = looped, "repetition"
        else:
            pool, stop = dict(beams), "length"
        best = max(pool, key=lambda sequence: pool[sequence] / max(1, len(sequence)))
        return list(best), pool[best], stop

    def _require_tokenizer(self) -> WhisperTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this WhisperModel has no tokenizer; load it with load_whisper_model()")
        return self.tokenizer

    def _window_result(self, ids: list[int], sum_logprob: float, stop: str, temperature: float,
                       beam_size: int) -> WindowDecoding:
        text = self._require_tokenizer().decode(ids).strip()
        # openai-whisper averages over the text tokens plus the end token
        return WindowDecoding(ids, text, sum_logprob, sum_logprob / (len(ids) + 1), compression_ratio(text), stop,
                              temperature, beam_size)

    def _decode_options(self, language: str, task: str, max_new_tokens: int | None, beam_size: int,
                        temperatures: tuple[float, ...], best_of: int, compression_ratio_threshold: float | None,
                        logprob_threshold: float | None, repetition_limit: int | None,
                        repetition_min_tokens: int) -> dict:
        tokenizer = self._require_tokenizer()
        return dict(prompt=tokenizer.prompt(self.dims.is_multilingual, language, task), max_new_tokens=max_new_tokens,
                    beam_size=beam_size, temperatures=tuple(temperatures) or (0.0,), best_of=best_of,
                    compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
                    repetition=(repetition_limit, repetition_min_tokens) if repetition_limit else None)

    @staticmethod
    def _failed(result: WindowDecoding, options: dict) -> bool:
        """openai-whisper's quality tests (plus the loop guard): True sends the window to the next attempt."""
        ratio, logprob = options["compression_ratio_threshold"], options["logprob_threshold"]
        return (result.stop == "repetition"
                or (ratio is not None and result.compression_ratio > ratio)
                or (logprob is not None and result.avg_logprob < logprob))

    def _sampled(self, window: Tensor, temperature: float, count: int, generator: torch.Generator,
                 options: dict) -> WindowDecoding:
        decodes = self.sample_decode(window.expand(count, *window.shape[1:]), options["prompt"],
                                     options["max_new_tokens"], temperature, generator, options["repetition"])
        results = [self._window_result(ids, lp, stop, temperature, 1) for ids, lp, stop in decodes]
        # best of the samples: not cut by the loop guard first, then sum log-probability / length
        return max(results, key=lambda r: (r.stop != "repetition", r.sum_logprob / max(1, len(r.tokens))))

    def _settle_window(self, window: Tensor | None, first: WindowDecoding, generator: torch.Generator,
                       options: dict) -> WindowDecoding:
        """The fallback chain for one encoded window [1, T, d] whose first attempt is `first`: beam search, then
        sampling at each further temperature, until an attempt passes the quality tests (`window` is read only
        when `first` fails them)."""
        attempts = [first]
        if self._failed(first, options):
            retries: list[tuple[float, int]] = []
            if options["beam_size"] > 1:
                retries.append((0.0, options["beam_size"]))
            retries += [(t, 1) for t in options["temperatures"][1:]]
            for temperature, beam in retries:
                if beam > 1:
                    ids, lp, stop = self.beam_search(window, options["prompt"], beam, options["max_new_tokens"],
                                                     repetition=options["repetition"])
                    retry = self._window_result(ids, lp, stop, 0.0, beam)
                else:
                    retry = self._sampled(window, temperature, options["best_of"] if temperature > 0 else 1,
                                          generator, options)
                attempts.append(retry)
                if not self._failed(retry, options):
                    break
        passing = [r for r in attempts if not self._failed(r, options)]
        if passing:
            chosen = passing[0]
        else:  # nothing passed: the least loop-like attempt, then the most confident
            ratio = options["compression_ratio_threshold"]
            chosen = max(attempts, key=lambda r: (r.stop != "repetition",
                                                  ratio is None or r.compression_ratio <= ratio, r.avg_logprob))
        chosen.attempts = len(attempts)
        return chosen

    def _encode_windows(self, waveforms: list, n_mels: int, window: str = "full") -> tuple[Tensor, Tensor | None]:
        """Encoded windows [B, T, d] and, where the rows' lengths differ, each row's encoder frames [B] (else None).
        window="full": every window is 30 s (3000 mel frames, Whisper's padding after the audio); "trimmed": each
        window keeps trimmed_frames(its samples) of them, the batch padded to its longest and the padding masked
        (WhisperEncoder `lengths`), so each row equals its window encoded alone."""
        from ...audio import PAD_VALUE, log_mel

        param = self.encoder.conv1.weight
        if window == "full":
            mels = [log_mel(w, n_mels, mode="whisper") for w in waveforms]
            return self.encoder(torch.stack(mels).to(device=param.device, dtype=param.dtype)), None
        frames = [trimmed_frames(len(w)) for w in waveforms]
        mels = torch.full((len(waveforms), n_mels, max(frames)), PAD_VALUE)
        for row, (waveform, count) in enumerate(zip(waveforms, frames)):
            mels[row, :, :count] = _trimmed_log_mel(waveform, n_mels, count)
        mel_lengths = None if len(set(frames)) == 1 else torch.tensor(frames, device=param.device)
        features = self.encoder(mels.to(device=param.device, dtype=param.dtype), mel_lengths)
        return features, None if mel_lengths is None else WhisperEncoder.output_lengths(mel_lengths)

    @staticmethod
    def _row_features(features: Tensor, lengths: Tensor | None, row: int) -> Tensor:
        """One row of encoded windows as [1, T_row, d], cut to its own frames (what encoding it alone gives)."""
        window = features[row:row + 1]
        return window if lengths is None else window[:, :int(lengths[row])]

    @torch.inference_mode()
    def decode_windows(self, audio: Any, *, language: str = "en", task: str = "transcribe",
                       max_new_tokens: int | None = None, batch_windows: int = 4, beam_size: int = 5,
                       temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES, best_of: int = 5,
                       compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                       logprob_threshold: float | None = LOGPROB_THRESHOLD, repetition_limit: int | None = 3,
                       repetition_min_tokens: int = 16, seed: int = 0, window: str = "full",
                       compute_type: str = "float32", first_pass: str = "greedy") -> list[WindowDecoding]:
        """Per-window decodes of `audio` (see `transcribe` for the options)."""
        _check_choice("window", window, WINDOW_MODES)
        _check_choice("compute_type", compute_type, COMPUTE_TYPES)
        _check_choice("first_pass", first_pass, FIRST_PASSES)
        with int8_linears(compute_type == "int8"):
            return self._decode_windows(audio, language, task, max_new_tokens, batch_windows, beam_size, temperatures,
                                        best_of, compression_ratio_threshold, logprob_threshold, repetition_limit,
                                        repetition_min_tokens, seed, window, first_pass)

    def _decode_windows(self, audio, language, task, max_new_tokens, batch_windows, beam_size, temperatures, best_of,
                        compression_ratio_threshold, logprob_threshold, repetition_limit, repetition_min_tokens, seed,
                        window, first_pass="greedy") -> list[WindowDecoding]:
        from ...audio import SAMPLES_PER_WINDOW, load_audio

        waveform = load_audio(audio)
        options = self._decode_options(language, task, max_new_tokens, beam_size, temperatures, best_of,
                                       compression_ratio_threshold, logprob_threshold, repetition_limit,
                                       repetition_min_tokens)
        prompt, repetition = options["prompt"], options["repetition"]
        generator = torch.Generator(device=self.encoder.conv1.weight.device).manual_seed(seed)
        first_t = options["temperatures"][0]
        results: list[WindowDecoding] = []
        starts = list(range(0, len(waveform), SAMPLES_PER_WINDOW))
        for first in range(0, len(starts), batch_windows):
            features, lengths = self._encode_windows([waveform[s:s + SAMPLES_PER_WINDOW]
                                                      for s in starts[first:first + batch_windows]], self.dims.n_mels,
                                                     window)
            if first_t == 0 and self._beam_first(first_pass, options):
                batch_results = [self._beam_window(self._row_features(features, lengths, w), options)
                                 for w in range(features.shape[0])]
            elif first_t == 0:
                decodes = self.sample_decode(features, prompt, max_new_tokens, 0.0, None, repetition, lengths)
                batch_results = [self._window_result(ids, lp, stop, 0.0, 1) for ids, lp, stop in decodes]
            else:
                batch_results = [self._sampled(self._row_features(features, lengths, w), first_t, best_of, generator,
                                               options)
                                 for w in range(features.shape[0])]
            settle = self._after_first_pass(first_pass, options)
            for w, result in enumerate(batch_results):
                results.append(self._settle_window(self._row_features(features, lengths, w), result, generator,
                                                   settle))
        return results

    @staticmethod
    def _beam_first(first_pass: str, options: dict) -> bool:
        return first_pass == "beam" and options["beam_size"] > 1

    @staticmethod
    def _after_first_pass(first_pass: str, options: dict) -> dict:
        """The fallback options once the first pass ran: a beam-search first pass is not retried with beam search."""
        return {**options, "beam_size": 1} if first_pass == "beam" else options

    def _beam_window(self, window: Tensor, options: dict) -> WindowDecoding:
        ids, lp, stop = self.beam_search(window, options["prompt"], options["beam_size"], options["max_new_tokens"],
                                         repetition=options["repetition"])
        return self._window_result(ids, lp, stop, 0.0, options["beam_size"])

    @torch.inference_mode()
    def decode_clips(self, clips: list, *, batch_size: int = 8, language: str = "en", task: str = "transcribe",
                     max_new_tokens: int | None = None, beam_size: int = 5,
                     temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES, best_of: int = 5,
                     compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                     logprob_threshold: float | None = LOGPROB_THRESHOLD, repetition_limit: int | None = 3,
                     repetition_min_tokens: int = 16, seed: int = 0, batch_windows: int = 4, window: str = "full",
                     compute_type: str = "float32", first_pass: str = "greedy") -> list[list[WindowDecoding]]:
        """Per-window decodes of each clip in `clips`, `batch_size` windows (of any clips) per encoder call and
        per greedy decode, longest windows first (with window="trimmed", windows of similar length share a batch).
        Equal to `decode_windows` on each clip alone: every clip's windows are cut as there, and the windows that
        fail the greedy pass take their fallbacks afterwards, clip by clip in window order, each clip drawing from
        its own generator seeded with `seed`. `batch_windows` matters only for a sampled first pass
        (temperatures[0] > 0), which decodes clip by clip as `decode_windows` does."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError("batch_size must be a positive integer, got %r" % (batch_size,))
        _check_choice("window", window, WINDOW_MODES)
        _check_choice("compute_type", compute_type, COMPUTE_TYPES)
        _check_choice("first_pass", first_pass, FIRST_PASSES)
        waveforms = [_load_clip(clip, index) for index, clip in enumerate(clips)]
        options = self._decode_options(language, task, max_new_tokens, beam_size, temperatures, best_of,
                                       compression_ratio_threshold, logprob_threshold, repetition_limit,
                                       repetition_min_tokens)
        with int8_linears(compute_type == "int8"):
            if options["temperatures"][0] != 0:
                # A sampled first pass draws every window's samples before any fallback, from one generator per
                # clip; keeping that order means decoding clip by clip.
                return [self._decode_windows(w, language, task, max_new_tokens, batch_windows, beam_size,
                                             temperatures, best_of, compression_ratio_threshold, logprob_threshold,
                                             repetition_limit, repetition_min_tokens, seed, window, first_pass)
                        for w in waveforms]
            return self._decode_clips_greedy_first(waveforms, batch_size, options, seed, window, first_pass)

    def _decode_clips_greedy_first(self, waveforms: list, batch_size: int, options: dict, seed: int,
                                   window: str, first_pass: str = "greedy") -> list[list[WindowDecoding]]:
        from ...audio import SAMPLES_PER_WINDOW

        device = self.encoder.conv1.weight.device
        windows = [(clip, start) for clip, waveform in enumerate(waveforms)
                   for start in range(0, len(waveform), SAMPLES_PER_WINDOW)]
        pieces = [waveforms[clip][start:start + SAMPLES_PER_WINDOW] for clip, start in windows]
        # Longest first (stable: full windows keep their order): a batch pads its rows to its longest window.
        order = sorted(range(len(windows)), key=lambda i: -len(pieces[i]))
        first_tries: dict[int, WindowDecoding] = {}
        retry_features: dict[int, Tensor] = {}
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            features, lengths = self._encode_windows([pieces[i] for i in chunk], self.dims.n_mels, window)
            if self._beam_first(first_pass, options):  # beam search takes one window at a time
                tries = [self._beam_window(self._row_features(features, lengths, row), options)
                         for row in range(len(chunk))]
            else:
                tries = [self._window_result(ids, lp, stop, 0.0, 1) for ids, lp, stop in
                         self._greedy_rows(features, options["prompt"], options["max_new_tokens"],
                                           options["repetition"], lengths)]
            for row, (i, first_try) in enumerate(zip(chunk, tries)):
                first_tries[i] = first_try
                if self._failed(first_tries[i], options):  # kept for its fallbacks, cut to its own frames
                    retry_features[i] = self._row_features(features, lengths, row).clone()
        generators: dict[int, torch.Generator] = {}
        options = self._after_first_pass(first_pass, options)
        results: list[list[WindowDecoding]] = [[] for _ in waveforms]
        for i, (clip, _) in enumerate(windows):
            if clip not in generators:
                generators[clip] = torch.Generator(device=device).manual_seed(seed)
            results[clip].append(self._settle_window(retry_features.pop(i, None), first_tries[i], generators[clip],
                                                     options))
        return results

    @torch.inference_mode()
    def _greedy_rows(self, audio_features: Tensor, prompt: list[int], max_new_tokens: int | None,
                     repetition: tuple[int, int] | None,
                     lengths: Tensor | None = None) -> list[tuple[list[int], float, str]]:
        """Greedy decoding of a batch of windows whose rows leave the batch as they finish: each step runs only the
        unfinished rows, their self-attention caches and cross-attention k/v (and key mask) selected down with them.
        Per row the same steps, suppression and stop rules as `sample_decode` at temperature 0."""
        tokenizer, budget, cache, tokens, (suppress, begin_suppress) = self._decode_start(audio_features, prompt,
                                                                                         max_new_tokens, lengths)
        device, batch = audio_features.device, audio_features.shape[0]
        outputs: list[list[int]] = [[] for _ in range(batch)]
        sums = [0.0] * batch
        stops = ["length"] * batch
        active = list(range(batch))  # original row of each row still in the batch
        for step in range(budget):
            logits = self.decoder(tokens, cache)[:, -1]
            logits.masked_fill_(begin_suppress if step == 0 else suppress, -math.inf)
            next_ids = logits.argmax(-1)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0].tolist()
            keep = []
            for position, (row, token) in enumerate(zip(active, next_ids.tolist())):
                if self._accept_token(row, token, logprobs[position], tokenizer.eot, outputs, sums, stops, repetition):
                    keep.append(position)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                for key in list(cache):
                    if isinstance(key, tuple):
                        k, v = cache[key]
                        cache[key] = (k.index_select(0, index), v.index_select(0, index))
                if cache["cross_mask"] is not None:
                    cache["cross_mask"] = cache["cross_mask"].index_select(0, index)
                next_ids = next_ids.index_select(0, index)
                active = [active[p] for p in keep]
            tokens = next_ids[:, None]
        return [(outputs[b], sums[b], stops[b]) for b in range(batch)]

    @torch.inference_mode()
    def transcribe(self, audio: Any, *, language: str = "en", task: str = "transcribe",
                   max_new_tokens: int | None = None, batch_windows: int = 4, beam_size: int = 5,
                   temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES, best_of: int = 5,
                   compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                   logprob_threshold: float | None = LOGPROB_THRESHOLD, repetition_limit: int | None = 3,
                   repetition_min_tokens: int = 16, seed: int = 0, batch_size: int = 8, window: str = "full",
                   compute_type: str = "float32", first_pass: str = "greedy") -> str | list[str]:
        """Transcript of `audio` (16 kHz waveform or anything `load_audio` accepts), without timestamps; for a list
        of clips, the list of their transcripts.

        A list is transcribed batched: each clip keeps its own 30 s windows (clips are never packed together into
        one window), and `batch_size` windows, of whichever clips, go through one encoder call and one greedy decode
        whose rows leave the batch as they finish; fallbacks run per window as below, each clip's sampling from its
        own generator seeded with `seed`. Every transcript equals `transcribe` of that clip alone. A clip that is
        None, empty, NaN / infinite, of a non-numeric dtype or of an unreadable shape raises a ValueError naming its
        index in the list.

        Speed options (the same for one clip and a list; docs/audio.md#transcription compares them):
        - `window="full"` (default) encodes every window as 30 s, as Whisper was trained and openai-whisper /
          faster-whisper run it. "trimmed" encodes a window only as far as its audio plus 3-4 s of Whisper's silence
          padding (trimmed_frames: whole seconds, at most 30 s): a 3-6 s clip is encoded as 6-9 s instead of 30 s.
          The model then attends to fewer padding frames than in training, so transcripts can differ from the full
          window's; a list's windows are batched longest first.
        - `compute_type="int8"` runs the encoder layers' and decoder's projections (and the decoder's output
          projection over the vocabulary) as dynamic int8 GEMMs: int8 weights per output channel, activations
          quantised per call, like faster-whisper's compute_type="int8"; "float32" (default) is exact.
        - `first_pass="beam"` decodes each window with beam search (`beam_size`) first instead of greedy (as
          openai-whisper does when given a beam size); its fallbacks are then the sampled temperatures only. Beam
          search takes one window at a time, so it costs several greedy passes.

        Audio longer than 30 s is cut into consecutive 30 s windows whose transcripts are joined with spaces;
        `batch_windows` windows go through the first (greedy) pass together. Each window, as in openai-whisper:
        - first pass at `temperatures[0]` (0.0: greedy, identical to faster-whisper / CTranslate2 greedy; or beam
          search, `first_pass="beam"`);
        - it fails when its text's gzip compression ratio > `compression_ratio_threshold` (2.4), its average token
          log-probability < `logprob_threshold` (-1.0), or the n-gram guard cut a loop (None disables a test);
        - a failed window is re-decoded with beam search (`beam_size`, 5; 1 skips it), then by sampling at each
          further temperature (0.2, 0.4, ... 1.0; `best_of` samples each, from a generator seeded with `seed`, so
          results are reproducible) until an attempt passes; if none does, the attempt least like a loop wins.
        Guards on every attempt: at most `max_new_tokens` new tokens per window, never more than n_text_ctx / 2
        (224 for Whisper); and a decode stops as soon as its last `repetition_limit` (3) back-to-back copies of an
        n-gram cover >= `repetition_min_tokens` (16) tokens, keeping one copy (`repetition_limit=None` disables).
        """
        options = dict(
            language=language, task=task, max_new_tokens=max_new_tokens, beam_size=beam_size,
            temperatures=temperatures, best_of=best_of, compression_ratio_threshold=compression_ratio_threshold,
            logprob_threshold=logprob_threshold, repetition_limit=repetition_limit,
            repetition_min_tokens=repetition_min_tokens, seed=seed, window=window, compute_type=compute_type,
            first_pass=first_pass)
        if isinstance(audio, list):
            return [" ".join(w.text for w in windows if w.text)
                    for windows in self.decode_clips(audio, batch_size=batch_size, batch_windows=batch_windows,
                                                     **options)]
        windows = self.decode_windows(audio, batch_windows=batch_windows, **options)
        return " ".join(w.text for w in windows if w.text)
