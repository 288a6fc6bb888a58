"""The `tuneoff` command: run the bake-off (the Prefect flow over the DVC stages), show its results,
deploy the flows to a Prefect server, upload offline W&B runs, and serve the registered adapters."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.params import TrackingParams, section
from tuneoff.decision.costs import results, results_table
from tuneoff.estimator import cli as estimate_cli
from tuneoff.serving import server as serving


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuneoff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bake-off flow in the current project")
    run.add_argument("--gpu-pool", help="dispatch the per-method stages to this Prefect work pool")
    run.add_argument("--repo", help="git URL the workers clone (default: this folder)")
    run.add_argument("--methods", help="comma-separated methods to run again, e.g. lora,qlora (default: all)")
    deploy = sub.add_parser("deploy", help="deploy the unit and scheduled-retrain flows (see flows/deploy.py)")
    deploy.add_argument("--gpu-pool", required=True)
    deploy.add_argument("--cpu-pool", required=True)
    deploy.add_argument("--source", default=str(Path.cwd()))
    deploy.add_argument("--image")
    publish = sub.add_parser("publish", help="commit the last run's records, dvc push, tag its versions with GTO "
                                             "(the bake-off does this itself; see flows/publish.py)")
    publish.add_argument("--push", action="store_true", help="also push the branch and tags to publish.git_remote")
    shown = sub.add_parser("results", help="print the per-method results and each task's verdict")
    shown.add_argument("--json", action="store_true", help="as JSON (runs, verdicts) for scripts")
    sub.add_parser("sync", help="upload the offline W&B runs (needs WANDB_API_KEY)")
    estimate_cli.add_arguments(sub.add_parser("estimate", help="peak memory, time and cost of each method before a run "
                                                                "(tuneoff/estimator/memory.py, docs/estimator.md)"), plan=False)
    estimate_cli.add_arguments(sub.add_parser("plan", help="a starting method, rank and target modules from the seed "
                                                            "article's rules, and the bake-off's cost"), plan=True)
    serve = sub.add_parser("serve", help="serve the registered adapters (or any adapter folders) on one base over an "
                                         "OpenAI-compatible HTTP API (see tuneoff/serving/)")
    serving.add_arguments(serve)
    for name, what in (("sweep", "rank x target-module grid with successive halving (params.yaml sweep:)"),
                       ("escalate", "the escalation ladder, cheapest rung first (params.yaml escalate:)")):
        cmd = sub.add_parser(name, help=f"{what}, as DVC experiments")
        cmd.add_argument("--apply", action="store_true",
                         help="`dvc exp apply` the winner: the next `dvc repro` reports and registers it")
    args = parser.parse_args(argv)
    if args.command in ("estimate", "plan"):
        return estimate_command(args)
    if args.command in ("sweep", "escalate"):
        return ablate(args.command, args.apply)
    if args.command == "serve":
        return serve_adapters(args)
    if args.command == "sync":
        sys.exit(sync())
    if args.command == "results":
        return show_results(args.json)
    if args.command == "publish":
        return project_flow("publish", ["--push"] if args.push else [])
    flags = {"run": ("gpu_pool", "repo", "methods"), "deploy": ("gpu_pool", "cpu_pool", "source", "image")}[args.command]
    project_flow(args.command, [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in flags if getattr(args, k)])


@user_errors
def show_results(as_json: bool) -> None:
    print(json.dumps(results(), indent=2) if as_json else results_table())


@user_errors
def project_flow(module: str, args: list[str]) -> None:
    """`tuneoff run` / `tuneoff deploy`: the project's own flows (flows/ beside dvc.yaml, not part of
    this package), in this process's place so that signals reach the flow."""
    if not Path("flows", f"{module}.py").is_file() or not Path("dvc.yaml").is_file():
        raise TuneoffError(f"no flows/{module}.py and dvc.yaml in {Path.cwd()}: run `tuneoff {module}` in the project folder")
    os.execv(sys.executable, [sys.executable, "-m", f"flows.{module}", *args])


@user_errors
def ablate(command: str, apply: bool) -> None:
    """`tuneoff sweep` / `tuneoff escalate` in the current project (tuneoff/experiments/ablation.py)."""
    from tuneoff.core.params import (
        CommonTrainParams,
        EscalateParams,
        SweepParams,
        check_task,
        read_params,
    )
    from tuneoff.experiments import ablation

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    data = read_params()
    base = Path("models/base")
    if not (base / "config.json").is_file():
        raise TuneoffError(f"{base}/ has no model: run `dvc repro import_base` (or the bake-off) first")
    if command == "sweep":
        params = section(SweepParams, "sweep", data=data)
        check_task(params.task, data)
        budget = section(CommonTrainParams, "train", "common", data=data).token_budget
        out = Path("sweeps") / f"{params.task}-{params.method}"
        result = ablation.sweep(params, budget, base, out)
        winner = next((r["experiment"] for r in result["rows"] if r["name"] == result["diminishing_returns"]), None)
        print((out / "sweep.md").read_text())
    else:
        params = section(EscalateParams, "escalate", data=data)
        check_task(params.task, data)
        out = Path("escalations") / params.task
        result = ablation.escalate(params, base, out)
        winner = next((r["experiment"] for r in result["rungs"] if r["name"] == result["winner"]), None)
        print((out / "ladder.md").read_text())
    print(f"written to {out}/; `dvc exp show` lists every experiment")
    if apply and winner:
        from dvc.repo import Repo

        with Repo() as repo:  # outputs of stages never run here (not cached) stay missing: `dvc repro` makes them
            repo.experiments.apply(winner, allow_missing=True)
        print(f"applied {winner}: `dvc repro` (or `tuneoff run`) now reports and registers it like the bake-off's")
    elif apply:
        raise TuneoffError(f"{command}: no winner to apply")


@user_errors
def serve_adapters(args: argparse.Namespace) -> None:
    serving.serve(serving.options_from_args(args))


@user_errors
def estimate_command(args: argparse.Namespace) -> None:
    (estimate_cli.run_plan if args.command == "plan" else estimate_cli.run_estimate)(args)


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
