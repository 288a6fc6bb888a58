"""Sweeps with successive halving and the escalation ladder: the rules on made-up results, then
real DVC experiments on the tiny model."""

import json

import pytest
import yaml
from conftest import make_project
from conftest import run as run_tracked

from tuneoff.experiments.ablation import climb, diminishing_returns, survivors


def run(cmd, cwd):
    """W&B off: these tests read DVC's records, and each stage starts ~1-2 s sooner without it."""
    return run_tracked(cmd, cwd, env={"WANDB_MODE": "disabled"})


def test_halving_keeps_the_best_share_by_val_loss():
    losses = {"r4-qv": 2.0, "r16-qv": 1.5, "r64-qv": 1.4, "r4-all": 9.9}  # r4-all is made to lose
    assert survivors(losses, 0.5) == ["r64-qv", "r16-qv"]
    assert survivors(losses, 0.75) == ["r64-qv", "r16-qv", "r4-qv"]
    assert survivors(losses, 0.01) == ["r64-qv"]  # at least one goes on


def test_diminishing_returns_is_the_cheapest_point_within_the_best_ci():
    rows = [{"name": "r4", "trainable": 4, "main": 0.60, "ci_low": 0.50, "ci_high": 0.70},
            {"name": "r16", "trainable": 16, "main": 0.71, "ci_low": 0.62, "ci_high": 0.80},
            {"name": "r64", "trainable": 64, "main": 0.73, "ci_low": 0.64, "ci_high": 0.82},
            {"name": "pruned", "trainable": 1, "main": None}]
    assert diminishing_returns(rows) == "r16"  # r4's 0.60 is below the best's CI (0.64); r16 is inside it
    assert diminishing_returns([{**r, "ci_low": 0.55} if r["name"] == "r64" else r for r in rows]) == "r4"
    assert diminishing_returns([rows[-1]]) is None


LADDER = [{"name": n} for n in ("qlora-r16-qv", "lora-r16-qv", "lora-r32-all-linear", "lora-r64-all-linear", "full")]


def fake_rungs(scores: dict, usd: float = 1.0):
    ran = []

    def run_rung(rung):
        ran.append(rung["name"])
        return {"main": scores[rung["name"]], "usd": usd, "gpu_hours": 0.5}
    return ran, run_rung


@pytest.mark.parametrize("target, winner, stopped, rungs_run", [
    (0.70, "lora-r32-all-linear", "target met", 3),
    (0.50, "qlora-r16-qv", "target met", 1),
    (0.95, None, "never reached", 5),
])
def test_the_ladder_stops_at_the_first_rung_that_meets_the_target(target, winner, stopped, rungs_run):
    ran, run_rung = fake_rungs(dict(zip([r["name"] for r in LADDER], [0.55, 0.62, 0.71, 0.72, 0.90])))
    result = climb(LADDER, target, 0, 0, run_rung)
    assert (result["winner"], result["stopped"], len(ran)) == (winner, stopped, rungs_run)
    assert [r["spent_usd"] for r in result["rungs"]] == [float(i) for i in range(1, rungs_run + 1)]
    if stopped == "never reached":
        assert result["reason"] == "no rung reached 95.0; the best was full (90.0)"


@pytest.mark.parametrize("budget_usd, budget_gpu_hours, rungs_run", [(2.5, 0, 3), (0, 1.0, 2), (0.5, 0, 1)])
def test_the_ladder_stops_when_the_budget_is_spent(budget_usd, budget_gpu_hours, rungs_run):
    ran, run_rung = fake_rungs({r["name"]: 0.1 for r in LADDER})
    result = climb(LADDER, 0.9, budget_usd, budget_gpu_hours, run_rung)
    assert result["stopped"] == "budget exhausted" and len(ran) == rungs_run and result["winner"] is None
    assert result["reason"].startswith("budget spent") and f"before rung {rungs_run + 1}" in result["reason"]


# -- real DVC experiments on the tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    project = make_project(tmp_path_factory.mktemp("ablation"), tiny_base)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["bakeoff"]["tasks"] = ["extraction"]
    params["sweep"].update(task="extraction", ranks=[2, 8], target_sets=["qv", "all-linear"],
                           halving={"first_budget_fraction": 0.5, "keep_fraction": 0.25})
    params["escalate"].update(task="extraction", target_kind="absolute", target_points=0.0,
                              ladder=[{"method": "lora", "rank": 2, "targets": "qv"}, {"method": "full"}])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # LoRA's bake-off run first, as a team would have it: its upstream (base, data) is in the cache
    run(["dvc", "repro", "evaluate@extraction-lora"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "bake-off"], project)
    return project


def set_params(project, section: str, **values):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", f"{section} params"], project)


def test_a_2x2_sweep_prunes_by_val_loss_and_tabulates(project):
    out = run(["tuneoff", "sweep"], project)
    result = json.loads((project / "sweeps/extraction-lora/sweep.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"r2-qv", "r8-qv", "r2-all-linear", "r8-all-linear"}
    kept = [n for n, r in rows.items() if not r["pruned"]]
    assert kept == survivors({n: r["rung1_val_loss"] for n, r in rows.items()}, 0.25) and len(kept) == 1
    for r in rows.values():
        assert (r["main"] is None) == r["pruned"] and r["trainable"] > 0
        assert r["target_modules"] == (["q_proj", "v_proj"] if r["targets"] == "qv" else
                                       ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert rows["r8-all-linear"]["trainable"] == 4 * rows["r2-all-linear"]["trainable"]
    assert result["diminishing_returns"] in kept
    hours = result["savings"]["device_hours"]
    assert hours["spent"] == pytest.approx(sum(r["rung1_device_hours"] + (r["device_hours"] or 0) for r in rows.values()), abs=1e-5)
    assert hours["full_grid"] == pytest.approx(sum(r["device_hours"] if not r["pruned"] else r["rung1_device_hours"]
                                                   * r["full_budget_factor"] for r in rows.values()), abs=1e-5)
    assert all(1 < r["full_budget_factor"] < 2 for r in rows.values())  # rung 1 had half the tokens
    assert (project / "sweeps/extraction-lora/sweep.png").stat().st_size > 10_000
    assert "| r2-qv | 2 | qv |" in out and "Diminishing returns: **" in out
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], project)
    assert sum("-rung1" in line for line in shown.splitlines()) == 4
    header = shown.splitlines()[0].split(",")
    assert {"train.lora.rank", "train.lora.target_modules", "runs/extraction/lora/eval.json:task"} <= set(header)


def test_the_ladder_stops_at_the_first_rung_and_its_winner_applies(project):
    out = run(["tuneoff", "escalate", "--apply"], project)
    result = json.loads((project / "escalations/extraction/ladder.json").read_text())
    assert result["stopped"] == "target met" and result["winner"] == "lora-r2-qv" and len(result["rungs"]) == 1
    assert "spent so far $" in out
    applied = yaml.safe_load((project / "params.yaml").read_text())["train"]["lora"]
    assert applied["rank"] == 2 and applied["target_modules"] == ["q_proj", "v_proj"]
    run(["git", "checkout", "params.yaml", "dvc.lock"], project)


def test_the_ladder_stops_when_its_budget_is_spent(project):
    set_params(project, "escalate", target_points=100.0, budget_usd=1e-9)
    run(["tuneoff", "escalate"], project)
    result = json.loads((project / "escalations/extraction/ladder.json").read_text())
    assert result["stopped"] == "budget exhausted" and len(result["rungs"]) == 1 and result["winner"] is None
    assert result["rungs"][0]["spent_usd"] > 1e-9

