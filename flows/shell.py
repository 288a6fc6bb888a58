"""Commands the flows run (dvc, git, prefect): one helper that runs a command, streams its output
when asked, times each DVC stage it starts, and turns a failure into one redacted line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from pathlib import Path

STAGE_SECONDS: dict[str, float] = {}  # wall seconds of each stage this process ran, start-up and imports included


def redact(text: str) -> str:
    """`https://user:token@host/repo.git` -> `https://***@host/repo.git`: a credential in a URL (the
    repo workers clone, a DVC remote) never reaches a log, an error or failed.json (which git tracks)."""
    return re.sub(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)


class CommandFailed(RuntimeError):
    """A command that failed: the message holds the tail of its output, `line` what to tell the user;
    both redacted."""

    def __init__(self, cmd: tuple[str, ...], returncode: int, cwd, output: str):
        super().__init__(redact(f"`{' '.join(cmd)}` failed ({returncode}) in {cwd}:\n{output[-2000:]}"))
        self.line = redact(failure_line(output) or f"`{' '.join(cmd)}` failed ({returncode})")


def failure_line(output: str) -> str | None:
    """The failed DVC stage and its own one-line error, from `dvc repro`'s output: "prepare@x: <error>"."""
    stage = re.findall(r"failed to reproduce '([^']+)'", output)
    errors = [line.removeprefix("error: ") for line in output.splitlines() if line.startswith("error: ")]
    if not stage:
        return errors[-1] if errors else None
    return f"{stage[-1]}: {errors[-1] if errors else 'failed (its output is above)'}"


def sh(*cmd: str, cwd: Path | str = ".", env: dict | None = None, echo: bool = False) -> str:
    """Run a command and return its stdout; `echo` streams stdout and stderr as they come (long
    stages show progress). On failure raise CommandFailed with the tail of the output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    if echo:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines, stage, started = [], None, 0.0
        # newline="": a progress bar's redraws end in "\r"; only its last state (ending "\n") is shown
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            lines.append(line)
            if not line.endswith("\r"):
                print(line.rstrip("\r\n"), flush=True)  # in a flow with log_prints: the run's log (Prefect UI)
            if line.startswith("Running stage '"):  # dvc repro starts the next stage: the last one ended
                if stage:
                    STAGE_SECONDS[stage] = time.monotonic() - started
                stage, started = line.split("'")[1], time.monotonic()
        returncode, out, err = proc.wait(), "".join(lines), ""
        if stage:
            STAGE_SECONDS[stage] = time.monotonic() - started
    else:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        returncode, out, err = done.returncode, done.stdout, done.stderr
    if returncode:
        raise CommandFailed(cmd, returncode, cwd, out + err)
    return out
