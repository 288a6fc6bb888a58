"""What ships for each method: QLoRA's deployable forms, the one chosen, and the merge into NF4."""

import json
from pathlib import Path

import pytest
import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.modeling.merge import FORMS, deployed_form, deployment, form_deployment

CPU = torch.device("cpu")


def test_the_best_form_ships_and_a_tie_goes_to_the_function_that_trained():
    assert deployed_form({"nf4": 0.5, "nf4-merged": 0.4, "float-merged": 0.6}) == "float-merged"
    assert deployed_form({"nf4": 0.5, "nf4-merged": 0.5, "float-merged": 0.5}) == "nf4-merged"
    assert deployed_form({"nf4": 0.5, "float-merged": 0.5}) == "nf4"
    assert FORMS == ("nf4-merged", "nf4", "float-merged")


def test_deployment_follows_the_form_evaluate_nf4_chose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lora = deployment(Path("runs/t/lora"), "lora")
    assert (str(lora.path), lora.form, str(lora.base)) == ("runs/t/lora/merged", "float-merged", "models/base")
    assert deployment(Path("runs/t/full"), "full").base is None
    with pytest.raises(TuneoffError, match=r"runs/t/qlora/eval.json not found: run its evaluate_nf4"):
        deployment(Path("runs/t/qlora"), "qlora")  # not scored yet: nothing to choose from
    expected = {"nf4": ("runs/t/qlora/model", "models/base-nf4"),  # the adapter itself, on the 4-bit base
                "nf4-merged": ("runs/t/qlora/merged-nf4", "models/base-nf4"),
                "float-merged": ("runs/t/qlora/merged", "models/base")}
    (tmp_path / "runs/t/qlora").mkdir(parents=True)
    for form, (path, base) in expected.items():
        (tmp_path / "runs/t/qlora/eval.json").write_text(json.dumps({"deployed_form": form}))
        chosen = deployment(Path("runs/t/qlora"), "qlora")
        assert (str(chosen.path), chosen.form, str(chosen.base)) == (path, form, base)
    with pytest.raises(TuneoffError, match="lora has no deployable form 'nf4'"):
        form_deployment(Path("runs/t/lora"), "lora", "nf4")


def test_merge_into_dequantized_nf4_computes_the_adapter_as_trained(tiny_nf4, tmp_path):
    """merge_nf4's model: the adapter merged into the dequantized 4-bit weights gives the logits of the
    adapter on the 4-bit base, and saves as a plain float model (no quantization config)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneoff.modeling import quantize
    from tuneoff.modeling.merge import load_adapter_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(quantize.load(tiny_nf4, torch.float32, CPU), config).save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        as_trained = load_adapter_model(tiny_nf4, tmp_path / "adapter", CPU)(input_ids=ids).logits
        float_base = quantize.dequantized(tiny_nf4, CPU)
        assert not any(p.dtype == torch.uint8 for p in float_base.parameters())
        merged = PeftModel.from_pretrained(float_base, tmp_path / "adapter").merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert not hasattr(reloaded.config, "quantization_config")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, as_trained, atol=1e-4, rtol=1e-4)


def test_models_are_scored_in_evaluate_dtype(tiny_base):
    """evaluate.dtype: auto is float32 on a CPU (bf16 on a GPU that has it); a dtype named is what every
    scoring stage loads the shipped model in."""
    from tuneoff.core.measure import eval_dtype
    from tuneoff.modeling.merge import load_shipped

    assert eval_dtype("auto", CPU) == torch.float32 and eval_dtype("bfloat16", CPU) == torch.bfloat16
    net, _ = load_shipped(tiny_base, None, CPU, eval_dtype("bfloat16", CPU))
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
