"""Record one `make run` of the embedded default as data: append a line to
benchmarks/results/default_run.json (a JSON list) from the finished project.

    .venv/bin/python benchmarks/default_run.py --project PROJECT --minutes 18.4 [--avx2-emulated] \
        [--note "..."] [--out benchmarks/results/default_run.json]

`--minutes` is the wall time of `make run` after set-up, as the caller measured it (`/usr/bin/time`).
Each record: the commit, the CPU (model, whether it has AVX-512 and AMX, and whether AVX2 was emulated by
restricting PyTorch, oneDNN and MKL to it), the minutes, the per-stage seconds the flow printed, and per
task the verdict, the recommended method and its score, and each method's score and interval against
the untuned base, from reports/comparison.json and registry/decision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def record(project: Path, minutes: float, emulated: bool, note: str = "") -> dict:
    comparison = json.loads((project / "reports/comparison.json").read_text())
    decisions = json.loads((project / "registry/decision.json").read_text())
    params = (project / "params.yaml").read_text()
    seed = next(int(line.split(":")[1].split("#")[0]) for line in params.split("train:", 1)[1].splitlines()
                if line.strip().startswith("seed:"))
    log = subprocess.run(["git", "log", "--format=%h %s"], cwd=project, capture_output=True, text=True).stdout
    # the code's commit: the latest that is not a run's own record (flows/publish.py commits those)
    commit = next(line.split()[0] for line in log.splitlines() if " tuneoff bake-off: " not in f" {line.split(' ', 1)[1]}")
    tasks = {}
    for c in comparison["tasks"]:
        d = decisions[c["task"]]
        rows = {r["method"]: r for r in c["rows"]}
        vs_base = {p["a"]: p for p in c["pairs"] if p["b"] == "base"}
        tasks[c["task"]] = {
            "main_metric": c["main_metric"], "test_items": c["conditions"]["test_examples"],
            "verdict": d["verdict"], "recommended": d["method"],
            "recommended_points": d["method"] and round(100 * rows[d["method"]]["main"], 2),
            "rationale": d["rationale"], "settle": d["settle"],
            "methods": {m: {"points": r["main"] is not None and round(100 * r["main"], 2),
                            "vs_base_points": m in vs_base and vs_base[m]["diff_points"],
                            "vs_base_ci_points": m in vs_base and vs_base[m]["ci_points"]}
                        for m, r in rows.items()},
        }
    return {"commit": commit, "seed": seed, "cpu": {**cpu(), "avx2_emulated": emulated},
            "minutes_after_setup": minutes, **({"note": note} if note else {}),
            "stage_seconds": comparison.get("stage_seconds"), "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--minutes", type=float, required=True, help="`make run`'s wall time after set-up")
    parser.add_argument("--avx2-emulated", action="store_true",
                        help="the run restricted PyTorch, oneDNN and MKL to AVX2 on a CPU that has more")
    parser.add_argument("--note", default="", help="how this run differs from a fresh clone's (cached stages, load)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/default_run.json")
    args = parser.parse_args()
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    runs.append(record(args.project, args.minutes, args.avx2_emulated, args.note))
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    for task, t in runs[-1]["tasks"].items():
        print(f"{task}: {t['verdict']}" + (f", {t['recommended']} {t['recommended_points']}%" if t["recommended"] else ""))


if __name__ == "__main__":
    main()
