"""DVC stage `quantize`: `--base` (models/base) -> `--out` (models/base-nf4/), the 4-bit base every QLoRA
run trains on.

Writes `--metrics` (models/quantize.json): size on disk against the float base, and the quantization error
on each task's val rows (logit difference, KL divergence, top-1 agreement, val loss before and
after quantizing).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneoff.core import measure
from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.params import BakeoffParams, QuantizeParams, read_params, section
from tuneoff.core.tracking import flat, stage_run
from tuneoff.data.rows import load_rows
from tuneoff.modeling import quantize
from tuneoff.modeling.base_model import save_tokenizer
from tuneoff.modeling.loss import eval_loss
from tuneoff.modeling.merge import logits_on

def measure_on(model, tasks: dict[str, dict], dev: torch.device) -> tuple[dict, dict]:
    """Logits at the check rows' loss positions, and val loss, for each task."""
    logits = {task: logits_on(model, rows["check"], dev) for task, rows in tasks.items()}
    losses = {task: eval_loss(model, rows["val"], 4, dev, "fp32") for task, rows in tasks.items()}
    return logits, losses


@user_errors
def main(base: Path, prepared: Path, out: Path, metrics_file: Path) -> None:
    data = read_params()
    params = section(QuantizeParams, "quantize", data=data)
    tasks = {}
    for task in section(BakeoffParams, "bakeoff", data=data).tasks:
        path = prepared / task / "val.safetensors"
        if not path.is_file():
            raise TuneoffError(f"{path} not found: run `dvc repro prepare@{task}` first")
        val = load_rows(path)
        tasks[task] = {"val": val, "check": {k: v[: params.check_rows] for k, v in val.items()}}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TuneoffError("params.yaml: quantize needs bitsandbytes: pip install 'bitsandbytes>=0.48'")

    dev = measure.device()
    start = time.perf_counter()
    float_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev)
    float_logits, float_loss = measure_on(float_model, tasks, dev)
    del float_model
    gc.collect()

    model = quantize.quantize(base, params, dev)
    nf4_logits, nf4_loss = measure_on(model, tasks, dev)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(AutoTokenizer.from_pretrained(base), tmp)
        # the saved 4-bit checkpoint must load back to the model that was measured, or it is not kept
        first = next(iter(tasks))
        if not torch.equal(logits_on(quantize.load(tmp, torch.float32, dev), tasks[first]["check"], dev), nf4_logits[first]):
            raise TuneoffError(f"{out}: the saved 4-bit model does not reload to the quantized weights")

    float_bytes = measure.dir_bytes(base, "*.safetensors")
    nf4_bytes = measure.dir_bytes(out, "*.safetensors")
    metrics = {
        "quant_type": params.quant_type, "double_quant": params.double_quant,
        "size": {"float_bytes": float_bytes, "quantized_bytes": nf4_bytes,
                 "compression": round(float_bytes / nf4_bytes, 3)},
        "error": {task: {**quantize.logit_error(float_logits[task], nf4_logits[task]),
                         "val_loss_float": round(float_loss[task], 6), "val_loss_quantized": round(nf4_loss[task], 6)}
                  for task in tasks},
        # the only keys a rerun changes
        "timing": {"seconds": round(time.perf_counter() - start, 3), "stage_seconds": measure.process_seconds()},
    }
    write_json(metrics_file, metrics)
    with stage_run("quantize", {"quantize": params.model_dump(), "bakeoff.tasks": list(tasks)}, data=data) as tracker:
        tracker.summary(flat(metrics))
    for task in tasks:
        print(f"quantize: {task}: val loss {float_loss[task]:.4f} -> {nf4_loss[task]:.4f}, "
              f"mean |logit diff| {(float_logits[task] - nf4_logits[task]).abs().mean():.3f}")
    print(f"quantize: {params.quant_type}{' + double quant' if params.double_quant else ''}: "
          f"{float_bytes / 2**20:.0f} MiB -> {nf4_bytes / 2**20:.0f} MiB -> {out}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.quantize")
    parser.add_argument("--base", type=Path, required=True, help="the float base model's folder")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared data, a folder per task")
    parser.add_argument("--out", type=Path, required=True, help="the 4-bit base model's folder")
    parser.add_argument("--metrics", type=Path, required=True, dest="metrics_file", help="the quantization error's JSON")
    main(**vars(parser.parse_args()))
