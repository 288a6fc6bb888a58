"""Scheduled retraining: rerun the bake-off when the data or params changed, and let the register
stage decide promotion. Nothing retrains when `dvc status` says nothing changed.

The retrain works on its own branch (`retrain.branch`, made from the checked-out commit), commits
the run's records there, `dvc push`es the outputs, tags the versions it registered (GTO) and
pushes the branch and tags to `publish.git_remote` (flows/publish.py); then it says what changed:
which stages ran, each task's verdict, and its production version before and after. It never runs
beside another bake-off in the same workspace (the bake-off flow's workspace lock).

`scope: production` reruns only each task's production method (and the base's evaluation); the
other methods' rows in the report then come from their last run.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.bakeoff import bakeoff
from flows.shell import sh
from flows.publish import dvc_remote
from tuneoff.core.params import RetrainParams, read_params, section

REGISTRY = Path("registry/registry.json")


def changed_stages() -> list[str]:
    """The stages `dvc repro` would run: anything whose code, data, params or outputs changed. In
    a fresh clone (a git-sourced deployment) the outputs are missing: they are pulled first from
    the DVC remote, where the last run pushed them, so that only real changes count."""
    status = json.loads(sh("dvc", "status", "--json") or "{}")
    if "deleted" in json.dumps(status) and dvc_remote():
        sh("dvc", "pull", "--quiet", "--allow-missing")
        status = json.loads(sh("dvc", "status", "--json") or "{}")
    return sorted(status)


def production() -> dict[str, str]:
    """Each registered model's production version, as "v2 (lora)"."""
    if not REGISTRY.is_file():
        return {}
    models = json.loads(REGISTRY.read_text())["models"]
    return {name: f"v{v['version']} ({v['method']})" for name, versions in models.items() for v in versions
            if v["stage"] == "production"}


def production_methods() -> list[str]:
    if not REGISTRY.is_file():
        return []
    models = json.loads(REGISTRY.read_text())["models"]
    return sorted({v["method"] for versions in models.values() for v in versions if v["stage"] == "production"})


@flow(name="retrain", log_prints=True)
def retrain(scope: str | None = None, gpu_pool: str | None = None) -> dict:
    """Retrain if anything changed; `scope` and `gpu_pool` default to params.yaml's `retrain` section."""
    logger = get_run_logger()
    params = section(RetrainParams, "retrain", data=read_params())
    scope, gpu_pool = scope or params.scope, gpu_pool if gpu_pool is not None else params.gpu_pool
    changed = changed_stages()
    if not changed:
        logger.info("dvc status: nothing changed since the last bake-off; nothing retrains")
        return {"retrained": False, "changed": []}
    logger.info("dvc status: %d stages out of date (%s); retraining (%s)", len(changed), ", ".join(changed[:8]), scope)
    methods = production_methods() if scope == "production" else None
    if scope == "production" and not methods:
        logger.info("no production model yet: running the whole bake-off")
        methods = None
    before = production()
    outcome = bakeoff(gpu_pool=gpu_pool or None, methods=methods, branch=params.branch, push=True)
    after = production()
    decisions = json.loads(Path("registry/decision.json").read_text())
    tasks = {task: {"verdict": d["verdict"], "method": d["method"],
                    "production_before": before.get(f"{task}-model"), "production_after": after.get(f"{task}-model")}
             for task, d in decisions.items()}
    for task, t in tasks.items():
        logger.info("%s: %s%s; production %s -> %s", task, t["verdict"], f" ({t['method']})" if t["method"] else "",
                    t["production_before"] or "none", t["production_after"] or "none")
    return {"retrained": True, "changed": changed, "outcome": outcome, "tasks": tasks, "branch": params.branch}
