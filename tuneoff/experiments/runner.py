"""Configurations tried as DVC experiments: each is `dvc exp run -S key=value ... <stage>` in a
temporary copy of the project, so the workspace is untouched, `dvc exp show` lists every one
with its params and metrics, and `dvc exp apply <name>` makes one the project's configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

from tuneoff.core.errors import TuneoffError


@dataclass
class Experiment:
    name: str
    stage: str  # the DVC stage it reproduces (with what it depends on)
    params: dict[str, object] = field(default_factory=dict)  # dotted params.yaml key -> value

    def set_args(self) -> list[str]:
        args = []
        for key, value in self.params.items():
            args += ["-S", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
        return args


def _dvc(*args: str, capture: bool = False) -> str:
    proc = subprocess.run(["dvc", *args], text=True, capture_output=capture,
                          stdout=None if capture else sys.stderr)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise TuneoffError(f"`dvc {' '.join(args[:3])} ...` failed" + (f": {detail[0]}" if detail else " (output above)"))
    return proc.stdout or ""


def run(experiments: list[Experiment]) -> dict[str, dict]:
    """Run `experiments` one after another, each in a temporary copy of the project (`dvc exp run
    --temp`), and return each one's metrics files ({name: {metrics file: contents}}); a failed
    experiment is reported and missing from the result. Not `--queue` + `--run-all`: that goes
    through DVC's Celery queue, whose worker here twice died with a task marked Running, and
    `--run-all` then waited on it forever."""
    for exp in experiments:
        try:
            _dvc("exp", "run", "--temp", "--name", exp.name, *exp.set_args(), exp.stage)
        except TuneoffError as e:
            print(f"{exp.name}: {e}; left out", file=sys.stderr)
    return metrics([exp.name for exp in experiments])


def metrics(names: list[str]) -> dict[str, dict]:
    """The metrics files of the named experiments, from `dvc exp show --json`."""
    shown = json.loads(_dvc("exp", "show", "--json", "--no-fetch", capture=True) or "[]")
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") in names and rev.get("data"):
                    found[rev["name"]] = {path: entry.get("data", {})
                                          for path, entry in (rev["data"].get("metrics") or {}).items()}
    return found
