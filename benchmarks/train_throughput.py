"""tuneoff's training loop against what users would otherwise run, on the same model, data, method,
batch and token budget: real (non-padding) tokens per second, peak memory, wall time, and the share of
the machine's matmul peak each reaches.

    .venv/bin/python benchmarks/train_throughput.py --project PROJECT --task extraction \\
        --methods full,lora,qlora --impls tuneoff,hf-fp32,hf-bf16,trl --rounds 2 --steps 8 \\
        --out benchmarks/results/train_throughput_extraction.json

`--project` is a project that has run prepare (and quantize, for qlora): models/base, models/base-nf4,
data/prepared/<task>/ (train.jsonl, val.safetensors, meta.json). The train settings (batch_size, seed,
lr, warmup, LoRA rank/alpha/dropout/targets, precision) come from `--params` (this repo's params.yaml).

Implementations, each (impl, method) run in its own fresh subprocess, the impl order rotating every round:

  tuneoff   tuneoff.training.loop.train() on rows packed by tuneoff.data.packing.pack from train.jsonl, exactly as the
            prepare and train stages do (checked against the prepared train.safetensors when present),
            the model from tuneoff.modeling.methods.build.
  hf-fp32   transformers' Trainer, batches padded to the longest example (labels padded with -100, as
  hf-bf16   DataCollatorForSeq2Seq does), in fp32 and with bf16=True (autocast; qlora computes in bf16).
            Each Trainer step gets exactly the examples of the matching tuneoff step (the segments of
            its packed rows), so steps, examples per step and real tokens are identical; only the
            order of the steps is the Trainer's own shuffle.
  trl       TRL's SFTTrainer with packing (best-fit decreasing, which turns on padding-free batches), on the
            same examples (one epoch over the list of examples of the planned steps), batch_size packed rows
            of seq_len per step, tuneoff's precision, LoRA through its peft_config.
  tuneoff+<variant>
            tuneoff with one change (VARIANTS below: bf16, fused or foreach AdamW, the output layer on
            every position, the whole-row masked attention, torch.compile, one thread, PEFT's dropout
            mask, the system's malloc), to measure what each of the loop's choices gives.
  <baseline>+tcmalloc
            a baseline started on tcmalloc, as tuneoff's train stage is (tuneoff/training/allocator.py), so the
            allocator's share of the difference shows. The targets are judged against the baselines
            as users run them (the system's malloc); the summary gives the ratio to HF on tcmalloc apart.

tuneoff runs on the allocator `train.common.allocator` names, as the train stage does (tcmalloc
where the machine has it); the baselines on the system's malloc unless `+tcmalloc`.

Every baseline builds its model like tuneoff (fp32 master weights, the same LoraConfig, the saved
NF4 base for qlora, use_cache off, the project's gradient_checkpointing) and trains with AdamW at
the method's lr, the cosine schedule with the same warmup fraction, weight decay and grad clipping;
no eval, no saving, no logging integrations. Real tokens are counted as batches are collated, not
assumed: a run whose count differs from the planned budget fails.

Measured per run: train_seconds (the optimizer loop: tuneoff's own timer; the Trainer's
on_train_begin..on_train_end), wall_seconds (model build + trainer set-up + training), peak memory
from after the model is built to the end of training (process VmHWM reset via /proc/self/clear_refs
on a CPU, torch.cuda.max_memory_allocated on a GPU), final train loss.

Achieved FLOP/s counts the same useful work for every impl: real tokens x F, with F =
tuneoff.estimator.throughput.flops_per_position for an unpacked example of the task's mean length (causal
attention within it), the output layer on the supervised share of positions only, no gradient
checkpointing recompute: roughly 6N per token for full and 4N for LoRA/QLoRA (N = decoder Linear
weights), plus attention, head and adapters (formulas: tuneoff/estimator/throughput.py). Work an impl does
beyond that (padding, the output layer on prompt positions, packed-row attention) lowers its
utilisation. The peak is what a 2048 x 2048 matmul reaches here (fp32, and bf16 on a GPU or a CPU with
bf16 instructions, same thread count; on a GPU also 8192 x 8192 bf16), measured by this script before
the runs.

On a CPU without bf16 instructions (avx512_bf16, amx_bf16) bf16 runs in a slow fallback, so a timing
would measure the fallback, not the method, and take many minutes: there the script has no bf16 peak
and refuses the impls that train in bf16 (hf-bf16, hf-bf16+tcmalloc, tuneoff+bf16; every impl that
follows the params if they say precision: bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneoff.core.methods import METHODS  # noqa: E402

IMPLS = ("tuneoff", "hf-fp32", "hf-bf16", "trl")
BASELINES = IMPLS[1:]
# tuneoff with one change, to measure what an optimisation gives: impl "tuneoff+<variant>"
VARIANTS = {
    "bf16": "bf16 autocast (precision: bf16)",
    "fp32": "fp32 (precision: fp32)",
    "fused-adamw": "torch.optim.AdamW(fused=True)",
    "foreach-adamw": "torch.optim.AdamW(foreach=True, fused=False)",
    "full-logits": "the output layer on every position, not only the supervised ones",
    "masked-attention": "SDPA over the whole packed row with the block-diagonal mask, not per example",
    "compile": "torch.compile(model) before training (compile time counts in train_seconds)",
    "1-thread": "torch.set_num_threads(1)",
    "torch-dropout": "LoRA's nn.Dropout as PEFT builds it, not tuneoff.training.dropout.Dropout's cheaper mask",
    "system-malloc": "the system's malloc (glibc), with the heap trimmed after each QLoRA step, not tcmalloc",
}


# ---------------------------------------------------------------- data: the same examples for everyone

def load_plan(project: Path, task: str, params_path: Path, steps: int | None) -> dict:
    """Tokenized examples, tuneoff's packed rows, and the steps every impl trains on."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tuneoff.core.params import CommonTrainParams, read_params, section
    from tuneoff.core.records import read_jsonl
    from tuneoff.data.packing import pack, tokenize_chat
    from tuneoff.training.loop import plan_steps

    prepared = project / "data/prepared" / task
    meta = json.loads((prepared / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(project / "models/base")
    examples = read_jsonl(prepared / "train.jsonl")
    packed = pack([tokenize_chat(tokenizer, ex["messages"]) for ex in examples], meta["seq_len"], tokenizer.pad_token_id)
    rows = {k: v.long() for k, v in packed.tensors().items()}
    if (prepared / "train.safetensors").is_file():  # the rows the train stage reads: must be these
        stored = load_file(prepared / "train.safetensors")
        if any(k not in stored or not torch.equal(stored[k].long(), rows[k]) for k in rows):
            raise SystemExit(f"{prepared}/train.safetensors differs from packing train.jsonl again: rerun prepare@{task}")
    common = section(CommonTrainParams, "train", "common", data=read_params(params_path))
    plan = plan_steps(rows["real_tokens"], common.batch_size, common.token_budget, common.seed)
    if steps:
        plan = plan[:steps]
    budget = sum(int(rows["real_tokens"][idx].sum()) for idx in plan)  # train() then plans exactly these steps
    return {"rows": rows, "plan": plan, "budget": budget, "seq_len": meta["seq_len"], "common": common,
            "tokenizer": tokenizer}


def row_examples(rows: dict, r: int) -> list[dict]:
    """The examples packed in row r, as a Trainer takes them: input_ids and labels (-100 where no loss).
    Positions restart at 0 per example; labels[j] = targets[j - 1] (the packed targets are shifted)."""
    real = int(rows["real_tokens"][r])
    pos, ids, tgt = (rows[k][r, :real].tolist() for k in ("position_ids", "input_ids", "targets"))
    starts = [i for i, p in enumerate(pos) if p == 0] + [real]
    return [{"input_ids": ids[a:b], "labels": [-100] + tgt[a : b - 1]} for a, b in zip(starts, starts[1:])]


def step_batches(plan_data: dict) -> list[list[dict]]:
    return [[ex for r in idx.tolist() for ex in row_examples(plan_data["rows"], r)] for idx in plan_data["plan"]]


# ---------------------------------------------------------------- FLOPs and the machine's matmul peak

def useful_flops_per_token(project: Path, method: str, params, plan_data: dict, precision: str, dev_type: str) -> float:
    """F of the module docstring: flops_per_position for one unpacked example of the mean length."""
    from tuneoff.estimator import memory, throughput
    from tuneoff.estimator.architectures import from_config

    batches = step_batches(plan_data)
    examples = [ex for batch in batches for ex in batch]
    mean_len = sum(len(ex["input_ids"]) for ex in examples) / len(examples)
    mean_supervised = sum(sum(l != -100 for l in ex["labels"]) for ex in examples) / len(examples)
    config = json.loads((project / "models/base/config.json").read_text())
    lora = METHODS[method].adapter
    setup = memory.Setup(method=method, batch_size=1, seq_len=max(1, round(mean_len)), precision=precision,
                         device=dev_type, optimizer="adamw", gradient_checkpointing=False,
                         rank=params.rank if lora else 16,
                         target_modules=memory.expand_targets(params.target_modules) if lora else ("q_proj", "v_proj"),
                         dropout=params.dropout if lora else 0.0, supervised_positions=max(1, round(mean_supervised)),
                         attention="causal", double_quant=True, gpus=1)
    return throughput.flops_per_position(from_config(config, "base"), setup)


def runs_bf16(impl: str, precision: str) -> bool:
    """Whether `impl` trains in bf16, given the precision the params resolve to on this device."""
    base_impl, _, variant = impl.partition("+")
    if base_impl in ("hf-fp32", "hf-bf16"):
        return base_impl == "hf-bf16"
    if base_impl == "tuneoff" and variant in ("bf16", "fp32"):
        return variant == "bf16"
    return precision == "bf16"  # tuneoff, its other variants and trl train in the params' precision


def bf16_refusal(impls: list[str], precision: str, dev_type: str, flags: set[str] | None = None) -> str | None:
    """Why these impls cannot be timed here, or None: bf16 ones on a CPU without bf16 instructions
    (`flags`: /proc/cpuinfo's, this machine's by default)."""
    from tuneoff.core import measure

    bf16 = [impl for impl in impls if runs_bf16(impl, precision)]
    if not bf16 or dev_type == "cuda" or measure.cpu_has_bf16(flags):
        return None
    always = [impl for impl in bf16 if runs_bf16(impl, "fp32")]  # bf16 whatever the params say
    fixes = ([f"leave {', '.join(always)} out of --impls"] if always else []) + (
        ["set train.common.precision to fp32 or auto in --params"] if len(always) < len(bf16) else [])
    return (f"{', '.join(bf16)} would train in bf16, but this CPU has no bf16 instructions (avx512_bf16, amx_bf16): "
            f"bf16 would run in a slow fallback; {' and '.join(fixes)}")


def matmul_peak() -> dict:
    """FLOP/s of a large square matmul, fp32 and bf16 (best of a few timed runs after warm-up). bf16 is
    timed on a GPU and on a CPU with bf16 instructions; elsewhere `bf16_flops` is None (no bf16 run is
    allowed there)."""
    import torch

    from tuneoff.core import measure

    dev = measure.device()
    sizes = [("fp32", torch.float32, 2048)]
    if dev.type == "cuda" or measure.cpu_has_bf16():
        sizes.append(("bf16", torch.bfloat16, 2048))
    if dev.type == "cuda":
        sizes.append(("bf16_8192", torch.bfloat16, 8192))
    out = {"device": measure.device_name(dev), "threads": torch.get_num_threads(), "bf16_flops": None}
    for name, dtype, n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
        best = math.inf
        for i in range(6):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3 if dev.type == "cpu" else 20):
                a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is warm-up
                best = min(best, (time.perf_counter() - t) / (3 if dev.type == "cpu" else 20))
        out[f"{name}_flops"] = 2 * n**3 / best
    return out


# ---------------------------------------------------------------- one run, in a fresh process

def worker(impl: str, method: str, project: Path, task: str, params_path: Path, steps: int | None) -> dict:
    import torch

    from tuneoff.core import measure
    from tuneoff.core.params import read_params, section
    from tuneoff.modeling import methods
    from tuneoff.training import allocator

    plan_data = load_plan(project, task, params_path, steps)
    common = plan_data["common"].model_copy(update={"token_budget": plan_data["budget"], "eval_every": 0})
    params = section(methods.PARAMS_BY_METHOD[method], "train", method, data=read_params(params_path))
    dev = measure.device()
    precision = measure.resolve_precision(common.precision, dev)
    torch.manual_seed(common.seed)
    peak = measure.PeakMemory(dev)
    start = time.perf_counter()
    base_impl, _, variant = impl.partition("+")
    if base_impl == "tuneoff" and variant:
        precision = apply_variant(variant, precision)
    if impl.startswith("tuneoff"):
        model = methods.build(method, params, project / METHODS[method].base, precision, dev,
                              common.gradient_checkpointing)
    elif impl.startswith("hf"):
        # float bases keep fp32 master weights (bf16=True autocasts); the NF4 base computes in bf16 under bf16=True
        build_precision = "bf16" if base_impl == "hf-bf16" and METHODS[method].quantized else "fp32"
        model = methods.build(method, params, project / METHODS[method].base, build_precision, dev,
                              common.gradient_checkpointing)
    else:
        model = trl_base(method, project, precision, dev)
    load_seconds = time.perf_counter() - start
    if not impl.startswith("tuneoff"):  # the baselines' libraries are loaded before the peak is reset, as tuneoff's are
        import transformers.trainer  # noqa: F401
        if base_impl == "trl":
            import datasets  # noqa: F401, E401
    if variant == "compile":
        model = torch.compile(model)
    peak.reset()
    if impl.startswith("tuneoff"):
        out = run_tuneoff(model, plan_data, common, params, dev, precision)
    elif impl.startswith("hf"):
        out = run_hf(model, plan_data, common, params, base_impl == "hf-bf16")
    else:
        out = run_trl(model, plan_data, common, params, method, precision)
    mem = peak.read()
    if out["real_tokens"] != plan_data["budget"]:
        raise SystemExit(f"{impl}/{method} trained on {out['real_tokens']} real tokens, not the planned {plan_data['budget']}")
    flops_per_token = useful_flops_per_token(project, method, params, plan_data, precision, dev.type)
    return {"impl": impl, "method": method, "precision": out.pop("precision", precision), "allocator": allocator.in_use(),
            "load_seconds": round(load_seconds, 3), "wall_seconds": round(time.perf_counter() - start, 3),
            **out, "tokens_per_second": round(out["real_tokens"] / out["train_seconds"], 2),
            "peak_memory_bytes": mem["peak_bytes"], "memory_measure": mem["measure"],
            "useful_flops_per_token": round(flops_per_token),
            "achieved_flops": out["real_tokens"] * flops_per_token / out["train_seconds"]}


def apply_variant(variant: str, precision: str) -> str:
    """Patch tuneoff for one VARIANTS entry (this process only); returns the precision to train in."""
    import contextlib
    import functools

    import torch

    from tuneoff.training import loop as train

    if variant in ("bf16", "fp32"):
        return variant
    if variant in ("fused-adamw", "foreach-adamw"):
        if variant == "fused-adamw":
            train.make_optimizer = functools.partial(train.make_optimizer, fused=True)
        else:  # on a CPU torch's default is the per-tensor loop
            torch.optim.AdamW = functools.partial(torch.optim.AdamW, foreach=True)
    elif variant == "full-logits":
        batch_loss = train.batch_loss

        class FullLogits:  # the model with its output layer on every position; the supervised ones picked after
            def __init__(self, model):
                self.model, self.config = model, model.config

            def __call__(self, logits_to_keep, **inputs):
                out = self.model(**inputs)
                out.logits = out.logits[logits_to_keep]
                return out

        train.batch_loss = lambda model, *args: batch_loss(FullLogits(model), *args)
    elif variant == "masked-attention":  # the model keeps transformers' SDPA, over whole packed rows
        train.attention.packed = contextlib.nullcontext
    elif variant == "1-thread":
        torch.set_num_threads(1)
    elif variant == "torch-dropout":
        train.dropout.cheaper = contextlib.nullcontext
    return precision


def run_tuneoff(model, plan_data, common, params, dev, precision) -> dict:
    from tuneoff.training.loop import train

    val = {k: v[:1] for k, v in plan_data["rows"].items()}  # train() checks val loss before and after: keep it to one row
    with tempfile.TemporaryDirectory() as logs:
        result = train(model, plan_data["rows"], val, common, params.lr, dev, precision, Path(logs), "tuneoff")
    return {"steps": result.steps, "real_tokens": result.real_tokens, "loss_tokens": result.loss_tokens,
            "train_seconds": round(result.train_seconds, 3), "final_train_loss": round(result.final_train_loss, 6)}


class Counter:
    """Wraps a collator: counts the real (non-padding) and supervised tokens it hands the model."""

    def __init__(self, collate):
        self.collate, self.real, self.loss = collate, 0, 0

    def __call__(self, items):
        batch = self.collate(items)
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())  # padding-free: all real
        self.loss += int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels: position 0 never counts
        return batch


def pad_to_longest(pad_id: int):
    """DataCollatorForSeq2Seq's padding (right, to the longest in the batch, labels with -100), applied to one
    dataset item that is a whole step's examples."""
    import torch

    def collate(items):
        examples = items[0]
        longest = max(len(ex["input_ids"]) for ex in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def timer_callback():
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    return Timer()


def trainer_args(common, lr: float, steps: int, bf16: bool, out_dir: str, **extra) -> dict:
    import torch

    return dict(output_dir=out_dir, learning_rate=lr, lr_scheduler_type="cosine",
                warmup_steps=math.ceil(common.warmup_fraction * steps), weight_decay=common.weight_decay,
                max_grad_norm=common.max_grad_norm, optim="adamw_torch", seed=common.seed, bf16=bf16,
                use_cpu=not torch.cuda.is_available(),  # bf16=True on a CPU needs it said
                gradient_checkpointing=common.gradient_checkpointing, logging_steps=common.log_every,
                report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                **extra)


def trainer_result(trainer, timer, counter) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "real_tokens": counter.real, "loss_tokens": counter.loss,
            "train_seconds": round(timer.seconds, 3), "final_train_loss": round(losses[-1], 6) if losses else None}


def run_hf(model, plan_data, common, params, bf16: bool) -> dict:
    from transformers import Trainer, TrainingArguments

    batches = step_batches(plan_data)  # one dataset item per optimizer step: exactly tuneoff's examples
    counter = Counter(pad_to_longest(plan_data["tokenizer"].pad_token_id))
    timer = timer_callback()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(**trainer_args(common, params.lr, len(batches), bf16, out_dir,
                                                per_device_train_batch_size=1, num_train_epochs=1,
                                                remove_unused_columns=False))
        trainer = Trainer(model=model, args=args, train_dataset=batches, data_collator=counter, callbacks=[timer])
        trainer.train()
    return trainer_result(trainer, timer, counter) | {"precision": "bf16" if bf16 else "fp32"}


def trl_base(method: str, project: Path, precision: str, dev):
    """The model as a TRL user passes it: the plain base (LoRA comes from SFTTrainer's peft_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneoff.modeling import methods, quantize

    base = project / METHODS[method].base
    if METHODS[method].quantized:
        model = quantize.load(base, methods.DTYPES[precision], dev)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev)
    model.config.use_cache = False
    return model


def run_trl(model, plan_data, common, params, method: str, precision: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    examples = [ex for batch in step_batches(plan_data) for ex in batch]
    dataset = Dataset.from_list(examples)  # pre-tokenized, labels given: TRL only packs it
    # TRL packs like tuneoff (best-fit decreasing into rows of seq_len), so about as many rows result
    rows_estimate = math.ceil(sum(len(ex["input_ids"]) for ex in examples) / plan_data["seq_len"])
    steps_estimate = math.ceil(rows_estimate / common.batch_size)
    peft_config = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
        target_modules=list(params.target_modules), task_type="CAUSAL_LM") if METHODS[method].adapter else None
    counter, timer = None, timer_callback()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(**trainer_args(common, params.lr, steps_estimate, precision == "bf16", out_dir,
                                        per_device_train_batch_size=common.batch_size, num_train_epochs=1,
                                        packing=True, packing_strategy="bfd", padding_free=True,
                                        max_length=plan_data["seq_len"], dataset_num_proc=None))
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=plan_data["tokenizer"],
                             peft_config=peft_config, callbacks=[timer])
        counter = trainer.data_collator = Counter(trainer.data_collator)  # the dataloader is built in train()
        trainer.train()
    return trainer_result(trainer, timer, counter) | {"precision": precision,
                                                       "packed_rows": len(trainer.train_dataset)}


# ---------------------------------------------------------------- the driver

def start_on(impl: str, params_path: Path) -> dict[str, str]:
    """The environment an impl's process starts with: its allocator (tuneoff/training/allocator.py)."""
    from tuneoff.core.params import CommonTrainParams, section
    from tuneoff.training import allocator

    base_impl, _, variant = impl.partition("+")
    if base_impl == "tuneoff":
        choice = "system" if variant == "system-malloc" else section(CommonTrainParams, "train", "common", path=params_path).allocator
    else:
        choice = "tcmalloc" if variant == "tcmalloc" else "system"
    return allocator.environment(choice)


def summarise(runs: list[dict], methods: list[str], impls: list[str]) -> dict:
    """Per method: each impl's median over rounds, and tuneoff's ratios to the baselines."""
    out = {}
    for method in methods:
        med = {}
        for impl in impls:
            rs = [r for r in runs if r["method"] == method and r["impl"] == impl]
            if rs:
                med[impl] = {k: statistics.median(r[k] for r in rs) for k in
                             ("tokens_per_second", "peak_memory_bytes", "train_seconds", "wall_seconds",
                              "achieved_flops")}
                utilisation = [r["utilisation"] for r in rs if r["utilisation"] is not None]  # None: no peak to judge by
                med[impl]["utilisation"] = statistics.median(utilisation) if utilisation else None
                med[impl]["real_tokens"] = rs[0]["real_tokens"]
        entry = {"median": med}

        def fastest(names):
            return max((i for i in names if i in med), default=None, key=lambda i: med[i]["tokens_per_second"])

        # the targets' baselines as users run them (the system's malloc), and apart from them HF on
        # tcmalloc, to show how much of the difference the allocator alone makes
        hf = fastest(("hf-fp32", "hf-bf16"))
        compared = {"faster_hf": hf, "trl": fastest(("trl",)),
                    "faster_hf_on_tcmalloc": fastest(("hf-fp32+tcmalloc", "hf-bf16+tcmalloc"))}
        for key, other in compared.items():
            if "tuneoff" in med and other:
                entry[key] = other
                entry[f"speedup_vs_{key}"] = round(med["tuneoff"]["tokens_per_second"] / med[other]["tokens_per_second"], 3)
                entry[f"memory_ratio_vs_{key}"] = round(med["tuneoff"]["peak_memory_bytes"] / med[other]["peak_memory_bytes"], 3)
        # the issue's targets: >= 1.3x the faster HF setting, no slower than TRL, peak memory no higher than either
        if "speedup_vs_faster_hf" in entry:
            baselines = [i for i in (hf, compared["trl"]) if i]
            entry["meets_targets"] = (entry["speedup_vs_faster_hf"] >= 1.3 and entry.get("speedup_vs_trl", 1.0) >= 1.0
                                      and all(med["tuneoff"]["peak_memory_bytes"] <= med[i]["peak_memory_bytes"]
                                              for i in baselines))
        out[method] = entry
    return out


def table(result: dict) -> str:
    peak = result["peak"]
    bf16 = f"{peak['bf16_flops'] / 1e9:.0f} bf16" if peak["bf16_flops"] else "bf16 not timed: no bf16 instructions"
    lines = [f"{result['label']}\n", f"task `{result['task']}`, {result['steps']} steps, {result['budget']:,} real tokens "
             f"per run, {result['rounds']} round(s), medians; matmul peak {peak['fp32_flops'] / 1e9:.0f} "
             f"GFLOP/s fp32, {bf16} ({peak['device']}, {peak['threads']} threads)\n",
             "| method | impl | real tok/s | peak MiB | train s | wall s | utilisation | vs tuneoff tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method, entry in result["summary"].items():
        med = entry["median"]
        for impl, m in med.items():
            rel = m["tokens_per_second"] / med["tuneoff"]["tokens_per_second"] if "tuneoff" in med else float("nan")
            utilisation = "n/a" if m["utilisation"] is None else f"{m['utilisation']:.1%}"
            lines.append(f"| {method} | {impl} | {m['tokens_per_second']:.0f} | {m['peak_memory_bytes'] / 2**20:.0f} | "
                         f"{m['train_seconds']:.2f} | {m['wall_seconds']:.2f} | {utilisation} | {rel:.2f} |")
    lines.append("")
    for method, entry in result["summary"].items():
        if "speedup_vs_faster_hf" in entry:
            trl = (f", {entry['speedup_vs_trl']:.2f}x TRL (memory {entry['memory_ratio_vs_trl']:.2f}x)"
                   if "speedup_vs_trl" in entry else ", TRL not run")
            lines.append(f"- {method}: tuneoff {entry['speedup_vs_faster_hf']:.2f}x the faster HF setting "
                         f"({entry['faster_hf']}, memory {entry['memory_ratio_vs_faster_hf']:.2f}x){trl}; "
                         f"targets met: {entry['meets_targets']}")
        if "speedup_vs_faster_hf_on_tcmalloc" in entry:
            lines.append(f"  - against HF on tcmalloc too ({entry['faster_hf_on_tcmalloc']}): "
                         f"{entry['speedup_vs_faster_hf_on_tcmalloc']:.2f}x, memory {entry['memory_ratio_vs_faster_hf_on_tcmalloc']:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="the first N planned steps; 0 = the whole token budget")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="JSON; a .md table is written beside it")
    ap.add_argument("--label", default="", help="a line saying what this run is (written first in the table)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # impl:method, inside a fresh subprocess
    args = ap.parse_args()
    project = args.project.resolve()
    if args.worker:
        impl, method = args.worker.split(":")
        print(json.dumps(worker(impl, method, project, args.task, args.params.resolve(), args.steps or None)))
        return

    methods, impls = args.methods.split(","), args.impls.split(",")
    allowed_impls = [*IMPLS, *(f"tuneoff+{v}" for v in VARIANTS), *(f"{b}+tcmalloc" for b in BASELINES)]
    for name, given, allowed in (("method", methods, METHODS), ("impl", impls, allowed_impls)):
        if bad := [x for x in given if x not in allowed]:
            sys.exit(f"unknown {name} {bad}; allowed: {list(allowed)}")
    if "trl" in impls:
        import importlib.util
        if importlib.util.find_spec("trl") is None:
            sys.exit("impl trl needs TRL: pip install trl (or leave trl out of --impls)")
    from tuneoff.core import measure
    from tuneoff.core.params import CommonTrainParams, section

    dev = measure.device()
    common = section(CommonTrainParams, "train", "common", path=args.params)
    if refusal := bf16_refusal(impls, measure.resolve_precision(common.precision, dev), dev.type):
        sys.exit(refusal)
    peak = matmul_peak()
    runs = []
    for rnd in range(args.rounds):
        order = impls[rnd % len(impls):] + impls[: rnd % len(impls)]  # rotate so no impl always runs first
        for method in methods:
            for impl in order:
                cmd = [sys.executable, __file__, "--worker", f"{impl}:{method}", "--project", str(project), "--task",
                       args.task, "--steps", str(args.steps), "--params", str(args.params.resolve()), "--out", os.devnull]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **start_on(impl, args.params.resolve())})
                if proc.returncode:
                    sys.exit(f"{impl}/{method} failed:\n{proc.stderr[-4000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                ref = peak["bf16_flops" if run["precision"] == "bf16" else "fp32_flops"]
                run.update(round=rnd, utilisation=run["achieved_flops"] / ref if ref else None)
                if "bf16_8192_flops" in peak:  # on a GPU, also against its large-matmul bf16 peak
                    run["utilisation_vs_bf16_peak"] = run["achieved_flops"] / peak["bf16_8192_flops"]
                runs.append(run)
                print(f"round {rnd} {method:5} {impl:8} {run['tokens_per_second']:8.0f} tok/s  "
                      f"peak {run['peak_memory_bytes'] / 2**20:6.0f} MiB  {run['train_seconds']:.2f} s", file=sys.stderr)
    budgets = {r["real_tokens"] for r in runs}
    if len(budgets) != 1:
        sys.exit(f"real token budgets differ between runs: {sorted(budgets)}")
    result = {"label": args.label or "benchmark run", "task": args.task, "project": str(project),
              "steps": next((r["steps"] for r in runs if r["impl"] != "trl"), None), "budget": budgets.pop(),
              "rounds": args.rounds, "methods": methods, "impls": impls, "peak": peak, "runs": runs,
              "summary": summarise(runs, methods, impls)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
