"""EurekaAudioForCausalLM: text-only exactness, audio insertion, errors, loss, generation, save/load, stages."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM

from eureka_fast.models import AudioInputError, EurekaAudioConfig, EurekaAudioForCausalLM
from eureka_reference import reference_audio_embeddings, reference_aux_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _asr(path, text=None):
    content = [{"type": "audio_url", "audio_url": {"url": str(path)}}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _config_fields(config):
    """Config contents without the load bookkeeping (source path, dtype recorded at save time)."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("_name_or_path", "dtype")}

    return strip(config.to_dict())


def test_presets():
    tiny = EurekaAudioConfig.preset("tiny")
    assert (tiny.audio_config.n_mels, tiny.audio_config.n_audio_layer, tiny.audio_config.n_audio_state) == (80, 4, 384)
    assert (tiny.text_config.model_type, tiny.text_config.num_hidden_layers, tiny.text_config.hidden_size) == \
        ("qwen3", 2, 64)
    big = EurekaAudioConfig.preset("eureka-1.7b")
    t = big.text_config
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.vocab_size) == (28, 2048, 6144, 16, 8, 128, 151936)
    assert (big.audio_config.n_mels, big.audio_config.n_audio_layer, big.audio_config.n_audio_state) == (128, 32, 1280)
    a = big.adapter_config
    assert (a.stack_factor, a.num_experts, a.top_k, a.expert_intermediate_size, a.aux_loss_coef) == (4, 8, 4, 1280, 0.01)
    small = EurekaAudioConfig.preset("eureka-1.7b", text_config={"num_hidden_layers": 2})
    assert small.text_config.num_hidden_layers == 2 and small.text_config.hidden_size == 2048
    with pytest.raises(ValueError, match="unknown EurekaAudioConfig preset"):
        EurekaAudioConfig.preset("huge")
    with pytest.raises(ValueError, match="audio_pad_token_id"):
        EurekaAudioConfig.preset("tiny", audio_pad_token_id=10**6)


def test_language_model_is_a_real_transformers_model(tiny_eureka_model):
    assert isinstance(tiny_eureka_model.language_model, Qwen3ForCausalLM)


def test_text_only_logits_equal_the_language_model_exactly(tiny_eureka_model, tiny_eureka_processor):
    model = tiny_eureka_model
    lm = Qwen3ForCausalLM(model.config.text_config).eval()
    lm.load_state_dict(model.language_model.state_dict())
    inputs = tiny_eureka_processor([[{"role": "user", "content": "Hello there, how are you?"}],
                                    [{"role": "user", "content": "Hi"}]])
    assert inputs["input_features"].shape[0] == 0
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        ours_pos = model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
        plain = model(input_ids=inputs["input_ids"]).logits
        plain_lm = lm(input_ids=inputs["input_ids"]).logits
    assert torch.equal(ours_pos, theirs)
    assert torch.equal(plain, plain_lm)
    assert ours.shape == theirs.shape


def test_audio_embeddings_replace_audio_pads_in_order(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    model = tiny_eureka_model
    convs = [_asr(wav_dir / "noise.wav", "What is it?"),
             [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": str(wav_dir / "tone.wav")}},
                                           {"type": "text", "text": "and"},
                                           {"type": "audio_url", "audio_url": {"url": str(wav_dir / "noise.wav")}}]}],
             [{"role": "user", "content": "no audio here"}]]
    inputs = tiny_eureka_processor(convs)
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    embeds = captured["embeds"]
    audio = inputs["token_type_ids"] == 3
    tokens_per_request = audio.sum(1).tolist()
    assert tokens_per_request == [25, 10 + 25, 0]  # ceil(32000/1280), ceil(12320/1280) + 25
    with torch.no_grad():
        expected = reference_audio_embeddings(model, inputs["input_features"], inputs["windows_per_request"].tolist(),
                                              tokens_per_request)
        text_embeds = model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(embeds[audio], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(embeds[~audio], text_embeds[~audio])
    assert out.aux_loss is not None and out.router_load.shape == (8,)


def test_audio_across_window_boundary(tiny_eureka_model, tiny_eureka_processor, tmp_path):
    """A 31 s clip: 388 audio tokens from 2 windows; the frames of window 2 continue those of window 1."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(5)
    sf.write(tmp_path / "long.wav", (rng.standard_normal(31 * 16000) * 0.1).astype(np.float32), 16000)
    inputs = tiny_eureka_processor(_asr(tmp_path / "long.wav"))
    assert inputs["windows_per_request"].tolist() == [2] and inputs["audio_token_counts"].tolist() == [388]
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = tiny_eureka_model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_eureka_model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        expected = reference_audio_embeddings(tiny_eureka_model, inputs["input_features"], [2], [388])
    got = captured["embeds"][inputs["token_type_ids"] == 3]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_audio_count_mismatches_raise(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    model = tiny_eureka_model
    inputs = dict(tiny_eureka_processor(_asr(wav_dir / "noise.wav")))
    with torch.no_grad():
        with pytest.raises(AudioInputError, match="audio token count mismatch"):
            model(**{**inputs, "audio_token_counts": torch.tensor([24])})
        with pytest.raises(AudioInputError, match="no input_features"):
            model(**{k: v for k, v in inputs.items() if k != "input_features"})
        with pytest.raises(AudioInputError, match="windows"):
            model(**{**inputs, "input_features": inputs["input_features"].repeat(2, 1, 1)})
        too_many = inputs["input_ids"].clone()
        types = inputs["token_type_ids"].clone()
        extra = torch.full((1, 400), model.config.audio_pad_token_id)
        with pytest.raises(AudioInputError, match="hold only 375"):
            model(input_ids=torch.cat([too_many, extra], 1), token_type_ids=torch.cat([types, extra * 0 + 3], 1),
                  input_features=inputs["input_features"], windows_per_request=[1])
        bad_types = types.clone()
        bad_types[0, 0] = 3
        with pytest.raises(AudioInputError, match="do not hold <.audio_pad.>"):
            model(**{**inputs, "token_type_ids": bad_types})
        with pytest.raises(AudioInputError, match="mel bins"):
            model(**{**inputs, "input_features": inputs["input_features"][:, :40]})


def test_loss_is_ntp_plus_lambda_aux(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    model = tiny_eureka_model
    record = _asr(wav_dir / "tone.wav") + [{"role": "assistant", "content": "a tone"}]
    inputs = tiny_eureka_processor(record, return_assistant_mask=True)
    labels = inputs["input_ids"].masked_fill(inputs["assistant_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits = out.logits[0, :-1].double()
    target = labels[0, 1:]
    ntp = F.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.ntp_loss.double(), ntp, rtol=1e-5, atol=1e-6)
    # aux by hand from the router logits of the audio tokens
    captured = {}
    real_mix = model.adapter.mix

    def spy(x):
        res = real_mix(x)
        captured["res"] = res
        return res

    model.adapter.mix = spy
    try:
        with torch.no_grad():
            out2 = model(**inputs, labels=labels)
    finally:
        del model.adapter.mix
    res = captured["res"]
    aux = reference_aux_loss(res.router_logits, res.expert_ids, 8)
    torch.testing.assert_close(out2.aux_loss.double(), aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2.loss.double(), ntp + 0.01 * aux, rtol=1e-5, atol=1e-6)
    text_only = tiny_eureka_processor([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                      return_assistant_mask=True)
    with torch.no_grad():
        t = model(**text_only, labels=text_only["input_ids"].masked_fill(text_only["assistant_mask"] == 0, -100))
    assert t.aux_loss is None and torch.equal(t.loss, t.ntp_loss)


def test_generate_with_cache_equals_without(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    inputs = tiny_eureka_processor(_asr(wav_dir / "speech.wav", "Transcribe."))
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True,
              eos_token_id=None, pad_token_id=tiny_eureka_processor.pad_token_id)
    with torch.no_grad():
        cached = tiny_eureka_model.generate(**inputs, use_cache=True, **kw)
        uncached = tiny_eureka_model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generated_audio_pad_ids_stay_text(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    """If the model emits the <|audio_pad|> id it is an ordinary (text) token at the next steps, with or without
    the cache and with or without token_type_ids passed in."""
    from transformers import LogitsProcessor, LogitsProcessorList

    pad_id = tiny_eureka_model.config.audio_pad_token_id

    class ForcePadFirst(LogitsProcessor):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == self.prompt_len:
                scores = torch.full_like(scores, -1e9)
                scores[:, pad_id] = 0.0
            return scores

    inputs = dict(tiny_eureka_processor(_asr(wav_dir / "tone.wav")))
    prompt_len = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=tiny_eureka_processor.pad_token_id,
              logits_processor=LogitsProcessorList([ForcePadFirst(prompt_len)]))
    no_types = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        runs = [tiny_eureka_model.generate(**inputs, use_cache=True, **kw),
                tiny_eureka_model.generate(**inputs, use_cache=False, **kw),
                tiny_eureka_model.generate(**no_types, use_cache=True, **kw)]
    assert runs[0][0, prompt_len].item() == pad_id
    for other in runs[1:]:
        assert torch.equal(other, runs[0])


def test_batch_of_three_equals_single_runs(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    convs = [_asr(wav_dir / "speech.wav"), _asr(wav_dir / "tone.wav", "Describe it in detail please."),
             [{"role": "user", "content": "Text only question?"}]]
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=tiny_eureka_processor.pad_token_id,
              return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        batch_inputs = tiny_eureka_processor(convs)
        assert (batch_inputs["attention_mask"][:, -1] == 1).all()  # left padded
        batched = tiny_eureka_model.generate(**batch_inputs, **kw)
        new_batched = batched.sequences[:, batch_inputs["input_ids"].shape[1]:]
        for i, conv in enumerate(convs):
            single_inputs = tiny_eureka_processor(conv)
            single = tiny_eureka_model.generate(**single_inputs, **kw)
            assert torch.equal(single.sequences[0, single_inputs["input_ids"].shape[1]:], new_batched[i])
            for step in range(4):
                torch.testing.assert_close(single.scores[step][0], batched.scores[step][i], rtol=1e-3, atol=1e-3)


def test_num_return_sequences_repeats_each_requests_audio(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    convs = [_asr(wav_dir / "tone.wav"), [{"role": "user", "content": "text"}], _asr(wav_dir / "noise.wav")]
    inputs = tiny_eureka_processor(convs)
    kw = dict(max_new_tokens=3, eos_token_id=None, pad_token_id=tiny_eureka_processor.pad_token_id)
    with torch.no_grad():
        greedy = tiny_eureka_model.generate(**inputs, do_sample=False, **kw)
        # top_k=1 sampling is greedy, so each of the 2 returned sequences must equal its request's greedy answer
        sampled = tiny_eureka_model.generate(**inputs, do_sample=True, top_k=1, num_return_sequences=2, **kw)
    assert torch.equal(sampled, greedy.repeat_interleave(2, dim=0))


def test_save_and_load_round_trip(tiny_eureka_model, tiny_eureka_processor, wav_dir, tmp_path):
    tiny_eureka_model.save_pretrained(tmp_path)
    loaded = EurekaAudioForCausalLM.from_pretrained(tmp_path).eval()
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is EurekaAudioForCausalLM
    a, b = tiny_eureka_model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _config_fields(loaded.config) == _config_fields(tiny_eureka_model.config)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # still tied
    inputs = tiny_eureka_processor(_asr(wav_dir / "tone.wav"))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, tiny_eureka_model(**inputs).logits)


def test_training_stages_freeze_the_right_parts():
    torch.manual_seed(0)
    model = EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny"))
    total = sum(p.numel() for p in model.parameters())
    n_align = model.set_training_stage("align")
    assert n_align == sum(p.numel() for p in model.adapter.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    assert model.set_training_stage("joint") == total
    assert model.set_training_stage("sft") == total
    with pytest.raises(ValueError, match="unknown training stage"):
        model.set_training_stage("rl")


def test_gradients_reach_adapter_and_encoder(tiny_eureka_processor, wav_dir):
    torch.manual_seed(0)
    model = EurekaAudioForCausalLM(EurekaAudioConfig.preset("tiny"))
    model.set_training_stage("align")
    record = _asr(wav_dir / "tone.wav") + [{"role": "assistant", "content": "a tone"}]
    inputs = tiny_eureka_processor(record, return_assistant_mask=True)
    labels = inputs["input_ids"].masked_fill(inputs["assistant_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    assert model.adapter.router.weight.grad is not None and model.adapter.router.weight.grad.abs().sum() > 0
    assert model.adapter.experts.gate_up_proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.language_model.parameters())


def test_fast_and_reference_ops_give_the_same_model_outputs(tiny_eureka_model, tiny_eureka_processor, wav_dir):
    inputs = tiny_eureka_processor(_asr(wav_dir / "noise.wav", "Q?"))
    outs = []
    try:
        for ref in (False, True):
            tiny_eureka_model.set_reference_ops(ref)
            with torch.no_grad():
                outs.append(tiny_eureka_model(**inputs))
    finally:
        tiny_eureka_model.set_reference_ops(False)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, rtol=1e-5, atol=1e-6)


def test_from_components(tmp_path, tiny_eureka_processor, wav_dir):
    import whisper.model as wm

    from eureka_fast.models.whisper import load_whisper_encoder

    torch.manual_seed(0)
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                              n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    whisper_model = wm.Whisper(dims)
    whisper_path = tmp_path / "whisper.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": whisper_model.state_dict()}, whisper_path)

    text_config = copy.deepcopy(EurekaAudioConfig.preset("tiny").text_config)
    text_config.vocab_size = 50257 + 2  # GPT-2 + im tokens: the audio tokens are missing and must be added
    lm = Qwen3ForCausalLM(text_config)
    lm_dir = tmp_path / "llm"
    lm.save_pretrained(lm_dir)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # a tokenizer without the audio tokens: the GPT-2 part + <|endoftext|> + im tokens only
    import json

    spec = json.loads(tiny_eureka_processor.tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"]
                            if t["content"] in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    raw = Tokenizer.from_str(json.dumps(spec))
    assert raw.get_vocab_size() == 50259 and raw.token_to_id("<|audio_pad|>") is None
    base_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    base_tok.save_pretrained(lm_dir)

    model, tok = EurekaAudioForCausalLM.from_components(whisper=str(whisper_path), llm=str(lm_dir),
                                                        adapter_config={"num_experts": 4, "top_k": 2})
    assert model.config.audio_config.n_audio_state == 64 and model.config.adapter_config.num_experts == 4
    assert model.config.audio_pad_token_id == tok.convert_tokens_to_ids("<|audio_pad|>") >= 50259  # added
    assert len(tok) == 50262 and model.config.text_vocab_size == 50262
    assert model.language_model.config.vocab_size >= len(tok)
    # the pretrained parts keep their weights
    ref_encoder = load_whisper_encoder(str(whisper_path))
    for k, v in ref_encoder.state_dict().items():
        assert torch.equal(model.audio_encoder.state_dict()[k], v), k
    for k, v in lm.state_dict().items():
        got = model.language_model.state_dict()[k]
        assert torch.equal(got[: v.shape[0]], v), k
    # and the whole thing runs on audio
    from eureka_fast.models import EurekaAudioProcessor

    processor = EurekaAudioProcessor(tok, n_mels=80)
    inputs = processor(_asr(wav_dir / "tone.wav"))
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
