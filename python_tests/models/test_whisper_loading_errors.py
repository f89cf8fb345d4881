"""load_whisper_encoder / load_whisper_model on files that are not usable checkpoints: a ValueError naming the file
and the problem, never a bare KeyError / JSONDecodeError / UnpicklingError, and never advice to unpickle unsafely."""

import json
import os

import pytest
import torch

from eureka_fast.models.whisper import WhisperDims, WhisperModel, load_whisper_encoder, load_whisper_model

SMALL = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2, n_vocab=51864,
             n_text_ctx=448, n_text_state=64, n_text_head=4, n_text_layer=2)


def expect_load_error(path, *fragments, loader=load_whisper_encoder):
    with pytest.raises(ValueError) as info:
        loader(str(path))
    message = str(info.value)
    assert type(info.value) is ValueError, type(info.value)  # not a KeyError / JSONDecodeError subclass
    assert str(path) in message, message
    assert "weights_only" not in message and "trust" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def openai_state():
    whisper_model = pytest.importorskip("whisper.model")
    torch.manual_seed(0)
    return whisper_model.Whisper(whisper_model.ModelDimensions(**SMALL)).state_dict()


def test_junk_empty_and_cut_pt_files(tmp_path, openai_state):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    expect_load_error(tmp_path / "junk.pt", "not a PyTorch checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    expect_load_error(tmp_path / "empty.pt", "empty or truncated")
    torch.save({"dims": SMALL, "model_state_dict": openai_state}, tmp_path / "full.pt")
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    expect_load_error(tmp_path / "cut.pt", "corrupt or truncated")
    # The complete file still loads, with the weights it holds.
    encoder = load_whisper_encoder(str(tmp_path / "full.pt"))
    torch.testing.assert_close(encoder.state_dict()["conv1.weight"], openai_state["encoder.conv1.weight"])


class NotATensor:
    pass


def test_pickled_objects_are_refused_without_suggesting_unsafe_loading(tmp_path):
    torch.save({"dims": SMALL, "model_state_dict": {"x": NotATensor()}}, tmp_path / "object.pt")
    expect_load_error(tmp_path / "object.pt", "not a PyTorch checkpoint of tensors", "NotATensor")


def test_pt_with_missing_keys_wrong_dims_or_shapes(tmp_path, openai_state):
    torch.save({"dims": SMALL, "model_state_dict": {"encoder.conv2.weight": torch.zeros(3)}}, tmp_path / "bare.pt")
    expect_load_error(tmp_path / "bare.pt", "not a complete Whisper checkpoint", "encoder.conv1.weight")

    partial = {k: v for k, v in openai_state.items() if not k.startswith("encoder.blocks.1.")}
    torch.save({"dims": SMALL, "model_state_dict": partial}, tmp_path / "one_block.pt")
    expect_load_error(tmp_path / "one_block.pt", "encoder.blocks.1.")

    torch.save({"dims": dict(SMALL, n_sizes=3), "model_state_dict": openai_state}, tmp_path / "dims.pt")
    expect_load_error(tmp_path / "dims.pt", "dims", "n_sizes")

    wrong = dict(openai_state)
    wrong["encoder.conv1.weight"] = torch.zeros(64, 80, 5)
    torch.save({"dims": SMALL, "model_state_dict": wrong}, tmp_path / "shape.pt")
    expect_load_error(tmp_path / "shape.pt", "do not match", "conv1.weight")

    torch.save({"weights": openai_state}, tmp_path / "other.pt")
    expect_load_error(tmp_path / "other.pt", "not an openai-whisper checkpoint")

    # The full model (decoder too) reports the same way.
    decoder_missing = {k: v for k, v in openai_state.items() if k != "decoder.ln.weight"}
    torch.save({"dims": SMALL, "model_state_dict": decoder_missing}, tmp_path / "no_decoder_ln.pt")
    load_whisper_encoder(str(tmp_path / "no_decoder_ln.pt"))  # the encoder does not need it
    expect_load_error(tmp_path / "no_decoder_ln.pt", "decoder.ln.weight", loader=load_whisper_model)


def _transformers_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=51864)
    directory = tmp_path / "hf"
    transformers.WhisperForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    return directory


def test_transformers_dir_with_bad_config_or_weights(tmp_path):
    directory = _transformers_dir(tmp_path)
    load_whisper_encoder(str(directory))  # sanity: the untouched directory loads
    config_path = directory / "config.json"
    good_config = config_path.read_text()

    config_path.write_text(good_config[: len(good_config) // 2])
    message = expect_load_error(config_path, "malformed JSON", loader=lambda p: load_whisper_encoder(str(directory)))
    assert "line" in message

    config = json.loads(good_config)
    del config["d_model"]
    config_path.write_text(json.dumps(config))
    expect_load_error(config_path, "not a Whisper config", "d_model",
                      loader=lambda p: load_whisper_encoder(str(directory)))

    config_path.write_text("[1, 2, 3]")
    expect_load_error(config_path, "JSON object", loader=lambda p: load_whisper_encoder(str(directory)))

    config_path.write_text(good_config)
    weights = next(directory.glob("*.safetensors"))
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    expect_load_error(weights, "corrupt or truncated safetensors",
                      loader=lambda p: load_whisper_encoder(str(directory)))


def test_ctranslate2_dir_missing_variables(tmp_path):
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    from eureka_fast.models.whisper import read_ctranslate2_model_bin

    out = tmp_path / "ct2"
    TransformersConverter(str(_transformers_dir(tmp_path))).convert(str(out), quantization="float32", force=True)
    spec, variables = read_ctranslate2_model_bin(str(out / "model.bin"))
    assert spec == "WhisperSpec" and "encoder/conv1/weight" in variables
    raw = (out / "model.bin").read_bytes()
    # Rename the variable in place (same length): the file parses, but the layout lacks it.
    renamed = raw.replace(b"encoder/conv1/weight", b"encoder/conv9/weight", 1)
    assert renamed != raw
    (out / "model.bin").write_bytes(renamed)
    expect_load_error(out, "not a complete Whisper checkpoint", "encoder/conv1/weight")
