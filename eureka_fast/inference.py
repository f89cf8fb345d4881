"""Eureka-Audio inference: the ``EurekaAudio`` API and the ``eureka-audio infer`` subcommand.

Decoding defaults are the official wrapper's (docs/model.md#decoding-defaults): sampling, temperature 0.7, top_p 0.8,
top_k 20, repetition penalty 1.05, 512 new tokens; the official CLI decodes greedily (``greedy=True`` /
``--greedy``) with the same repetition penalty. Unlike the official wrapper (batch size 1), ``generate`` takes many
conversations at once.
"""
from __future__ import annotations

import os
import sys
from types import MappingProxyType
from typing import Any

import torch

# Read-only: the server and the CLI read their defaults from here, so no caller may change them for the others.
OFFICIAL_DECODING = MappingProxyType(dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                          repetition_penalty=1.05, max_new_tokens=512))

ASR_SYSTEM_PROMPT = "You are an advanced ASR (Automatic Speech Recognition) AI assistant."
CAPTION_PROMPT = "Please provide a comprehensive description of the input audio, covering all details."
TASKS = ("asr", "qa", "caption")


def task_messages(task: str, audio: Any, question: str | None = None) -> list[dict]:
    """The official prompt of a task for one audio source (path, URL, data URI, array...).

    asr: system ASR prompt + a user turn holding only the audio; caption: user [audio, caption request];
    qa: user [audio, question] with no system turn (put the options "A. ...\\nB. ..." in the question)."""
    audio_item = {"type": "audio_url", "audio_url": {"url": audio}} if isinstance(audio, (str, os.PathLike)) \
        else {"type": "audio", "audio": audio}
    if isinstance(audio, os.PathLike):
        audio_item["audio_url"]["url"] = os.fspath(audio)
    if task == "asr":
        if question:
            raise ValueError("the asr task takes no question (its prompt is fixed)")
        return [{"role": "system", "content": ASR_SYSTEM_PROMPT}, {"role": "user", "content": [audio_item]}]
    if task == "caption":
        if question:
            raise ValueError("the caption task takes no question (its prompt is fixed)")
        return [{"role": "user", "content": [audio_item, {"type": "text", "text": CAPTION_PROMPT}]}]
    if task == "qa":
        if not question:
            raise ValueError("the qa task needs a question")
        return [{"role": "user", "content": [audio_item, {"type": "text", "text": question}]}]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


class _TextStreamer:
    """Prints the text of generated ids as they come (batch of 1). Decodes the whole answer each step and prints the
    new suffix, so multi-byte characters split over tokens come out whole; ids past the text vocabulary are dropped."""

    def __init__(self, processor, stream=None):
        self.processor = processor
        self.stream = stream or sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError("streaming supports one conversation at a time")
            value = value[0]
        self.ids.extend(int(i) for i in value.tolist())
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.stream.write(text[len(self.printed):])
        self.stream.flush()
        self.printed = text

    def end(self):
        text = self.processor.decode(self.ids)
        self.stream.write(text[len(self.printed):] + "\n")
        self.stream.flush()
        self.printed = text


class EurekaAudio:
    """Eureka-Audio inference.

    >>> model = EurekaAudio("path/to/model_dir")          # saved EurekaAudioForCausalLM + processor
    >>> model.generate([{"role": "user", "content": [
    ...     {"type": "audio_url", "audio_url": {"url": "clip.wav"}},
    ...     {"type": "text", "text": "What is being said?"}]}])
    >>> model.generate([conv1, conv2, conv3], greedy=True)   # a batch -> a list of answers

    model: a directory holding both (``save_pretrained`` of the model and of the processor), or a loaded
    EurekaAudioForCausalLM together with ``processor=``.
    """

    def __init__(self, model, processor=None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None):
        from .models import EurekaAudioForCausalLM, EurekaAudioProcessor

        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        if isinstance(model, (str, os.PathLike)):
            directory = os.fspath(model)
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"model directory {directory!r} does not exist")
            model = EurekaAudioForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
            if processor is None:
                processor = EurekaAudioProcessor.from_pretrained(directory)
        elif processor is None:
            raise ValueError("pass processor= together with a loaded model")
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.processor = processor
        if processor.n_mels != model.config.audio_config.n_mels:
            raise ValueError(f"processor makes {processor.n_mels}-bin mels, the model's encoder takes "
                             f"{model.config.audio_config.n_mels}")
        if processor.audio_pad_token_id != model.config.audio_pad_token_id:
            raise ValueError(f"processor <|audio_pad|> id {processor.audio_pad_token_id} != model's "
                             f"{model.config.audio_pad_token_id}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decoding_settings(self, greedy: bool = False, **overrides) -> dict:
        settings = dict(OFFICIAL_DECODING)
        if greedy:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        settings.update(overrides)
        return settings

    @torch.inference_mode()
    def generate(self, messages, *, greedy: bool = False, batch_size: int | None = None, stream: bool = False,
                 audio_base_dir: str | None = None, **decoding) -> str | list[str]:
        """Answer of one conversation (a str) or of a list of conversations (a list of str, in order).

        decoding: transformers generate() arguments over the official defaults (max_new_tokens, temperature...).
        batch_size: conversations per generate() call (default: all at once). stream: print tokens as they come
        (one conversation only).
        """
        from .models.conversation import is_single_conversation

        single = is_single_conversation(messages)
        conversations = [messages] if single else list(messages)
        if stream and len(conversations) != 1:
            raise ValueError("stream=True works with one conversation")
        settings = self.decoding_settings(greedy, **decoding)
        settings.setdefault("eos_token_id", self.processor.eos_token_ids)
        settings.setdefault("pad_token_id", self.processor.pad_token_id)
        step = batch_size or len(conversations)
        answers: list[str] = []
        for start in range(0, len(conversations), step):
            chunk = conversations[start:start + step]
            inputs = self.processor(chunk, add_generation_prompt=True, padding_side="left",
                                    audio_base_dir=audio_base_dir)
            inputs = inputs.to(self.device)
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
            streamer = _TextStreamer(self.processor) if stream else None
            out = self.model.generate(**inputs, streamer=streamer, **settings)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            answers.extend(self.processor.batch_decode(new_tokens, skip_special_tokens=True))
        return answers[0] if single else answers

    __call__ = generate

    def transcribe(self, audio, **decoding) -> str:
        return self.generate(task_messages("asr", audio), **decoding)


# ---------------------------------------------------------------------------------------------------------------
# Command line: eureka-audio infer
# ---------------------------------------------------------------------------------------------------------------
def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("infer", help="run Eureka-Audio on audio files (asr / qa / caption)",
                              description="Run a saved Eureka-Audio model on one or more audio files with the "
                                          "official task prompts. Several files are decoded as one batch.")
    p.add_argument("--model", required=True, help="model directory (model + processor save_pretrained output)")
    p.add_argument("--audio", required=True, nargs="+", help="audio file(s), http(s) URL(s) or data URI(s)")
    p.add_argument("--task", choices=TASKS, default="asr", help="official prompt to use (default asr)")
    p.add_argument("--question", help="the question for --task qa (with options 'A. ...\\nB. ...')")
    p.add_argument("--greedy", action="store_true", help="greedy decoding, as the official CLI (default: sampling "
                                                         "with temperature 0.7, top_p 0.8, top_k 20)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one file)")
    p.add_argument("--max-new-tokens", type=int, default=OFFICIAL_DECODING["max_new_tokens"],
                   help=f"longest answer, in tokens (default {OFFICIAL_DECODING['max_new_tokens']})")
    p.add_argument("--temperature", type=float,
                   help=f"sampling temperature (default {OFFICIAL_DECODING['temperature']})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass (default {OFFICIAL_DECODING['top_p']})")
    p.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens (default {OFFICIAL_DECODING['top_k']})")
    p.add_argument("--repetition-penalty", type=float,
                   help=f"penalty on repeated tokens (default {OFFICIAL_DECODING['repetition_penalty']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--verbose", action="store_true",
                   help="show the model loading messages and progress bars of transformers (on stderr)")
    p.set_defaults(func=_run_infer)


def _usable_sources(sources) -> tuple[list[str], list[tuple[str, str]]]:
    """Split --audio into sources that decode and (source, reason) for those that do not. URLs are left to the
    processor (fetching them twice would cost a download)."""
    from .audio import load_audio

    good, bad = [], []
    for source in sources:
        if source.startswith(("http://", "https://")):
            good.append(source)
            continue
        if not source.startswith("data:") and not os.path.exists(source):
            bad.append((source, "does not exist"))
            continue
        try:
            load_audio(source)
        except Exception as exc:  # AudioError names the problem; anything else is reported the same way
            bad.append((source, " ".join(str(exc).split()) or type(exc).__name__))
            continue
        good.append(source)
    return good, bad


def _quiet_transformers() -> None:
    """Keep transformers' loading progress bars and notices out of the answers (and off the terminal)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _run_infer(args) -> int:
    from .cli import CommandError

    if args.task == "qa" and not args.question:
        raise CommandError("--task qa needs --question")
    if args.task != "qa" and args.question:
        raise CommandError(f"--question only applies to --task qa (got --task {args.task})")
    if args.stream and len(args.audio) != 1:
        raise CommandError("--stream works with one --audio")
    if not os.path.isdir(args.model):
        raise CommandError(f"--model {args.model}: no such directory (a model saved with save_pretrained, "
                           "e.g. <train run>/final)")
    good, bad = _usable_sources(args.audio)
    prog = "eureka-audio infer"
    for source, reason in bad:
        print(f"{prog}: skipped {source}: {reason}", file=sys.stderr)
    if not good:
        raise CommandError("no usable audio: " + "; ".join(f"{s}: {r}" for s, r in bad))
    if not args.verbose:
        _quiet_transformers()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    engine = EurekaAudio(args.model, device=args.device, dtype=dtype)
    overrides = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                   ("top_k", args.top_k), ("repetition_penalty", args.repetition_penalty))
                 if v is not None}
    conversations = [task_messages(args.task, os.path.abspath(a) if os.path.exists(a) else a, args.question)
                     for a in good]
    if args.stream:
        engine.generate(conversations[0], greedy=args.greedy, stream=True, max_new_tokens=args.max_new_tokens,
                        **overrides)
        return 0
    answers = engine.generate(conversations, greedy=args.greedy, max_new_tokens=args.max_new_tokens, **overrides)
    for source, answer in zip(good, answers):
        if len(args.audio) > 1:
            print(f"== {source}")
        print(answer)
    if bad:
        print(f"{prog}: {len(bad)} of {len(args.audio)} file(s) skipped", file=sys.stderr)
        return 1
    return 0
