"""EurekaAudioProcessor: conversations (official OpenAI-like message format) -> model inputs, and ids -> text.

Prompt format (docs/model.md#prompt-format): ChatML of the Qwen3-Omni template with thinking disabled,

    <|im_start|>system\\n{text}<|im_end|>\\n
    <|im_start|>user\\n{text and audio items, concatenated}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{answer}<|im_end|>\\n

where every audio item becomes <|audio_start|> + N x <|audio_pad|> + <|audio_end|>, N = ceil(samples / 1280)
(16 kHz), and ``token_type_ids`` is 3 on the pads, 0 elsewhere. The generation prompt is
``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``; the same empty think block precedes a trained answer, so a
training prompt tokenizes exactly like the inference prompt. The mel windows come from eureka_fast.audio
(all clips of a conversation concatenated in time, 30 s windows, long audio = more windows, never truncated).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch
from transformers import BatchFeature

from ..audio import is_array_rate_pair, load_clip
from .configuration_eureka import AUDIO_END_TOKEN, AUDIO_PAD_TOKEN, AUDIO_START_TOKEN, AUDIO_TOKEN_TYPE
from .conversation import (AUDIO_ITEM_TYPES, ROLES, MessageFormatError, audio_reference, content_items,  # noqa: F401
                           is_single_conversation, messages_of)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
AUDIO_PLACEHOLDER = AUDIO_START_TOKEN + AUDIO_PAD_TOKEN + AUDIO_END_TOKEN  # one audio item in rendered text
PROCESSOR_CONFIG = "processor_config.json"

# The tiny tokenizer: GPT-2's byte-level BPE (50256 merges ranks + <|endoftext|> = 50257 ids), then these, in order
# (ids 50257..50263; EurekaAudioConfig.preset("tiny") uses the same ids).
TINY_SPECIAL_TOKENS = (IM_START, IM_END, AUDIO_START_TOKEN, AUDIO_END_TOKEN, AUDIO_PAD_TOKEN)
TINY_PLAIN_ADDED_TOKENS = (THINK_OPEN, THINK_CLOSE)  # added but not "special", as in Qwen3
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------
def _gpt2_tiktoken_path() -> str:
    from .gpt2_ranks import gpt2_ranks_path

    return gpt2_ranks_path(os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                        "eureka_fast"))


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """GPT-2 byte-level BPE (converted from tiktoken ranks to a `tokenizers` model) + the Eureka special tokens,
    serialised; conversion takes a few seconds, so it is cached per process and on disk."""
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eureka_fast")
    cache_file = os.path.join(cache_dir, "tiny_tokenizer_v1.json")
    if os.path.exists(cache_file):
        with open(cache_file, encoding="utf-8") as fh:
            return fh.read()
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=_gpt2_tiktoken_path(), pattern=GPT2_PATTERN).converted()
    tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_PLAIN_ADDED_TOKENS])
    text = tok.to_str()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs the conversion time
    return text


def build_tiny_tokenizer():
    """An offline transformers tokenizer for the tiny preset (GPT-2 vocabulary from openai-whisper's assets)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                  eos_token=IM_END, pad_token=END_OF_TEXT, bos_token=None, unk_token=None)
    if len(tok) != 50257 + len(TINY_SPECIAL_TOKENS) + len(TINY_PLAIN_ADDED_TOKENS):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected 50264")
    return tok


def add_audio_special_tokens(tokenizer) -> dict:
    """Adds the ChatML and audio special tokens a tokenizer lacks; returns their ids (keys start, pad, end,
    im_start, im_end)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END, AUDIO_START_TOKEN, AUDIO_END_TOKEN, AUDIO_PAD_TOKEN) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in
           (("start", AUDIO_START_TOKEN), ("pad", AUDIO_PAD_TOKEN), ("end", AUDIO_END_TOKEN),
            ("im_start", IM_START), ("im_end", IM_END))}
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Rendered:
    """One conversation as ordered pieces: ("text", str) prompt text, ("target", str, trained) assistant output,
    ("audio", source) an audio item."""

    pieces: list = field(default_factory=list)

    def text(self, s: str):
        if self.pieces and self.pieces[-1][0] == "text":
            self.pieces[-1] = ("text", self.pieces[-1][1] + s)
        elif s:
            self.pieces.append(("text", s))

    def target(self, s: str, trained: bool):
        self.pieces.append(("target", s, trained))

    def audio(self, source):
        self.pieces.append(("audio", source))


def render_conversation(messages: Sequence[dict], *, add_generation_prompt: bool, enable_thinking: bool = False,
                        train_turns: str = "last", index: int = 0) -> _Rendered:
    """Pieces of one conversation (see module docstring). ``train_turns``: which assistant turns the assistant mask
    covers, "last" (the training target of a record, default) or "all"."""
    if train_turns not in ("last", "all"):
        raise ValueError(f"train_turns must be 'last' or 'all', got {train_turns!r}")
    roles = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise MessageFormatError(f"conversation {index}, message {m}: expected a dict with 'role' and "
                                     f"'content', got {message!r:.200}")
        if message["role"] not in ROLES:
            raise MessageFormatError(f"conversation {index}, message {m}: role must be one of {ROLES}, got "
                                     f"{message['role']!r}")
        roles.append(message["role"])
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
    last_assistant = max((i for i, r in enumerate(roles) if r == "assistant"), default=-1)
    out = _Rendered()
    for m, message in enumerate(messages):
        role = roles[m]
        where = f"conversation {index}, message {m} ({role})"
        out.text(f"{IM_START}{role}\n")
        items = content_items(message.get("content"), where)
        if role == "assistant":
            texts = []
            for j, item in enumerate(items):
                if not isinstance(item, dict) or item.get("type") != "text" or not isinstance(item.get("text"), str):
                    raise MessageFormatError(f"{where}, item {j}: assistant content must be text items, got "
                                             f"{item!r:.200}")
                texts.append(item["text"])
            if m > last_user and not enable_thinking:
                out.text(EMPTY_THINK)
            trained = train_turns == "all" or m == last_assistant
            out.target("".join(texts), trained)
            out.target(IM_END, trained)
            out.text("\n")
            continue
        for j, item in enumerate(items):
            if not isinstance(item, dict):
                raise MessageFormatError(f"{where}, item {j}: expected a dict with 'type', got {item!r:.200}")
            kind = item.get("type")
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise MessageFormatError(f"{where}, item {j}: a text item needs a string 'text'")
                out.text(item["text"])
            elif kind in AUDIO_ITEM_TYPES:
                if role == "system":
                    raise MessageFormatError(f"{where}, item {j}: audio in a system message is not supported")
                out.audio(audio_reference(item, f"{where}, item {j}"))
            else:
                raise MessageFormatError(f"{where}, item {j}: unknown content type {kind!r} (use 'text' or "
                                         f"'audio_url')")
        out.text(f"{IM_END}\n")
    if add_generation_prompt:
        out.text(f"{IM_START}assistant\n" + ("" if enable_thinking else EMPTY_THINK))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------
class EurekaAudioProcessor:
    """Turns conversations into ``model(**inputs)`` / ``model.generate(**inputs)`` inputs and ids into text.

    tokenizer: any transformers tokenizer; the ChatML and audio special tokens are added when missing.
    n_mels: 128 for Whisper-large-v3 encoders, 80 for the others.
    text_vocab_size: ids at or above it are dropped before detokenising (official); default len(tokenizer).
    enable_thinking: False (the released model's setting) puts the empty think block after the assistant header.
    """

    def __init__(self, tokenizer, n_mels: int = 128, *, text_vocab_size: int | None = None,
                 enable_thinking: bool = False):
        if n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128, got {n_mels}")
        self.tokenizer = tokenizer
        self.n_mels = n_mels
        self.enable_thinking = enable_thinking
        ids = add_audio_special_tokens(tokenizer)
        self.audio_start_token_id = ids["start"]
        self.audio_pad_token_id = ids["pad"]
        self.audio_end_token_id = ids["end"]
        self.im_end_token_id = ids["im_end"]
        self.text_vocab_size = int(text_vocab_size) if text_vocab_size is not None else len(tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.convert_tokens_to_ids(END_OF_TEXT) if END_OF_TEXT in tokenizer.get_vocab() else \
                tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad, <|endoftext|> or eos token to pad batches with")
        self.pad_token_id = int(pad)

    # --- construction and persistence -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "EurekaAudioProcessor":
        """"tiny": the offline GPT-2-vocabulary tokenizer + 80 mels, matching EurekaAudioConfig.preset("tiny")."""
        if name == "tiny":
            return cls(build_tiny_tokenizer(), n_mels=80)
        raise ValueError(f"unknown processor preset {name!r}: only 'tiny' is offline; load the released model's "
                         f"processor with EurekaAudioProcessor.from_pretrained(dir)")

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn: <|im_end|> and, when present, <|endoftext|>."""
        ids = [self.im_end_token_id]
        eot = self.tokenizer.get_vocab().get(END_OF_TEXT)
        if eot is not None and eot != self.im_end_token_id:
            ids.append(eot)
        return ids

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_CONFIG), "w") as fh:
            json.dump({"processor_class": type(self).__name__, "n_mels": self.n_mels,
                       "text_vocab_size": self.text_vocab_size, "enable_thinking": self.enable_thinking}, fh,
                      indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> "EurekaAudioProcessor":
        """Tokenizer from ``directory`` (any transformers tokenizer files); n_mels etc. from processor_config.json,
        else from config.json's audio_config (128 mels when neither says)."""
        settings: dict = {}
        path = os.path.join(directory, PROCESSOR_CONFIG)
        if os.path.exists(path):
            with open(path) as fh:
                saved = json.load(fh)
            settings = {k: saved[k] for k in ("n_mels", "text_vocab_size", "enable_thinking") if k in saved}
        else:
            config_path = os.path.join(directory, "config.json")
            if os.path.exists(config_path):
                with open(config_path) as fh:
                    config = json.load(fh)
                n_mels = (config.get("audio_config") or {}).get("n_mels")
                if n_mels:
                    settings["n_mels"] = n_mels
                if config.get("text_vocab_size"):
                    settings["text_vocab_size"] = config["text_vocab_size"]
        settings.update(overrides)
        return cls(_load_tokenizer(directory), **settings)

    # --- text rendering --------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, *, add_generation_prompt: bool | None = None, tokenize: bool = False,
                            **kwargs):
        """The prompt text, one <|audio_start|><|audio_pad|><|audio_end|> per audio item (the official template's
        output); tokenize=True returns ``self(conversation, ...)`` instead."""
        if tokenize:
            return self(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
        single = is_single_conversation(conversation)
        batch = [conversation] if single else list(conversation)
        texts = []
        for b, conv in enumerate(batch):
            messages = messages_of(conv, b)
            rendered = render_conversation(messages, add_generation_prompt=_auto_generation_prompt(
                add_generation_prompt, messages), enable_thinking=self.enable_thinking, index=b)
            texts.append("".join(p[1] if p[0] != "audio" else AUDIO_PLACEHOLDER for p in rendered.pieces))
        return texts[0] if single else texts

    # --- main entry -----------------------------------------------------------------------------------------------
    def __call__(self, conversations=None, *, text=None, audio=None, audios=None, return_tensors: str = "pt",
                 add_generation_prompt: bool | None = None, return_assistant_mask: bool = False,
                 padding_side: str | None = None, train_turns: str = "last", audio_base_dir: str | None = None,
                 **unused) -> BatchFeature:
        """Model inputs for one conversation or a list of them (or transformers style ``text=`` with audio
        placeholders + ``audio=`` clips in order).

        add_generation_prompt: None = True unless a conversation ends with an assistant turn (a training record).
        padding_side: None = "left" when generating (so new tokens follow every prompt directly), else "right".
        return_assistant_mask: adds ``assistant_mask`` (1 on the assistant's content and closing <|im_end|>).
        audio_base_dir: relative audio paths resolve against it (a manifest's directory).
        Returns input_ids, attention_mask, token_type_ids (3 = audio pad), input_features [W, n_mels, 3000],
        audio_token_counts (one per audio item, in order), windows_per_request [B], and assistant_mask if asked.
        """
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if audios is not None:
            if audio is not None:
                raise ValueError("pass audio= or audios=, not both")
            audio = audios
        if isinstance(conversations, str) or (isinstance(conversations, (list, tuple)) and conversations
                                              and all(isinstance(c, str) for c in conversations)):
            if text is not None:
                raise ValueError("pass the prompt text once (positionally or as text=)")
            text, conversations = conversations, None
        if text is not None:
            if conversations is not None:
                raise ValueError("pass conversations or text=, not both")
            rendered = self._render_text(text, audio)
            generating = True
        else:
            if conversations is None:
                raise ValueError("nothing to process: pass conversations or text=")
            if audio is not None:
                raise ValueError("audio= goes with text=; conversations carry their audio in audio_url items")
            batch = [conversations] if is_single_conversation(conversations) else list(conversations)
            rendered = []
            generating = False
            for b, conv in enumerate(batch):
                messages = messages_of(conv, b)
                gen = _auto_generation_prompt(add_generation_prompt, messages)
                generating = generating or gen
                rendered.append(render_conversation(messages, add_generation_prompt=gen,
                                                    enable_thinking=self.enable_thinking, train_turns=train_turns,
                                                    index=b))
        if padding_side is None:
            padding_side = "left" if generating else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return self._encode(rendered, audio_base_dir, padding_side, return_assistant_mask)

    def _render_text(self, text, audio) -> list:
        texts = [text] if isinstance(text, str) else list(text)
        if audio is None:
            clips = []
        elif isinstance(audio, (list, tuple)) and not is_array_rate_pair(audio):
            clips = list(audio)
        else:
            clips = [audio]
        placeholders = sum(t.count(AUDIO_PLACEHOLDER) for t in texts)
        if placeholders != len(clips):
            raise MessageFormatError(f"the text holds {placeholders} audio placeholder(s) {AUDIO_PLACEHOLDER!r} but "
                                     f"{len(clips)} audio clip(s) were given")
        out, next_clip = [], 0
        for t in texts:
            rendered = _Rendered()
            parts = t.split(AUDIO_PLACEHOLDER)
            for i, part in enumerate(parts):
                rendered.text(part)
                if i < len(parts) - 1:
                    rendered.audio(clips[next_clip])
                    next_clip += 1
            out.append(rendered)
        return out

    def _encode(self, rendered: list, base_dir, padding_side: str, return_assistant_mask: bool) -> BatchFeature:
        from ..audio import eureka_features_batch

        # Audio first: the features decide how many pad tokens each item gets.
        clips_per_request = [[load_clip(p[1], base_dir) for p in r.pieces if p[0] == "audio"] for r in rendered]
        with_audio = [b for b, clips in enumerate(clips_per_request) if clips]
        if with_audio:
            windows, windows_with_audio, counts_with_audio = eureka_features_batch(
                [clips_per_request[b] for b in with_audio], self.n_mels)
        else:
            from ..audio import FRAMES_PER_WINDOW

            windows, windows_with_audio, counts_with_audio = torch.zeros(0, self.n_mels, FRAMES_PER_WINDOW), [], []
        windows_per_request = [0] * len(rendered)
        counts_per_request: list[list[int]] = [[] for _ in rendered]
        for b, w, c in zip(with_audio, windows_with_audio, counts_with_audio):
            windows_per_request[b] = int(w)
            counts_per_request[b] = [int(x) for x in c]

        rows = []
        for b, r in enumerate(rendered):
            ids, types, mask = [], [], []
            counts = iter(counts_per_request[b])
            for piece in r.pieces:
                if piece[0] == "audio":
                    n = next(counts)
                    ids += [self.audio_start_token_id] + [self.audio_pad_token_id] * n + [self.audio_end_token_id]
                    types += [0] + [AUDIO_TOKEN_TYPE] * n + [0]
                    mask += [0] * (n + 2)
                    continue
                piece_ids = self.tokenizer.encode(piece[1], add_special_tokens=False)
                if self.audio_pad_token_id in piece_ids:
                    raise MessageFormatError(f"conversation {b}: the text contains {AUDIO_PAD_TOKEN!r} literally; "
                                             f"audio must come as audio items")
                ids += piece_ids
                types += [0] * len(piece_ids)
                mask += [int(piece[0] == "target" and piece[2])] * len(piece_ids)
            rows.append((ids, types, mask))

        length = max(len(r[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        token_type_ids = torch.zeros(batch, length, dtype=torch.long)
        assistant_mask = torch.zeros(batch, length, dtype=torch.long)
        for b, (ids, types, mask) in enumerate(rows):
            n = len(ids)
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, span] = 1
            token_type_ids[b, span] = torch.tensor(types, dtype=torch.long)
            assistant_mask[b, span] = torch.tensor(mask, dtype=torch.long)
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "input_features": windows.float(),
            "audio_token_counts": torch.tensor([c for cs in counts_per_request for c in cs], dtype=torch.long),
            "windows_per_request": torch.tensor(windows_per_request, dtype=torch.long),
        }
        if return_assistant_mask:
            data["assistant_mask"] = assistant_mask
        return BatchFeature(data=data)

    # --- decoding --------------------------------------------------------------------------------------------------
    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Text of each row of ``sequences`` (ids at or above text_vocab_size dropped, as the official wrapper does)."""
        if torch.is_tensor(sequences):
            sequences = sequences.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        kept = [int(i) for i in ids if 0 <= int(i) < self.text_vocab_size]
        return self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens, **kwargs)


def _load_tokenizer(directory: str):
    """A tokenizer saved as a bare tokenizers model loads directly (AutoTokenizer would first try to read our
    config.json as a known architecture and warn); anything else goes through AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(tokenizer_config) and os.path.exists(os.path.join(directory, "tokenizer.json")):
        with open(tokenizer_config) as fh:
            cls_name = json.load(fh).get("tokenizer_class")
        if cls_name in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _auto_generation_prompt(flag: bool | None, messages: list) -> bool:
    if flag is not None:
        return bool(flag)
    last = messages[-1]
    return not (isinstance(last, dict) and last.get("role") == "assistant")
