"""A method trained by two processes (train.common.devices: 2, DDP over gloo on this CPU: what
accelerate runs without an accelerator) against one: the same loss curve at the same global batch,
outputs and the W&B run written once, and a kill -9 mid-run resumed to the same result bit for bit.
FSDP and DeepSpeed need GPUs (accelerate refuses them on a CPU): their launch commands are checked
here, their sharded checkpoints are not run."""

import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_project, run, stage_command
from safetensors.torch import load_file
from test_resume import kill_after_checkpoint

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import CommonTrainParams, read_params, section
from tuneoff.training import distributed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    project = make_project(tmp_path_factory.mktemp("distributed"), tiny_base)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["bakeoff"]["tasks"] = ["extraction"]
    # 13 steps of 2 rows: 1 row per process; lr 1e-3 so that the loss falls
    params["train"]["common"].update(token_budget=5000, log_every=1, eval_every=4, precision="fp32")
    params["train"]["full"]["lr"] = 1e-3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "distributed test params"], project)
    run(["dvc", "repro", "--no-commit", "prepare@extraction", "import_base", "quantize"], project)
    return project


def set_params(project: Path, devices: int, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["common"]["devices"] = devices
    for key, value in changes.items():
        group, name = key.split("__")
        params["train"][group][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train(project: Path, method: str, devices: int, **changes) -> dict:
    """Run the train stage as dvc.yaml does (through its launcher) on `devices` processes."""
    set_params(project, devices, **changes)
    runs_before = set(project.glob("wandb/offline-run-*"))
    run(stage_command("train", task="extraction", method=method), project)
    out = project / "runs/extraction" / method
    csv = {name: [line.split(",") for line in (out / name).read_text().splitlines()[1:]]
           for name in ("loss.csv", "val_loss.csv")}
    return {"record": json.loads((out / "train.json").read_text()),
            "train_loss": [float(row[2]) for row in csv["loss.csv"]],
            "val_loss": [float(row[1]) for row in csv["val_loss.csv"]],
            "weights": load_file(next((out / "model").glob("*.safetensors"))),
            "wandb_runs": set(project.glob("wandb/offline-run-*")) - runs_before}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_two_processes_train_as_one(project, method):
    """Every logged train and val loss within 1e-5 (relative; measured 2e-7: float summation order), the
    final weights within 1e-4 of one update; one W&B run and one record, which says 2 devices and 1
    row per pass (each process's share of a 2-row step). The adapters without dropout: its draws differ by
    process.

    QLoRA (its 4-bit base replicated like LoRA's): losses within 1e-3 (measured 4.3e-4), weights not
    compared. On this CPU bitsandbytes' 4-bit layers make QLoRA's training depend on how a step's rows are
    grouped: one process running the same step in micro-batches of 1 row ends as far from its whole-batch
    run (adapter weights 0.004-0.010 apart, of at most 0.13) as two processes do."""
    one = train(project, method, 1, lora__dropout=0.0)
    two = train(project, method, 2, lora__dropout=0.0)
    assert len(two["train_loss"]) == len(one["train_loss"]) >= 10  # the same steps, logged every step
    assert two["train_loss"][-1] < 0.99 * two["train_loss"][0]  # it trains
    rtol = 1e-3 if method == "qlora" else 1e-5
    torch.testing.assert_close(two["train_loss"], one["train_loss"], rtol=rtol, atol=0)
    torch.testing.assert_close(two["val_loss"], one["val_loss"], rtol=rtol, atol=0)
    assert two["weights"].keys() == one["weights"].keys()
    for name, weight in one["weights"].items() if method != "qlora" else ():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert len(two["wandb_runs"]) == 1
    setup = two["record"]["setup"]
    assert (setup["devices"], setup["micro_batch_rows"], two["record"]["tokens"]["batch_rows"]) == (2, 1, 2)
    assert two["record"]["tokens"] == {**one["record"]["tokens"]}


def test_killed_two_process_training_resumes_to_the_same_result(project):
    """LoRA with dropout (each process draws its own masks, so each one's RNG is in the checkpoint),
    killed with SIGKILL to its process group under `dvc repro`: no process trains on (the launcher's
    workers die with it), and the rerun resumes to the uninterrupted run's weights, bit for bit."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["common"].update(token_budget=20000, log_every=2)  # ~60 steps
    params["checkpoint"]["every_steps"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uninterrupted = train(project, "lora", 2, lora__dropout=0.05)
    assert uninterrupted["record"]["tokens"]["steps"] > 40

    step = kill_after_checkpoint(project, "lora", min_step=6)
    checkpoint = project / "checkpoints/extraction/lora"
    # the kernel kills the workers once their launcher has exited, which a big process takes a moment to do
    deadline = time.monotonic() + 15
    while (out := subprocess.run(["pgrep", "-f", "stages.train extraction lora"], capture_output=True,
                                 text=True).stdout.strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not out, f"training processes outlived their launcher by 15 s: {out}"
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert not (project / "runs/extraction/lora/train.json").exists()

    log = run(["dvc", "repro", "train@extraction-lora"], project)
    resumed = json.loads((project / "runs/extraction/lora/train.json").read_text())
    assert resumed["timing"]["resumed_from_step"] >= step
    assert log.count("resuming from the checkpoint") == 1  # said once, by the main process
    weights = load_file(project / "runs/extraction/lora/model/adapter_model.safetensors")
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(weights[name], tensor), name
    assert not checkpoint.exists()


def test_launch_commands():
    """What the launcher starts: torch's launcher on a CPU (DDP over gloo; FSDP and DeepSpeed refused in
    one line), `accelerate launch` with infra/accelerate's config on GPUs (auto: FSDP for full, DDP for
    adapters; bf16 autocast as accelerate's mixed precision)."""
    common = section(CommonTrainParams, "train", "common", data=read_params(Path(__file__).parents[1] / "params.yaml"))
    two = common.model_copy(update={"devices": 2, "batch_size": 4})
    argv = ["stages.train", "extraction", "full"]
    cmd, env = distributed.command(argv, two, "full", "fp32", on_gpu=False)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["-m", *argv] and env == {"ACCELERATE_USE_CPU": "true"}

    cmd, _ = distributed.command(argv, two, "full", "bf16", on_gpu=True)
    assert cmd[2] == "accelerate.commands.launch" and cmd[4].endswith("infra/accelerate/fsdp.yaml")
    assert "--num_processes=2" in cmd and "--mixed_precision=bf16" in cmd and cmd[-4:] == ["--module", *argv]
    cmd, _ = distributed.command(argv, two, "lora", "bf16-pure", on_gpu=True)
    assert cmd[4].endswith("infra/accelerate/ddp.yaml") and "--mixed_precision=no" in cmd

    with pytest.raises(TuneoffError, match="train.common.distributed fsdp needs GPUs"):
        distributed.command(argv, two.model_copy(update={"distributed": "fsdp"}), "full", "fp32", on_gpu=False)
    with pytest.raises(TuneoffError, match="batch_size 3 is not a multiple of train.common.devices 2"):
        distributed.command(argv, two.model_copy(update={"batch_size": 3}), "full", "fp32", on_gpu=False)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(TuneoffError, match="pip install deepspeed"):
            distributed.command(argv, two.model_copy(update={"distributed": "deepspeed"}), "full", "bf16", on_gpu=True)
