"""How each method builds its model; everything after this is one shared training loop.

- full:  every weight trains, float32 master weights (bf16 autocast when precision is bf16), or
         bf16 weights with precision bf16-pure.
- lora:  PEFT LoRA adapters on a frozen base held in the compute dtype; the adapters are float32,
         or bf16 with precision bf16-pure.
- qlora: the same adapters on a frozen 4-bit (NF4, double-quantized) bitsandbytes base,
         quantized once by the quantize stage (tuneoff/modeling/quantize.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import METHODS
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import LoraParams, params_of
from tuneoff.modeling import quantize

PARAMS_BY_METHOD = {name: params_of(name) for name in METHODS}
DTYPES = {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp32": torch.float32}


def linear_module_names(base_dir: Path) -> set[str]:
    """Short names of the Linear layers the architecture has (q_proj, ...), from its config alone."""
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def validate(method: str, params, base_dir: Path) -> None:
    """Reject what would fail later, before the model loads."""
    if isinstance(params, LoraParams):
        available = linear_module_names(base_dir)
        missing = [m for m in params.target_modules if m not in available]
        if missing:
            raise TuneoffError(f"params.yaml: train.{method}.target_modules: {missing} not in the model; "
                               f"it has {sorted(available)}")
    if method_named(method).quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise TuneoffError("params.yaml: qlora needs bitsandbytes: pip install 'bitsandbytes>=0.48'")


def build(method: str, params, base_dir: Path, precision: str, dev: torch.device, gradient_checkpointing: bool):
    """The trainable model for `method`, on `dev`, from `base_dir` (the 4-bit copy for qlora: Method.base)."""
    m, compute_dtype = method_named(method), DTYPES[precision]
    if not m.adapter:  # float32 master weights under autocast; bf16-pure trains the bf16 weights themselves
        dtype = compute_dtype if precision == "bf16-pure" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(dev)
    elif not m.quantized:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=compute_dtype).to(dev)
    else:
        model = quantize.load(base_dir, compute_dtype, dev)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not m.adapter:
        return model

    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    lora = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=list(params.target_modules), task_type="CAUSAL_LM")
    # adapters stay float32 (PEFT's autocast_adapter_dtype) while the frozen base is bf16 or 4-bit;
    # bf16-pure keeps them in the base's bf16
    return get_peft_model(model, lora, autocast_adapter_dtype=precision != "bf16-pure")


def trainable_and_total(model) -> tuple[int, int]:
    """Trainable and total parameters; a 4-bit weight packs 2 values per stored byte, counted as 2."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def save(model, method: str, out_dir: Path, state_dict: dict | None = None) -> None:
    """Full weights (full) or the adapter only (lora, qlora), as safetensors; `state_dict`: the
    model's whole state gathered from its shards (FSDP), for a model that holds only its shard."""
    model.save_pretrained(out_dir, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    config = Path(out_dir) / "adapter_config.json"
    if config.is_file():  # PEFT writes target_modules from a set, in an order that changes run to run
        data = json.loads(config.read_text())
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True))
