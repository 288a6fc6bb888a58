"""The tracking seam: off means off, and a broken W&B never fails a stage."""

from tuneoff.core import tracking
from tuneoff.core.params import TrackingParams

PARAMS = dict(enabled=True, project="tuneoff-test", entity="", system_metrics_seconds=5, registry="wandb-registry-model")


def test_disabled_tracking_is_a_no_op(tmp_path):
    tracker = tracking.start(TrackingParams(**PARAMS | {"enabled": False, "dir": str(tmp_path)}), "train", {})
    assert type(tracker) is tracking.NoTracker
    tracker.log({"train/loss": 1.0})
    assert not any(tmp_path.iterdir())


def test_unwritable_tracking_dir_warns_and_the_stage_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(tracking, "_warned", False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tracker = tracking.start(TrackingParams(**PARAMS | {"dir": str(blocker / "wandb")}), "train", {}, task="t")
    tracker.log({"train/loss": 1.0})
    tracker.finish()
    assert type(tracker) is tracking.NoTracker
    err = capsys.readouterr().err
    assert err.count("warning: W&B tracking failed") == 1


def test_a_failing_wandb_call_disables_tracking_once(tmp_path, monkeypatch, capsys):
    from wandb_records import read_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(tracking, "_warned", False)
    tracker = tracking.start(TrackingParams(**PARAMS | {"dir": str(tmp_path)}), "report", {"bakeoff": {"tasks": ["t"]}})
    tracker.summary({"before": 1})
    tracker.image("report/chart", tmp_path / "missing.png")  # W&B raises: no such image
    tracker.summary({"after": 2})  # a no-op now
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning: W&B tracking failed") == 1 and "FileNotFoundError" in err, err  # the image, no other call
    (run,) = read_runs(tmp_path / "wandb")
    assert (run.summary.get("before"), "after" in run.summary, run.exit_code) == (1, False, 1), (run.summary, err)


def test_flat_keys():
    assert tracking.flat({"cost": {"usd": 1.5, "gpu_hours": 0}, "seed": 0}) == {"cost/usd": 1.5, "cost/gpu_hours": 0, "seed": 0}


def test_group_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(tracking.GROUP_ENV, "bakeoff-42")
    assert tracking.group_id() == "bakeoff-42"
    monkeypatch.delenv(tracking.GROUP_ENV)
    assert tracking.group_id().startswith("bakeoff-")


def test_a_wandb_login_key_in_netrc_means_online(tmp_path, monkeypatch):
    """`wandb login` writes the key to ~/.netrc, not the environment: runs go online with it."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking._mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password local-0123456789\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert tracking._mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another host is not one
    assert tracking._mode() == "offline"


def test_small_outputs_are_artifact_files_and_large_ones_references(tmp_path, monkeypatch):
    """A reviewer can download an adapter from W&B; a model over tracking.upload_max_mib stays a
    reference (its checksums and path), as DVC stores it."""
    from wandb_records import read_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    adapter = tmp_path / "model"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 3000)
    (adapter / "adapter_config.json").write_text("{}")
    for limit, name in ((1, "small"), (0.001, "large")):  # MiB: 3 kB is under 1, over 0.001
        tracker = tracking.start(TrackingParams(**PARAMS | {"dir": str(tmp_path / name), "upload_max_mib": limit}),
                                 "train", {}, task="t", method="lora")
        tracker.artifact(f"t-lora-{name}", "model", adapter, {"trained_on": "t-data"})
        tracker.finish()
    (small,) = read_runs(tmp_path / "small/wandb")[0].artifacts
    (large,) = read_runs(tmp_path / "large/wandb")[0].artifacts
    assert sorted(small["files"]) == ["model/adapter_config.json", "model/adapter_model.safetensors"]
    assert not any(small["refs"])  # the files themselves
    assert all(ref.startswith("file://") for ref in large["refs"]) and large["files"]
