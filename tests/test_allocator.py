"""The train process's allocator: `python -m tuneoff.training.launch` starts a module on the one
`train.common.allocator` names (tuneoff/training/allocator.py)."""

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneoff.core.errors import TuneoffError
from tuneoff.training import allocator

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, choice: str) -> subprocess.CompletedProcess:
    """Launch a probe module that prints the allocator it runs on, from a project whose params name `choice`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["common"]["allocator"] = choice
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "probe.py").write_text("from tuneoff.training import allocator\nprint(allocator.in_use())\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "tuneoff.training.launch", "probe"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(allocator.library() is None, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
@pytest.mark.parametrize("choice", ["auto", "tcmalloc"])
def test_launch_starts_the_module_on_tcmalloc(tmp_path, choice):
    proc = launch(tmp_path, choice)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tcmalloc"


def test_launch_on_the_system_allocator(tmp_path):
    proc = launch(tmp_path, "system")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "system" and allocator.in_use() == "system"  # pytest itself runs on the C library's


def test_auto_without_tcmalloc_is_the_system_allocator_and_tcmalloc_a_clear_error(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.environment("auto") == {}
    with pytest.raises(TuneoffError, match=r"train.common.allocator: tcmalloc, but it is not installed"):
        allocator.environment("tcmalloc")


def test_a_bad_allocator_is_a_one_line_error(tmp_path):
    proc = launch(tmp_path, "jemalloc")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "train.common.allocator" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
