"""Checkpoints: atomic publish, HF-loadable model, manifest verification, fallback, keep-last-N."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import CheckpointError
from learner import checkpoint as ckpt


@pytest.fixture()
def trainer_parts(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _train_one(model, opt, sched):
    ids = torch.arange(4, 12).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(root, step, parts, tokenizer_dir=None, keep_last=3):
    model, opt, sched = parts
    return ckpt.save_checkpoint(
        root,
        step,
        model,
        opt,
        sched,
        {"step": step, "version": step, "extra": {"cursor": step * 10}},
        keep_last,
        tokenizer_dir,
    )


def test_roundtrip_is_exact_and_hf_loadable(tmp_path, trainer_parts, tiny_model_dir):
    model, opt, sched = trainer_parts
    _train_one(model, opt, sched)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    path = _save(tmp_path, 1, trainer_parts, tokenizer_dir=tiny_model_dir)
    expect_rng = (torch.rand(3), np.random.rand(3), random.random())
    assert (tmp_path / "latest").read_text().strip() == path.name == "ckpt-00000001"

    found = ckpt.require_checkpoint(tmp_path)
    assert found.path == path and found.step == 1 and found.extra == {"cursor": 10}
    for name, tensor in found.model_state().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    saved_opt = found.optimizer_state()
    for k, v in opt.state_dict()["state"][0].items():
        assert (
            torch.equal(saved_opt["state"][0][k], v) if torch.is_tensor(v) else saved_opt["state"][0][k] == v
        )
    assert found.scheduler_state()["last_epoch"] == sched.state_dict()["last_epoch"]
    ckpt.set_rng_state(found.rng(0))
    got_rng = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got_rng[0], expect_rng[0]) and np.array_equal(got_rng[1], expect_rng[1])
    assert got_rng[2] == expect_rng[2]

    # the directory is a Hugging Face model directory with its tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(reloaded.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert AutoTokenizer.from_pretrained(path).encode("1+2=") == AutoTokenizer.from_pretrained(
        tiny_model_dir
    ).encode("1+2=")


@pytest.mark.parametrize(
    "damage", ["truncate_weights", "flip_byte", "bad_manifest", "no_manifest", "missing_file"]
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, trainer_parts, caplog, damage):
    first = _save(tmp_path, 1, trainer_parts)
    _train_one(*trainer_parts)
    second = _save(tmp_path, 2, trainer_parts)
    weights = second / "model.safetensors"
    if damage == "truncate_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "bad_manifest":
        (second / "manifest.json").write_text("{not json")
    elif damage == "no_manifest":
        (second / "manifest.json").unlink()
    else:
        (second / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="learner.checkpoint"):
        found = ckpt.require_checkpoint(tmp_path)
    assert found.path == first and found.extra == {"cursor": 10}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(second) in warning and str(first) in warning


def test_no_checkpoint_and_nothing_intact(tmp_path, trainer_parts):
    assert ckpt.find_checkpoint(tmp_path / "missing") is None
    with pytest.raises(CheckpointError, match="resume was requested"):
        ckpt.require_checkpoint(tmp_path)
    only = _save(tmp_path, 1, trainer_parts)
    (only / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.require_checkpoint(tmp_path)


def test_unpublished_and_temporary_directories_are_ignored(tmp_path, trainer_parts, caplog):
    first = _save(tmp_path, 1, trainer_parts)
    # a crash after the rename but before the pointer moved: ckpt-2 exists, latest still names ckpt-1
    second = _save(tmp_path, 2, trainer_parts)
    (tmp_path / "latest").write_text(first.name + "\n")
    (tmp_path / ".tmp-ckpt-00000003").mkdir()
    assert ckpt.require_checkpoint(tmp_path).path == first
    # no readable pointer at all: the newest intact directory, with a warning
    (tmp_path / "latest").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="learner.checkpoint"):
        assert ckpt.require_checkpoint(tmp_path).path == second
    assert "pointer" in caplog.text


def test_keep_last_never_deletes_the_published_one(tmp_path, trainer_parts):
    for step in (1, 2, 3):
        _save(tmp_path, step, trainer_parts, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-00000002", "ckpt-00000003"]
    # the pointer names an older checkpoint (newer ones unpublished): it survives pruning
    (tmp_path / "latest").write_text("ckpt-00000002\n")
    ckpt.prune(tmp_path, keep_last=1)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-00000002", "ckpt-00000003"]
    manifest = json.loads((tmp_path / "ckpt-00000003" / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer.json", "rng-rank0.pt"} <= set(
        manifest["files"]
    )
