"""The `tuneoff` command: run the bake-off (a thin wrapper over `dvc repro`) and show its results."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def results_table(runs: Path = Path("runs")) -> str:
    """One line per (task, method) from runs/<task>/<method>/train.json."""
    rows = []
    for path in sorted(runs.glob("*/*/train.json")):
        m = json.loads(path.read_text())
        usd = m["cost"]["usd"]
        rows.append([m["task"], m["method"], m["device"], m["precision"],
                     f"{m['params']['trainable_percent']:.2f}%",
                     f"{m['memory']['peak_memory_bytes'] / 2**30:.2f}",
                     f"{m['timing']['train_seconds']:.0f}", f"{m['timing']['tokens_per_second']:.0f}",
                     f"{m['loss']['val_before']:.3f} -> {m['loss']['val']:.3f}",
                     f"{m['output']['weights_bytes'] / 2**20:.1f}", "n/a" if usd is None else f"{usd:.4f}"])
    if not rows:
        return f"no results under {runs}/ yet: run `dvc repro` (or `make run`)"
    header = ["task", "method", "device", "prec", "trainable", "peak GiB", "train s", "tok/s",
              "val loss", "weights MiB", "USD"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    memory_kind = json.loads(next(runs.glob("*/*/train.json")).read_text())["memory"]["measure"]
    return "\n".join([fmt(header), *map(fmt, rows), f"(peak memory: {memory_kind}; details in {runs}/<task>/<method>/train.json)"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuneoff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the bake-off: `dvc repro` in the current project")
    sub.add_parser("results", help="print the per-method results table")
    args = parser.parse_args(argv)
    if args.command == "run":
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        code = subprocess.call(["dvc", "repro"], env=env)
        if code:
            sys.exit(code)
    print(results_table())


if __name__ == "__main__":
    main()
