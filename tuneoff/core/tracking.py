"""Weights & Biases behind one small seam: every stage logs through a Tracker.

`start()` returns a W&B-backed tracker, or a no-op with the same methods when
`tracking.enabled` is false. Each stage run is a W&B run: job_type = the stage, name =
"<stage>@<task>-<method>", config = exactly the params sections the stage read plus the git
revision and dvc.lock hash, tags = task, base model and method. Every stage of one pipeline run
shares a group id: $TUNEOFF_RUN_GROUP when set (`tuneoff run` and the Prefect flow set it, and
pass it to workers), else one derived from the git revision and params.yaml.

Mode: $WANDB_MODE if set; online when wandb has an API key where it looks for one ($WANDB_API_KEY,
or the netrc entry `wandb login` writes for $WANDB_BASE_URL's host); otherwise offline under
`tracking.dir` (upload later with `tuneoff sync`). Offline runs do not see the key at all.

Tracking never fails a stage: the first W&B error is printed as one warning and every later
call becomes a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from tuneoff.core.params import TrackingParams, section

GROUP_ENV = "TUNEOFF_RUN_GROUP"


class NoTracker:
    """The interface, doing nothing: tracking off, or W&B broken."""

    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def summary(self, metrics: dict) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list]) -> None: ...

    def image(self, key: str, path: Path) -> None: ...

    def artifact(self, name: str, kind: str, path: Path, metadata: dict, aliases: tuple[str, ...] = (),
                 urls: dict[str, str] | None = None) -> None: ...

    def link(self, name: str, kind: str, path: Path, metadata: dict, target: str, aliases: tuple[str, ...]) -> None: ...

    def publish_report(self, title: str, markdown: str) -> str | None: ...

    def alert(self, title: str, text: str, level: str = "INFO") -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def _guarded(method):
    """Run a W&B call; on the first error warn once and turn the tracker into a no-op."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # tracking must never fail the stage
            self.disable(e)
            return None

    return wrapper


class WandbTracker(NoTracker):
    def __init__(self, run, online: bool, upload_max_bytes: float = 100 * 2**20):
        self.run, self.online, self.upload_max_bytes = run, online, upload_max_bytes

    def disable(self, error: Exception) -> None:
        warn(f"W&B tracking failed ({type(error).__name__}: {error}); the stage goes on without it")
        run, self.run = self.run, None
        with contextlib.suppress(Exception):
            run.finish(exit_code=1)

    @_guarded
    def log(self, metrics, step=None):
        self.run.log(metrics, step=step)

    @_guarded
    def summary(self, metrics):
        self.run.summary.update(metrics)

    @_guarded
    def table(self, key, columns, rows):
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    @_guarded
    def image(self, key, path):
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def _artifact(self, name, kind, path, metadata, urls=None):
        """Files a reviewer can download when `path` is small (an adapter, the data, metrics); above
        tracking.upload_max_mib a reference: W&B records each file's checksum and path and does not
        copy a model's weights (DVC stores them). `urls` ({file in path: URL}) are where the DVC
        remote holds each file: the reference then points there, fetchable by whoever can read the
        remote, not at this machine's disk."""
        import wandb

        path = Path(path)
        art = wandb.Artifact(name, type=kind, metadata=metadata)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        if size > self.upload_max_bytes and urls:
            for rel, url in sorted(urls.items()):  # checksum=False: W&B would fetch the object to hash it
                art.add_reference(url, name=f"{path.name}/{rel}", checksum=False)
        elif size > self.upload_max_bytes:
            art.add_reference(path.resolve().as_uri(), name=path.name)
        elif path.is_dir():
            art.add_dir(str(path), name=path.name)
        else:
            art.add_file(str(path), name=path.name)
        return art

    @_guarded
    def artifact(self, name, kind, path, metadata, aliases=(), urls=None):
        self.run.log_artifact(self._artifact(name, kind, path, metadata, urls), aliases=list(aliases))

    @_guarded
    def link(self, name, kind, path, metadata, target, aliases):
        art = self.run.log_artifact(self._artifact(name, kind, path, metadata), aliases=list(aliases))
        if self.online:  # the model registry lives on the server; offline runs keep the aliases only
            art.wait()
            self.run.link_artifact(art, target, aliases=list(aliases))

    @_guarded
    def alert(self, title, text, level="INFO"):
        """A W&B alert (Slack or e-mail, as the team set it up in W&B); recorded offline too."""
        import wandb

        self.run.alert(title=title, text=text, level=wandb.AlertLevel[level])

    @_guarded
    def publish_report(self, title, markdown):
        """Online, with wandb-workspaces installed: a W&B Report of this group's runs; its URL."""
        if not self.online:
            return None
        import wandb_workspaces.reports.v2 as wr

        runs = wr.Runset(entity=self.run.entity, project=self.run.project, name=self.run.group,
                         filters=f"Metric('Group') == '{self.run.group}'")
        report = wr.Report(entity=self.run.entity, project=self.run.project, title=title, blocks=[
            wr.MarkdownBlock(text=markdown),
            wr.PanelGrid(runsets=[runs], panels=[wr.LinePlot(x="Step", y=["train/loss"]),
                                                 wr.BarPlot(metrics=["cost/usd"]), wr.BarPlot(metrics=["eval/main"])]),
        ])
        report.save()
        return report.url

    @_guarded
    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


_warned = False


def warn(message: str) -> None:
    global _warned
    if not _warned:
        print(f"warning: {message}", file=sys.stderr)
        _warned = True


def group_id() -> str:
    """The pipeline run's group: $TUNEOFF_RUN_GROUP, else git revision + params.yaml digest."""
    if os.environ.get(GROUP_ENV):
        return os.environ[GROUP_ENV]
    from tuneoff.core.lineage import git_revision

    commit = (git_revision()["commit"] or "nogit")[:8]
    params = Path("params.yaml")
    digest = hashlib.sha256(params.read_bytes()).hexdigest()[:8] if params.is_file() else "noparams"
    return f"bakeoff-{commit}-{digest}"


def run_config(sections: dict) -> dict:
    """What a stage ran with: its params sections, the git revision, and the dvc.lock hash."""
    from tuneoff.core.lineage import git_revision, lock_hashes

    return {"params": sections, "git": git_revision(), "dvc_lock_sha256": lock_hashes([])["dvc_lock_sha256"]}


def _mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") or _netrc_key() else "offline"


def _netrc_key() -> bool:
    """Whether `wandb login` left a key: a netrc entry ($NETRC, else ~/.netrc) for the W&B host."""
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start(params: TrackingParams, stage: str, config: dict, *, task: str = "", method: str = "",
          base_model: str = "") -> NoTracker:
    """A tracker for one stage run (see the module docstring)."""
    if not params.enabled:
        return NoTracker()
    mode = _mode()
    name = stage + (f"@{task}" if task else "") + (f"-{method}" if method else "")
    tags = [t for t in (task, base_model, method) if t]
    try:
        import wandb

        with _without_api_key(mode != "online"):
            Path(params.dir).mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=params.project, entity=params.entity or None, dir=params.dir, mode=mode,
                             group=group_id(), job_type=stage, name=name, tags=[t[:64] for t in tags],
                             config=run_config(config), reinit="create_new",
                             settings=wandb.Settings(silent=True, x_stats_sampling_interval=params.system_metrics_seconds))
    except Exception as e:  # tracking must never fail the stage
        warn(f"W&B tracking failed to start ({type(e).__name__}: {e}); the stage goes on without it")
        return NoTracker()
    return WandbTracker(run, online=mode == "online", upload_max_bytes=params.upload_max_mib * 2**20)


@contextlib.contextmanager
def _without_api_key(hide: bool):
    """Keep the API key out of an offline run's process environment (and so out of its files)."""
    key = os.environ.pop("WANDB_API_KEY", None) if hide else None
    try:
        yield
    finally:
        if key is not None:
            os.environ["WANDB_API_KEY"] = key


def flat(metrics: dict, prefix: str = "") -> dict:
    """{"cost": {"usd": 1}} -> {"cost/usd": 1}: W&B's key style, one panel group per prefix."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def base_model_tag(base_dir: Path = Path("models/base")) -> str:
    """What the base is, from import_base's provenance: the wheel requirement or the source path."""
    path = base_dir / "provenance.json"
    if not path.is_file():
        return ""
    source = json.loads(path.read_text())["source"]
    return source["requirement"] if source["kind"] == "wheel" else Path(source["path"]).name


@contextlib.contextmanager
def stage_run(stage: str, sections: dict, *, task: str = "", method: str = "", data: dict | None = None):
    """The tracker for one stage, as a context: the W&B run finishes as failed if the stage raises.
    `sections` maps each params key the stage read to its values (the run's config)."""
    params = section(TrackingParams, "tracking", data=data)
    tracker = start(params, stage, sections, task=task, method=method, base_model=base_model_tag())
    try:
        yield tracker
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
