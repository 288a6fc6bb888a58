"""The bake-off as a Prefect flow: DVC owns the DAG and the caching, the flow decides where stages run.

CPU stages (import_base, prepare, quantize, then report, register) run where the flow runs. The
per-model GPU stages are grouped into units, one per method plus the untuned base's evaluation:

    base:  evaluate_base@<task>
    full:  train@<task>-full, evaluate_full@<task>
    lora:  train@<task>-lora, merge@<task>-lora, evaluate@<task>-lora
    qlora: train_nf4@<task>-qlora, merge@<task>-qlora, merge_nf4@<task>-qlora, evaluate_nf4@<task>-qlora

Without a pool each unit is `dvc repro` here, one after another (DVC locks the workspace).
With `gpu_pool`, each unit becomes a run of the `bakeoff-unit` deployment in that work pool, and
the units run concurrently on whichever workers pick them up. A worker clones the flow's git
revision, takes this workspace's dvc.lock, `dvc pull`s the inputs from the DVC remote, reproduces
its stages, `dvc push`es their outputs and returns their dvc.lock entries and small uncached files
(metrics, plots); the flow writes those back and `dvc pull`s the outputs, so afterwards
`dvc status` here is clean and `dvc repro` has nothing to do.

Transient failures retry with backoff. A unit that fails for good is recorded in
runs/<task>/<method>/failed.json; the report shows it as failed and the other methods complete.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.states import Failed

from tuneoff.core.methods import BASE, unit_stages
from tuneoff.core.params import BakeoffParams, read_params, section
from tuneoff.core.tracking import GROUP_ENV

UNIT_DEPLOYMENT = "bakeoff-unit"
AFTER = ["report", "register"]


def before_stages(tasks: list[str]) -> list[str]:
    """The CPU stages the units depend on."""
    return ["import_base", *(f"prepare@{t}" for t in tasks), "quantize"]


def redact(text: str) -> str:
    """`https://user:token@host/repo.git` -> `https://***@host/repo.git`: a credential in a URL (the
    repo workers clone, a DVC remote) never reaches a log, an error or failed.json (which git tracks)."""
    return re.sub(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)


class CommandFailed(RuntimeError):
    """A command that failed: the message holds the tail of its output, `line` what to tell the user;
    both redacted."""

    def __init__(self, cmd: tuple[str, ...], returncode: int, cwd, output: str):
        super().__init__(redact(f"`{' '.join(cmd)}` failed ({returncode}) in {cwd}:\n{output[-2000:]}"))
        self.line = redact(failure_line(output) or f"`{' '.join(cmd)}` failed ({returncode})")


def failure_line(output: str) -> str | None:
    """The failed DVC stage and its own one-line error, from `dvc repro`'s output: "prepare@x: <error>"."""
    stage = re.findall(r"failed to reproduce '([^']+)'", output)
    errors = [line.removeprefix("error: ") for line in output.splitlines() if line.startswith("error: ")]
    if not stage:
        return errors[-1] if errors else None
    return f"{stage[-1]}: {errors[-1] if errors else 'failed (its output is above)'}"


def sh(*cmd: str, cwd: Path | str = ".", env: dict | None = None, echo: bool = False) -> str:
    """Run a command and return its stdout; `echo` streams stdout and stderr as they come (long
    stages show progress). On failure raise CommandFailed with the tail of the output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    if echo:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        returncode, out, err = proc.wait(), "".join(lines), ""
    else:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        returncode, out, err = done.returncode, done.stdout, done.stderr
    if returncode:
        raise CommandFailed(cmd, returncode, cwd, out + err)
    return out


def repro(targets: list[str], cwd: Path | str = ".", env: dict | None = None) -> None:
    sh("dvc", "repro", *targets, cwd=cwd, env=env, echo=True)


@task(retries=2, retry_delay_seconds=[10, 30])
def run_here(unit: str, targets: list[str]) -> str:
    repro(targets)
    return unit


@task(retries=2, retry_delay_seconds=[10, 30])
def dispatch(unit: str, targets: list[str], upstream: list[str], pool: str, repo: str, revision: str, lock: str,
             group: str) -> dict:
    """Run a unit on a worker in `pool`; its outputs come back through the DVC remote."""
    run = run_deployment(f"{UNIT_DEPLOYMENT}/{pool}", parameters={
        "repo": repo, "revision": revision, "unit": unit, "targets": targets, "upstream": upstream, "lock": lock,
        "group": group}, flow_run_name=f"{unit}@{revision[:8]}", as_subflow=False)
    if not run.state.is_completed():
        raise RuntimeError(redact(f"unit {unit}: flow run {run.name} ended {run.state.type.value}: {run.state.message}"))
    return run.state.result()


@flow(name=UNIT_DEPLOYMENT, persist_result=True)
def bakeoff_unit(repo: str, revision: str, unit: str, targets: list[str], upstream: list[str], lock: str,
                 group: str) -> dict:
    """On a worker: reproduce `targets` at `revision` against the orchestrator's dvc.lock."""
    logger = get_run_logger()
    work = Path(tempfile.mkdtemp(prefix=f"tuneoff-{unit}-"))
    try:
        sh("git", "clone", "--quiet", repo, str(work))
        sh("git", "checkout", "--quiet", revision, cwd=work)
        (work / "dvc.lock").write_text(lock)
        sh("dvc", "pull", "--quiet", *upstream, cwd=work)
        logger.info("unit %s on %s: dvc repro %s", unit, os.uname().nodename, " ".join(targets))
        sh("dvc", "repro", "--single-item", *targets, cwd=work, env={GROUP_ENV: group}, echo=True)
        sh("dvc", "push", "--quiet", *targets, cwd=work)
        keep_offline_runs(work / "wandb")
        return {"unit": unit, "host": os.uname().nodename, "pid": os.getpid(), **collect(work, targets)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def keep_offline_runs(wandb_dir: Path) -> None:
    """Offline W&B runs would go with the scratch clone: move them to $TUNEOFF_OFFLINE_RUNS
    (default ~/.tuneoff/wandb) for `wandb sync`. Online runs are already uploaded."""
    dest = Path(os.environ.get("TUNEOFF_OFFLINE_RUNS", Path.home() / ".tuneoff" / "wandb"))
    for run in wandb_dir.glob("offline-run-*"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run), dest / run.name)


def collect(work: Path, targets: list[str]) -> dict:
    """The dvc.lock entries of `targets`, and their uncached outputs (metrics, plots) as base64."""
    from dvc.repo import Repo

    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    files = {}
    with Repo(str(work)) as repo:
        for stage in repo.index.stages:
            if stage.name in targets:  # (addressing is relative to the cwd, not the repo)
                files.update({out.def_path: base64.b64encode((work / out.def_path).read_bytes()).decode()
                              for out in stage.outs if not out.use_cache})
    return {"lock": {t: lock[t] for t in targets}, "files": files}


def apply(result: dict) -> None:
    """Bring a worker's results into this workspace: dvc.lock entries, uncached files, cached outputs."""
    lock_path = Path("dvc.lock")
    lock = yaml.safe_load(lock_path.read_text())
    lock["stages"].update(result["lock"])
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    for path, data in result["files"].items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
    sh("dvc", "pull", "--quiet", *result["lock"])


def record_failure(unit: str, tasks: list[str], error: BaseException) -> None:
    for t in tasks:
        out = Path("runs") / t / unit
        out.mkdir(parents=True, exist_ok=True)
        (out / "failed.json").write_text(json.dumps({"unit": unit, "error": redact(getattr(error, "line", str(error)[-500:])),
                                                     "output": redact(str(error)[-2000:])}, indent=2) + "\n")


def git_revision_for_dispatch() -> str:
    """HEAD, provided the tracked files (other than dvc.lock) match it: workers run that revision."""
    changed = [line[3:] for line in sh("git", "status", "--porcelain", "--untracked-files=no").splitlines()]
    changed = [p for p in changed if p != "dvc.lock"]
    if changed:
        raise RuntimeError(f"uncommitted changes to {changed}: workers run the committed revision, commit first")
    return sh("git", "rev-parse", "HEAD").strip()


@flow(name="bakeoff", log_prints=True)
def bakeoff(gpu_pool: str | None = None, repo: str | None = None, methods: list[str] | None = None) -> dict:
    """The whole bake-off; `gpu_pool` sends the per-method stages to that work pool's workers.
    `repo` is the git URL workers clone (default: this repository's path); `methods` limits the
    methods rerun (default: all of params.yaml's)."""
    logger = get_run_logger()
    os.environ.setdefault(GROUP_ENV, time.strftime("bakeoff-%Y%m%d-%H%M%S", time.gmtime()))
    bakeoff_params = section(BakeoffParams, "bakeoff", data=read_params())
    tasks, units = bakeoff_params.tasks, [BASE, *(methods or bakeoff_params.methods)]
    for t in tasks:
        for u in units:
            (Path("runs") / t / u / "failed.json").unlink(missing_ok=True)
    before = before_stages(tasks)
    try:
        repro(before)
    except CommandFailed as e:  # a stage's own error is one line, not a traceback
        return Failed(message=e.line)
    outcome = {}
    for unit in list(units):  # a unit whose stages are all up to date is not sent anywhere
        if not json.loads(sh("dvc", "status", "--json", *unit_stages(unit, tasks, bakeoff_params.more_seeds)) or "{}"):
            outcome[unit] = {"state": "up to date"}
            units.remove(unit)
    if gpu_pool:
        revision = git_revision_for_dispatch()
        sh("dvc", "push", "--quiet", *before)
        lock = Path("dvc.lock").read_text()
        futures = {u: dispatch.submit(u, unit_stages(u, tasks, bakeoff_params.more_seeds), before, gpu_pool, repo or str(Path.cwd()), revision,
                                      lock, os.environ[GROUP_ENV]) for u in units}
        for unit, future in futures.items():
            try:
                result = future.result()
            except Exception as e:
                logger.error("unit %s failed for good: %s", unit, redact(str(getattr(e, "line", e))))
                record_failure(unit, tasks, e)
                outcome[unit] = {"state": "failed", "error": redact(getattr(e, "line", str(e)[-500:]))}
                continue
            apply(result)
            outcome[unit] = {"state": "completed", "host": result["host"], "pid": result["pid"]}
            logger.info("unit %s done on %s (pid %s)", unit, result["host"], result["pid"])
    else:
        for unit in units:
            try:
                run_here(unit, unit_stages(unit, tasks, bakeoff_params.more_seeds))
                outcome[unit] = {"state": "completed", "host": "local"}
            except Exception as e:
                logger.error("unit %s failed for good: %s", unit, redact(str(getattr(e, "line", e))))
                record_failure(unit, tasks, e)
                outcome[unit] = {"state": "failed", "error": redact(getattr(e, "line", str(e)[-500:]))}
    try:  # not upstream: a failed unit is reported, not retried here
        sh("dvc", "repro", "--single-item", *AFTER, echo=True)
    except CommandFailed as e:
        return Failed(message=e.line)
    return {unit: outcome[unit] for unit in [BASE, *(methods or bakeoff_params.methods)]}
