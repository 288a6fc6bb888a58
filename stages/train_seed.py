"""DVC stages `train_seed@<task>-<method>-<seed>` and `train_seed_nf4@<task>-qlora-<seed>`: the train
stage again with one of bakeoff.more_seeds, then the model scored on the test set as trained (an
adapter on its base: for QLoRA the NF4 base, whose function its first seed is compared in too, as nf4-merged).

Outputs, in `--run-dir` (runs/<task>/<method>/seeds/<seed>/): model/, train.json, eval.json, predictions.jsonl and the
loss logs. The report compares methods over all their seeds (tuneoff/decision/report.py pair_over_seeds).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import train
from tuneoff.core import measure
from tuneoff.core.atomic import write_json, write_jsonl
from tuneoff.core.errors import user_errors
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import EvaluateParams, read_params, section
from tuneoff.core.records import EvalRecord, EvalTiming
from tuneoff.evaluation.score import load_test, score_model
from tuneoff.modeling.merge import load_adapter_model


@user_errors
def main(task: str, method: str, seed: int, base: Path, prepared: Path, run: Path) -> None:
    out = train.main(task, method, base, prepared, run, seed)
    gc.collect()
    spec, params = method_named(method), section(EvaluateParams, "evaluate", data=read_params())
    test, dev = load_test(prepared), measure.device()
    start = time.perf_counter()
    dtype = measure.eval_dtype(params.dtype, dev)
    if spec.adapter:
        net = load_adapter_model(base, out / "model", dev, dtype)
    else:
        net = AutoModelForCausalLM.from_pretrained(out / "model", dtype=dtype).to(dev).eval()
    load_seconds = time.perf_counter() - start
    scored = score_model(net, AutoTokenizer.from_pretrained(out / "model"), test, params, dev,
                         f"score {task}/{method}-seed{seed}")
    write_jsonl(out / "predictions.jsonl", scored.records)
    write_json(out / "eval.json", EvalRecord(
        task=task, model=method, evaluated=str(out / "model"), scorer=test.scorer, metrics=scored.metrics,
        test_loss=round(scored.test_loss, 6), max_new_tokens=scored.max_new_tokens,
        timing=EvalTiming(load_seconds=round(load_seconds, 3), generate_seconds=round(scored.generate_seconds, 3),
                          examples_per_second=round(scored.examples_per_second, 3),
                          stage_seconds=measure.process_seconds())).model_dump(exclude_none=True))
    m = scored.metrics
    print(f"train_seed {task}/{method}-seed{seed}: {m['main_metric']} {m['main']:.3f} on {m['n']} test examples "
          f"(as trained) -> {out}/eval.json")


if __name__ == "__main__":
    parser = train.arguments("python -m stages.train_seed")
    parser.add_argument("seed", type=int)
    main(**vars(parser.parse_args()))
