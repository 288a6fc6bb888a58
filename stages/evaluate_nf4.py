"""DVC stage `evaluate_nf4@<task>-<method>`: score QLoRA in the form it is deployed in.

A QLoRA adapter learned the NF4 weights, so merging it into the float base changes answers. Two
forms (tuneoff/modeling/merge.py SCORED_FORMS) could ship: nf4-merged (merge_nf4's standalone
float32 model of the function that trained, which merge_nf4 checked against the adapter on
models/base-nf4) and float-merged (merge's model on the float base). The adapter on the 4-bit base
(form nf4) computes nf4-merged's function, so it is not scored again: on a CPU its 4-bit layers made
it the slowest of the three. Each form is scored on the validation split, and the one that ships is
chosen there (the best main metric, then the lower loss of the references; a tie goes to the form
that computes what trained, merge.deployed_form). The test split, which the verdict reads, scores
the chosen form, and chooses nothing; `evaluate.all_forms_on_test` scores every form on it too (the
report then pairs them), and with `bakeoff.more_seeds` nf4-merged is always scored there (the other
seeds are scored as trained, and pair with it).

Reads the forms from the run folder `--run-dir` (runs/<task>/<method>/) and writes there eval.json: `forms`
(each form's `val` main and loss, and, where scored on test, its n, main, CI, test loss and speed there),
`deployed_form`, and the deployed form's `metrics`, `test_loss` and `timing` where evaluate writes them for
the other models; forms/<form>.jsonl
for each form scored on test, and predictions.jsonl = the deployed form's (records as in
stages/evaluate.py, with each reference's `loss`). The deployed form is then scored on the general
benchmarks and the other tasks, as stages/evaluate.py scores the other models: benchmark.json and
benchmark-items.json.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.evaluate import write_outputs
from tuneoff.core import measure
from tuneoff.core.atomic import write_jsonl
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import METHODS
from tuneoff.core.params import (
    BakeoffParams,
    BenchmarkParams,
    EvaluateParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.tracking import stage_run
from tuneoff.evaluation.general import ability_line, general_ability
from tuneoff.evaluation.score import load_test, score_model
from tuneoff.modeling.merge import (
    SCORED_FORMS,
    TRAINED_FORM,
    deployed_form,
    form_deployment,
)

STAGE_OF_FORM = {"nf4-merged": "merge_nf4", "float-merged": "merge"}  # what writes each scored form


@user_errors
def main(task: str, method: str, base: Path, prepared: Path, run: Path) -> None:
    if method not in METHODS or not METHODS[method].quantized:
        raise TuneoffError(f"evaluate_nf4@{task}-{method}: only methods trained on the 4-bit base (qlora) "
                           f"are scored here; `dvc repro evaluate@{task}-{method}`")
    data = read_params()
    check_task(task, data)
    params = section(EvaluateParams, "evaluate", data=data)
    benchmarks = section(BenchmarkParams, "benchmarks", data=data)
    bakeoff = section(BakeoffParams, "bakeoff", data=data)
    others = [t for t in bakeoff.tasks if t != task]
    test, val = (load_test(prepared / task, split) for split in ("test", "val"))
    forms = {form: form_deployment(run, method, form) for form in SCORED_FORMS}
    for form, where in forms.items():
        needed = where.path / "config.json"
        if not needed.is_file():
            raise TuneoffError(f"{needed} not found: run `dvc repro {STAGE_OF_FORM[form]}@{task}-{method}` first")

    config = {"evaluate": params.model_dump(), "benchmarks": benchmarks.model_dump()}
    with stage_run("evaluate_nf4", config, task=task, method=method, data=data) as tracker:
        dev = measure.device()
        tokenizer = AutoTokenizer.from_pretrained(base)
        scored, on_val, load_seconds, loaded = {}, {}, {}, {}

        def use(form: str):  # the form's model, loaded once and timed; one model in memory at a time
            if form not in loaded:
                loaded.clear()
                gc.collect()
                start = time.perf_counter()
                net = AutoModelForCausalLM.from_pretrained(forms[form].path, dtype=measure.eval_dtype(params.dtype, dev))
                load_seconds[form] = time.perf_counter() - start
                loaded[form] = net.to(dev).eval()
            return loaded[form]

        on_test = set(SCORED_FORMS) if params.all_forms_on_test else set()
        if bakeoff.more_seeds:  # the other seeds are scored as trained; the first seed pairs with them as trained
            on_test.add(TRAINED_FORM)
        for form in forms:
            on_val[form] = score_model(use(form), tokenizer, val, params, dev, f"evaluate {task}/{method} {form} (val)")
            if form in on_test:
                scored[form] = score_model(use(form), tokenizer, test, params, dev, f"evaluate {task}/{method} {form}")
        chosen = deployed_form({form: (s.metrics["main"], -s.test_loss) for form, s in on_val.items()})
        if chosen not in scored:
            scored[chosen] = score_model(use(chosen), tokenizer, test, params, dev, f"evaluate {task}/{method} {chosen}")
        net = use(chosen)
        ability, items = general_ability(net, tokenizer, method, others, prepared, benchmarks, params, dev)

        deployed = scored[chosen]
        for form, s in scored.items():
            write_jsonl(run / "forms" / f"{form}.jsonl", s.records)
        summary = {form: {**({"n": scored[form].metrics["n"], "main": scored[form].metrics["main"],
                              "ci_low": scored[form].metrics["ci_low"], "ci_high": scored[form].metrics["ci_high"],
                              "test_loss": round(scored[form].test_loss, 6),
                              "examples_per_second": round(scored[form].examples_per_second, 3)} if form in scored else {}),
                          "val": {"n": v.metrics["n"], "main": v.metrics["main"], "loss": round(v.test_loss, 6)}}
                   for form, v in on_val.items()}
        write_outputs(run, task, method, forms[chosen].path, test, deployed, load_seconds[chosen], ability, items, tracker,
                      deployed_form=chosen, forms=summary)
    for form, s in summary.items():
        on_test = (f"test {s['main']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], loss {s['test_loss']:.3f}"
                   if "main" in s else "not scored on test (evaluate.all_forms_on_test)")
        print(f"evaluate_nf4@{task}-{method}: {form:<12} val {deployed.metrics['main_metric']} {s['val']['main']:.3f}, "
              f"loss {s['val']['loss']:.3f}; {on_test}" + ("  <- deployed (chosen on val)" if form == chosen else ""))
    print(f"evaluate_nf4@{task}-{method}: {summary[chosen]['n']} test examples -> {run}/eval.json")
    print(f"evaluate_nf4@{task}-{method}: general ability of {chosen} {ability_line(ability)} -> {run}/benchmark.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate_nf4")
    parser.add_argument("task")
    parser.add_argument("method")
    parser.add_argument("--base", type=Path, required=True, help="the 4-bit base (its tokenizer)")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared data, a folder per task")
    parser.add_argument("--run-dir", dest="run", type=Path, required=True, help="the method's run folder: the merged forms in, scores out")
    main(**vars(parser.parse_args()))
