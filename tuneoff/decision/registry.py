"""A small file registry of model versions and stages, updated under a lock. Whether a new version
replaces production is the caller's judgement (stages/register.py scores both on the same items).

Why not GTO (DVC's git-tag registry): GTO records a version as a git tag on a commit, but a
pipeline run registers its result before anyone commits it, and a scheduled run on a worker
may not be allowed to push tags. A JSON file with each version's lineage (git revision,
dvc.lock hashes of its inputs, params, metrics) works in both places and is readable by
people; `gto` can be layered on top once a team tags releases.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock

from tuneoff.core.atomic import atomic_dir, write_json


def register(registry_dir: Path, name: str, entry: dict, judge) -> dict:
    """Add `entry` as the next version of model `name`. `judge(production)`, given the current
    production version (None if there is none), returns (promote, reason): whether the new version
    replaces it. It runs under the registry's lock, so concurrent registrations are judged one after
    another, each against the production the one before it left. Returns the stored version."""
    registry_dir.mkdir(parents=True, exist_ok=True)
    path = registry_dir / "registry.json"
    with FileLock(str(registry_dir / ".registry.lock")):
        data = json.loads(path.read_text()) if path.is_file() else {"models": {}}
        versions = data["models"].setdefault(name, [])
        production = next((v for v in versions if v["stage"] == "production"), None)
        promote, reason = judge(production)
        if promote and production is not None:
            production["stage"] = "archived"
        version = {"version": len(versions) + 1, "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   **entry, "stage": "production" if promote else "staging", "reason": reason}
        versions.append(version)
        write_json(path, data)
    return version


def publish(source: Path, dest: Path) -> None:
    """Make `dest` a copy of the model folder `source` (hard links where the filesystem allows:
    a model's weights are not duplicated on disk), replacing what was there in one step."""
    with atomic_dir(dest) as tmp:
        for f in sorted(Path(source).rglob("*")):
            if f.is_file():
                target = tmp / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
