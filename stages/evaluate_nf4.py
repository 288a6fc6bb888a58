"""DVC stage `evaluate_nf4@<task>-<method>`: score QLoRA in each form it could be deployed in.

A QLoRA adapter learned the NF4 weights, so merging it into the float base changes answers. Two
forms (tuneoff/modeling/merge.py SCORED_FORMS) are scored on the whole test set: nf4-merged
(merge_nf4's standalone float32 model of the function that trained, which merge_nf4 checked
against the adapter on models/base-nf4) and float-merged (merge's model on the float base). The
adapter on the 4-bit base (form nf4) computes nf4-merged's function, so it is not generated from
again: on a CPU its 4-bit layers made it the slowest of the three to score. The deployed form is
chosen on the validation split (the best main metric there, then the lower loss of the references; a
tie goes to the form that computes what trained, merge.deployed_form), so the test split, which the
verdict reads, scores each form once and chooses nothing.

Writes runs/<task>/<method>/eval.json: `forms` (each form's n, main, CI, test loss and speed on
test, and its `val` main and loss),
`deployed_form`, and the deployed form's `metrics`, `test_loss` and `timing` where evaluate
writes them for the other models; predictions-<form>.jsonl for each form, and predictions.jsonl
= the deployed form's (records as in stages/evaluate.py, with each reference's `loss`). The
deployed form is then scored on the general benchmarks and the other tasks, as stages/evaluate.py
scores the other models: benchmark.json and benchmark-items.json.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneoff.core import measure
from tuneoff.core.atomic import write_json, write_jsonl
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import METHODS, NF4_BASE
from tuneoff.core.params import (
    BakeoffParams,
    BenchmarkParams,
    EvaluateParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.records import EvalRecord, EvalTiming
from tuneoff.core.tracking import flat, stage_run
from tuneoff.evaluation.general import ability_line, general_ability
from tuneoff.evaluation.score import RECORD_COLUMNS, load_test, score_model
from tuneoff.modeling.merge import (
    SCORED_FORMS,
    deployed_form,
    form_deployment,
)

STAGE_OF_FORM = {"nf4-merged": "merge_nf4", "float-merged": "merge"}  # what writes each scored form


@user_errors
def main(task: str, method: str) -> None:
    if method not in METHODS or not METHODS[method].quantized:
        raise TuneoffError(f"evaluate_nf4@{task}-{method}: only methods trained on {NF4_BASE} (qlora) "
                           f"are scored here; `dvc repro evaluate@{task}-{method}`")
    data = read_params()
    check_task(task, data)
    params = section(EvaluateParams, "evaluate", data=data)
    benchmarks = section(BenchmarkParams, "benchmarks", data=data)
    others = [t for t in section(BakeoffParams, "bakeoff", data=data).tasks if t != task]
    test, val = (load_test(Path("data/prepared") / task, split) for split in ("test", "val"))
    forms = {form: form_deployment(task, method, form) for form in SCORED_FORMS}
    for form, where in forms.items():
        needed = where.path / "config.json"
        if not needed.is_file():
            raise TuneoffError(f"{needed} not found: run `dvc repro {STAGE_OF_FORM[form]}@{task}-{method}` first")

    config = {"evaluate": params.model_dump(), "benchmarks": benchmarks.model_dump()}
    with stage_run("evaluate_nf4", config, task=task, method=method, data=data) as tracker:
        dev = measure.device()
        tokenizer = AutoTokenizer.from_pretrained(NF4_BASE)
        scored, on_val, load_seconds = {}, {}, {}

        def load(form: str):  # one form's model, timed
            start = time.perf_counter()
            net = AutoModelForCausalLM.from_pretrained(forms[form].path, dtype=measure.eval_dtype(params.dtype, dev))
            load_seconds[form] = time.perf_counter() - start
            return net.to(dev).eval()

        for form in forms:  # one model in memory at a time
            net = load(form)
            on_val[form] = score_model(net, tokenizer, val, params, dev, f"evaluate {task}/{method} {form} (val)")
            scored[form] = score_model(net, tokenizer, test, params, dev, f"evaluate {task}/{method} {form}")
            if form != SCORED_FORMS[-1]:
                del net
                gc.collect()
        chosen = deployed_form({form: (s.metrics["main"], -s.test_loss) for form, s in on_val.items()})
        if chosen != SCORED_FORMS[-1]:  # the last form scored is still loaded
            del net
            gc.collect()
            net = load(chosen)
        ability, items = general_ability(net, tokenizer, method, others, benchmarks, params, dev)

        out = Path("runs") / task / method
        deployed = scored[chosen]
        for form, s in scored.items():
            write_jsonl(out / f"predictions-{form}.jsonl", s.records)
        write_jsonl(out / "predictions.jsonl", deployed.records)
        write_json(out / "benchmark-items.json", items)
        write_json(out / "benchmark.json", ability)
        summary = {form: {"n": s.metrics["n"], "main": s.metrics["main"], "ci_low": s.metrics["ci_low"],
                          "ci_high": s.metrics["ci_high"], "test_loss": round(s.test_loss, 6),
                          "examples_per_second": round(s.examples_per_second, 3),
                          "val": {"n": on_val[form].metrics["n"], "main": on_val[form].metrics["main"],
                                  "loss": round(on_val[form].test_loss, 6)}} for form, s in scored.items()}
        record = EvalRecord(
            task=task, model=method, evaluated=str(forms[chosen].path), scorer=test.scorer, deployed_form=chosen,
            metrics=deployed.metrics, test_loss=round(deployed.test_loss, 6), forms=summary,
            max_new_tokens=deployed.max_new_tokens,
            timing=EvalTiming(load_seconds=round(load_seconds[chosen], 3), generate_seconds=round(deployed.generate_seconds, 3),
                              examples_per_second=round(deployed.examples_per_second, 3),
                              stage_seconds=measure.process_seconds(), read_off=deployed.read_off))
        write_json(out / "eval.json", record.model_dump(exclude_none=True))
        tracker.summary(flat({"eval": {k: v for k, v in deployed.metrics.items() if k != "confusions"}
                                       | {"test_loss": deployed.test_loss, "deployed_form": chosen, "forms": summary}}))
        tracker.summary(flat({"benchmark": ability}))
        tracker.table("eval/predictions", RECORD_COLUMNS, [[r[c] for c in RECORD_COLUMNS] for r in deployed.records])
    for form, s in summary.items():
        print(f"evaluate_nf4@{task}-{method}: {form:<12} val {deployed.metrics['main_metric']} {s['val']['main']:.3f}, "
              f"loss {s['val']['loss']:.3f}; test {s['main']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], "
              f"loss {s['test_loss']:.3f}" + ("  <- deployed (chosen on val)" if form == chosen else ""))
    print(f"evaluate_nf4@{task}-{method}: {summary[chosen]['n']} test examples per form -> {out}/eval.json")
    print(f"evaluate_nf4@{task}-{method}: general ability of {chosen} {ability_line(ability)} -> {out}/benchmark.json")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.evaluate_nf4 <task> <qlora>")
    main(sys.argv[1], sys.argv[2])
