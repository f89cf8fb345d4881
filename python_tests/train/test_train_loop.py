"""Schedules, parameter groups, stage freezing, exact resume, atomic checkpoints, the frozen-encoder cache."""
from __future__ import annotations

import math
import os

import pytest
import torch

from eureka_fast.train import checkpoint as ckpt
from eureka_fast.train.config import OptimConfig, config_from_dict
from eureka_fast.train.optim import apply_stage, lr_multiplier, param_groups
from eureka_fast.train.trainer import Trainer
from train_helpers import base_config, tiny_model


def test_wsd_and_cosine_schedules_hand_computed():
    wsd = OptimConfig(schedule="wsd", warmup_steps=4, decay_fraction=0.2, min_lr_ratio=0.1)
    got = [lr_multiplier(s, 20, wsd) for s in range(20)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    assert got[4:16] == [1.0] * 12  # stable
    # last 4 steps decay linearly to 0.1: 1 - 0.9 * k/4
    assert got[16:] == pytest.approx([0.775, 0.55, 0.325, 0.1])
    cos = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    got = [lr_multiplier(s, 10, cos) for s in range(10)]
    assert got[:2] == [0.5, 1.0]
    assert got[2] == pytest.approx(1.0)
    assert got[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_multiplier(10, 10, cos) == pytest.approx(0.0)
    assert lr_multiplier(5, 10, OptimConfig(schedule="constant", warmup_steps=0)) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "norm" in n.lower() or model.get_parameter(n).ndim < 2 for n in plain)
    assert any("norm" in n for n in plain) and any(n.endswith("bias") for n in plain)
    assert all(model.get_parameter(n).ndim >= 2 and "norm" not in n.lower() for n in decayed)


def _trainer(cfg_dict, **kw):
    return Trainer(config_from_dict(cfg_dict), model=tiny_model(), **kw)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_align_stage_updates_only_the_adapter(train_manifest, tmp_path, processor):
    trainer = _trainer(base_config(train_manifest, str(tmp_path), stage="align", max_steps=1), processor=processor)
    before = _params(trainer.base_model)
    trainer.train()
    after = _params(trainer.base_model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert all(n.startswith("adapter.") for n in changed), sorted(changed)[:5]
    # every adapter matrix that received gradient moved (experts may get no token; routers always do)
    assert any("router" in n or "gate" in n for n in changed)
    assert not any(n.startswith(("language_model.", "audio_encoder.")) for n in changed)


def test_stage_freezing_counts():
    model = tiny_model()
    adapter = sum(p.numel() for p in model.adapter.parameters())
    assert apply_stage(model, "align")["trainable"] == adapter
    total = sum(p.numel() for p in model.parameters())
    assert apply_stage(model, "sft")["trainable"] == total
    encoder = sum(p.numel() for p in model.audio_encoder.parameters())
    assert apply_stage(model, "joint", ["audio_encoder"])["trainable"] == total - encoder
    with pytest.raises(ValueError, match="no module"):
        apply_stage(model, "sft", ["decoder_of_doom"])


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(train_manifest, tmp_path, processor):
    # 4 steps, 2 micro-batches per step; 12 records / global batch 2 = 6 batches per epoch, so it crosses epochs
    common = dict(max_steps=4, grad_accum=2)
    full = _trainer(base_config(train_manifest, str(tmp_path / "full"), **common), processor=processor).train()

    def stop_after_3(trainer, step, record):
        if step == 3:
            raise _Interrupt()

    cfg = base_config(train_manifest, str(tmp_path / "cut"), **common)
    cfg["output"]["save_every"] = 2
    with pytest.raises(_Interrupt):
        _trainer(cfg, processor=processor, callbacks=[stop_after_3]).train()
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path / "cut"))) == "step-00000002"
    resumed_trainer = _trainer(cfg, processor=processor)
    resumed = resumed_trainer.train(resume="auto")
    assert resumed.losses == full.losses  # bit-identical on CPU: same data order, RNG, optimizer state
    assert len(full.losses) == 4 and full.losses[-1] < full.losses[0]
    full_final = torch.load(os.path.join(tmp_path / "full", "checkpoints", "step-00000004", "model.pt"))
    cut_final = torch.load(os.path.join(tmp_path / "cut", "checkpoints", "step-00000004", "model.pt"))
    assert all(torch.equal(full_final[k], cut_final[k]) for k in full_final)


def test_interrupted_checkpoint_write_keeps_the_previous_one(train_manifest, tmp_path, processor, monkeypatch):
    cfg = base_config(train_manifest, str(tmp_path), max_steps=2)
    trainer = _trainer(cfg, processor=processor)
    trainer.train()  # final checkpoint: step 2
    good = ckpt.latest_checkpoint(str(tmp_path))
    assert good.endswith("step-00000002")
    real_save = ckpt._save

    def dying_save(obj, path):
        if path.endswith("optimizer.pt"):
            with open(path, "wb") as fh:
                fh.write(b"half a file")
            raise KeyboardInterrupt("power cut")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_save", dying_save)
    trainer.step = 3
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(ckpt, "_save", real_save)
    root = os.path.join(str(tmp_path), "checkpoints")
    assert os.path.isdir(os.path.join(root, ".step-00000003.tmp"))  # the torn write stays hidden
    assert not os.path.exists(os.path.join(root, "step-00000003"))
    assert ckpt.latest_checkpoint(str(tmp_path)) == good
    fresh = _trainer(cfg, processor=processor)
    assert fresh.resume("auto") and fresh.step == 2
    trainer.save()  # the next save replaces the stale temporary directory
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000003")
    assert not os.path.exists(os.path.join(root, ".step-00000003.tmp"))


def test_frozen_encoder_cache_trains_identically(train_manifest, tmp_path, processor):
    cfg = base_config(train_manifest, str(tmp_path / "a"), max_steps=3, freeze=["audio_encoder"])
    plain = _trainer(cfg, processor=processor).train().losses
    cfg["output"]["dir"] = str(tmp_path / "b")
    trainer = _trainer(cfg, processor=processor, cache_frozen_encoder=True)
    cached = trainer.train().losses
    assert cached == pytest.approx(plain, rel=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        _trainer(base_config(train_manifest, str(tmp_path / "c")), processor=processor, cache_frozen_encoder=True)


def test_logits_only_at_target_positions_give_the_same_loss(train_manifest, processor):
    from eureka_fast.train.data import ConversationCollator, load_sources
    from eureka_fast.train.trainer import logit_positions, token_cross_entropy_sum

    ds, _ = load_sources([train_manifest])
    batch = ConversationCollator(processor)([ds[i] for i in (0, 5, 9)])
    model = tiny_model().eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "input_features",
                                    "audio_token_counts", "windows_per_request")}
    with torch.no_grad():
        full = model(**inputs).logits
        positions = logit_positions(batch["labels"])
        kept = model(**inputs, logits_to_keep=positions).logits
    assert kept.shape[1] == len(positions) < full.shape[1]
    torch.testing.assert_close(kept, full[:, positions])
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]),
                                            batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(token_cross_entropy_sum(kept, batch["labels"], positions), ref)
    torch.testing.assert_close(token_cross_entropy_sum(full, batch["labels"]), ref)


def test_gradient_checkpointing_gives_the_same_training(train_manifest, tmp_path, processor):
    cfg = base_config(train_manifest, str(tmp_path / "plain"), max_steps=2, freeze=["audio_encoder"])
    plain = _trainer(cfg, processor=processor).train().losses
    cfg["output"]["dir"] = str(tmp_path / "ckpt")
    cfg["train"]["gradient_checkpointing"] = True
    trainer = _trainer(cfg, processor=processor)
    assert trainer.base_model.language_model.is_gradient_checkpointing
    assert trainer.train().losses == pytest.approx(plain, rel=1e-5)
