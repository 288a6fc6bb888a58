"""The 4-bit base QLoRA trains on: quantized once, saved, loaded by every QLoRA run.

bitsandbytes stores a quantized checkpoint (packed 4-bit weights plus their quant state) that
`from_pretrained` loads back bit for bit, so quantizing once in the `quantize` stage gives each
`train_nf4` stage the same base and a size on disk that can be reported. The quantization
error is measured against the float base on held-out rows: how far the logits move, and what
it does to val loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tuneoff.core.params import QuantizeParams


def _device_map(dev: torch.device) -> dict:
    return {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}


def quantize(base_dir: Path, params: QuantizeParams, dev: torch.device):
    """The float base with every Linear except the output layer in 4 bits."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params.quant_type,
                                bnb_4bit_use_double_quant=params.double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype="auto",
                                                 device_map=_device_map(dev))
    return _set_compute(model, torch.float32)


def load(nf4_dir: Path, compute_dtype: torch.dtype, dev: torch.device):
    """A saved 4-bit base, computing in `compute_dtype`."""
    model = AutoModelForCausalLM.from_pretrained(nf4_dir, dtype=compute_dtype, device_map=_device_map(dev))
    return _set_compute(model, compute_dtype)


def dequantized(nf4_dir: Path, dev: torch.device):
    """A saved 4-bit base as a plain float32 model: each bitsandbytes Linear4bit becomes an
    nn.Linear holding its dequantized weights, the very weights QLoRA trained against. It saves
    and loads without bitsandbytes (no quantization_config left)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = load(nf4_dir, torch.float32, dev)
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            with torch.device("meta"):  # no random init of weights about to be replaced
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.data.float(), requires_grad=False)
            model.set_submodule(name, linear)
    model.hf_quantizer.remove_quantization_config(model)
    return model


def _set_compute(model, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = compute_dtype  # the checkpoint stores float32; bf16 where training runs bf16
            # bitsandbytes (0.50) on an avx512_bf16 CPU repacks a 4-bit weight for inference the
            # first time the layer runs in eval mode without grad, and from then on no gradient
            # flows through it: a val-loss check before training silently froze QLoRA. Keep the
            # training layout (tests/test_methods.py::test_qlora_trains_after_eval).
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def logit_error(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    """How far the quantized model's logits are from the float model's, on the same positions."""
    diff = (reference - quantized).abs()
    kl = F.kl_div(quantized.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    top1 = (reference.argmax(-1) == quantized.argmax(-1)).float().mean()
    return {"mean_abs_logit_diff": round(float(diff.mean()), 6), "max_abs_logit_diff": round(float(diff.max()), 6),
            "kl_divergence": round(float(kl), 6), "top1_agreement": round(float(top1), 6),
            "positions": int(reference.shape[0])}
