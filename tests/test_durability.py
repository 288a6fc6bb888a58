"""What survives a crash: outputs are on disk before their name is (fsync), a checkpoint cut short
is a fresh start rather than a stage that fails until someone deletes it, and a loss that stops
being finite ends the run with one line naming where."""

import os
from pathlib import Path

import pytest
import torch

from tuneoff.core import atomic
from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import CommonTrainParams
from tuneoff.training import loop
from tuneoff.training.checkpoint import Checkpointer


@pytest.fixture
def synced(monkeypatch) -> list[int]:
    """The inode of every file or folder fsync'd, in order."""
    inodes, real = [], os.fsync

    def fsync(fd):
        inodes.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return inodes


def test_a_written_file_is_on_disk_before_its_name_and_the_name_after(tmp_path, synced):
    target = tmp_path / "out" / "metrics.json"
    atomic.write_json(target, {"a": 1})
    file, folder = target.stat().st_ino, target.parent.stat().st_ino
    assert synced == [file, folder]  # the data, then the rename


def test_every_file_of_a_written_folder_is_on_disk_before_the_folder_is_renamed(tmp_path, synced):
    target = tmp_path / "model"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    expected = {p.stat().st_ino for p in (target / "weights.bin", target / "sub" / "config.json", target / "sub", target)}
    assert expected <= set(synced[:-1]) and synced[-1] == tmp_path.stat().st_ino


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@pytest.mark.parametrize("damaged", ["state.pt", "trainable.safetensors", "progress.json"])
def test_a_checkpoint_cut_short_starts_the_run_over_and_says_so(tmp_path, capsys, damaged):
    model, optimizer, scheduler = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "ckpt", "run-1", every_steps=1)
    ckpt.save(model, optimizer, scheduler, {"window_loss": torch.zeros(())}, {"step": 3})
    path = ckpt.folder / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # what a crash mid-write leaves
    fresh, optimizer, scheduler = model_and_optimizer()
    with torch.no_grad():
        fresh.weight.fill_(7.0)
    assert ckpt.load(fresh, optimizer, scheduler) is None
    assert "unreadable" in capsys.readouterr().err and not ckpt.folder.exists()
    assert torch.all(fresh.weight == 7.0)  # nothing half-restored


def test_an_intact_checkpoint_still_resumes(tmp_path):
    model, optimizer, scheduler = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "ckpt", "run-1", every_steps=1)
    ckpt.save(model, optimizer, scheduler, {"window_loss": torch.ones(())}, {"step": 3})
    fresh, optimizer, scheduler = model_and_optimizer()
    with torch.no_grad():
        fresh.weight.fill_(7.0)
    progress, tensors = ckpt.load(fresh, optimizer, scheduler)
    assert progress["step"] == 3 and tensors["window_loss"] == 1 and torch.equal(fresh.weight, model.weight)


def test_a_loss_that_stops_being_finite_names_the_steps(tmp_path, tiny_base, monkeypatch):
    from transformers import AutoModelForCausalLM

    rows = {"input_ids": torch.ones(8, 16, dtype=torch.long), "targets": torch.ones(8, 16, dtype=torch.long),
            "real_tokens": torch.full((8,), 16), "example": torch.zeros(8, 16, dtype=torch.long)}
    calls = []

    def exploding(model, rows, idx, dev, precision, *args, **kwargs):
        calls.append(idx)
        value = float("nan") if len(calls) >= 3 else 1.0
        return model.lm_head.weight.sum() * 0 + value, 1

    monkeypatch.setattr(loop, "batch_loss", exploding)
    monkeypatch.setattr(loop, "eval_loss", lambda *a, **k: 1.0)
    common = CommonTrainParams(seed=0, batch_size=2, micro_batch_size=0, token_budget=8 * 16, precision="fp32",
                               optimizer="adamw", gradient_checkpointing=False, allocator="system", devices=1, distributed="auto", warmup_fraction=0.0,
                               weight_decay=0.0, max_grad_norm=1.0, eval_every=0, log_every=2, pilot_fraction=0.25)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with pytest.raises(TuneoffError, match=r"t/full: the train loss became nan within steps 3-4 of 4: lower"):
        loop.train(model, rows, rows, common, 1e-3, torch.device("cpu"), "fp32", Path(tmp_path), "t/full")
