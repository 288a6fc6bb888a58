"""Merge a LoRA adapter into the full-precision base, and prove the merge is right.

An adapter is always merged into the float base, never into 4-bit weights: merging into the
quantized base is the most reported source of quality loss in QLoRA merges. A QLoRA adapter
was trained against the NF4 base, so the merged model also differs from what was trained by
the quantization error; that difference is measured and reported, not hidden.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneoff import quantize
from tuneoff.errors import TuneoffError
from tuneoff.packing import IGNORE


def deployable_dir(task: str, method: str) -> Path:
    """The model folder that would be deployed: full weights for `full`, the merged model for adapters."""
    if method == "full":
        return Path("runs") / task / "full" / "model"
    return Path("runs") / task / method / "merged"


def adapter_dir(task: str, method: str) -> Path:
    """The PEFT adapter an adapter method trained (what `tuneoff serve` loads onto one base)."""
    return Path("runs") / task / method / "model"


@torch.no_grad()
def logits_on(model, rows: dict[str, torch.Tensor], dev: torch.device) -> torch.Tensor:
    """Float32 logits at the loss positions of `rows` (the positions a fine-tune was trained on)."""
    model.eval()
    keep = rows["targets"] != IGNORE
    out = model(input_ids=rows["input_ids"].to(dev), position_ids=rows["position_ids"].to(dev),
                logits_to_keep=keep.to(dev), use_cache=False)
    return out.logits.float().cpu()


def is_4bit(base_dir: Path) -> bool:
    """Whether `base_dir` holds a quantized (the quantize stage's 4-bit) checkpoint."""
    return hasattr(AutoConfig.from_pretrained(base_dir), "quantization_config")


def load_base(base_dir: Path, dev: torch.device, dtype: torch.dtype = torch.float32):
    """The base in `base_dir`, computing in `dtype`. A 4-bit base (the quantize stage's) loads
    as 4-bit: that is the model QLoRA trained."""
    if is_4bit(base_dir):
        return quantize.load(base_dir, dtype, dev)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(dev)


def load_adapter_model(base_dir: Path, adapter_dir: Path, dev: torch.device):
    """The base in `base_dir` with the adapter attached, unmerged, computing in float32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir, dev), adapter_dir).eval()


def check_merge(reference: torch.Tensor, merged: torch.Tensor, tolerance: float, what: str) -> float:
    """Max |logit difference|; a difference beyond `tolerance` fails the stage."""
    diff = float((reference - merged).abs().max())
    if not diff <= tolerance:
        raise TuneoffError(f"{what}: merged model's logits differ from the adapter model's by {diff:.3g} "
                           f"(> merge.tolerance = {tolerance:g}); the merge is wrong, not saved")
    return diff
