"""The bake-off as a Prefect flow: DVC owns the DAG and the caching, the flow decides where stages run.

CPU stages (import_base, prepare, quantize, then report, register) run where the flow runs. The
per-model GPU stages are grouped into units, one per method plus the untuned base's evaluation:

    base:  evaluate_base@<task>
    full:  train@<task>-full, evaluate_full@<task>
    lora:  train@<task>-lora, merge@<task>-lora, evaluate@<task>-lora
    qlora: train_nf4@<task>-qlora, merge@<task>-qlora, merge_nf4@<task>-qlora, evaluate_nf4@<task>-qlora

(each evaluate stage also scores its model's general ability)

Without a pool each unit is `dvc repro` here, one after another (DVC locks the workspace).
With `gpu_pool`, each unit becomes a run of the `bakeoff-unit` deployment in that work pool, and
the units run concurrently on whichever workers pick them up. A worker clones the flow's git
revision, takes this workspace's dvc.lock, `dvc pull`s the inputs from the DVC remote, reproduces
its stages, `dvc push`es their outputs and returns their dvc.lock entries and small uncached files
(metrics, plots); the flow writes those back and `dvc pull`s the outputs, so afterwards
`dvc status` here is clean and `dvc repro` has nothing to do.

Afterwards the run is published (flows/publish.py): its records committed, its outputs pushed to
the DVC remote, its registered versions tagged with GTO, and with publish.push the branch and tags
pushed.

Transient failures retry with backoff. A unit that fails for good is recorded in
runs/<task>/<method>/failed.json; the report shows it as failed and the other methods complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, runtime, task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, Failed

from flows import hardware
from flows.shell import CommandFailed, redact, sh
from tuneoff.core.atomic import atomic_file
from tuneoff.core.errors import TRACEBACKS, TuneoffError
from tuneoff.core.methods import BASE, unit_stages
from tuneoff.core.params import (
    BakeoffParams,
    CheckpointParams,
    DispatchParams,
    read_params,
    section,
)
from tuneoff.core.records import Comparison, read
from tuneoff.core.tracking import GROUP_ENV

UNIT_DEPLOYMENT = "bakeoff-unit"
AFTER = ["report", "register"]
WORKSPACE_LOCK = Path(".dvc/tmp/tuneoff-bakeoff.lock")  # one bake-off at a time in a workspace
POLL_SECONDS = 5


def before_stages(tasks: list[str]) -> list[str]:
    """The CPU stages the units depend on."""
    return ["import_base", *(f"prepare@{t}" for t in tasks), "quantize"]


def repro(targets: list[str], cwd: Path | str = ".", env: dict | None = None) -> None:
    sh("dvc", "repro", *targets, cwd=cwd, env=env, echo=True)


def transient(task, task_run, state) -> bool:
    """Whether a failed unit is worth another attempt: a lost worker, a network or storage error, a
    timeout are; a stage's own one-line `error:` is not, nor is running out of memory: it would fail
    the same way again. A stage prints that line for a bad input (a TuneoffError) and for an exception
    from the code (a bug, its traceback in logs/: tuneoff/core/errors.py); a network or storage error
    inside a stage keeps its traceback and no such line (errors.transient)."""
    try:
        state.result()
    except Exception as e:
        text = str(e)
        return not (re.search(r"^error: ", text, re.MULTILINE) or "out of memory" in text.lower())
    return False


@task(retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=transient)
def run_here(unit: str, targets: list[str]) -> str:
    repro(targets)
    return unit


@task(retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=transient)
def dispatch(unit: str, targets: list[str], upstream: list[str], pool: str, repo: str, revision: str, lock: str,
             group: str, limits: DispatchParams, job_variables: dict) -> dict:
    """Run a unit on a worker in `pool` and return its result; its outputs come back through the
    DVC remote. The run's idempotency key is the unit, revision, dvc.lock and this task's attempt:
    a retry after a failed or timed-out run starts a new run, nothing else starts a second one.
    `job_variables` (flows/hardware.py) override the deployment's per key; its command and env stay."""
    key = f"{unit}@{revision}:{hashlib.sha256(lock.encode()).hexdigest()[:16]}:{runtime.task_run.run_count}"
    run = run_deployment(f"{UNIT_DEPLOYMENT}/{pool}", parameters={
        "repo": repo, "revision": revision, "unit": unit, "targets": targets, "upstream": upstream, "lock": lock,
        "group": group}, job_variables=job_variables, flow_run_name=f"{unit}@{revision[:8]}", as_subflow=False,
        idempotency_key=key, timeout=0)
    state = wait_for(run.id, run.name, limits)
    if not state.is_completed():
        raise RuntimeError(redact(f"unit {unit}: flow run {run.name} ended {state.type.value}: {state.message}"))
    return unit_result(state)


def wait_for(run_id, name: str, limits: DispatchParams):
    """The run's final state. Polling errors are retried here (not by a new run); a run still
    unfinished after unit_timeout_minutes, or PENDING (claimed, never started) for
    pending_timeout_minutes, is cancelled and a TimeoutError raised."""
    deadline = time.monotonic() + 60 * limits.unit_timeout_minutes
    with get_client(sync_client=True) as client:
        while True:
            try:
                state = client.read_flow_run(run_id).state
            except Exception as e:  # the API unreachable for a moment: ask again
                get_run_logger().warning("polling %s: %s", name, redact(str(e))[:200])
                state = None
            if state is not None and state.is_final():
                return state
            pending_for = (time.time() - state.timestamp.timestamp()) if state is not None and state.is_pending() else 0
            if time.monotonic() > deadline or pending_for > 60 * limits.pending_timeout_minutes:
                why = (f"PENDING for {pending_for / 60:.1f} min" if pending_for > 60 * limits.pending_timeout_minutes
                       else f"unfinished after {limits.unit_timeout_minutes:g} min")
                cancel = Cancelling if state is not None and state.is_running() else Cancelled
                client.set_flow_run_state(run_id, cancel(message=f"tuneoff: {why}"), force=True)
                raise TimeoutError(f"flow run {name} {why}: cancelled")
            time.sleep(POLL_SECONDS)


def unit_result(state) -> dict:
    """A unit run's result, read as JSON and only JSON. `state.result()` would deserialize with
    whatever serializer the stored bytes or the run's metadata name, pickle included; here a result
    whose metadata names another serializer, or whose stored bytes are not JSON (a whole result
    record naming another serializer included), is refused, never loaded."""
    # the storage lookup and block call Prefect's own result reading makes (prefect/states.py)
    from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method
    from prefect.results import get_default_result_storage, resolve_result_storage

    meta = state.data
    if getattr(getattr(meta, "serializer", None), "type", None) != "json" or not getattr(meta, "storage_key", None):
        raise RuntimeError("unit result: not a persisted JSON result; refused")
    storage = (resolve_result_storage(meta.storage_block_id, _sync=True) if meta.storage_block_id
               else get_default_result_storage(_sync=True))
    try:
        content = json.loads(call_explicitly_sync_block_method(storage, "read_path", (meta.storage_key,), {}))
        if isinstance(content, dict) and set(content) == {"metadata", "result"}:  # a whole result record
            if (content["metadata"] or {}).get("serializer", {}).get("type") != "json":
                raise ValueError("a result record with a serializer other than JSON")
            content = json.loads(content["result"])
    except (ValueError, TypeError, AttributeError) as e:
        raise RuntimeError(f"unit result {meta.storage_key}: not JSON ({e}); refused") from None
    if not (isinstance(content, dict) and {"lock", "files"} <= set(content)):
        raise RuntimeError(f"unit result {meta.storage_key}: not a unit's result; refused")
    return content


@flow(name=UNIT_DEPLOYMENT, persist_result=True, result_serializer="json", log_prints=True)
def bakeoff_unit(repo: str, revision: str, unit: str, targets: list[str], upstream: list[str], lock: str,
                 group: str) -> dict:
    """On a worker: reproduce `targets` at `revision` against the orchestrator's dvc.lock."""
    logger = get_run_logger()
    work = Path(tempfile.mkdtemp(prefix=f"tuneoff-{unit}-"))
    try:
        sh("git", "clone", "--quiet", repo, str(work))
        sh("git", "checkout", "--quiet", revision, cwd=work)
        (work / "dvc.lock").write_text(lock)
        share_checkpoints(work, f"{repo}\n{revision}\n{lock}")
        sh("dvc", "pull", "--quiet", *upstream, cwd=work)
        logger.info("unit %s on %s: dvc repro %s", unit, os.uname().nodename, " ".join(targets))
        try:
            sh("dvc", "repro", "--single-item", *targets, cwd=work, env={GROUP_ENV: group}, echo=True)
        except CommandFailed:  # the clone goes below: the tracebacks its stages saved stay in this run's log
            for path in sorted((work / TRACEBACKS).glob("*.traceback")):
                logger.error("%s:\n%s", path.relative_to(work), redact(path.read_text()))
            raise
        sh("dvc", "push", "--quiet", *targets, cwd=work)
        keep_offline_runs(work / "wandb")
        return {"unit": unit, "host": os.uname().nodename, "pid": os.getpid(), **collect(work, targets)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def share_checkpoints(work: Path, key: str) -> None:
    """With $TUNEOFF_CHECKPOINTS (a folder every GPU worker mounts: a network volume), the scratch
    clone's checkpoint folder is a link to <it>/<hash of repo, revision, dvc.lock>: a unit preempted
    mid-training resumes from its last checkpoint on the next worker instead of step 0 (each
    checkpoint is still checked against its params, data and base before it is resumed)."""
    shared = os.environ.get("TUNEOFF_CHECKPOINTS")
    if not shared:
        return
    folder = Path(shared) / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    configured = Path(section(CheckpointParams, "checkpoint", path=work / "params.yaml").dir)
    checkpoints = work / configured
    if configured.is_absolute() or checkpoints.exists():  # a folder of the user's own choosing: theirs
        return
    checkpoints.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.symlink_to(folder, target_is_directory=True)


def keep_offline_runs(wandb_dir: Path) -> None:
    """Offline W&B runs would go with the scratch clone: move them to $TUNEOFF_OFFLINE_RUNS
    (default ~/.tuneoff/wandb) for `wandb sync`. Online runs are already uploaded."""
    dest = Path(os.environ.get("TUNEOFF_OFFLINE_RUNS", Path.home() / ".tuneoff" / "wandb"))
    for run in wandb_dir.glob("offline-run-*"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run), dest / run.name)


def uncached_outs(repo_dir: Path, targets: list[str]) -> set[str]:
    """The outputs of `targets` that DVC does not cache (metrics, plots): they travel in the result."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:  # (addressing is relative to the cwd, not the repo)
        return {out.def_path for stage in repo.index.stages if stage.name in targets for out in stage.outs
                if not out.use_cache}


def out_files(work: Path, outs: set[str]) -> list[str]:
    """The files of these outputs, relative to `work`: an output itself, or each file in an output folder."""
    found = []
    for out in sorted(outs):
        path = work / out
        found += [out] if path.is_file() else sorted(str(f.relative_to(work)) for f in path.rglob("*") if f.is_file())
    return found


def collect(work: Path, targets: list[str]) -> dict:
    """The dvc.lock entries of `targets`, and their uncached outputs (metrics, plots, a folder of records)
    as base64, file by file."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    files = {path: base64.b64encode((work / path).read_bytes()).decode()
             for path in out_files(work, uncached_outs(work, targets))}
    return {"lock": {t: lock[t] for t in targets}, "files": files}


def apply(result: dict, sent: list[str]) -> None:
    """Bring a worker's results into this workspace: the dvc.lock entries of the stages it was sent
    and their uncached outputs, each written atomically, then their cached outputs (dvc pull).
    Anything else in the result (another stage's entry, another file) refuses it whole."""
    outs = uncached_outs(Path.cwd(), sent)
    extra = sorted(set(result["lock"]) - set(sent)) + sorted(
        path for path in result["files"]
        if ".." in Path(path).parts or not any(path == out or path.startswith(f"{out}/") for out in outs))
    if extra:
        raise RuntimeError(f"unit result refused: it holds {extra}, which the stages it was sent do not write")
    lock_path = Path("dvc.lock")
    lock = yaml.safe_load(lock_path.read_text())
    lock["stages"].update(result["lock"])
    for path, data in result["files"].items():
        with atomic_file(Path(path)) as tmp:
            tmp.write_bytes(base64.b64decode(data))
    with atomic_file(lock_path) as tmp:
        tmp.write_text(yaml.safe_dump(lock, sort_keys=False))
    sh("dvc", "pull", "--quiet", *result["lock"])


def report_artifacts() -> None:
    """The report (markdown) and the comparison (a table) on the flow run, for the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(Path("reports/report.md").read_text(), key="bakeoff-report",
                             description="tuneoff bake-off report (reports/report.md)")
    comparison = read(Comparison, Path("reports/comparison.json"))
    rows = [{"task": c["task"], "method": r["method"], "main": r["main"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
             "cost_usd": (r["train"] or {}).get("cost_usd"), "peak_memory_bytes": (r["train"] or {}).get("peak_memory_bytes"),
             "failed": r.get("failed"), "verdict": comparison["decisions"][c["task"]]["verdict"],
             "recommended": comparison["decisions"][c["task"]]["method"]} for c in comparison["tasks"] for r in c["rows"]]
    create_table_artifact(rows, key="bakeoff-comparison", description="each task's methods: score [95% CI], cost, verdict")


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
def bakeoff(gpu_pool: str | None = None, repo: str | None = None, methods: list[str] | None = None,
            branch: str | None = None, push: bool | None = None) -> dict:
    """The whole bake-off; `gpu_pool` sends the per-method stages to that work pool's workers.
    `repo` is the git URL workers clone (default: this repository's path); `methods` limits the
    methods rerun (default: all of params.yaml's). Then its records are committed and its versions
    tagged (flows/publish.py): on `branch` if given (pushed with force), pushed when `push` (default
    params publish.push)."""
    from flows.publish import publish, switch_to

    WORKSPACE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(WORKSPACE_LOCK), timeout=0):
            if branch:
                switch_to(branch)
            outcome = run_bakeoff(gpu_pool, repo, methods)
            if isinstance(outcome, dict):
                try:
                    publish(push, branch)
                except CommandFailed as e:
                    return Failed(message=f"the bake-off finished, publishing it failed: {e.line}")
            return outcome
    except Timeout:
        return Failed(message=f"another bake-off is running in this workspace (it holds {WORKSPACE_LOCK}); "
                              "wait for it to finish")


def run_bakeoff(gpu_pool: str | None, repo: str | None, methods: list[str] | None) -> dict:
    logger = get_run_logger()
    os.environ.setdefault(GROUP_ENV, time.strftime("bakeoff-%Y%m%d-%H%M%S", time.gmtime()))
    params = read_params()
    bakeoff_params = section(BakeoffParams, "bakeoff", data=params)
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
        limits = section(DispatchParams, "dispatch", data=params)
        try:  # every unit's hardware before any is sent: a method that fits no GPU costs no GPU time
            variables = {u: hardware.job_variables(u, tasks, params) for u in units}
        except TuneoffError as e:
            return Failed(message=str(e))
        sent = {u: unit_stages(u, tasks, bakeoff_params.more_seeds) for u in units}
        futures = {u: dispatch.submit(u, sent[u], before, gpu_pool, repo or str(Path.cwd()), revision, lock,
                                      os.environ[GROUP_ENV], limits, variables[u]) for u in units}
        for unit, future in futures.items():
            try:
                result = future.result()
                apply(result, sent[unit])
            except Exception as e:
                logger.error("unit %s failed for good: %s", unit, redact(str(getattr(e, "line", e))))
                record_failure(unit, tasks, e)
                outcome[unit] = {"state": "failed", "error": redact(getattr(e, "line", str(e)[-500:]))}
                continue
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
    report_artifacts()
    return {unit: outcome[unit] for unit in [BASE, *(methods or bakeoff_params.methods)]}
