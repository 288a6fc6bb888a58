"""A writer killed at any moment leaves the previous output or the new one, never a mix."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuneoff.core.atomic import atomic_dir, remove_stale, write_json

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from pathlib import Path
from tuneoff.core.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    print("writing", flush=True)
    for i in range(5):
        (tmp / f"part{i}").write_text("new")
        time.sleep(0.04)
print("done", flush=True)
"""


def contents(path: Path) -> dict:
    return {f.name: f.read_text() for f in sorted(path.iterdir())}


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_kill_at_any_moment_leaves_old_or_new(tmp_path):
    old = {f"part{i}": "old" for i in range(3)}
    new = {f"part{i}": "new" for i in range(5)}
    seen = set()
    for delay in [0.0, 0.02, 0.05, 0.1, 0.15, 0.19, 0.21, 0.25, None]:  # None: kill once it printed "done"
        out = tmp_path / f"out{delay}"
        with atomic_dir(out) as tmp:
            for name, text in old.items():
                (tmp / name).write_text(text)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"writing\n"
        if delay is None:
            assert proc.stdout.readline() == b"done\n"
        else:
            time.sleep(delay)  # 5 parts x 0.04 s: the swap happens ~0.2 s in
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        remove_stale(out)  # what the next writer of `out` does first
        state = contents(out)
        assert state in (old, new), (delay, state)
        seen.add("new" if state == new else "old")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{delay}")] == []
    assert seen == {"old", "new"}  # the kills landed both before and after the swap


def test_a_crash_between_the_two_renames_restores_the_previous_output(tmp_path):
    out, pid = tmp_path / "model", dead_pid()
    aside, half = tmp_path / f".model.old-{pid}", tmp_path / f".model.tmp-{pid}"
    aside.mkdir()
    (aside / "weights").write_text("previous")
    half.mkdir()
    (half / "weights").write_text("new, maybe incomplete")
    remove_stale(out)
    assert contents(out) == {"weights": "previous"} and not aside.exists() and not half.exists()


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    mine = tmp_path / f".model.tmp-{os.getpid()}"
    mine.mkdir()
    remove_stale(tmp_path / "model")
    assert mine.exists()


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    try:
        write_json(path, {"a": object()})  # not JSON-serializable: fails mid-write
    except TypeError:
        pass
    assert path.read_text() == '{\n  "a": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
