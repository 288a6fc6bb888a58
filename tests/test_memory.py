"""The estimator (tuneoff/estimator/memory.py, throughput.py, estimate.py, plan.py) against what PyTorch actually
does: exact parameter counts, exactly the bytes autograd saves, the peak of bytes held in tensors
within 10%, and the CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tuneoff.core import measure
from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import CommonTrainParams, FullParams, LoraParams, QloraParams
from tuneoff.data.packing import IGNORE, example_spans
from tuneoff.estimator import architectures, estimate, memory, throughput, train_stage
from tuneoff.modeling import methods
from tuneoff.training import attention, dropout

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ALL = memory.expand_targets(["all-linear"])
# published totals (model cards, safetensors metadata) for the catalog's shapes
PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
             "llama-3.2-3b": 3_212_749_824, "llama-2-7b": 6_738_415_616, "mistral-7b": 7_248_023_552,
             "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "smollm2-135m": 134_515_008}


def rows_for(tokenizer, n=12, seq_len=256):
    from tuneoff.data.packing import pack, tokenize_chat
    from tuneoff.data.tasks import extraction

    packed = pack([tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(n, 0)], seq_len,
                  tokenizer.pad_token_id)
    return {k: v.long() for k, v in packed.tensors().items()}


def setup(method="lora", **kw) -> memory.Setup:
    base = dict(method=method, batch_size=2, seq_len=256, precision="fp32", device="cpu", optimizer="adamw",
                gradient_checkpointing=False, rank=4, target_modules=("q_proj", "v_proj"), dropout=0.05,
                supervised_positions=None, attention="packed", double_quant=True, gpus=1, sharded=True, accumulates=False)
    return memory.Setup(**{**base, **kw})


def cuda(method="lora", **kw) -> memory.Setup:
    return setup(method, **{"batch_size": 1, "seq_len": 2048, "precision": "bf16", "device": "cuda", "rank": 16, **kw})


# --- parameter counts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(architectures.CATALOG))
def test_catalog_counts_equal_the_built_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**architectures.CATALOG[name]))
    shape = architectures.resolve(name)
    assert shape.parameter_count() == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert shape.parameter_count() == PUBLISHED[name]


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("o_proj", "down_proj"), ALL, ("k_proj", "lm_head")])
def test_lora_counts_are_exact(tiny_base, targets):
    params = LoraParams(lr=1e-3, rank=8, alpha=16, dropout=0.0, target_modules=list(targets))
    model = methods.build("lora", params, tiny_base, "fp32", CPU, False)
    predicted = memory.parameter_counts(architectures.resolve(str(tiny_base)), setup(rank=8, target_modules=targets))
    assert (predicted["trainable"], predicted["total"]) == methods.trainable_and_total(model)


def test_full_count_is_exact(tiny_base):
    model = methods.build("full", FullParams(lr=1e-4), tiny_base, "fp32", CPU, False)
    predicted = memory.parameter_counts(architectures.resolve(str(tiny_base)), setup("full"))
    assert (predicted["trainable"], predicted["total"]) == methods.trainable_and_total(model)


def test_qlora_counts_and_stored_bytes_are_exact(tiny_nf4):
    params = QloraParams(lr=1e-3, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = methods.build("qlora", params, tiny_nf4, "fp32", CPU, False)
    shape, s = architectures.resolve(str(tiny_nf4)), setup("qlora", dropout=0.0)
    predicted = memory.parameter_counts(shape, s)
    assert (predicted["trainable"], predicted["total"]) == methods.trainable_and_total(model)
    est = memory.estimate(shape, s, 0)
    # packed 4-bit weights + float rest + double-quantized absmax and codes + the adapters, to the byte
    stored = est.terms["weights"] + est.terms["quantization constants"] + est.terms["LoRA parameters"]
    assert stored == measure.model_bytes(model)


# --- activations: exactly what autograd saves ----------------------------------------------------------

def saved_bytes(model, rows, batch, autocast: bool, per_example: bool = False) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass, with the LoRA dropout
    the train loop uses on a CPU (dropout.py), and its per-example attention if `per_example`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    idx = torch.arange(batch)  # a copy, as the training loop's batch indexing makes
    ids, pos, targets = (rows[k][idx] for k in ("input_ids", "position_ids", "targets"))
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    spans = {"packed_spans": example_spans(pos)} if per_example else {}
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context,
          dropout.cheaper(model), attention.packed(model) if per_example else contextlib.nullcontext()):
        model(input_ids=ids, position_ids=pos, logits_to_keep=targets != IGNORE, use_cache=False, **spans)
    return sum(seen.values()), int((targets != IGNORE).sum())


def build_tiny(method, precision, targets, dropout, vocab, model_type="llama"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=model_type != "qwen2")
    model = AutoModelForCausalLM.from_config(config)
    if precision == "bf16-pure" or (method != "full" and precision == "bf16"):
        model = model.to(torch.bfloat16)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets)),
                               autocast_adapter_dtype=precision != "bf16-pure")
    model.train()
    return model, architectures.from_config(config.to_dict(), model_type)


CASES = [("full", p, (), 0.0, "llama") for p in memory.PRECISIONS] + [
    ("lora", p, t, d, "llama") for p in memory.PRECISIONS for t, d in ((("q_proj", "v_proj"), 0.1), (ALL, 0.0))
] + [("lora", "fp32", t, d, "llama") for t, d in ((("o_proj", "down_proj"), 0.0), (ALL, 0.1), (("k_proj", "lm_head"), 0.1))
     ] + [(m, "fp32", ("q_proj", "v_proj"), 0.1, t) for m in ("full", "lora") for t in ("qwen2", "qwen3")]


@pytest.mark.parametrize("method,precision,targets,dropout,model_type", CASES)
def test_activations_are_what_autograd_saves(tokenizer, method, precision, targets, dropout, model_type):
    """Every tensor the formula counts, and none it does not: fp32, bf16 autocast and pure bf16;
    LoRA on several target sets with and without dropout; Llama, Qwen2 (q/k/v bias), Qwen3 (q/k norm)."""
    rows = rows_for(tokenizer)
    model, shape = build_tiny(method, precision, targets, dropout, len(tokenizer), model_type)
    for kind in ("packed", "per-example", "causal"):
        data = dict(rows)
        if kind == "causal":  # no position restarts: one sequence per row, SDPA's is_causal
            data["position_ids"] = torch.arange(256).expand_as(rows["position_ids"]).contiguous()
        measured, positions = saved_bytes(model, data, 2, precision == "bf16", per_example=kind == "per-example")
        s = setup(method, precision=precision, target_modules=targets or ("q_proj",), dropout=dropout,
                  supervised_positions=positions, attention=kind)
        assert sum(memory.activations(shape, s)[0].values()) == measured, kind


def test_activations_at_smollm2_scale():
    """The same count at SmolLM2-135M's shape, batch 3 x 448, as traced there (scripted, not re-traced here:
    the model is 0.5 GB; saved_bytes on the first 3 rows of the default task): LoRA r16 on q/v with dropout 0.05
    saves 1,611,134,784 bytes with the train loop's bool dropout mask (1,745,835,840 with nn.Dropout's float
    one on a CPU), full 2,001,720,384."""
    shape = architectures.resolve("smollm2-135m")
    s = setup(batch_size=3, seq_len=448, rank=16, supervised_positions=398)
    assert sum(memory.activations(shape, s)[0].values()) == 1_611_134_784
    assert sum(memory.activations(shape, replace(s, method="full"))[0].values()) == 2_001_720_384


# --- the peak -------------------------------------------------------------------------------------------

# (method, gradient checkpointing, precision, optimizer, micro_batch_size): every method with and without
# checkpointing, then what else the loop trains with: pure bf16, 8-bit AdamW states, micro-batches of 1 row of 2
# (full's shows the gradients held between micro-batches: 11% of its peak were they left out)
PEAK_CASES = [(m, c, "fp32", "adamw", 0) for m in ("full", "lora", "qlora") for c in (False, True)] + [
    ("full", False, "bf16-pure", "adamw", 0), ("full", False, "fp32", "adamw-8bit", 0),
    ("lora", False, "fp32", "adamw", 1), ("full", False, "fp32", "adamw", 1)]


@pytest.mark.parametrize("method,checkpointing,precision,optimizer,micro_batch_size", PEAK_CASES)
def test_peak_within_10_percent_of_measured(tiny_base, tokenizer, request, method, checkpointing, precision, optimizer,
                                            micro_batch_size):
    """tuneoff's own loop (train.train) for 3 steps on the tiny model; measured: the peak of bytes held in
    tensors (torch's profiler, measure.TensorPeak) plus the model's own. Predicted from the step shapes the
    train stage records (loop.step_shapes), as the report does."""
    from tuneoff.training.loop import plan_steps, step_shapes, train

    base = request.getfixturevalue("tiny_nf4") if method == "qlora" else tiny_base
    rows = rows_for(tokenizer, 24)
    common = CommonTrainParams(seed=0, batch_size=2, micro_batch_size=micro_batch_size, token_budget=3 * 2 * 200,
                               precision=precision, optimizer=optimizer, gradient_checkpointing=checkpointing,
                               allocator="system", devices=1, distributed="auto", warmup_fraction=0.0, weight_decay=0.0, max_grad_norm=1.0, eval_every=0,
                               log_every=1, pilot_fraction=0.25)
    params = FullParams(lr=1e-4) if method == "full" else LoraParams(lr=1e-3, rank=4, alpha=8, dropout=0.05,
                                                                      target_modules=["q_proj", "v_proj"])
    model = methods.build(method, params, base, precision, CPU, checkpointing)
    assert len(plan_steps(rows["real_tokens"], 2, common.token_budget, 0)) >= 3  # optimizer states from step 2 on
    with tempfile.TemporaryDirectory() as logs, measure.TensorPeak() as peak:
        train(model, rows, {k: v[:2] for k, v in rows.items()}, common, params.rates[0], CPU, precision, Path(logs), "t")
    measured = peak.peak_bytes + measure.model_bytes(model)
    shapes = step_shapes(rows, common)
    s = estimate.setup_for_run(method, None if method == "full" else params, common.batch_size, checkpointing, precision,
                               optimizer, "cpu", 256, shapes["max_supervised_positions"],
                               json.loads((base / "config.json").read_text()))
    # the rows one forward and backward pass runs, joined by batch_loss into one row of their real tokens
    s = estimate.joined_rows(estimate.one_pass(s, shapes["micro_batch_rows"]), shapes["max_step_tokens"])
    predicted = memory.estimate(architectures.resolve(str(base)), s, 0).peak_tensor_bytes
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_terms_follow_the_method():
    shape = architectures.resolve("llama-3-8b")
    setups = {m: cuda(m) for m in ("full", "lora", "qlora")}
    full, lora, qlora = (memory.estimate(shape, s, 0) for s in setups.values())
    p = shape.parameter_count()
    assert full.terms["weights"] == 4 * p + 512 and full.terms["gradients"] == 4 * p  # float32 master weights
    assert full.terms["optimizer states"] == 8 * p  # AdamW: two float32 states
    assert lora.terms["weights"] == 2 * p + 512  # the frozen base in bf16 (+ RoPE buffers)
    assert lora.terms["gradients"] == 4 * memory.lora_parameters(shape, setups["lora"])  # float32 adapters
    assert qlora.terms["weights"] < 0.4 * lora.terms["weights"] and qlora.terms["quantization constants"] > 0
    assert full.phase == "optimizer step" and lora.phase == qlora.phase == "loss backward"
    pure8 = memory.estimate(shape, replace(setups["full"], optimizer="paged-adamw-8bit", precision="bf16-pure"), 0)
    assert pure8.terms["weights"] == 2 * p + 512 and pure8.terms["optimizer states"] == 0
    assert 2 * p <= pure8.terms["optimizer states (paged)"] < 2.1 * p  # uint8 x 2 + a float32 absmax per 256


def test_bitsandbytes_optimizers_on_a_cpu():
    """bitsandbytes' optimizers run on a CPU too (the loop's adamw-8bit); paging is CUDA unified memory, so on a
    CPU paged states are ordinary memory, counted like any other."""
    shape = architectures.resolve("smollm2-135m")
    p = shape.parameter_count()
    on_cpu = memory.estimate(shape, setup("full", optimizer="paged-adamw-8bit"), 0)
    on_gpu = memory.estimate(shape, cuda("full", optimizer="paged-adamw-8bit"), 0)
    assert on_cpu.terms["optimizer states (paged)"] == 0 and 2 * p <= on_cpu.terms["optimizer states"] < 2.1 * p
    assert on_gpu.terms["optimizer states"] == 0
    assert on_gpu.terms["optimizer states (paged)"] == on_cpu.terms["optimizer states"]


def test_fsdp_divides_the_sharded_terms():
    shape = architectures.resolve("llama-3-70b")
    one = memory.estimate(shape, cuda(seq_len=1024), 0)
    two = memory.estimate(shape, cuda(seq_len=1024, gpus=2), 0)
    assert two.terms["weights"] == pytest.approx(one.terms["weights"] / 2, abs=1)
    assert two.terms["activations"] == one.terms["activations"]
    replicated = memory.estimate(shape, cuda(seq_len=1024, gpus=2, sharded=False), 0)  # DDP: each holds it all
    assert replicated.terms["weights"] == one.terms["weights"] and replicated.peak_bytes == one.peak_bytes


# --- devices, time, cost -----------------------------------------------------------------------------

def device(memory_gib=24.0, tflops=100.0, price=2.0, kind="cuda"):
    return throughput.Device("GPU X", memory_gib, {"fp32": tflops / 8, "bf16": tflops}, price, kind)


def test_fit_statuses():
    est = memory.Estimate(terms={}, at_peak={}, activations={}, peak_tensor_bytes=int(20 * 2**30),
                          overhead_bytes=int(0.5 * 2**30), phase="loss backward")
    assert estimate.fit(est, device(22), 0.10).status == "tight"  # 20.5 of 22 GiB: under 10% left
    assert estimate.fit(est, device(30), 0.10).status == "fits"
    assert estimate.fit(est, device(20.4), 0.10).status == "no"
    assert estimate.fit(est, device(20.5), 0.10).status == "tight"  # exactly full still fits


def test_flops_per_token_match_the_6n_rule():
    shape = architectures.resolve("llama-3-8b")
    s = cuda("full", seq_len=128)
    n = shape.non_embedding_params() + shape.vocab * shape.hidden  # the output layer multiplies too
    assert throughput.flops_per_position(shape, s) == pytest.approx(6 * n, rel=0.02)
    lora = throughput.flops_per_position(shape, replace(s, method="lora"))
    assert lora == pytest.approx(4 * n, rel=0.02)  # no weight gradients for the frozen base
    ckpt = throughput.flops_per_position(shape, replace(s, method="lora", gradient_checkpointing=True))
    assert ckpt == pytest.approx(6 * n, rel=0.03)


def test_calibration_uses_measured_runs():
    gpu = device(tflops=100.0)
    runs = [throughput.Measured("lora", "GPU X", "bf16", 4e15, seconds, task)
            for task, seconds in (("a", 100.0), ("b", 200.0), ("c", 300.0))]
    cal = throughput.calibrate(runs, gpu, "lora", "bf16", prior=0.9)
    assert cal.utilisation == pytest.approx(4e15 / 200 / 100e12) and len(cal.runs) == 3  # the median run
    assert throughput.calibrate(runs, gpu, "full", "bf16", prior=0.9).utilisation == 0.9
    assert throughput.calibrate(runs, gpu, "lora", "fp32", prior=0.9).source == "prior"


def test_find_device():
    catalog = [device(), throughput.Device("NVIDIA A100-SXM4-40GB", 40, {}, 1, "cuda"),
               throughput.Device("NVIDIA A100-SXM4-80GB", 80, {}, 1, "cuda")]
    assert estimate.find_device("a100 80", catalog).memory_gib == 80
    with pytest.raises(TuneoffError, match="ambiguous"):
        estimate.find_device("a100", catalog)
    with pytest.raises(TuneoffError, match="unknown"):
        estimate.find_device("tpu", catalog)


def test_train_stage_estimate(tiny_base, tokenizer):
    rows = rows_for(tokenizer, 40)
    common = CommonTrainParams(seed=0, batch_size=2, micro_batch_size=0, token_budget=1500, precision="fp32",
                               optimizer="adamw", gradient_checkpointing=False, allocator="system", devices=1, distributed="auto", warmup_fraction=0.0,
                               weight_decay=0.0, max_grad_norm=1.0, eval_every=0, log_every=1, pilot_fraction=0.25)
    from tuneoff.core.params import CostParams, EstimateParams, section

    params = section(EstimateParams, "estimate", path=ROOT / "params.yaml")
    prices = section(CostParams, "cost", path=ROOT / "params.yaml").price_per_hour
    lora = LoraParams(lr=1e-3, rank=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])
    est, timing = train_stage.for_train_stage("lora", lora, common, "fp32", "cpu", "cpu", tiny_base, rows, params, prices)
    model = methods.build("lora", lora, tiny_base, "fp32", CPU, False)
    assert (est["params"]["trainable"], est["params"]["total"]) == methods.trainable_and_total(model)
    assert est["peak_memory_bytes"] == est["peak_tensor_bytes"] + int(params.overhead_gib.cpu * 2**30)
    assert est["measure"] == "cpu_peak_rss" and timing["train_seconds"] > 0
    again, _ = train_stage.for_train_stage("lora", lora, common, "fp32", "cpu", "cpu", tiny_base, rows, params, prices)
    assert again == est  # a function of the config and data: reruns write the same train.json


# --- the CLI ---------------------------------------------------------------------------------------------

def cli(capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    from tuneoff.cli import main

    monkeypatch.chdir(ROOT)
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_estimate_json(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, "estimate", "--model", "llama-3-8b", "--batch-size", "1", "--seq-len", "2048",
                       "--tokens", "1e7", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["model"]["parameters"] == 8_030_261_248
    lora, full, qlora = (result["methods"][m] for m in ("lora", "full", "qlora"))
    assert lora["memory"]["params"]["trainable"] == 32 * 16 * (4096 + 4096 + 4096 + 1024)  # r16 on q, v
    h100 = "NVIDIA H100 80GB HBM3"
    assert full["devices"][h100]["fit"]["status"] == "no"  # float32 master weights + AdamW: 16 bytes/param
    assert qlora["devices"]["NVIDIA GeForce RTX 4090"]["fit"]["status"] == "fits"
    cost = lora["devices"][h100]["time_and_cost"]
    assert cost["usd"] == pytest.approx(cost["train_hours"] * 3.50)
    assert cost["train_flops"] == pytest.approx(1e7 * cost["flops_per_position"])


def test_cli_tables(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, "estimate", "--model", "smollm2-135m", "--device", "cpu")
    assert code == 0 and "peak, tensors" in out and "cpu (23 GiB)" in out
    code, out, _ = cli(capsys, monkeypatch, "plan", "--model", "llama-3-8b", "--task-type", "format", "--device", "a10g",
                       "--examples", "50000", "--tokens", "1.5e7", "--tolerance", "3")
    assert code == 0 and "start with: lora, rank 16, on q_proj, v_proj" in out and "full left out" in out


@pytest.mark.parametrize("argv,message", [
    (["estimate", "--model", "llama-9b"], "model 'llama-9b': not a catalog name"),
    (["estimate", "--model", "no/such/config.json"], "no config.json at no/such/config.json"),
    (["estimate", "--model", "llama-3-8b", "--method", "dora"], "--method dora: allowed"),
    (["estimate", "--model", "llama-3-8b", "--device", "tpu"], "device 'tpu': unknown"),
    (["estimate", "--model", "llama-3-8b", "--target-modules", "qproj"], "target modules ['qproj']: allowed"),
    (["plan", "--model", "llama-3-8b", "--task-type", "format", "--device", "h100", "--tolerance", "2"],
     "plan needs the dataset's size"),
])
def test_cli_bad_input_is_one_line(capsys, monkeypatch, argv, message):
    code, out, err = cli(capsys, monkeypatch, *argv)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TuneoffError, match="not valid JSON"):
        architectures.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(TuneoffError, match="model_type 'mixtral' is not supported"):
        architectures.resolve(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(TuneoffError, match="has no 'num_attention_heads'"):
        architectures.resolve(str(tmp_path))


# --- plan ------------------------------------------------------------------------------------------------

def plan_for(model, task_type, device_name, examples, tolerance):
    from tuneoff.core.params import CostParams, EstimateParams, PlanParams, section
    from tuneoff.estimator import plan

    params = section(EstimateParams, "estimate", path=ROOT / "params.yaml")
    catalog = estimate.devices(params, section(CostParams, "cost", path=ROOT / "params.yaml").price_per_hour)
    base = cuda(batch_size=2, seq_len=1024)
    return plan.plan(architectures.resolve(model), task_type, estimate.find_device(device_name, catalog), examples,
                     examples * 300, tolerance, base, section(PlanParams, "plan", path=ROOT / "params.yaml"), params,
                     None)


def test_plan_rules():
    easy = plan_for("llama-3-8b", "format", "a100 80", 50_000, 3.0)
    assert (easy["method"], easy["rank"], easy["target_modules"]) == ("lora", 16, ["q_proj", "v_proj"])
    tight = plan_for("llama-3-8b", "format", "a100 80", 50_000, 1.0)  # under the expected 2-point gap
    assert tight["rank"] == 32 and tight["target_modules"] == list(ALL)
    big = plan_for("smollm2-360m", "knowledge", "h100", 600_000, 3.0)
    assert big["method"] == "full" and "600,000" in " ".join(big["reasons"])
    small_gpu = plan_for("llama-3-70b", "format", "h100", 50_000, 3.0)  # 141 GB of bf16 weights
    assert small_gpu["method"] == "qlora" and small_gpu["bakeoff"]["methods"] == ["qlora"]
    assert {"full", "lora"} == set(small_gpu["bakeoff"]["left_out"])


# --- the report ------------------------------------------------------------------------------------------

def test_report_shows_predicted_vs_measured():
    """Memory error against the run's own estimate; time calibrated on the other task's run of the method."""
    from tuneoff.decision import costs as report

    def row(method, predicted, measured, flops, seconds):
        train = {"peak_memory_bytes": measured, "memory_measure": "cuda_max_memory_allocated", "train_seconds": seconds,
                 "device": "GPU X", "precision": "bf16",
                 "estimate": {"peak_memory_bytes": predicted, "phase": "loss backward", "train_flops": flops,
                              "train_seconds": 50.0, "utilisation": 0.3}}
        return {"method": method, "train": train}

    comparisons = [{"task": "a", "rows": [{"method": "base", "train": None}, row("lora", 110 * 2**30, 100 * 2**30, 1e15, 10.0)]},
                   {"task": "b", "rows": [row("lora", 90 * 2**30, 100 * 2**30, 2e15, 25.0)]}]
    a, b = report.predictions(comparisons)
    assert (a["peak_error_percent"], b["peak_error_percent"]) == (10.0, -10.0)
    assert a["seconds_calibrated"] == pytest.approx(1e15 / (2e15 / 25.0))  # a's FLOPs at b's FLOP/s: 12.5 s
    assert a["seconds_error_percent"] == 25.0 and b["seconds_calibrated"] == pytest.approx(20.0)
    table = "\n".join(report._predictions_table(comparisons))
    assert "| a | lora | 110.00 | 100.00 | +10.0 | 50 | 12 | 10 | +25.0 |" in table


def test_shipped_estimate_and_plan_params_are_valid_and_checked(tmp_path):
    import yaml

    from tuneoff.core.params import EstimateParams, PlanParams, section

    estimate_params = section(EstimateParams, "estimate", path=ROOT / "params.yaml")
    assert "cpu" in estimate_params.devices and section(PlanParams, "plan", path=ROOT / "params.yaml").rank["format"] > 0
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["estimate"]["utilisation"]["cuda"]["lora"] = 1.5
    del data["plan"]["rank"]["reasoning"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(TuneoffError, match=r"estimate.utilisation.cuda.lora = 1.5: Input should be less than or equal to 1"):
        section(EstimateParams, "estimate", path=tmp_path / "params.yaml")
    with pytest.raises(TuneoffError, match=r"plan: rank needs every task type; missing \['reasoning'\]"):
        section(PlanParams, "plan", path=tmp_path / "params.yaml")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peak_within_10_percent(tmp_path):
    """benchmarks/gpu_check.py on Llama 3.2 1B's shape (random weights): every method's predicted peak
    within 10% of torch.cuda.max_memory_allocated."""
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--model", "llama-3.2-1b", "--steps", "3",
                    "--cases", "full:bf16:adamw,lora:bf16:adamw,qlora:bf16:adamw", "--out", str(out)], check=True, cwd=ROOT)
    cases = json.loads(out.read_text())["cases"]
    assert [c["method"] for c in cases] == ["full", "lora", "qlora"]
    for case in cases:
        assert "error" not in case and "skipped" not in case, case
        assert abs(case["error_percent"]) < 10, (case["name"], case["error_percent"])


def test_gpu_check_runs_its_cases_on_a_cpu_and_refuses_a_missing_gpu_in_one_line(tmp_path):
    """benchmarks/gpu_check.py, the GPU acceptance script, on its CPU path: each case in its own
    process, SmolLM2-135M's shape with random weights, peak within 10% of the estimate (8-bit AdamW
    and checkpointing on full, plain AdamW on LoRA). Asked for CUDA where torch has none, it stops
    with one line before running anything."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--model",
                           "smollm2-135m", "--seq-len", "64", "--batch-size", "1", "--steps", "2", "--cases",
                           "full:fp32:adamw-8bit:gc,lora:fp32:adamw", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    assert [c["name"] for c in cases] == ["full:fp32:adamw-8bit:gc", "lora:fp32:adamw"]
    assert all(abs(c["error_percent"]) <= 10 and c["measured_gib"] > 0 for c in cases), cases
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 1 and proc.stderr.strip().startswith("gpu_check: torch") \
            and "sees no CUDA device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
