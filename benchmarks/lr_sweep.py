"""Each method's learning rate against validation loss and the task metric, over a log grid, at a
project's token budget: where each method's best rate lies, and so what params.yaml defaults to.

    .venv/bin/python benchmarks/lr_sweep.py --project PROJECT --tasks extraction iso_codes banking77 \
        --out benchmarks/results/lr_sweep.jsonl --plots docs/lr-sweep

`--project` has run prepare for each task and quantize (a `make run` project, with banking77 prepared
by `dvc repro prepare@banking77`). Every point trains the way the train stage does (the project's
params.yaml train.common and train.<method>, the same seed and initial weights, tuneoff's loop),
at the rate given, then scores the trained model on the task's validation split: its val loss (what
the pilots of tuneoff/training/tune.py choose by) and the main metric of greedy replies (QLoRA as its
adapter on the NF4 base, the function that trained). Each point is appended to --out as it finishes
and a rerun skips the points already there. One plot per task: val loss and val metric against rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRIDS = {"full": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
         "qlora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}  # 100x each, in half-decade steps; LoRA's ~10-30x full's


def point(project: Path, task: str, method: str, rate: float) -> dict:
    """Train `method` on `task` at `rate` as the train stage would, and score it on val."""
    import torch
    from transformers import AutoTokenizer

    from tuneoff.core import measure
    from tuneoff.core.methods import method as method_named
    from tuneoff.core.params import CommonTrainParams, EvaluateParams, read_params, section
    from tuneoff.data.rows import load_rows
    from tuneoff.evaluation.score import load_test, score_model
    from tuneoff.modeling import methods
    from tuneoff.training.loop import train

    data = read_params(project / "params.yaml")
    common = section(CommonTrainParams, "train", "common", data=data)
    params = section(methods.PARAMS_BY_METHOD[method], "train", method, data=data)
    evaluate = section(EvaluateParams, "evaluate", data=data)
    prepared, base = project / "data/prepared" / task, project / method_named(method).base
    dev = measure.device()
    precision = measure.resolve_precision(common.precision, dev)
    torch.manual_seed(common.seed)
    model = methods.build(method, params, base, precision, dev, common.gradient_checkpointing)
    rows, val_rows = load_rows(prepared / "train.safetensors"), load_rows(prepared / "val.safetensors")
    with tempfile.TemporaryDirectory() as logs:
        result = train(model, rows, val_rows, common, rate, dev, precision, Path(logs), f"{task}/{method} lr={rate:g}")
    model.eval()
    scored = score_model(model, AutoTokenizer.from_pretrained(base), load_test(prepared, "val"), evaluate, dev,
                         f"{task}/{method} lr={rate:g} val")
    out = {"task": task, "method": method, "lr": rate, "val_loss": round(result.val_loss, 6),
           "val_main": scored.metrics["main"], "main_metric": scored.metrics["main_metric"], "val_n": scored.metrics["n"],
           "train_final_loss": round(result.final_train_loss, 6), "steps": result.steps,
           "train_seconds": round(result.train_seconds, 1), "token_budget": common.token_budget}
    del model
    gc.collect()
    return out


def plot(points: list[dict], task: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, main_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for method in GRIDS:
        mine = sorted((p for p in points if p["task"] == task and p["method"] == method), key=lambda p: p["lr"])
        if mine:
            loss_ax.plot([p["lr"] for p in mine], [p["val_loss"] for p in mine], "o-", label=method)
            main_ax.plot([p["lr"] for p in mine], [100 * p["val_main"] for p in mine], "o-", label=method)
    metric = next(p["main_metric"] for p in points if p["task"] == task)
    for ax, label in ((loss_ax, "val loss"), (main_ax, f"val {metric} %")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    loss_ax.set_yscale("log")  # a diverged rate's loss would flatten the others'
    loss_ax.legend()
    fig.suptitle(f"{task}: learning rate sweep at {points[0]['token_budget']:,} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(points: list[dict], task: str) -> str:
    """The task's points as a markdown table: val loss (val metric) per rate and method, each method's
    lowest loss in bold."""
    mine = [p for p in points if p["task"] == task]
    best = {m: min((p["val_loss"] for p in mine if p["method"] == m), default=None) for m in GRIDS}
    lines = ["| rate | " + " | ".join(GRIDS) + " |", "|---:|" + "---|" * len(GRIDS)]
    for rate in sorted({p["lr"] for p in mine}):
        cells = []
        for method in GRIDS:
            p = next((p for p in mine if (p["method"], p["lr"]) == (method, rate)), None)
            cell = "" if p is None else f"{p['val_loss']:.3f} ({100 * p['val_main']:.0f}%)"
            cells.append(f"**{cell}**" if p and p["val_loss"] == best[method] else cell)
        lines.append(f"| {rate:.0e} | ".replace("e-0", "e-") + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per point; points already there are skipped")
    parser.add_argument("--plots", type=Path, help="write <plots>-<task>.png per task")
    parser.add_argument("--tables", action="store_true", help="print each task's markdown table (docs/lr-sweep.md)")
    parser.add_argument("--rates", type=lambda text: [float(x) for x in text.split(",")],
                        help="these rates for every method instead of GRIDS (comma-separated)")
    args = parser.parse_args()
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    for task in args.tasks:
        for method in args.methods:
            for rate in args.rates or GRIDS[method]:
                if any((p["task"], p["method"], p["lr"]) == (task, method, rate) for p in done):
                    continue
                start = time.perf_counter()
                p = point(args.project, task, method, rate)
                done.append(p)
                with args.out.open("a") as f:
                    f.write(json.dumps(p) + "\n")
                print(f"{task} {method} lr {rate:g}: val loss {p['val_loss']:.4f}, val {p['main_metric']} "
                      f"{100 * p['val_main']:.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.plots:
            plot(done, task, args.plots.parent / f"{args.plots.name}-{task}.png")
        if args.tables:
            print(f"\n{task}\n\n{table(done, task)}\n")


if __name__ == "__main__":
    main()
