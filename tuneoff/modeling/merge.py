"""Merge a LoRA adapter into a base, prove the merge is right, and name what would be deployed.

A LoRA adapter merges into the float base it trained on. A QLoRA adapter trained on the NF4
base, so it has three deployable forms (FORMS): `nf4` (the adapter on the 4-bit base, as trained),
`nf4-merged` (merged into the dequantized NF4 weights, in float32: the function that trained, as a
standalone model that needs neither peft nor bitsandbytes) and `float-merged` (merged into the
float base: it differs from what trained by the quantization error, which changes answers).
evaluate_nf4 scores SCORED_FORMS on the whole test set: `nf4` is not scored again, since merge_nf4
has checked that nf4-merged computes its function (logits within merge.tolerance). The best main
metric ships.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import FLOAT_BASE, NF4_BASE
from tuneoff.core.methods import method as method_named
from tuneoff.data.packing import IGNORE
from tuneoff.modeling import quantize

# QLoRA's deployable forms, in the order a tie goes: the function that trained first (nf4-merged
# also serves without bitsandbytes), the float merge last
FORMS = ("nf4-merged", "nf4", "float-merged")
SCORED_FORMS = ("nf4-merged", "float-merged")  # nf4 computes nf4-merged's function, which is scored
TRAINED_FORM = "nf4-merged"  # the function that trained, as a standalone model


@dataclass(frozen=True)
class Deployment:
    """What ships for one method: a model folder and, for an adapter method, its form and base."""

    path: Path  # a standalone model; for the nf4 form the adapter, which runs on `base`
    form: str | None  # one of FORMS (LoRA: float-merged); None for full
    base: Path | None  # the base the method's adapter runs on (`tuneoff serve --base`); None for full


def deployed_form(scores: dict[str, float | tuple]) -> str:
    """The form that ships, from each scored form's score (the main metric, or a tuple compared in order):
    the best, a tie to the earliest in FORMS."""
    return max((f for f in FORMS if f in scores), key=lambda f: (scores[f], -FORMS.index(f)))


def form_deployment(run: Path, method: str, form: str | None) -> Deployment:
    """Where `form` of `method` lives in its run folder `run` (runs/<task>/<method>/ in dvc.yaml) and the
    base its adapter needs. LoRA has one form (float-merged) and full none; a QLoRA adapter runs on the
    NF4 base in both nf4 forms."""
    m = method_named(method)
    if not m.adapter:
        return Deployment(run / "model", None, None)
    allowed = FORMS if m.quantized else ("float-merged",)
    if form not in allowed:
        raise TuneoffError(f"{method} has no deployable form {form!r}; it has {list(allowed)}")
    if form == "nf4":
        return Deployment(run / "model", form, NF4_BASE)
    if form == "nf4-merged":
        return Deployment(run / "merged-nf4", form, NF4_BASE)
    return Deployment(run / "merged", form, FLOAT_BASE)


def deployment(run: Path, method: str) -> Deployment:
    """What would be deployed of `method`'s run folder `run`: for a method trained on the NF4 base, the
    form its evaluation chose (`run`/eval.json `deployed_form`)."""
    m = method_named(method)
    if not m.adapter:
        return form_deployment(run, method, None)
    if not m.quantized:
        return form_deployment(run, method, "float-merged")
    scores = run / "eval.json"
    if not scores.is_file():
        raise TuneoffError(f"{scores} not found: run its evaluate_nf4 stage first (it chooses the form that ships)")
    return form_deployment(run, method, json.loads(scores.read_text())["deployed_form"])


def adapter_dir(run: Path) -> Path:
    """The PEFT adapter an adapter method trained into its run folder `run` (what `tuneoff serve` loads
    onto one base)."""
    return run / "model"


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


def load_adapter_model(base_dir: Path, adapter_dir: Path, dev: torch.device, dtype: torch.dtype = torch.float32):
    """The base in `base_dir` with the adapter attached, unmerged, computing in `dtype`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir, dev, dtype), adapter_dir).eval()


def load_shipped(folder: Path, base: Path | None, dev: torch.device, dtype: torch.dtype = torch.float32):
    """A model as it ships, computing in `dtype` (measure.eval_dtype), and its tokenizer: a standalone
    model folder, or (QLoRA's nf4 form) an adapter folder run on `base`."""
    from transformers import AutoTokenizer

    if (folder / "adapter_config.json").is_file():
        return load_adapter_model(base, folder, dev, dtype), AutoTokenizer.from_pretrained(base)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval(), \
        AutoTokenizer.from_pretrained(folder)


def check_merge(reference: torch.Tensor, merged: torch.Tensor, tolerance: float, what: str) -> float:
    """Max |logit difference|; a difference beyond `tolerance` fails the stage."""
    diff = float((reference - merged).abs().max())
    if not diff <= tolerance:
        raise TuneoffError(f"{what}: merged model's logits differ from the adapter model's by {diff:.3g} "
                           f"(> merge.tolerance = {tolerance:g}); the merge is wrong, not saved")
    return diff
