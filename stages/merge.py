"""DVC stage `merge@<task>-<method>`: an adapter merged into the full-precision base.

Outputs runs/<task>/<method>/merged/, a standalone model folder that plain
`AutoModelForCausalLM.from_pretrained` loads without peft, and merge.json with the measured
logit difference between the adapter model and the merged model on held-out val rows. For
qlora this is the `float-merged` form (merge_nf4 makes the `nf4-merged` one; evaluate_nf4 scores
both), and merge.json also records how far it is from the model that trained (the adapter on
the 4-bit base): that is quantization error, not a merge error, so it is reported and does not
fail the stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

from tuneoff import measure, methods, quantize
from tuneoff.atomic import atomic_dir, write_json
from tuneoff.errors import TuneoffError, user_errors
from tuneoff.merge import adapter_dir, check_merge, load_adapter_model, logits_on
from tuneoff.params import MergeParams, check_task, read_params, section
from tuneoff.tracking import flat, stage_run
from tuneoff.train import load_rows

BASE = methods.FLOAT_BASE


@user_errors
def main(task: str, method: str) -> None:
    if method not in ("lora", "qlora"):
        raise TuneoffError(f"merge@{task}-{method}: only adapter methods (lora, qlora) merge")
    data = read_params()
    check_task(task, data)
    params = section(MergeParams, "merge", data=data)
    adapter = adapter_dir(task, method)
    run = adapter.parent
    if not (adapter / "adapter_config.json").is_file():
        raise TuneoffError(f"{adapter} has no adapter: run `dvc repro {methods.train_stage(task, method)}` first")
    dev = measure.device()
    rows = {k: v[: params.check_rows] for k, v in load_rows(Path("data/prepared") / task / "val.safetensors").items()}

    model = load_adapter_model(BASE, adapter, dev)
    with_adapter = logits_on(model, rows, dev)
    merged = model.merge_and_unload()
    merged_logits = logits_on(merged, rows, dev)
    diff = check_merge(with_adapter, merged_logits, params.tolerance, f"merge@{task}-{method}")
    vs_trained = {}
    if method == "qlora":
        trained = logits_on(load_adapter_model(methods.base_dir(method), adapter, dev), rows, dev)
        vs_trained = {"vs_trained_4bit": quantize.logit_error(trained, merged_logits)}

    with atomic_dir(run / "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(BASE).save_pretrained(tmp)
    metrics = {
        "task": task, "method": method, "merged_into": str(BASE), "dtype": "float32",
        "max_abs_logit_diff": diff, "tolerance": params.tolerance,
        "positions_checked": int(with_adapter.shape[0]), **vs_trained,
        "weights_bytes": measure.dir_bytes(run / "merged", "*.safetensors"),
    }
    write_json(run / "merge.json", metrics)
    with stage_run("merge", {"merge": params.model_dump()}, task=task, method=method) as tracker:
        tracker.summary(flat({"merge": metrics}))
        tracker.artifact(f"{task}-{method}-merged", "model", run / "merged",
                         {**metrics, "adapter": f"{task}-{method}", "standalone": True})
    print(f"merge@{task}-{method}: max |logit diff| {diff:.2e} (tolerance {params.tolerance:g}) over "
          f"{with_adapter.shape[0]} positions -> {run}/merged/")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.merge <task> <lora|qlora>")
    main(sys.argv[1], sys.argv[2])
