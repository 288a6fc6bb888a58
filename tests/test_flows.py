"""Prefect orchestration with real components: a Prefect server on 127.0.0.1 (its own
PREFECT_HOME, SQLite), a process work pool named like the GPU pool, real worker processes, a DVC
remote in a temporary folder, and the tiny model."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, make_project, run, stage_command

from tuneoff.serving.server import free_port

pytestmark = pytest.mark.slow
POOL = "gpu"
UNITS = ("base", "full", "lora", "qlora")


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server; yields the environment that points clients and workers at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server")
        yield env
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, server):
    """The tiny project with a local-folder DVC remote and a bare git remote (origin) it pushes its
    runs to, committed; the pool and deployments created."""
    dest = make_project(tmp_path_factory.mktemp("flow-project"), tiny_base)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["bakeoff"]["tasks"] = ["extraction"]  # units are methods: one task shows every path through them
    params["publish"]["push"] = True
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], dest)
    run(["git", "commit", "-qam", "DVC remote"], dest)
    origin = tmp_path_factory.mktemp("git-remote") / "project.git"
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], dest)
    run(["git", "remote", "add", "origin", str(origin)], dest)
    run(["git", "branch", "-M", "main"], dest)
    run(["git", "push", "-q", "origin", "main"], dest)
    run(["prefect", "work-pool", "create", POOL, "--type", "process"], dest, server)
    run(["prefect", "work-pool", "create", "cpu", "--type", "process"], dest, server)
    run([sys.executable, "-m", "flows.deploy", "--gpu-pool", POOL, "--cpu-pool", "cpu", "--source", str(dest)], dest,
        server)
    return dest


def start_worker(project: Path, server: dict, name: str, runs_dir: Path, **extra) -> subprocess.Popen:
    env = {**server, "TUNEOFF_OFFLINE_RUNS": str(runs_dir), **extra,
           "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log = open(project.parent / f"{name}.log", "w")
    return subprocess.Popen(["prefect", "worker", "start", "--pool", POOL, "--name", name, "--type", "process"],
                            cwd=project.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def client(server: dict):
    """A Prefect client for the test's server (settings are read once per process, so set them here)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        yield c


def unit_runs(server: dict) -> list:
    """Every flow run of the bakeoff-unit deployment, as the server has it."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(server) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[POOL])))


def states(server: dict, flow_run_id) -> list[str]:
    with client(server) as c:
        return [s.type.value for s in sorted(c.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)]


def test_job_template_is_accepted_by_the_server_and_a_bad_one_is_not(project, server):
    template = ROOT / "infra/k8s/gpu-pool-job-template.json"
    run(["prefect", "work-pool", "create", "gpu-k8s", "--type", "kubernetes", "--base-job-template", str(template)],
        project, server)
    bad = project.parent / "bad-template.json"
    doc = json.loads(template.read_text())
    doc["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["runtimeClassName"] = "{{ runtime_class }}"
    bad.write_text(json.dumps(doc))
    proc = subprocess.run(["prefect", "work-pool", "create", "gpu-bad", "--type", "kubernetes", "--base-job-template",
                           str(bad)], cwd=project, env=server, capture_output=True, text=True)
    assert proc.returncode != 0 and "undeclared variable(s): runtime_class" in proc.stdout + proc.stderr


def test_dispatch_runs_every_method_on_the_worker(project, server, tmp_path):
    worker = start_worker(project, server, "gpu-worker-1", tmp_path / "wandb")
    try:
        start = time.monotonic()
        out = run([sys.executable, "-m", "tuneoff.cli", "run", "--gpu-pool", POOL], project, server)
        flow_seconds = time.monotonic() - start
    finally:
        stop(worker)
    for unit in UNITS:
        assert f"{unit}: completed on" in out
    runs = unit_runs(server)
    assert sorted(r.parameters["unit"] for r in runs) == sorted(UNITS)
    assert all(r.state.is_completed() and r.work_pool_name == POOL for r in runs)
    # each unit asked the pool for its hardware (flows/hardware.py): the tiny model fits the smallest GPU listed
    from flows.hardware import GPU_LABEL
    assert all(r.job_variables == {"gpu_count": 1, "node_selector": {GPU_LABEL: "NVIDIA-L4"}} for r in runs)
    # outputs came back through the DVC remote: the cache here has the adapters the workers trained
    status = json.loads(run(["dvc", "status", "--json"], project) or "{}")
    assert status == {}
    assert "Running stage" not in run(["dvc", "repro"], project)
    assert (project / "runs/extraction/lora/model/adapter_model.safetensors").is_file()
    assert (project / "reports/report.md").read_text().startswith("# tuneoff bake-off report")
    # every stage on the workers logged to the same W&B group as the orchestrator
    from wandb_records import read_runs

    worker_runs = read_runs(tmp_path / "wandb")
    assert {r.name for r in worker_runs} >= {"train@extraction-lora", "evaluate@extraction-base"}
    assert {r.group for r in worker_runs} == {"bakeoff-test"}
    # the Prefect UI shows the work: each unit's stage output in its run's log, the report and the
    # comparison table on the bake-off's flow run
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterFlowRunId,
    )

    lora_run = next(r for r in runs if r.parameters["unit"] == "lora")
    with client(server) as c:
        logs = [entry.message for entry in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[lora_run.id])))]
        artifacts = {a.key: a for a in c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["bakeoff-report", "bakeoff-comparison"])))}
    assert any("Running stage 'train@extraction-lora'" in m for m in logs)
    assert artifacts["bakeoff-report"].data.startswith("# tuneoff bake-off report")
    table = json.loads(artifacts["bakeoff-comparison"].data)
    assert [(r["task"], r["method"]) for r in table] == [("extraction", m) for m in UNITS]
    print(f"dispatched bake-off: {flow_seconds:.0f} s")


def test_retrain_is_scheduled_and_retrains_nothing_when_nothing_changed(project, server):
    with client(server) as c:
        deployment = c.read_deployment_by_name("retrain/scheduled")
    cron = yaml.safe_load((project / "params.yaml").read_text())["retrain"]["cron"]
    assert [s.schedule.cron for s in deployment.schedules] == [cron]
    lock = (project / "dvc.lock").read_bytes()
    out = run([sys.executable, "-c", "from flows.retrain import retrain; print('result', retrain())"], project, server)
    assert "result {'retrained': False, 'changed': []}" in out
    assert (project / "dvc.lock").read_bytes() == lock


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_clone_gets_the_versions_stages_and_production_model(project, server, tmp_path):
    """Clone A (the project) ran the bake-off flow, which committed the run's records, pushed its
    outputs to the DVC remote and its commit to origin. With a version registered and published,
    clone B, with only git, `dvc pull` and GTO, has what A has: the same records and outputs
    (`dvc status` clean), the versions and stages, and the production model."""
    origin = run(["git", "remote", "get-url", "origin"], project).strip()
    head = run(["git", "rev-parse", "HEAD"], project).strip()
    assert run(["git", "--git-dir", origin, "log", "-1", "--format=%H %s", "main"], project).startswith(
        f"{head} tuneoff bake-off: extraction: ")
    # a decided verdict (8 test items cannot give the tiny model one), registered and published as the flow does
    comparison_file = project / "reports/comparison.json"
    report = json.loads(comparison_file.read_text())
    report["decisions"]["extraction"].update(method="lora", verdict="decided")
    comparison_file.write_text(json.dumps(report))
    run(stage_command("register"), project)
    run(["dvc", "commit", "--force", "report", "register"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["upload_max_mib"] = 0  # every model a reference in W&B, as an 8B one would be
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "tuneoff.cli", "publish"], project)
    assert "publish: GTO extraction-model v1.0.0 production" in out and "publish: pushed main" in out
    # W&B: the published model's files are references to the DVC remote, with the version and stage
    from wandb_records import read_runs

    remote = Path(run(["dvc", "remote", "list"], project).split()[1]).resolve()
    (record,) = [a for r in read_runs(project / "wandb") if r.name == "publish@extraction-lora" for a in r.artifacts]
    assert set(record["aliases"]) >= {"v1.0.0", "production"} and record["metadata"]["stage"] == "production"
    assert sorted(record["files"]) == sorted(f"extraction/{f}" for f in tree(project / "models/production/extraction"))
    assert all(ref.startswith(f"{remote.as_uri()}/files/md5/") for ref in record["refs"])
    assert "GTO" not in run([sys.executable, "-m", "tuneoff.cli", "publish"], project)  # a rerun tags nothing
    clone = tmp_path / "b"
    run(["git", "clone", "-q", origin, str(clone)], tmp_path)
    run(["dvc", "pull", "--quiet"], clone)
    assert json.loads(run(["dvc", "status", "--json"], clone) or "{}") == {}
    assert json.loads(run(["gto", "show", "--json"], clone))["extraction-model"]["stage"] == {"production": "v1.0.0"}
    assert (clone / "registry/registry.json").read_text() == (project / "registry/registry.json").read_text()
    run(["dvc", "artifacts", "get", origin, "extraction-model", "--stage", "production", "-o", "prod"], tmp_path)
    assert tree(tmp_path / "prod") == tree(project / "models/production/extraction")


def test_a_retrain_commits_on_its_branch_and_pushes_it(project, server):
    """A params change (the decision's margin) makes the scheduled retrain rerun report and
    register; it commits on tuneoff/retrain and pushes that branch, and says what changed."""
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["decide"]["max_gap_points"] = 3.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "a wider margin"], project)
    origin = run(["git", "remote", "get-url", "origin"], project).strip()
    main = run(["git", "--git-dir", origin, "rev-parse", "main"], project)
    out = run([sys.executable, "-c", "import json; from flows.retrain import retrain; "
                                     "print('result', json.dumps(retrain()))"], project, server)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("result "))[7:])
    assert result["retrained"] and result["changed"] == ["register", "report"] and result["branch"] == "tuneoff/retrain"
    assert result["tasks"]["extraction"]["production_before"] == result["tasks"]["extraction"]["production_after"] \
        == "v1 (lora)"
    head = run(["git", "rev-parse", "HEAD"], project).strip()
    assert run(["git", "rev-parse", "--abbrev-ref", "HEAD"], project).strip() == "tuneoff/retrain"
    assert run(["git", "--git-dir", origin, "log", "-1", "--format=%H %s", "tuneoff/retrain"], project).startswith(
        f"{head} tuneoff bake-off: extraction: ")
    assert run(["git", "--git-dir", origin, "rev-parse", "main"], project) == main  # main is the team's
    assert json.loads(run(["dvc", "status", "--json"], project) or "{}") == {}


def test_publish_on_a_fresh_machine_commits_as_tuneoff_and_pushes_nothing(tmp_path):
    """No DVC remote, no git remote, no git identity (a new clone on a new machine, as `make run`
    has it): the records are committed under tuneoff's own name and nothing is pushed."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry/decision.json").write_text(json.dumps({"t": {"verdict": "inconclusive", "method": None}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, env=env, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env={**env, "DVC_NO_ANALYTICS": "1"}, check=True)
    done = subprocess.run([sys.executable, "-m", "flows.publish", "--push"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "publish: committed" in done.stdout and "publish: no git remote 'origin'" in done.stdout
    assert "DVC remote" not in done.stdout
    log = subprocess.run(["git", "log", "-1", "--format=%an <%ae>%n%s"], cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.splitlines()
    assert log == ["tuneoff <tuneoff@localhost>", "tuneoff bake-off: t: inconclusive"]


def test_a_killed_worker_is_retried_on_a_restarted_one_and_resumes_its_checkpoint(project, server, tmp_path):
    """A preempted GPU machine: its worker and the unit's processes die mid-training. The run is
    rescheduled, a second worker takes it and resumes training from the checkpoint the first left
    on the volume both mount ($TUNEOFF_CHECKPOINTS)."""
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["train"]["common"]["token_budget"] = 40000  # ~120 steps: time to be killed after a checkpoint
    params["checkpoint"]["every_steps"] = 2
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "a longer run, checkpoints every 2 steps"], project)
    shared = tmp_path / "checkpoints"
    before = {r.id for r in unit_runs(server)}
    first = start_worker(project, server, "gpu-worker-2", tmp_path / "wandb", TUNEOFF_CHECKPOINTS=str(shared))
    env = {**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"}
    flow = subprocess.Popen([sys.executable, "-m", "tuneoff.cli", "run", "--gpu-pool", POOL, "--methods", "lora"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None

    def checkpoint_step() -> int:
        steps = [0]
        for path in shared.glob("*/extraction/lora/progress.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):  # a checkpoint being replaced
                steps.append(json.loads(path.read_text())["step"])
        return max(steps)

    try:
        wait_for(lambda: checkpoint_step() >= 4, 300, "the lora unit's checkpoint at step 4 on the shared volume",
                 every=0.02)
        # the machine goes: first it stops (the unit's processes and the worker freeze, so training
        # neither finishes nor removes its checkpoint), the flow run's supervisor (PID 1 of a
        # Kubernetes pod) gets SIGTERM, then everything on it is gone (SIGKILL)
        supervisors = [p for p in psutil.Process(first.pid).children() if "flow-run" in " ".join(p.cmdline())]
        frozen = [p for s in supervisors for p in s.children(recursive=True)] + [psutil.Process(first.pid)]
        for proc in frozen:
            proc.send_signal(signal.SIGSTOP)
        running = [r for r in unit_runs(server) if r.id not in before and r.state.is_running()]
        assert supervisors and len(running) == 1
        for proc in supervisors:
            proc.terminate()
        psutil.wait_procs(supervisors, timeout=60)
        for proc in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        first.wait(60)
        killed_at = checkpoint_step()
        victim = running[0].id
        wait_for(lambda: "SCHEDULED" in states(server, victim)[1:], 60,
                 f"the killed run to be rescheduled (states: {states(server, victim)})")
        second = start_worker(project, server, "gpu-worker-3", tmp_path / "wandb", TUNEOFF_CHECKPOINTS=str(shared))
        output, _ = flow.communicate(timeout=900)
    finally:
        for proc in (flow, first, second):
            if proc is not None and proc.poll() is None:
                proc.kill() if proc is flow else stop(proc)
        params_file.write_text(original)  # back to the short run: full and qlora were never retrained
        run(["git", "commit", "-qam", "back to the short run"], project)
    assert flow.returncode == 0, output[-3000:]
    history = states(server, victim)
    assert history.index("SCHEDULED", 1) > history.index("RUNNING") and history[-1] == "COMPLETED"
    assert "lora: completed on" in output and "base: up to date" in output
    resumed = json.loads((project / "runs/extraction/lora/train.json").read_text())["timing"]["resumed_from_step"]
    assert resumed >= killed_at >= 4
    assert not list(shared.glob("*/extraction/lora"))  # the stage that finished removed its checkpoint


def test_one_bake_off_at_a_time_in_a_workspace(project, server):
    from filelock import FileLock

    from flows.bakeoff import WORKSPACE_LOCK

    with FileLock(str(project / WORKSPACE_LOCK)):  # as a running bake-off (a scheduled retrain, say) holds it
        done = subprocess.run([sys.executable, "-m", "tuneoff.cli", "run"], cwd=project, capture_output=True, text=True,
                              env={**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and errors == [f"error: bake-off failed: another bake-off is running in this workspace "
                                               f"(it holds {WORKSPACE_LOCK}); wait for it to finish"], done.stderr
    assert "Running stage" not in done.stdout


def test_a_unit_result_is_read_as_json_only(server, tmp_path):
    """What a worker returns is read from result storage without unpickling: a result whose
    metadata names pickle, stored bytes that are not JSON, or a stored record naming pickle under
    metadata that says JSON, are refused. (A JSON result as a flow run stores it, raw, is read in
    test_dispatch_runs_every_method_on_the_worker.)"""
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer, PickleSerializer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.states import Completed

    from flows.bakeoff import unit_result

    result = {"unit": "lora", "lock": {}, "files": {}}
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"], PREFECT_LOCAL_STORAGE_PATH: tmp_path}):
        stored = {}
        for name, serializer in (("json", JSONSerializer()), ("pickle", PickleSerializer())):
            store = ResultStore(serializer=serializer)
            record = store.create_result_record(result, key=name)
            store.persist_result_record(record)  # a whole record: its metadata and the result
            stored[name] = record.metadata
        assert unit_result(Completed(data=stored["json"])) == result
        (tmp_path / "raw-pickle").write_bytes(PickleSerializer().dumps(result))
        refused = {"not a persisted JSON result": stored["pickle"],
                   "a result record with a serializer other than JSON": stored["json"].model_copy(
                       update={"storage_key": stored["pickle"].storage_key}),
                   "not JSON": stored["json"].model_copy(update={"storage_key": str(tmp_path / "raw-pickle")})}
        for why, metadata in refused.items():
            with pytest.raises(RuntimeError, match=why):
                unit_result(Completed(data=metadata))


def test_a_unit_result_brings_back_only_what_its_stages_write(project, monkeypatch):
    import base64

    from flows.bakeoff import apply

    monkeypatch.chdir(project)
    lock = (project / "dvc.lock").read_text()
    sent = ["train@extraction-lora", "merge@extraction-lora", "evaluate@extraction-lora"]
    entry = yaml.safe_load(lock)["stages"]["train@extraction-lora"]
    escape = "runs/extraction/lora/eval.json/../../../params.yaml"  # under an output's path, out of it
    for result in ({"lock": {"train@extraction-lora": entry, "report": entry}, "files": {}},
                   {"lock": {"train@extraction-lora": entry}, "files": {"params.yaml": base64.b64encode(b"x").decode()}},
                   {"lock": {"train@extraction-lora": entry}, "files": {escape: base64.b64encode(b"x").decode()}}):
        with pytest.raises(RuntimeError, match=r"unit result refused: it holds \['(report|params.yaml|runs/.*)'\]"):
            apply(result, sent)
    assert (project / "dvc.lock").read_text() == lock


def test_a_unit_no_worker_takes_is_cancelled_after_its_timeout_and_retried(project, server):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["lr"] *= 2  # the lora unit is out of date; no worker is running
    params["dispatch"]["unit_timeout_minutes"] = 0.05
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "lora lr, a short unit timeout"], project)
    before = {r.id for r in unit_runs(server)}
    done = subprocess.run([sys.executable, "-m", "tuneoff.cli", "run", "--gpu-pool", POOL], cwd=project,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 1 and "lora: failed (" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Retry 1/2 will start" in done.stdout + done.stderr  # a timeout is worth another attempt
    from wandb_records import read_runs

    # the report told the team, as a W&B alert
    alerts = [a for r in read_runs(project / "wandb") if r.name == "report" for a in r.alerts]
    assert any(a["title"] == "tuneoff: extraction lora failed" and a["level"] == "WARN" for a in alerts)
    assert "unfinished after 0.05 min: cancelled" in json.loads((project / "runs/extraction/lora/failed.json").read_text())["error"]
    runs = [r for r in unit_runs(server) if r.id not in before]
    # one run per attempt (the first and two retries), each cancelled, none left waiting for a worker
    assert len(runs) == 3 and all(r.state.is_cancelled() and r.parameters["unit"] == "lora" for r in runs)
    params["dispatch"]["unit_timeout_minutes"] = 720
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "unit timeout back"], project)


def test_local_run_reruns_only_the_changed_method(project, server):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora"]["rank"] = 8
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "tuneoff.cli", "run"], project, server)
    assert "lora: completed on local" in out
    assert all(f"{u}: up to date" in out for u in ("base", "full", "qlora"))
    assert json.loads(run(["dvc", "status", "--json"], project) or "{}") == {}
    assert json.loads((project / "runs/extraction/lora/train.json").read_text())["params"]["trainable"] > 0


# ---------------------------------------------------------------- a newcomer's first `tuneoff run`

SLOW_SERVER = """import os, time
if os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1":  # only in Prefect's temporary server process
    time.sleep(float(os.environ["SLOW_SERVER_SECONDS"]))
"""


def tuneoff_run(project: Path, home: Path, delay: float, **env) -> subprocess.CompletedProcess:
    """`tuneoff run` with no PREFECT_API_URL (so on a temporary server) from the empty Prefect home `home`,
    its server process held back `delay` seconds before it starts (sitecustomize, on PYTHONPATH)."""
    (home.parent / "slow").mkdir(exist_ok=True)
    (home.parent / "slow/sitecustomize.py").write_text(SLOW_SERVER)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(home), "PYTHONPATH": str(home.parent / "slow"), "SLOW_SERVER_SECONDS": str(delay),
        "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run([sys.executable, "-m", "tuneoff.cli", "run"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)


def run_with_params(project: Path, server: dict, edit) -> subprocess.CompletedProcess:
    """`tuneoff run` (units here) with params.yaml changed by `edit(params)` for the run, then put back."""
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    edit(params)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return subprocess.run([sys.executable, "-m", "tuneoff.cli", "run"], cwd=project, capture_output=True, text=True,
                              env={**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"})
    finally:
        params_file.write_text(original)


def test_a_stages_own_error_is_not_retried(project, server):
    """A params typo fails the same way every time: the unit fails at once, not after two retries."""
    done = run_with_params(project, server, lambda p: p["train"]["lora"].update(target_modules=["q_proj", "query"]))
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "lora: failed (train@extraction-lora: params.yaml: train.lora.target_modules" in out
    assert "Retry 1/2 will start" not in out, out[-3000:]  # the phrase Prefect logs for a retry (seen in the timeout test)


def test_first_run_waits_for_a_slow_temporary_server(project, tmp_path):
    # Prefect's own wait is 20 s; a first start on a slow, busy machine took longer (issue 18)
    done = tuneoff_run(project, tmp_path / "prefect-home", delay=25)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "first run: creating its database" in out
    assert all(f"{u}: up to date" in out or f"{u}: completed" in out for u in UNITS)


def test_no_server_is_one_line_and_exit_1(project, tmp_path):
    for env, delay, expected in (({"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}, 0,
                                  "cannot reach the Prefect server at PREFECT_API_URL="),
                                 ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "3"}, 30,
                                  "the temporary Prefect server did not start within 3 s")):
        done = tuneoff_run(project, tmp_path / f"home-{delay}", delay, **env)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: {expected}"), done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_a_failing_stage_ends_the_run_with_its_name_and_one_line(project, server):
    done = run_with_params(project, server, lambda p: p["tasks"]["extraction"].update(n_examples=0))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: bake-off")]
    assert done.returncode == 1 and errors == ["error: bake-off failed: prepare@extraction: params.yaml: "
                                               "tasks.extraction.n_examples = 0: Input should be greater than 0"]
    assert "Traceback" not in done.stdout + done.stderr


def test_stage_output_shows_a_progress_bar_once_in_its_last_state(tmp_path, capsys):
    """What reaches the run's log (and the terminal): each line once, a progress bar's redraws only
    as its final state; the whole output, redraws too, is what sh returns; each stage is timed."""
    from flows.shell import STAGE_SECONDS, sh

    text = "Running stage 'x':\n\r 1/3\r 2/3\r 3/3\ndone\n"
    (tmp_path / "stage.txt").write_text(text, newline="")
    out = sh("cat", str(tmp_path / "stage.txt"), echo=True)
    assert capsys.readouterr().out == "Running stage 'x':\n 3/3\ndone\n"
    assert out == text and STAGE_SECONDS["x"] >= 0  # timed from its "Running stage" line to the command's end


def test_a_token_in_a_url_reaches_no_error_log_or_failed_json(tmp_path, monkeypatch):
    from flows.bakeoff import record_failure
    from flows.shell import CommandFailed

    url = "https://ci-bot:ghp_SECRET123@git.example.com/team/repo.git"
    error = CommandFailed(("git", "clone", "--quiet", url, "/tmp/unit"), 128, "/tmp",
                          f"fatal: unable to access '{url}/': Could not resolve host\n")
    assert "SECRET" not in str(error) + error.line and "'https://***@git.example.com/team/repo.git" in str(error)
    monkeypatch.chdir(tmp_path)
    record_failure("lora", ["extraction"], error)
    written = (tmp_path / "runs/extraction/lora/failed.json").read_text()
    assert "SECRET" not in written and "https://***@git.example.com" in written
