"""`tuneoff run`: the bake-off flow in this project, against $PREFECT_API_URL if set, else a
temporary local Prefect server; then the per-method results table.

    python -m flows.run [--gpu-pool POOL] [--repo GIT_URL] [--methods lora,qlora]
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.bakeoff import bakeoff
from flows.shell import STAGE_SECONDS
from flows.server import ensure_server
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.params import BakeoffParams, section
from tuneoff.decision.costs import results_table


@user_errors
def run(gpu_pool: str | None, repo: str | None, methods: str | None = None) -> list[str]:
    """The flow's units and their states; a stage that fails before or after the per-method units
    ends the run with its one line."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    known = section(BakeoffParams, "bakeoff").methods  # a params error is one line before any server starts
    chosen = methods.split(",") if methods else None
    if chosen and not set(chosen) <= set(known):
        raise TuneoffError(f"--methods {methods}: params.yaml's bakeoff trains {', '.join(known)}")
    ensure_server()
    state = bakeoff(gpu_pool=gpu_pool, repo=repo, methods=chosen, return_state=True)
    if not state.is_completed():
        raise TuneoffError(f"bake-off {state.name.lower()}: {(state.message or '').strip().splitlines()[0]}")
    outcome = state.result()
    for unit, result in outcome.items():
        print(f"{unit}: {result['state']}" + (f" on {result['host']}" if "host" in result else "")
              + (f" ({result['error']})" if "error" in result else ""))
    if STAGE_SECONDS:
        print(stage_times(STAGE_SECONDS))
    return [unit for unit, result in outcome.items() if result["state"] == "failed"]


def stage_times(seconds: dict[str, float]) -> str:
    """Where this run's time went: each stage it ran here, slowest first, with its share."""
    total = sum(seconds.values())
    rows = [f"  {name:<32} {s:7.1f} s  {100 * s / total:4.1f}%" for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])]
    return "\n".join([f"stages run here: {len(seconds)}, {total:.0f} s (wall, process start-up and imports included)",
                      *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-pool", help="dispatch the per-method stages to this Prefect work pool")
    parser.add_argument("--repo", help="git URL the workers clone (default: this folder)")
    parser.add_argument("--methods", help="comma-separated methods to run again (default: all of params.yaml's)")
    args = parser.parse_args(argv)
    failed = run(args.gpu_pool, args.repo, args.methods)
    print(results_table())
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see runs/<task>/<method>/failed.json and the report)")


if __name__ == "__main__":
    main()
