"""Resumable training: every `checkpoint.every_steps` steps the loop saves what it needs to go on
as if it had never stopped, so a killed stage rerun by `dvc repro` ends with the same weights
and metrics, bit for bit on CPU, as an uninterrupted run.

A checkpoint is a folder under checkpoints/<task>/<method>/ (outside every DVC output, so
`dvc repro` does not delete it before the rerun): the trainable weights as safetensors,
the optimizer, scheduler and RNG state (torch.save, read back with `weights_only=True`: tensors
and plain containers only, no arbitrary pickle), and progress.json (step, counters, the log rows
so far). It is written whole or not at all (atomic_dir) and resumed only when its fingerprint
(the params, data and base model it was trained from) matches the run's; a successful stage
deletes it.

Trained by several processes (distributed.py), each writes into one shared temporary folder that
the main process then renames into place. Under DDP the weights and optimizer states are the same
in every process: the main process saves them as above, and each process its own RNG state
(rng-<rank>.pt: LoRA dropout draws differ between processes). Under FSDP or DeepSpeed, whose
weights and states are sharded, accelerate's `save_state` writes each process's shards and RNG
(sharded/), and `load_state` reads them back; that path needs GPUs and is not run by the tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneoff.core.atomic import _sync_tree, atomic_dir, write_json


def fingerprint(config: dict, *paths: Path) -> str:
    """sha256 of `config` (JSON) and of every file under `paths`: what a resumed run must share
    with the run that saved the checkpoint."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for root in paths:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(root)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Checkpointer:
    """Saves and restores one training run's state in `folder`; with `acc` (accelerate's
    Accelerator), one process's part of a run trained by several."""

    def __init__(self, folder: Path, fingerprint: str, every_steps: int, acc=None):
        self.folder, self.fingerprint, self.every_steps, self.acc = Path(folder), fingerprint, every_steps, acc
        self.sharded = acc is not None and acc.distributed_type.value in ("FSDP", "DEEPSPEED")

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0 and step != last_step

    def save(self, model, optimizer, scheduler, tensors: dict[str, torch.Tensor], progress: dict) -> None:
        if self.acc is not None:
            return self._save_shared(model, optimizer, scheduler, tensors, progress)
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_dir(self.folder) as tmp:
            save_file(trainable, tmp / "trainable.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(), "tensors": tensors}, tmp / "state.pt")
            write_json(tmp / "progress.json", {"fingerprint": self.fingerprint, **progress})

    def _save_shared(self, model, optimizer, scheduler, tensors, progress) -> None:
        acc, main = self.acc, self.acc.is_main_process
        tmp = self.folder.with_name(f".{self.folder.name}.saving")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.sharded:
            acc.save_state(tmp / "sharded")  # the model, optimizer and scheduler (registered), each process's RNG
        else:
            torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        if main:
            if not self.sharded:
                trainable = {n: p.detach().contiguous() for n, p in _trainable(model).items()}
                save_file(trainable, tmp / "trainable.safetensors")
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
            torch.save(tensors, tmp / "tensors.pt")
        acc.wait_for_everyone()
        if main:
            write_json(tmp / "progress.json", {"fingerprint": self.fingerprint, **progress})
            _sync_tree(tmp)
            old = self.folder.with_name(f".{self.folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.folder.exists():
                self.folder.rename(old)
            tmp.rename(self.folder)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self, model, optimizer, scheduler) -> tuple[dict, dict] | None:
        """Restore the saved state into model, optimizer, scheduler and the RNG; return
        (progress, tensors), or None when there is no checkpoint or it is from another run."""
        progress_file = self.folder / "progress.json"
        if not progress_file.is_file():
            return None
        if self.acc is not None:
            return self._load_shared(model, optimizer, scheduler, json.loads(progress_file.read_text()))
        try:  # everything is read before anything is restored: a bad file leaves the model untouched
            progress = json.loads(progress_file.read_text())
            if progress.get("fingerprint") != self.fingerprint:
                print(f"checkpoint {self.folder}: saved from other params, data or base; starting over")
                self.clear()
                return None
            saved = load_file(self.folder / "trainable.safetensors")
            state = torch.load(self.folder / "state.pt", weights_only=True, map_location="cpu")
        except Exception as e:  # a file cut short by a crash or a full disk: json, safetensors or torch's own error
            print(f"checkpoint {self.folder}: unreadable ({type(e).__name__}: {str(e)[:200]}); starting over",
                  file=sys.stderr)
            self.clear()
            return None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != params.keys():
            raise RuntimeError(f"{self.folder}: trainable parameters differ from the model's")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return progress, state["tensors"]

    def _load_shared(self, model, optimizer, scheduler, progress: dict) -> tuple[dict, dict] | None:
        acc = self.acc
        if progress.get("fingerprint") != self.fingerprint:  # the same file, the same answer in every process
            if acc.is_main_process:
                print(f"checkpoint {self.folder}: saved from other params, data or base; starting over")
            acc.wait_for_everyone()
            self.clear()
            return None
        if self.sharded:
            acc.load_state(self.folder / "sharded")
        else:
            saved = load_file(self.folder / "trainable.safetensors")
            state = torch.load(self.folder / "state.pt", weights_only=True, map_location="cpu")
            with torch.no_grad():
                for name, p in _trainable(model).items():
                    p.copy_(saved[name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(torch.load(self.folder / f"rng-{acc.process_index}.pt", weights_only=True))
        return progress, torch.load(self.folder / "tensors.pt", weights_only=True)

    def clear(self) -> None:
        """Delete the checkpoint (by the main process only, when several share it)."""
        if self.acc is None or self.acc.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)
