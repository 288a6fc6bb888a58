"""DVC stage `report`: comparison.json, report.md and one PNG per task (quality vs cost, peak memory by
method, loss curves) in `--out` (reports/), from this run's metrics files (`--runs`, `--prepared`'s meta.json,
`--quantize`), with dollars
at params.yaml's prices and the estimator's prediction for each run (so a price edit reruns only this); plus
curves.csv and tradeoff.csv for `dvc plots show`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import user_errors
from tuneoff.core.params import (
    BakeoffParams,
    CostParams,
    DecideParams,
    EstimateParams,
    read_params,
    section,
)
from tuneoff.core.tracking import flat, group_id, stage_run
from tuneoff.decision.decide import decide
from tuneoff.decision.report import (
    COLUMNS,
    REPLY_COLUMNS,
    compare_task,
    comparison_rows,
    markdown,
    plot,
    read_json,
    reply_rows,
    stage_seconds,
    write_plot_data,
)

@user_errors
def main(runs: Path, prepared: Path, quantize_file: Path, out: Path) -> None:
    data = read_params()
    bakeoff = section(BakeoffParams, "bakeoff", data=data)
    rules = section(DecideParams, "decide", data=data)
    estimate_params = section(EstimateParams, "estimate", data=data)
    cost = section(CostParams, "cost", data=data)
    prices = cost.price_per_hour
    comparisons = [compare_task(task, list(bakeoff.methods), estimate_params, prices, runs=runs, prepared=prepared,
                                bootstrap_samples=rules.bootstrap_samples, seed=rules.seed,
                                more_seeds=tuple(bakeoff.more_seeds), sample_replies=rules.sample_replies,
                                judge_prices=cost.judge_usd_per_million_tokens)
                   for task in bakeoff.tasks]
    decisions = {c["task"]: decide(c, rules) for c in comparisons}
    quantization = read_json(quantize_file) if bakeoff.nf4_methods else None
    seconds = stage_seconds(runs, quantization)
    with atomic_dir(out) as tmp:
        write_json(tmp / "comparison.json", {"tasks": comparisons, "decisions": decisions, "quantization": quantization,
                                             "stage_seconds": seconds})
        (tmp / "report.md").write_text(markdown(comparisons, decisions, quantization, seconds), encoding="utf-8")
        write_plot_data(comparisons, runs, tmp)
        for c in comparisons:
            d = decisions[c["task"]]
            plot(c, runs, tmp / f"{c['task']}.png", rules.max_gap_points, d["method"] or d["verdict"])
    sections = {"bakeoff": bakeoff.model_dump(), "decide": rules.model_dump(), "cost": cost.model_dump(),
                "estimate": estimate_params.model_dump()}
    with stage_run("report", sections, data=data) as tracker:
        tracker.table("report/comparison", COLUMNS, [[row[c] for c in COLUMNS] for row in comparison_rows(comparisons, decisions)])
        tracker.table("report/replies", REPLY_COLUMNS, reply_rows(comparisons))
        for c in comparisons:
            tracker.image(f"report/{c['task']}", out / f"{c['task']}.png")
        tracker.summary(flat({"decision": {task: {"method": d["method"], "verdict": d["verdict"],
                                                  "rationale": d["rationale"]} for task, d in decisions.items()}}))
        url = tracker.publish_report(f"tuneoff bake-off {group_id()}", (out / "report.md").read_text())
        for c in comparisons:
            for row in (r for r in c["rows"] if r.get("failed")):
                tracker.alert(f"tuneoff: {c['task']} {row['method']} failed", row["failed"], "WARN")
    for task, d in decisions.items():
        print(f"report: {task}: " + (f"recommend {d['method']}" if d["method"] else d["verdict"]))
    if url:
        print(f"report: W&B Report {url}")
    print(f"report -> {out}/report.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.report")
    parser.add_argument("--runs", type=Path, required=True, help="every run's folder, runs/<task>/<model>/")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared data, a folder per task")
    parser.add_argument("--quantize", type=Path, required=True, dest="quantize_file", help="the quantize stage's JSON")
    parser.add_argument("--out", type=Path, required=True, help="the report's folder")
    main(**vars(parser.parse_args()))
