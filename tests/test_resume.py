"""Kill -9 a real training stage mid-run, `dvc repro` again: it resumes from its checkpoint and
ends with the same weights, metrics and loss logs, bit for bit, as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_project, run, stage_command
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
MEASURED = {"timing", "memory", "cost"}  # what a rerun may change: seconds, bytes of RSS, dollars
UPSTREAM = {"full": ["prepare@extraction"], "qlora": ["quantize"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    project = make_project(tmp_path_factory.mktemp("resume"), tiny_base)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["bakeoff"]["tasks"] = ["extraction"]
    # ~45 steps, a val check every 4 and a checkpoint every 3: the kill lands between checkpoints
    params["train"]["common"].update(token_budget=12000, eval_every=4)
    params["checkpoint"]["every_steps"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "resume test params"], project)
    return project


def outputs(project: Path, method: str) -> dict:
    out = project / "runs/extraction" / method
    metrics = json.loads((out / "train.json").read_text())
    weights = next((out / "model").glob("*.safetensors"))
    metrics["tuning"].pop("seconds")  # the learning-rate pilots' time, measured like the rest
    return {"metrics": {k: v for k, v in metrics.items() if k not in MEASURED},
            "weights": load_file(weights),
            "logs": [(out / name).read_text() for name in ("loss.csv", "val_loss.csv")]}


def stage(method: str) -> str:
    return f"{'train_nf4' if method == 'qlora' else 'train'}@extraction-{method}"


def kill_after_checkpoint(project: Path, method: str, min_step: int) -> int:
    """Start the stage under `dvc repro`, SIGKILL its whole process group once a checkpoint at
    `min_step` or later exists; return the checkpoint's step."""
    progress = project / "checkpoints/extraction" / method / "progress.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage(method)], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= min_step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return step
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{stage(method)} ended (rc {proc.poll()}) before a checkpoint at step {min_step} was seen")


# full (the whole model's weights and optimizer state) and qlora (an adapter on the NF4 base);
# lora's checkpoint is qlora's without the quantized base, and is killed and restarted below.
# full again with bitsandbytes' 8-bit AdamW, whose state is uint8 codes and block scales
@pytest.mark.parametrize("method,optimizer", [("full", "adamw"), ("qlora", "adamw"), ("full", "adamw-8bit")])
def test_killed_training_resumes_to_the_same_result(project, method, optimizer):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["common"]["optimizer"] = optimizer  # each case sets its own
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the reference run goes around DVC: from DVC's run cache the rerun below would be restored, not resumed
    run(["dvc", "repro", "--no-commit", *UPSTREAM[method]], project)
    run(stage_command(stage(method).split("@")[0], task="extraction", method=method), project,
        env={"WANDB_MODE": "disabled"})
    uninterrupted = outputs(project, method)
    assert uninterrupted["metrics"]["tokens"]["steps"] > 20
    assert not (project / "checkpoints/extraction" / method).exists()  # removed by the stage that finished

    step = kill_after_checkpoint(project, method, min_step=6)
    assert not (project / "runs/extraction" / method / "train.json").exists()  # killed mid-run: no result yet
    out = run(["dvc", "repro", stage(method)], project)
    resumed_at = json.loads((project / "runs/extraction" / method / "train.json").read_text())["timing"]["resumed_from_step"]
    assert resumed_at >= step and f"resuming from the checkpoint at step {resumed_at}" in out

    resumed = outputs(project, method)
    assert not list((project / "runs/extraction" / method).glob(".model.*"))  # the killed run's temp folder is gone
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["logs"] == uninterrupted["logs"]
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


def test_a_checkpoint_from_other_params_is_not_resumed(project):
    step = kill_after_checkpoint(project, "lora", min_step=3)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["lr"] = 5e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", stage("lora")], project)
    assert step >= 3 and "saved from other params, data or base; starting over" in out
    assert json.loads((project / "runs/extraction/lora/train.json").read_text())["timing"]["resumed_from_step"] == 0
