"""DVC stage `evaluate@<task>-<model>`: score a model on the task's held-out test split.

<model> is `base` (the untuned base, always a row), `full`, or an adapter method, for which the
merged model is evaluated: that is what would be deployed. Writes runs/<task>/<model>/eval.json
and predictions.jsonl (input, expected, produced, correct) so a person can read the failures.

For an adapter, the model as trained (the adapter on its own base: the 4-bit base for qlora)
is also scored on the first `evaluate.adapter_check_examples` test examples, beside the merged
model on the same examples, so eval.json shows whether merging changed the answers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneoff import measure, methods
from tuneoff.atomic import write_json, write_jsonl
from tuneoff.errors import TuneoffError, user_errors
from tuneoff.generate import generate
from tuneoff.merge import adapter_dir, deployable_dir, load_adapter_model
from tuneoff.params import EvaluateParams, check_task, read_params, section
from tuneoff.scoring import main_score, score
from tuneoff.tracking import flat, stage_run
from tuneoff.train import eval_loss, load_rows


@user_errors
def main(task: str, model: str) -> None:
    data = read_params()
    check_task(task, data)
    params = section(EvaluateParams, "evaluate", data=data)
    prepared = Path("data/prepared") / task
    source = Path("models/base") if model == "base" else deployable_dir(task, model)
    for needed in (prepared / "test.jsonl", source / "config.json"):
        if not needed.is_file():
            raise TuneoffError(f"{needed} not found: run the stages before evaluate@{task}-{model}")
    meta = json.loads((prepared / "meta.json").read_text())
    examples = [json.loads(line) for line in (prepared / "test.jsonl").read_text().splitlines()]
    conversations = [ex["messages"][:-1] for ex in examples]
    references = [ex["messages"][-1]["content"] for ex in examples]

    with stage_run("evaluate", {"evaluate": params.model_dump()}, task=task, method=model, data=data) as tracker:
        dev = measure.device()
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source)
        net = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(dev).eval()
        load_seconds = time.perf_counter() - start

        start = time.perf_counter()
        predictions = generate(net, tokenizer, conversations, params.batch_size, params.max_new_tokens, dev,
                               f"evaluate {task}/{model}")
        generate_seconds = time.perf_counter() - start
        test_loss = eval_loss(net, load_rows(prepared / "test.safetensors"), params.batch_size, dev, "fp32")
        metrics, rows = score(meta["scorer"], predictions, references, meta["labels"], params.bootstrap_samples,
                              params.seed)
        adapter_check = {}
        if model != "base" and model != "full" and params.adapter_check_examples:
            del net
            n = min(params.adapter_check_examples, len(examples))
            adapter = load_adapter_model(methods.base_dir(model), adapter_dir(task, model), dev)
            as_trained = generate(adapter, tokenizer, conversations[:n], params.batch_size, params.max_new_tokens, dev,
                                  f"evaluate {task}/{model} adapter")
            adapter_check = {"adapter_check": {
                "examples": n, "adapter_base": str(methods.base_dir(model)),
                "adapter_main": main_score(meta["scorer"], as_trained, references[:n], meta["labels"]),
                "merged_main": main_score(meta["scorer"], predictions[:n], references[:n], meta["labels"]),
                "same_predictions": round(sum(a == b for a, b in zip(as_trained, predictions)) / n, 4)}}

        out = Path("runs") / task / model
        records = [{"input": conv[-1]["content"], "expected": ref, "produced": pred, **row}
                   for conv, ref, pred, row in zip(conversations, references, predictions, rows)]
        write_jsonl(out / "predictions.jsonl", records)
        write_json(out / "eval.json", {
            "task": task, "model": model, "evaluated": str(source), "scorer": meta["scorer"],
            "metrics": metrics, "test_loss": round(test_loss, 6), **adapter_check,
            "timing": {"load_seconds": round(load_seconds, 3), "generate_seconds": round(generate_seconds, 3),
                       "examples_per_second": round(len(examples) / generate_seconds, 3)},
        })
        tracker.summary(flat({"eval": {k: v for k, v in metrics.items() if k != "confusions"}
                                       | {"test_loss": test_loss} | adapter_check}))
        columns = ["input", "expected", "produced", "correct"]
        tracker.table("eval/predictions", columns, [[r[c] for c in columns] for r in records])
    print(f"evaluate@{task}-{model}: {metrics['main_metric']} {metrics['main']:.3f} "
          f"[{metrics['ci_low']:.3f}, {metrics['ci_high']:.3f}] on {len(examples)} test examples, "
          f"test loss {test_loss:.3f} -> {out}/eval.json")
    if adapter_check:
        check = adapter_check["adapter_check"]
        print(f"evaluate@{task}-{model}: on the first {check['examples']}: adapter as trained {check['adapter_main']:.3f}, "
              f"merged {check['merged_main']:.3f}, same predictions {check['same_predictions']:.0%}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.evaluate <task> <base|full|lora|qlora>")
    main(sys.argv[1], sys.argv[2])
