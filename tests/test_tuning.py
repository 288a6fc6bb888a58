"""Learning rates tuned per method (issue 39) on the tiny model: a list of candidates runs a pilot each
and the lowest val loss trains the whole budget, exactly as that rate alone would; the pilots are in
the method's cost; one rate runs no pilot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from safetensors.torch import load_file

from tuneoff.core.params import CostParams, EstimateParams, read_params, section
from tuneoff.core.records import TrainRecord, read
from tuneoff.decision.costs import run_costs
from tuneoff.decision.decide import rates_note


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    """A folder with params.yaml (the extraction task, small), the tiny base, and prepare run in process."""
    from stages import prepare

    path = tmp_path_factory.mktemp("tuning")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["bakeoff"]["tasks"] = ["extraction"]
    params["tasks"]["extraction"]["n_examples"] = 60
    params["prepare"].update(seq_len=256, max_val_examples=8, max_test_examples=8)
    params["train"]["common"].update(batch_size=2, token_budget=1500, log_every=2)
    params["evaluate"].update(max_new_tokens=8, bootstrap_samples=100)
    params["tracking"]["enabled"] = False
    params["checkpoint"]["every_steps"] = 0
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "models").mkdir()
    (path / "models/base").symlink_to(tiny_base)
    here = os.getcwd()
    os.chdir(path)
    try:
        prepare.main("extraction", base=Path("models/base"), out=Path("data/prepared/extraction"))
    finally:
        os.chdir(here)
    return path


def train_lora(project, monkeypatch, lr) -> tuple[dict, dict]:
    """stages.train in-process at `lr` (one rate or a list): its train.json and weights."""
    from stages import train as train_stage

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["lr"] = lr
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    out = train_stage.main("extraction", "lora", base=Path("models/base"), prepared=Path("data/prepared/extraction"),
                           run=Path("runs/extraction/lora"))
    return json.loads((out / "train.json").read_text()), load_file(next((out / "model").glob("*.safetensors")))


def test_the_lowest_pilot_val_loss_trains_the_budget_as_that_rate_alone(project, monkeypatch):
    tuned, tuned_weights = train_lora(project, monkeypatch, [1e-4, 3e-2])
    t = tuned["tuning"]
    assert t["tuned"] and t["candidates"] == [1e-4, 3e-2] and set(t["pilot_val_loss"]) == {"0.0001", "0.03"}
    best = min(t["pilot_val_loss"], key=t["pilot_val_loss"].get)
    assert t["lr"] == float(best) and t["pilot_tokens"] == 375  # 25% of the 1,500-token budget
    assert t["at_edge"] == {"0.0001": "smallest", "0.03": "largest"}[best] and t["tied_with"] == []
    assert 0 < t["seconds"] < tuned["timing"]["wall_seconds"]

    alone, alone_weights = train_lora(project, monkeypatch, t["lr"])  # one rate: no pilot, the same training
    assert alone["tuning"] == {"lr": t["lr"], "tuned": False, "candidates": [t["lr"]], "pilot_tokens": None,
                               "pilot_val_loss": None, "at_edge": None, "tied_with": None, "seconds": 0.0}
    assert alone["loss"] == tuned["loss"] and alone["tokens"] == tuned["tokens"]
    assert alone_weights.keys() == tuned_weights.keys()
    assert all((alone_weights[k] == tuned_weights[k]).all() for k in alone_weights)

    # the pilots are part of the method's cost; the report shows the final run alone beside it
    params = read_params(project / "params.yaml")
    costs = run_costs(read(TrainRecord, project / "runs/extraction/lora/train.json"),
                      section(EstimateParams, "estimate", data=params), section(CostParams, "cost", data=params).price_per_hour)
    assert costs["tuning"]["tuned"] is False and costs["cost_usd_final"] == costs["cost_usd"]
    tuned_costs = run_costs(TrainRecord(**tuned), section(EstimateParams, "estimate", data=params),
                            section(CostParams, "cost", data=params).price_per_hour)
    assert tuned_costs["cost_usd"] > tuned_costs["cost_usd_final"] > 0
    assert tuned_costs["tuning"]["usd"] == pytest.approx(tuned_costs["cost_usd"] - tuned_costs["cost_usd_final"])


def test_a_verdict_says_which_rates_were_tuned_and_which_sit_at_an_edge():
    def row(method, tuned, edge=None):
        return {"method": method, "train": {"tuning": {"lr": 1e-3, "tuned": tuned, "at_edge": edge}}}

    assert "No learning rate was tuned" in rates_note([row("full", False), row("lora", False)])
    mixed = rates_note([{"method": "base", "train": None}, row("full", False), row("lora", True)])
    assert "full trained at one hand-set learning rate, lora at a tuned one" in mixed
    edge = rates_note([row("full", True), row("lora", True, "largest")])
    assert "lora (0.001, the largest tried) is at the edge" in edge and "hand-set" not in edge


def test_the_sweep_harness_trains_and_scores_each_rate_once(project, tmp_path):
    """benchmarks/lr_sweep.py (the sweep behind the default rates, docs/lr-sweep.md) on the tiny model:
    each point trained and scored on val, written as it finishes; a plot per task."""
    out, plots = tmp_path / "sweep.jsonl", tmp_path / "sweep"
    command = [sys.executable, "benchmarks/lr_sweep.py", "--project", str(project), "--tasks", "extraction",
               "--methods", "lora", "--rates", "1e-3", "--out", str(out), "--plots", str(plots)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    points = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["method"], p["lr"]) for p in points] == [("lora", 1e-3)]
    val = json.loads((project / "data/prepared/extraction/meta.json").read_text())["examples"]["val"]
    assert all(p["val_loss"] > 0 and 0 <= p["val_main"] <= 1 and p["val_n"] == val for p in points)
    assert (tmp_path / "sweep-extraction.png").stat().st_size > 0
