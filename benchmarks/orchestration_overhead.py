"""Orchestration overhead on the tiny test model: `dvc repro` vs `tuneoff run` (local, temporary
Prefect server), each from scratch in its own copy of the project, one after the other.

    .venv/bin/python benchmarks/orchestration_overhead.py
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_model, build_tokenizer, make_project  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="tuneoff-overhead-"))
base = root / "tiny-base"
tokenizer = build_tokenizer()
build_tiny_model(len(tokenizer)).save_pretrained(base)
tokenizer.save_pretrained(base)
env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline",
       "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(root / "prefect")}
env.pop("PREFECT_API_URL", None)
times = {}
for name, cmd in (("dvc repro", ["dvc", "repro"]), ("tuneoff run", [sys.executable, "-m", "tuneoff.cli", "run"])):
    dest = root / name.replace(" ", "-")
    dest.mkdir()
    make_project(dest, base)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    times[name] = time.perf_counter() - start
    print(f"{name}: {times[name]:.1f} s", flush=True)
print(f"ratio tuneoff run / dvc repro: {times['tuneoff run'] / times['dvc repro']:.2f}")
