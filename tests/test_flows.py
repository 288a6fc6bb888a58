"""Prefect orchestration with real components: a Prefect server on 127.0.0.1 (its own
PREFECT_HOME, SQLite), a process work pool named like the GPU pool, real worker processes, a DVC
remote in a temporary folder, and the tiny model."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, make_project, run

pytestmark = pytest.mark.slow
POOL = "gpu"
UNITS = ("base", "full", "lora", "qlora")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """The tiny project with a local-folder DVC remote, committed; the pool and deployments created."""
    dest = make_project(tmp_path_factory.mktemp("flow-project"), tiny_base)
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], dest)
    run(["git", "commit", "-qam", "DVC remote"], dest)
    run(["prefect", "work-pool", "create", POOL, "--type", "process"], dest, server)
    run(["prefect", "work-pool", "create", "cpu", "--type", "process"], dest, server)
    run([sys.executable, "-m", "flows.deploy", "--gpu-pool", POOL, "--cpu-pool", "cpu", "--source", str(dest)], dest,
        server)
    return dest


def start_worker(project: Path, server: dict, name: str, runs_dir: Path) -> subprocess.Popen:
    env = {**server, "TUNEOFF_OFFLINE_RUNS": str(runs_dir),
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
    # outputs came back through the DVC remote: the cache here has the adapters the workers trained
    status = json.loads(run(["dvc", "status", "--json"], project) or "{}")
    assert status == {}
    assert "Running stage" not in run(["dvc", "repro"], project)
    assert (project / "runs/extraction/lora/model/adapter_model.safetensors").is_file()
    assert (project / "reports/report.md").read_text().startswith("# tuneoff bake-off report")
    # every stage on the workers logged to the same W&B group as the orchestrator
    from wandb_records import read_runs

    worker_runs = read_runs(tmp_path / "wandb")
    assert {r.name for r in worker_runs} >= {"train@extraction-lora", "evaluate@iso_codes-base"}
    assert {r.group for r in worker_runs} == {"bakeoff-test"}
    print(f"dispatched bake-off: {flow_seconds:.0f} s")


def test_a_killed_worker_is_retried_on_a_restarted_one(project, server, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["common"]["seed"] = 1  # every unit reruns
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "seed 1"], project)
    before = {r.id for r in unit_runs(server)}
    first = start_worker(project, server, "gpu-worker-2", tmp_path / "wandb")
    env = {**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"}
    flow = subprocess.Popen([sys.executable, "-m", "tuneoff.cli", "run", "--gpu-pool", POOL], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None
    try:
        # preempt while a unit runs and none is PENDING: a worker killed between claiming a run
        # (PENDING) and starting it leaves that run orphaned, a case this test does not cover
        def running_and_none_pending():
            runs = [r for r in unit_runs(server) if r.id not in before]
            pending = any(r.state.is_pending() for r in runs)
            return not pending and [r for r in runs if r.state.is_running()]

        running = wait_for(running_and_none_pending, 300, "a unit running on the first worker, none pending",
                           every=0.2)
        # a preempted machine: the worker stops (SIGSTOP: it takes no more runs), each flow run's
        # supervisor (`prefect flow-run execute`, PID 1 of a Kubernetes pod) gets SIGTERM, and
        # then the worker is gone (SIGKILL)
        supervisors = [p for p in psutil.Process(first.pid).children() if "flow-run" in " ".join(p.cmdline())]
        assert supervisors
        first.send_signal(signal.SIGSTOP)
        for proc in supervisors:
            proc.terminate()
        psutil.wait_procs(supervisors, timeout=60)
        first.kill()
        first.wait(60)
        victim = running[0].id
        wait_for(lambda: "SCHEDULED" in states(server, victim)[1:], 60,
                 f"the killed run to be rescheduled (states: {states(server, victim)})")
        second = start_worker(project, server, "gpu-worker-3", tmp_path / "wandb")
        output, _ = flow.communicate(timeout=900)
    finally:
        for proc in (flow, first, second):
            if proc is not None and proc.poll() is None:
                proc.kill() if proc is flow else stop(proc)
    assert flow.returncode == 0, output[-3000:]
    history = states(server, victim)
    assert history.index("SCHEDULED", 1) > history.index("RUNNING") and history[-1] == "COMPLETED"
    # the seed changes training, not the untuned base: after a first run its unit is not sent anywhere
    assert all(f"{u}: completed" in output for u in UNITS[1:])
    assert "base: up to date" in output or "base: completed" in output
    assert json.loads(run(["dvc", "status", "--json"], project) or "{}") == {}


def test_retrain_is_scheduled_and_retrains_nothing_when_nothing_changed(project, server):
    with client(server) as c:
        deployment = c.read_deployment_by_name("retrain/scheduled")
    cron = yaml.safe_load((project / "params.yaml").read_text())["retrain"]["cron"]
    assert [s.schedule.cron for s in deployment.schedules] == [cron]
    lock = (project / "dvc.lock").read_bytes()
    out = run([sys.executable, "-c", "from flows.retrain import retrain; print('result', retrain())"], project, server)
    assert "result {'retrained': False, 'changed': []}" in out
    assert (project / "dvc.lock").read_bytes() == lock


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
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["tasks"]["extraction"]["n_examples"] = 0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = subprocess.run([sys.executable, "-m", "tuneoff.cli", "run"], cwd=project, capture_output=True, text=True,
                              env={**os.environ, **server, "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1"})
    finally:
        params_file.write_text(original)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: bake-off")]
    assert done.returncode == 1 and errors == ["error: bake-off failed: prepare@extraction: params.yaml: "
                                               "tasks.extraction.n_examples = 0: Input should be greater than 0"]
    assert "Traceback" not in done.stdout + done.stderr


def test_a_token_in_a_url_reaches_no_error_log_or_failed_json(tmp_path, monkeypatch):
    from flows.bakeoff import CommandFailed, record_failure

    url = "https://ci-bot:ghp_SECRET123@git.example.com/team/repo.git"
    error = CommandFailed(("git", "clone", "--quiet", url, "/tmp/unit"), 128, "/tmp",
                          f"fatal: unable to access '{url}/': Could not resolve host\n")
    assert "SECRET" not in str(error) + error.line and "'https://***@git.example.com/team/repo.git" in str(error)
    monkeypatch.chdir(tmp_path)
    record_failure("lora", ["extraction"], error)
    written = (tmp_path / "runs/extraction/lora/failed.json").read_text()
    assert "SECRET" not in written and "https://***@git.example.com" in written
