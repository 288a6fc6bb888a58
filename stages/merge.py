"""DVC stage `merge@<task>-<method>`: an adapter merged into the full-precision base.

Outputs runs/<task>/<method>/merged/, a standalone model folder that plain
`AutoModelForCausalLM.from_pretrained` loads without peft, and merge.json with the measured
logit difference between the adapter model and the merged model on held-out val rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

from tuneoff import measure
from tuneoff.atomic import atomic_dir, write_json
from tuneoff.errors import TuneoffError, user_errors
from tuneoff.merge import check_merge, load_adapter_model, logits_on
from tuneoff.params import MergeParams, section
from tuneoff.train import load_rows

BASE = Path("models/base")


@user_errors
def main(task: str, method: str) -> None:
    if method not in ("lora", "qlora"):
        raise TuneoffError(f"merge@{task}-{method}: only adapter methods (lora, qlora) merge")
    params = section(MergeParams, "merge")
    run = Path("runs") / task / method
    if not (run / "model" / "adapter_config.json").is_file():
        raise TuneoffError(f"{run}/model has no adapter: run `dvc repro train@{task}-{method}` first")
    dev = measure.device()
    rows = {k: v[: params.check_rows] for k, v in load_rows(Path("data/prepared") / task / "val.safetensors").items()}

    model = load_adapter_model(BASE, run / "model", dev)
    with_adapter = logits_on(model, rows, dev)
    merged = model.merge_and_unload()
    diff = check_merge(with_adapter, logits_on(merged, rows, dev), params.tolerance, f"merge@{task}-{method}")

    with atomic_dir(run / "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(BASE).save_pretrained(tmp)
    write_json(run / "merge.json", {
        "task": task, "method": method, "merged_into": str(BASE), "dtype": "float32",
        "max_abs_logit_diff": diff, "tolerance": params.tolerance,
        "positions_checked": int(with_adapter.shape[0]),
        "weights_bytes": measure.dir_bytes(run / "merged", "*.safetensors"),
    })
    print(f"merge@{task}-{method}: max |logit diff| {diff:.2e} (tolerance {params.tolerance:g}) over "
          f"{with_adapter.shape[0]} positions -> {run}/merged/")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.merge <task> <lora|qlora>")
    main(sys.argv[1], sys.argv[2])
