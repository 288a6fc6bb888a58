"""One method trained by several processes, one per device: `train.common.devices`.

The train stage's launcher (launch.py) starts them through the standard stack: on GPUs
`accelerate launch` with `infra/accelerate/<strategy>.yaml`, on a CPU torch's own launcher
(`torch.distributed.run`; `accelerate launch --cpu` starts one process only) with
ACCELERATE_USE_CPU, which makes accelerate's `Accelerator` a gloo group of CPU processes.

The strategy (`train.common.distributed`): DDP replicates the model and averages gradients (the
adapter methods: their trainable weights are small); FSDP shards weights, gradients and AdamW
states over the devices (a full fine-tune that one GPU cannot hold); DeepSpeed ZeRO-3 is the
alternative. accelerate runs FSDP and DeepSpeed on accelerators only, so a CPU runs DDP.

What stays the same as on one device, so the comparison stays fair: each step's `batch_size` rows
(plan_steps: the same rows, seed and token budget) are dealt out between the processes, each
process's summed loss is divided by the whole step's loss tokens and multiplied by the process
count, and DDP/FSDP average the gradients: the gradient of the step's mean loss, as on one device
up to float summation order (tests/test_distributed.py compares the loss curves).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import CommonTrainParams

CONFIGS = Path(__file__).resolve().parents[2] / "infra" / "accelerate"
CONFIG_FILES = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml", "deepspeed": "deepspeed-zero3.yaml"}


def strategy(common: CommonTrainParams, method: str, on_gpu: bool) -> str:
    """The strategy `distributed: auto` means: on GPUs FSDP for a full fine-tune, DDP for an adapter;
    on a CPU DDP (the one that runs there)."""
    if common.distributed != "auto":
        return common.distributed
    return "fsdp" if on_gpu and not method_named(method).adapter else "ddp"


def command(module_argv: list[str], common: CommonTrainParams, method: str, precision: str,
            on_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """The command (and environment additions) that runs `python -m <module_argv>` as
    `common.devices` processes."""
    n, kind = common.devices, strategy(common, method, on_gpu)
    if common.batch_size % n:
        raise TuneoffError(f"params.yaml: train.common.batch_size {common.batch_size} is not a multiple of "
                           f"train.common.devices {n}: each process takes an equal share of a step's rows")
    if not on_gpu:
        if kind != "ddp":
            raise TuneoffError(f"params.yaml: train.common.distributed {kind} needs GPUs (accelerate runs FSDP and "
                               f"DeepSpeed on accelerators only); on a CPU set it to ddp")
        return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                 "-m", *module_argv], {"ACCELERATE_USE_CPU": "true"})
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise TuneoffError("params.yaml: train.common.distributed deepspeed needs DeepSpeed: pip install deepspeed")
    # bf16 autocast (precision bf16) is FSDP's mixed precision: bf16 compute over sharded float32 weights
    mixed = "bf16" if precision == "bf16" else "no"
    return ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / CONFIG_FILES[kind]),
             f"--num_processes={n}", f"--mixed_precision={mixed}", "--module", *module_argv], {})


def launched() -> bool:
    """Whether this process is one of several that a launcher started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def die_with_launcher() -> None:
    """Have the kernel kill this process when the launcher that started it dies. torch's launcher starts
    each process in a session of its own, so a SIGKILL to the stage's process group (a killed `dvc repro`,
    a cancelled flow run) would leave them training on, to write outputs and delete the checkpoint that
    the rerun should resume from. Linux only (prctl PR_SET_PDEATHSIG)."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def accelerator():
    """accelerate's Accelerator for this process when it is one of several, else None (one device:
    the loop runs as it always has)."""
    if not launched():
        return None
    die_with_launcher()
    from accelerate import Accelerator

    return Accelerator()


def share(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of a step that process `rank` of `world` trains on (every world-th row)."""
    return idx[rank::world]
