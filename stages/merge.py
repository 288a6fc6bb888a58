"""DVC stages `merge@<task>-<method>` and `merge_nf4@<task>-<method>`: an adapter merged into a base,
checked against the unmerged model on held-out val rows within merge.tolerance.

Each reads the adapter from the run folder `--run-dir` (runs/<task>/<method>/) and writes beside it; `--base` is
the base it merges into.

- `merge` (form `float-merged`, the default): into the full-precision base. Outputs
  runs/<task>/<method>/merged/ and merge.json. For qlora, merge.json also records how far this is
  from the model that trained (the adapter on the 4-bit base): quantization error, not a merge
  error, so it is reported and does not fail the stage.
- `merge_nf4` (form `nf4-merged`, qlora only): each 4-bit Linear of models/base-nf4 dequantized to
  a float32 nn.Linear and the adapter merged into those weights, checked against the adapter on the
  4-bit base (the model as trained). Outputs runs/<task>/<method>/merged-nf4/ and merge-nf4.json.

Either output is a standalone float32 model folder that plain `AutoModelForCausalLM.from_pretrained`
loads without peft or bitsandbytes; evaluate (and evaluate_nf4 for qlora) score them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tuneoff.core import measure
from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import METHODS
from tuneoff.core.params import MergeParams, check_task, read_params, section
from tuneoff.core.tracking import flat, stage_run
from tuneoff.data.rows import load_rows
from tuneoff.modeling import quantize
from tuneoff.modeling.base_model import save_tokenizer
from tuneoff.modeling.merge import (
    adapter_dir,
    check_merge,
    form_deployment,
    load_adapter_model,
    logits_on,
)

STAGES = {"float-merged": "merge", "nf4-merged": "merge_nf4"}


@user_errors
def main(task: str, method: str, form: str, base: Path, prepared: Path, run: Path) -> None:
    stage, m = f"{STAGES[form]}@{task}-{method}", METHODS.get(method)
    if form == "nf4-merged" and (m is None or not m.quantized):
        raise TuneoffError(f"{stage}: only methods trained on the 4-bit base (qlora) merge here")
    if m is None or not m.adapter:
        raise TuneoffError(f"{stage}: only adapter methods (lora, qlora) merge")
    data = read_params()
    check_task(task, data)
    params = section(MergeParams, "merge", data=data)
    adapter = adapter_dir(run)
    if not (adapter / "adapter_config.json").is_file():
        raise TuneoffError(f"{adapter} has no adapter: run `dvc repro {m.train_stage(task)}` first")
    dev = measure.device()
    rows = {k: v[: params.check_rows] for k, v in load_rows(prepared / "val.safetensors").items()}

    deployed = form_deployment(run, method, form)
    extra = {}
    if form == "nf4-merged":
        from peft import PeftModel

        reference = logits_on(load_adapter_model(base, adapter, dev), rows, dev)  # the model as trained
        merged = PeftModel.from_pretrained(quantize.dequantized(base, dev), adapter).merge_and_unload()
        merged_into = f"{base} (dequantized)"
    else:
        model = load_adapter_model(base, adapter, dev)
        reference = logits_on(model, rows, dev)
        merged = model.merge_and_unload()
        merged_into = str(base)
    merged_logits = logits_on(merged, rows, dev)
    diff = check_merge(reference, merged_logits, params.tolerance, stage)
    if form == "float-merged" and m.quantized:  # the 4-bit base it trained on: not a dep (dvc.yaml says why)
        trained = logits_on(load_adapter_model(m.base, adapter, dev), rows, dev)
        extra = {"vs_trained_4bit": quantize.logit_error(trained, merged_logits)}

    with atomic_dir(deployed.path) as tmp:
        merged.to(getattr(torch, params.save_dtype)).save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(AutoTokenizer.from_pretrained(base), tmp)
    metrics = {
        "task": task, "method": method, "merged_into": merged_into, "dtype": params.save_dtype,
        "max_abs_logit_diff": diff, "tolerance": params.tolerance,
        "positions_checked": int(reference.shape[0]), **extra,
        "weights_bytes": measure.dir_bytes(deployed.path, "*.safetensors"),
        "timing": {"stage_seconds": measure.process_seconds()},
    }
    write_json(run / f"{STAGES[form].replace('_', '-')}.json", metrics)
    with stage_run(STAGES[form], {"merge": params.model_dump()}, task=task, method=method) as tracker:
        tracker.summary(flat({"merge": metrics}))
        tracker.artifact(f"{task}-{method}-{deployed.path.name}", "model", deployed.path,
                         {**metrics, "adapter": f"{task}-{method}", "standalone": True})
    against = "the adapter on the 4-bit base" if form == "nf4-merged" else "the adapter model"
    print(f"{stage}: max |logit diff| vs {against} {diff:.2e} (tolerance {params.tolerance:g}) over "
          f"{reference.shape[0]} positions -> {deployed.path}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.merge")
    parser.add_argument("task")
    parser.add_argument("method")
    parser.add_argument("form", nargs="?", default="float-merged", choices=list(STAGES))
    parser.add_argument("--base", type=Path, required=True, help="the base the adapter merges into")
    parser.add_argument("--prepared", type=Path, required=True, help="the task's prepared data (its val rows check the merge)")
    parser.add_argument("--run-dir", dest="run", type=Path, required=True, help="the method's run folder: model/ in, the merged model out")
    main(**vars(parser.parse_args()))
