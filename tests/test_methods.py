import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import FullParams, LoraParams, QloraParams
from tuneoff.modeling import methods
from tuneoff.modeling.loss import batch_loss, eval_loss
from tuneoff.training.loop import plan_steps

CPU = torch.device("cpu")
LORA = dict(lr=1e-3, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def rows(tokenizer, n=4):
    from tuneoff.data.packing import pack, tokenize_chat
    from tuneoff.data.tasks import extraction

    packed = pack([tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(n, 0)], 256,
                  tokenizer.pad_token_id)
    return {k: v.long() for k, v in packed.tensors().items()}


def test_full_trains_every_weight(tiny_base):
    model = methods.build("full", FullParams(lr=1e-4), tiny_base, "fp32", CPU, False)
    trainable, total = methods.trainable_and_total(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


def test_lora_touches_only_the_named_modules(tiny_base):
    model = methods.build("lora", LoraParams(**LORA), tiny_base, "fp32", CPU, False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable)
    # 2 layers x 2 modules x (A: r x 64 + B: out x r); v_proj out = 2 kv heads x 16 = 32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


def test_qlora_trains_on_the_saved_4bit_base(tiny_base, tiny_nf4):
    import bitsandbytes as bnb

    model = methods.build("qlora", QloraParams(**LORA), tiny_nf4, "bf16", CPU, False)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.compute_dtype == torch.bfloat16
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization survived save and load
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    # 4 bits per weight: the saved base is far smaller than the float one
    assert sum(f.stat().st_size for f in tiny_nf4.glob("*.safetensors")) < 0.5 * sum(
        f.stat().st_size for f in tiny_base.glob("*.safetensors"))


def test_quantization_error_is_measured(tiny_base, tiny_nf4, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneoff.modeling import quantize
    from tuneoff.modeling.merge import logits_on

    data = rows(tokenizer)
    ref = logits_on(AutoModelForCausalLM.from_pretrained(tiny_base), data, CPU)
    error = quantize.logit_error(ref, logits_on(quantize.load(tiny_nf4, torch.float32, CPU), data, CPU))
    assert 0 < error["mean_abs_logit_diff"] < error["max_abs_logit_diff"] and error["kl_divergence"] > 0
    assert quantize.logit_error(ref, ref)["max_abs_logit_diff"] == 0 and quantize.logit_error(ref, ref)["top1_agreement"] == 1


def test_qlora_trains_after_eval(tiny_nf4, tokenizer):
    """A val-loss check in eval mode must not freeze the adapters (bitsandbytes CPU repacking)."""
    model = methods.build("qlora", QloraParams(**LORA), tiny_nf4, "fp32", CPU, False)
    data = rows(tokenizer)
    eval_loss(model, data, 2, CPU, "fp32")
    model.train()
    loss, n = batch_loss(model, data, torch.arange(len(data["input_ids"])), CPU, "fp32")
    (loss / n).backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_target_module_fails_before_loading(tiny_base):
    with pytest.raises(TuneoffError, match=r"train.lora.target_modules: \['qkv_proj'\] not in the model"):
        methods.validate("lora", LoraParams(**{**LORA, "target_modules": ["q_proj", "qkv_proj"]}), tiny_base)


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_base, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TuneoffError, match="qlora needs bitsandbytes"):
        methods.validate("qlora", QloraParams(**LORA), tiny_base)


def test_step_plan_meets_the_budget_and_is_shared():
    real = torch.tensor([100, 90, 80, 70, 60])
    steps = plan_steps(real, 2, 500, seed=3)
    assert [s.tolist() for s in steps] == [s.tolist() for s in plan_steps(real, 2, 500, seed=3)]
    seen = [int(real[s].sum()) for s in steps]
    assert sum(seen) >= 500 and sum(seen) - seen[-1] < 500  # stops at the first step past the budget
    assert all(len(s) == 2 for s in steps)


def test_merge_check_catches_a_wrong_merge(tiny_base, tokenizer, tmp_path):
    from tuneoff.modeling.merge import check_merge, load_adapter_model, logits_on

    model = methods.build("lora", LoraParams(**LORA), tiny_base, "fp32", CPU, False)
    for name, p in model.named_parameters():  # a trained adapter: B is no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    data = rows(tokenizer)
    adapter_model = load_adapter_model(tiny_base, tmp_path / "adapter", CPU)
    reference = logits_on(adapter_model, data, CPU)
    merged = adapter_model.merge_and_unload()
    assert check_merge(reference, logits_on(merged, data, CPU), 1e-4, "test") < 1e-4
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():  # a merge that got one projection wrong
        merged.model.layers[1].self_attn.v_proj.weight.mul_(1.05)
    with pytest.raises(TuneoffError, match="merged model's logits differ"):
        check_merge(reference, logits_on(merged, data, CPU), 1e-4, "test")


def test_a_saved_tokenizer_does_not_depend_on_hf_hub_offline(tiny_base, tmp_path):
    """The stages save the base's tokenizer beside each model; transformers would record the loader's
    local_files_only, which HF_HUB_OFFLINE sets, so `make run` and a plain `dvc repro` wrote different
    files and DVC reran everything downstream. save_tokenizer leaves it out."""
    code = ("import sys; from pathlib import Path; from transformers import AutoTokenizer; "
            "from tuneoff.modeling.base_model import save_tokenizer; "
            "save_tokenizer(AutoTokenizer.from_pretrained(sys.argv[1]), Path(sys.argv[2]))")
    for offline in ("0", "1"):
        subprocess.run([sys.executable, "-c", code, str(tiny_base), str(tmp_path / offline)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": offline})
    files = sorted(p.name for p in (tmp_path / "0").iterdir())
    assert "tokenizer_config.json" in files and files == sorted(p.name for p in (tmp_path / "1").iterdir())
    for name in files:
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes(), name
