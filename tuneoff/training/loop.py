"""The one training loop every method shares.

Batches are packed rows (see packing.py); the loss is modeling/loss.py's, over assistant tokens.

With `train.common.micro_batch_size`, a step's rows run forward and backward in micro-batches and
their gradients add up (gradient accumulation): each micro-batch's summed loss is divided by the
whole step's count of loss tokens, so the sum of their gradients is the gradient of the step's mean
loss, as if the rows had run at once (up to float summation order). Activations are then held for
one micro-batch at a time; the steps, their rows, the token budget and the seed are unchanged.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tuneoff.core import measure
from tuneoff.core.atomic import atomic_file
from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import CommonTrainParams
from tuneoff.core.tracking import NoTracker
from tuneoff.data.packing import IGNORE
from tuneoff.modeling.loss import batch_loss, eval_loss, unwrap
from tuneoff.training import allocator, attention, distributed, dropout
from tuneoff.training.checkpoint import Checkpointer


def plan_steps(real_tokens: torch.Tensor, batch_size: int, token_budget: int, seed: int) -> list[torch.Tensor]:
    """Row indices for each optimizer step until `token_budget` real tokens are reached.
    Rows are reshuffled every epoch from `seed`, so every method sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    steps, seen, order = [], 0, torch.empty(0, dtype=torch.long)
    while seen < token_budget:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(real_tokens), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        steps.append(idx)
        seen += int(real_tokens[idx].sum())
    return steps


def micro_batches(idx: torch.Tensor, micro_batch_size: int) -> tuple[torch.Tensor, ...]:
    """A step's rows in the groups that each run one forward and backward: at most
    `micro_batch_size` rows each, or all of them at once with 0."""
    return idx.split(micro_batch_size) if micro_batch_size else (idx,)


def step_shapes(rows: dict[str, torch.Tensor], common: CommonTrainParams) -> dict[str, int]:
    """The shapes the steps of a run take (train.json `setup`, what the estimator predicts from):
    row length, step count, and the most rows, real tokens and supervised positions of any one
    forward and backward pass on one device (a step, or its share on one of `devices`, or with
    micro-batches one micro-batch of that: activations are held for one at a time)."""
    steps = plan_steps(rows["real_tokens"], common.batch_size, common.token_budget, common.seed)
    passes = [micro for idx in steps for rank in range(common.devices)
              for micro in micro_batches(distributed.share(idx, rank, common.devices), common.micro_batch_size)]
    return {"seq_len": rows["input_ids"].shape[1], "steps": len(steps),
            "micro_batch_rows": max(len(idx) for idx in passes),
            "max_step_tokens": max(int(rows["real_tokens"][idx].sum()) for idx in passes),
            "max_supervised_positions": max(int((rows["targets"][idx] != IGNORE).sum()) for idx in passes)}


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, given to bitsandbytes' too


def make_optimizer(params: list[torch.Tensor], weight_decay: float, lr: float, optimizer: str = "adamw",
                   fused: bool = True):
    """AdamW with weight decay on matrices only (norms and biases are not decayed).

    adamw: torch's, fused (one kernel per parameter, each state read once) on a CPU as on a GPU, as
    transformers' Trainer defaults to; several times faster than PyTorch's per-tensor CPU default
    (benchmarks/results/step_parts.md, `benchmarks/step_parts.py adamw`). Its states have the parameters' dtype.

    adamw-8bit, paged-adamw-8bit: bitsandbytes' AdamW8bit / PagedAdamW8bit with the same groups, lr,
    betas and eps: each state is uint8 codes plus a float32 absmax per 256 values, 2 bytes a parameter
    instead of 8 (tensors under 4,096 values keep float32 states). bitsandbytes runs them on a CPU too,
    in plain torch ops on float32 copies of one tensor's states at a time. Paging (unified memory the
    driver moves to host RAM when the GPU fills) exists on CUDA only: on a CPU the paged one is adamw-8bit.
    """
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TuneoffError(f"params.yaml: train.common.optimizer {optimizer} needs bitsandbytes: "
                           f"pip install 'bitsandbytes>=0.48'") from None
    kind = bnb.optim.PagedAdamW8bit if optimizer == "paged-adamw-8bit" else bnb.optim.AdamW8bit
    return kind(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


@contextlib.contextmanager
def cpu_paths(model, dev: torch.device):
    """What the loop changes on a CPU while it runs: per-example attention on packed rows
    (attention.py) and a cheaper LoRA dropout mask (dropout.py). A GPU keeps the model as it is."""
    with contextlib.ExitStack() as stack:
        if dev.type == "cpu":
            stack.enter_context(attention.packed(model))
            stack.enter_context(dropout.cheaper(model))
        yield model


_libc = ctypes.CDLL(None) if os.name == "posix" else None  # the process's own symbols, libc's among them


def return_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim); a no-op where the C
    library has none. The loop calls it after each step of a 4-bit (QLoRA) model on a CPU when the
    process runs on the system's malloc (train.common.allocator: system, or no tcmalloc installed).
    glibc keeps the holes a step's freed tensors leave resident: on the default task QLoRA's peak
    RSS was 4349 MiB without the trim and 3457 MiB with it, for 10-30% of its speed, as the returned
    pages fault back in (`benchmarks/peak_per_step.py`). tcmalloc needs no trim (allocator.py)."""
    trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if trim is not None:
        trim(0)


@dataclass
class TrainResult:
    steps: int
    real_tokens: int
    loss_tokens: int
    train_seconds: float
    eval_seconds: float
    final_train_loss: float
    val_loss: float
    resumed_from_step: int  # 0 = trained from the start


def cosine_with_warmup(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to 0: transformers' get_cosine_schedule_with_warmup, the same
    floats, without importing transformers.optimization (which imports peft: seconds per stage)."""
    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Run:
    """What stays fixed through one run: the model as it trains, its optimizer and schedule, and how and
    where it trains."""

    model: torch.nn.Module  # with `acc`, as accelerate wrapped it
    params: list[torch.Tensor]  # the trainable weights, whose gradient norm is clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    common: CommonTrainParams
    steps: int
    dev: torch.device
    precision: str
    label: str
    tracker: NoTracker
    acc: object | None  # accelerate's Accelerator, one of common.devices processes (distributed.py)

    @property
    def main_process(self) -> bool:
        return not self.acc or self.acc.is_main_process


def train(model, train_rows, val_rows, common: CommonTrainParams, lr: float, dev: torch.device, precision: str,
          log_dir: Path, label: str, tracker: NoTracker = NoTracker(), checkpointer: Checkpointer | None = None,
          acc=None) -> TrainResult:
    """Train `model` on `common.token_budget` real tokens; log loss to log_dir/{loss,val_loss}.csv
    and to `tracker` (train/loss, train/lr, tokens/s, memory, val/loss). With a `checkpointer`,
    resume from its checkpoint if there is one and save one every `every_steps` steps.

    With `acc` (accelerate's Accelerator, one of `common.devices` processes: distributed.py), this
    process trains on its share of each step's rows, the model and optimizer wrapped by accelerate
    (DDP, FSDP or DeepSpeed); the logs are the main process's to write, the losses the whole step's."""
    steps = plan_steps(train_rows["real_tokens"], common.batch_size, common.token_budget, common.seed)
    run = prepare(model, common, lr, len(steps), dev, precision, label, tracker, acc)
    four_bit = any(p.dtype == torch.uint8 for p in run.model.parameters())  # bitsandbytes stores 4-bit weights as uint8
    trim_heap = dev.type == "cpu" and four_bit and allocator.in_use() == "system"
    with cpu_paths(unwrap(run.model), dev):
        state, window_loss = resume(run, checkpointer)
        resumed_from_step = state["step"]
        # no val pass before the first step: that is the base model's val loss, the same for every
        # method on the base, which the quantize stage measures once per task (float and NF4)

        run.model.train()
        bar = tqdm(total=len(steps), initial=state["step"], desc=label, unit="step", file=sys.stderr,
                   mininterval=1 if sys.stderr.isatty() else 15, disable=not run.main_process)
        start = time.perf_counter()
        for step in range(state["step"] + 1, len(steps) + 1):
            idx = steps[step - 1]
            n = optimizer_step(run, train_rows, idx, window_loss)
            if trim_heap:
                return_freed_memory()
            state["step"] = step
            state["real_tokens"] += int(train_rows["real_tokens"][idx].sum())
            state["loss_tokens"] += n
            state["window_tokens"] += n
            bar.update()
            if step % common.log_every == 0 or step == len(steps):
                log_window(run, state, window_loss, start, bar)
                window_loss, state["window_tokens"] = torch.zeros((), device=dev), 0
            if common.eval_every and step % common.eval_every == 0 and step != len(steps):
                state["train_seconds"] += time.perf_counter() - start
                val_pass(run, val_rows, state)
                start = time.perf_counter()
            if checkpointer and checkpointer.due(step, len(steps)):
                state["train_seconds"] += time.perf_counter() - start
                window_loss = save_checkpoint(run, checkpointer, state, window_loss)
                start = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        state["train_seconds"] += time.perf_counter() - start
        bar.close()
        val_after = val_pass(run, val_rows, state)
    if run.main_process:
        write_csv(log_dir / "loss.csv", ["step", "tokens", "train_loss", "lr"], state["loss_rows"])
        write_csv(log_dir / "val_loss.csv", ["step", "val_loss"], state["val_rows"])
    recent = state["recent"]
    last = recent[-max(1, len(recent) // 10):]  # the log windows of about the last 10% of steps
    return TrainResult(len(steps), state["real_tokens"], state["loss_tokens"], state["train_seconds"],
                       state["eval_seconds"], sum(last) / len(last), val_after,
                       resumed_from_step)


def prepare(model, common: CommonTrainParams, lr: float, steps: int, dev: torch.device, precision: str, label: str,
            tracker: NoTracker, acc) -> Run:
    """The run of `steps` steps: AdamW over the model's trainable weights and its learning-rate schedule
    (with `acc`, the model and optimizer wrapped by accelerate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, common.weight_decay, lr, common.optimizer)
    if acc:  # FSDP2 shards the model in place and swaps the optimizer's parameters: both in one prepare
        model, optimizer = acc.prepare(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
    scheduler = cosine_with_warmup(optimizer, math.ceil(common.warmup_fraction * steps), steps)
    if acc:
        acc.register_for_checkpointing(scheduler)  # saved by acc.save_state with sharded checkpoints
    return Run(model, params, optimizer, scheduler, common, steps, dev, precision, label, tracker, acc)


def resume(run: Run, checkpointer: Checkpointer | None) -> tuple[dict, torch.Tensor]:
    """What the loop carries from step to step, and the summed loss of the log window so far: from the
    checkpoint if `checkpointer` has one, else as at the start."""
    # everything the loop carries from step to step, so a checkpoint can restore it
    state = {"step": 0, "real_tokens": 0, "loss_tokens": 0, "window_tokens": 0, "recent": [],
             "loss_rows": [], "val_rows": [], "train_seconds": 0.0, "eval_seconds": 0.0}
    window_loss = torch.zeros((), device=run.dev)
    resumed = checkpointer.load(run.model, run.optimizer, run.scheduler) if checkpointer else None
    if resumed:
        state, tensors = resumed
        # the window's losses so far were saved on the main process (save_checkpoint)
        window_loss = tensors["window_loss"].to(run.dev) if run.main_process else window_loss
        if run.main_process:
            print(f"{run.label}: resuming from the checkpoint at step {state['step']} of {run.steps}", file=sys.stderr)
    return state, window_loss


def optimizer_step(run: Run, rows: dict[str, torch.Tensor], idx: torch.Tensor, window_loss: torch.Tensor) -> int:
    """One step on rows[idx] (this process's share, in micro-batches): backward, clip, update. Adds the
    share's summed loss to `window_loss` in place; returns the whole step's loss tokens."""
    rank, world = (run.acc.process_index, run.acc.num_processes) if run.acc else (0, 1)
    n = int((rows["targets"][idx] != IGNORE).sum())  # the whole step's loss tokens, on the host
    micros = micro_batches(distributed.share(idx, rank, world), run.common.micro_batch_size)
    for i, micro in enumerate(micros):
        # DDP averages the processes' gradients once, at the last micro-batch
        with run.acc.no_sync(run.model) if run.acc and i < len(micros) - 1 else contextlib.nullcontext():
            loss_sum, _ = batch_loss(run.model, rows, micro, run.dev, run.precision)
            # over the step's count (times the processes, whose gradients are averaged): the
            # micro-batches' gradients, summed over every process, are the step's mean loss's
            (loss_sum * (world / n)).backward() if run.acc else (loss_sum / n).backward()
        window_loss += loss_sum.detach()
    if run.acc:
        run.acc.clip_grad_norm_(run.model.parameters(), run.common.max_grad_norm)  # FSDP: over every shard
    else:
        torch.nn.utils.clip_grad_norm_(run.params, run.common.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return n


def log_window(run: Run, state: dict, window_loss: torch.Tensor, start: float, bar: tqdm) -> None:
    """The mean train loss of the log window that ends at state["step"] (every process's rows): into
    loss.csv's rows, the tracker and the progress bar. A loss that is not finite stops the run."""
    step, log_every = state["step"], run.common.log_every
    window_sum = run.acc.reduce(window_loss, "sum") if run.acc else window_loss  # every process's rows
    mean = float(window_sum) / state["window_tokens"]  # the only host sync, once per log window
    if not math.isfinite(mean):
        first = step - (step - 1) % log_every
        raise TuneoffError(f"{run.label}: the train loss became {mean} within steps {first}-{step} of "
                           f"{run.steps}: lower the learning rate (train.<method>.lr) or "
                           f"train.common.max_grad_norm, or train in fp32 (train.common.precision)")
    state["recent"].append(mean)
    state["loss_rows"].append([step, state["real_tokens"], round(mean, 6), f"{run.scheduler.get_last_lr()[0]:.3e}"])
    elapsed = state["train_seconds"] + time.perf_counter() - start
    run.tracker.log({"train/loss": mean, "train/lr": run.scheduler.get_last_lr()[0], "train/tokens": state["real_tokens"],
                     "train/tokens_per_second": state["real_tokens"] / elapsed,
                     "memory/current_bytes": measure.current_memory_bytes(run.dev)}, step=step)
    bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{state['real_tokens'] / elapsed:.0f}")


def val_pass(run: Run, val_rows: dict[str, torch.Tensor], state: dict) -> float:
    """The val loss after state["step"]: into val_loss.csv's rows and the tracker, its seconds into eval_seconds."""
    # in micro-batches too: run on a whole step's rows, its logits could outgrow a training pass
    eval_rows = min(run.common.micro_batch_size or run.common.batch_size, run.common.batch_size)
    t = time.perf_counter()
    val = eval_loss(run.model, val_rows, eval_rows, run.dev, run.precision)
    state["eval_seconds"] += time.perf_counter() - t
    state["val_rows"].append([state["step"], round(val, 6)])
    run.tracker.log({"val/loss": val}, step=state["step"])
    return val


def save_checkpoint(run: Run, checkpointer: Checkpointer, state: dict, window_loss: torch.Tensor) -> torch.Tensor:
    """A checkpoint after state["step"]; returns the log window's summed loss as the checkpoint keeps it."""
    if run.acc:  # the window's losses so far, all on the main process: what the checkpoint keeps
        total = run.acc.reduce(window_loss, "sum")
        window_loss = total if run.acc.is_main_process else torch.zeros_like(total)
    checkpointer.save(run.model, run.optimizer, run.scheduler, {"window_loss": window_loss.cpu()}, state)
    return window_loss


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
