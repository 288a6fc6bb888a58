"""DVC stage `merge_nf4@<task>-<method>`: a QLoRA adapter merged into the weights it trained on.

Each 4-bit Linear of models/base-nf4 is dequantized to a float32 nn.Linear, the adapter is
merged into those weights, and the result is checked against the adapter on the 4-bit base (the
model as trained) within merge.tolerance. Outputs runs/<task>/<method>/merged-nf4/, the
`nf4-merged` form (tuneoff/merge.py FORMS): a standalone float32 model that plain
`AutoModelForCausalLM.from_pretrained` loads without peft or bitsandbytes, and merge-nf4.json
with the measured logit difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

from tuneoff import measure, methods, quantize
from tuneoff.atomic import atomic_dir, write_json
from tuneoff.errors import TuneoffError, user_errors
from tuneoff.merge import adapter_dir, check_merge, form_deployment, load_adapter_model, logits_on
from tuneoff.params import MergeParams, check_task, read_params, section
from tuneoff.tracking import flat, stage_run
from tuneoff.train import load_rows


@user_errors
def main(task: str, method: str) -> None:
    if methods.base_dir(method) != methods.NF4_BASE:
        raise TuneoffError(f"merge_nf4@{task}-{method}: only methods trained on {methods.NF4_BASE} (qlora) merge here")
    data = read_params()
    check_task(task, data)
    params = section(MergeParams, "merge", data=data)
    adapter = adapter_dir(task, method)
    run = adapter.parent
    if not (adapter / "adapter_config.json").is_file():
        raise TuneoffError(f"{adapter} has no adapter: run `dvc repro {methods.train_stage(task, method)}` first")
    dev = measure.device()
    rows = {k: v[: params.check_rows] for k, v in load_rows(Path("data/prepared") / task / "val.safetensors").items()}

    from peft import PeftModel

    as_trained = logits_on(load_adapter_model(methods.NF4_BASE, adapter, dev), rows, dev)
    merged = PeftModel.from_pretrained(quantize.dequantized(methods.NF4_BASE, dev), adapter).merge_and_unload()
    merged_logits = logits_on(merged, rows, dev)
    diff = check_merge(as_trained, merged_logits, params.tolerance, f"merge_nf4@{task}-{method}")

    out = form_deployment(task, method, "nf4-merged").path
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(methods.NF4_BASE).save_pretrained(tmp)
    metrics = {
        "task": task, "method": method, "merged_into": f"{methods.NF4_BASE} (dequantized)", "dtype": "float32",
        "max_abs_logit_diff": diff, "tolerance": params.tolerance,
        "positions_checked": int(as_trained.shape[0]),
        "weights_bytes": measure.dir_bytes(out, "*.safetensors"),
    }
    write_json(run / "merge-nf4.json", metrics)
    with stage_run("merge_nf4", {"merge": params.model_dump()}, task=task, method=method) as tracker:
        tracker.summary(flat({"merge": metrics}))
        tracker.artifact(f"{task}-{method}-merged-nf4", "model", out,
                         {**metrics, "adapter": f"{task}-{method}", "standalone": True})
    print(f"merge_nf4@{task}-{method}: max |logit diff| vs the adapter on the 4-bit base {diff:.2e} "
          f"(tolerance {params.tolerance:g}) over {as_trained.shape[0]} positions -> {out}/")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.merge_nf4 <task> <qlora>")
    main(sys.argv[1], sys.argv[2])
