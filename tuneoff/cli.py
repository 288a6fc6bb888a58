"""The `tuneoff` command: run the bake-off (the Prefect flow over the DVC stages), show its results,
deploy the flows to a Prefect server, and upload offline W&B runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tuneoff.errors import TuneoffError, user_errors
from tuneoff.params import TrackingParams, section


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
    run = sub.add_parser("run", help="run the bake-off flow in the current project")
    run.add_argument("--gpu-pool", help="dispatch the per-method stages to this Prefect work pool")
    run.add_argument("--repo", help="git URL the workers clone (default: this folder)")
    deploy = sub.add_parser("deploy", help="deploy the unit and scheduled-retrain flows (see flows/deploy.py)")
    deploy.add_argument("--gpu-pool", required=True)
    deploy.add_argument("--cpu-pool", required=True)
    deploy.add_argument("--source", default=str(Path.cwd()))
    deploy.add_argument("--image")
    sub.add_parser("results", help="print the per-method results table")
    sub.add_parser("sync", help="upload the offline W&B runs (needs WANDB_API_KEY)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        sys.exit(sync())
    if args.command == "deploy":
        from flows.deploy import deploy as deploy_flows

        deploy_flows(args.gpu_pool, args.cpu_pool, args.source, args.image)
        return
    failed = run_flow(args.gpu_pool, args.repo) if args.command == "run" else []
    print(results_table())
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see runs/<task>/<method>/failed.json and the report)")


def run_flow(gpu_pool: str | None, repo: str | None) -> list[str]:
    """The bake-off flow, here; against $PREFECT_API_URL if set, else a temporary local Prefect server."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.path.insert(0, str(Path.cwd()))  # flows/ lives in the project
    from flows.bakeoff import bakeoff

    outcome = bakeoff(gpu_pool=gpu_pool, repo=repo)
    for unit, result in outcome.items():
        print(f"{unit}: {result['state']}" + (f" on {result['host']}" if "host" in result else "")
              + (f" ({result['error'].splitlines()[-1]})" if "error" in result else ""))
    return [unit for unit, result in outcome.items() if result["state"] == "failed"]


@user_errors
def sync() -> int:
    """`wandb sync` over the offline runs under tracking.dir that were not uploaded yet."""
    tracking = section(TrackingParams, "tracking")
    runs = sorted(str(p) for p in (Path(tracking.dir) / "wandb").glob("offline-run-*"))
    if not runs:
        raise TuneoffError(f"no offline W&B runs under {Path(tracking.dir) / 'wandb'}/")
    if not os.environ.get("WANDB_API_KEY"):
        raise TuneoffError("WANDB_API_KEY is not set: `wandb login` or export it, then sync again")
    return subprocess.call(["wandb", "sync", "--skip-synced", "--project", tracking.project,
                            *(["--entity", tracking.entity] if tracking.entity else []), *runs])


if __name__ == "__main__":
    main()
