"""Scheduled retraining: rerun the bake-off when the data or params changed, and let the register
stage decide promotion. Nothing retrains when `dvc status` says nothing changed.

`scope: production` reruns only each task's production method (and the base's evaluation); the
other methods' rows in the report then come from their last run.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.bakeoff import bakeoff, sh
from tuneoff.core.params import RetrainParams, read_params, section


def changed_stages() -> list[str]:
    """The stages `dvc repro` would run: anything whose code, data, params or outputs changed."""
    return sorted(json.loads(sh("dvc", "status", "--json") or "{}"))


def production_methods(registry: Path = Path("registry/registry.json")) -> list[str]:
    if not registry.is_file():
        return []
    models = json.loads(registry.read_text())["models"]
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
    outcome = bakeoff(gpu_pool=gpu_pool or None, methods=methods)
    return {"retrained": True, "changed": changed, "outcome": outcome}
