"""Where a result came from: the git revision and the dvc.lock hashes of a stage's inputs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def git_revision() -> dict:
    def git(*args):
        proc = subprocess.run(["git", *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    return {"commit": rev, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if rev else None}


def lock_hashes(stages: list[str], lock_file: Path = Path("dvc.lock")) -> dict:
    """sha256 of dvc.lock, and the md5 of each output the named stages recorded there."""
    import yaml

    if not lock_file.is_file():
        return {"dvc_lock_sha256": None, "outs": {}}
    text = lock_file.read_text()
    entries = (yaml.safe_load(text) or {}).get("stages", {})
    outs = {o["path"]: o.get("md5") for s in stages for o in entries.get(s, {}).get("outs", [])}
    return {"dvc_lock_sha256": hashlib.sha256(text.encode()).hexdigest(), "outs": outs}
