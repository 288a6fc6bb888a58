"""tuneoff's training loop against what users would otherwise run, on the same model, data, method,
batch and token budget: real (non-padding) tokens per second, peak memory, wall time, and the share of
the machine's matmul peak each reaches.

    .venv/bin/python benchmarks/train_throughput.py --project PROJECT --task extraction \\
        --methods full,lora,qlora --impls tuneoff,hf-fp32,hf-fp32-keep,trl,trl-packed,tuneoff+tcmalloc \\
        --rounds 5 --steps 8 \\
        --out benchmarks/results/train_throughput_extraction.json

`--project` is a project that has run prepare (and quantize, for qlora): models/base, models/base-nf4,
data/prepared/<task>/ (train.jsonl, val.safetensors, meta.json). The train settings (batch_size, seed,
lr, warmup, LoRA rank/alpha/dropout/targets, precision) come from `--params` (this repo's params.yaml).

Implementations, each (impl, method) run in its own fresh subprocess, the impl order rotating every round.
Every one gets the same examples (those of the planned steps: `examples_sha256` in each run proves it)
and so the same real-token budget, and each batches them its own way:

  tuneoff   tuneoff.training.loop.train() on rows packed by tuneoff.data.packing.pack from train.jsonl, exactly as the
            prepare and train stages do (checked against the prepared train.safetensors when present),
            the model from tuneoff.modeling.methods.build.
  hf-fp32   transformers' Trainer as a competent user configures it: the examples as a dataset, its own batch
  hf-bf16   size (the mean number of examples in a tuneoff step, so about as many steps), length-grouped
            batches (train_sampling_strategy="group_by_length"), padded to the longest in each batch
            (DataCollatorForSeq2Seq); fp32, and bf16=True (autocast; qlora computes in bf16).
  hf-fp32-keep, hf-bf16-keep
            hf-fp32 (hf-bf16) with the output layer only on the positions that have a label (a compute_loss override
            passing logits_to_keep), the one trick of tuneoff's loop a Trainer user can copy in a few lines:
            the rows apart show what it gives and what the rest of the loop gives.
  trl       TRL's SFTTrainer in its best CPU setting: padded batches, no packing, length-grouped, the same
            batch size as hf; LoRA through its peft_config.
  trl-packed
            SFTTrainer with packing (best-fit decreasing, padding-free rows of seq_len, batch_size rows per step).
  tuneoff+<variant>
            tuneoff with one change (VARIANTS below: bf16, fused or foreach AdamW, the output layer on
            every position, the whole-row masked attention, torch.compile, one thread, PEFT's dropout
            mask), to measure what each of the loop's choices gives.
  <impl>+tcmalloc
            an impl started on tcmalloc (tuneoff/training/allocator.py). Every other impl, tuneoff included,
            starts on the system's malloc, so the headline compares like with like; tuneoff+tcmalloc is the
            train stage as it ships (train.common.allocator: auto picks tcmalloc where it is installed).

The same warm-up for everyone: each impl's first optimizer step is not timed (it pays one-off costs:
lazy initialisation, the allocator growing its pools). tokens_per_second = the real tokens of steps 2..n /
the time from the end of step 1 to the end of step n (tuneoff: its per-step log, log_every = 1; the
Trainers: a callback at each step's end, with the per-batch real tokens the collator saw, in order).

Every baseline builds its model like tuneoff (fp32 master weights, the same LoraConfig, the saved
NF4 base for qlora, use_cache off, the project's gradient_checkpointing) and trains with AdamW at
the method's lr, the cosine schedule with the same warmup fraction, weight decay and grad clipping;
no eval, no saving, no logging integrations. Real tokens are counted as batches are collated, not
assumed: a run whose count differs from the planned budget fails.

Measured per run: timed_seconds and timed_tokens (above), train_seconds (the whole optimizer loop: tuneoff's
own timer; the Trainer's on_train_begin..on_train_end), wall_seconds (model build + trainer set-up + training), peak memory
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

from tuneoff.core.methods import METHODS  # noqa: E402

IMPLS = ("tuneoff", "hf-fp32", "hf-bf16", "hf-fp32-keep", "hf-bf16-keep", "trl", "trl-packed")
BASELINES = IMPLS[1:]
HF, TRL = ("hf-fp32", "hf-bf16", "hf-fp32-keep", "hf-bf16-keep"), ("trl", "trl-packed")
# tuneoff with one change, to measure what an optimisation gives: impl "tuneoff+<variant>"
VARIANTS = {
    "bf16": "bf16 autocast (precision: bf16)",
    "fp32": "fp32 (precision: fp32)",
    "per-tensor-adamw": "torch.optim.AdamW(fused=False), the per-tensor loop (tuneoff's is fused)",
    "foreach-adamw": "torch.optim.AdamW(foreach=True, fused=False)",
    "full-logits": "the output layer on every position, not only the supervised ones",
    "masked-attention": "SDPA over the whole packed row with the block-diagonal mask, not per example",
    "compile": "torch.compile(model) before training (it compiles in the untimed first step)",
    "1-thread": "torch.set_num_threads(1)",
    "torch-dropout": "LoRA's nn.Dropout as PEFT builds it, not tuneoff.training.dropout.Dropout's cheaper mask",
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


def examples_sha256(examples: list[list[int]]) -> str:
    """The examples an impl trained on (their real token ids), as a multiset: equal for every impl."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(json.dumps(ids) for ids in examples)).encode()).hexdigest()


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
                         rank=params.rank if lora else None,
                         target_modules=memory.expand_targets(params.target_modules) if lora else None,
                         dropout=params.dropout if lora else None, supervised_positions=max(1, round(mean_supervised)),
                         attention="causal", double_quant=True, gpus=1, sharded=True, accumulates=False)
    return throughput.flops_per_position(from_config(config, "base"), setup)


def runs_bf16(impl: str, precision: str) -> bool:
    """Whether `impl` trains in bf16, given the precision the params resolve to on this device."""
    base_impl, _, variant = impl.partition("+")
    if base_impl.startswith("hf"):
        return base_impl.startswith("hf-bf16")
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
    """FLOP/s of a large square matmul, fp32 and bf16 (timing.matmul_flops). bf16 is timed on a GPU and on a
    CPU with bf16 instructions; elsewhere `bf16_flops` is None (no bf16 run is allowed there)."""
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
        out[f"{name}_flops"] = timing.matmul_flops(n, dtype, dev)
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
    if base_impl == "tuneoff" and variant in VARIANTS:
        precision = apply_variant(variant, precision)
    if impl.startswith("tuneoff"):
        model = methods.build(method, params, project / METHODS[method].base, precision, dev,
                              common.gradient_checkpointing)
    elif impl.startswith("hf"):
        # float bases keep fp32 master weights (bf16=True autocasts); the NF4 base computes in bf16 under bf16=True
        build_precision = "bf16" if base_impl.startswith("hf-bf16") and METHODS[method].quantized else "fp32"
        model = methods.build(method, params, project / METHODS[method].base, build_precision, dev,
                              common.gradient_checkpointing)
    else:
        model = trl_base(method, project, precision, dev)
    load_seconds = time.perf_counter() - start
    if not impl.startswith("tuneoff"):  # the baselines' libraries are loaded before the peak is reset, as tuneoff's are
        import transformers.trainer  # noqa: F401
        if base_impl.startswith("trl"):
            import datasets  # noqa: F401, E401
    if variant == "compile":
        model = torch.compile(model)
    peak.reset()
    if impl.startswith("tuneoff"):
        out = run_tuneoff(model, plan_data, common, params, dev, precision)
    elif impl.startswith("hf"):
        out = run_hf(model, plan_data, common, params, bf16=base_impl.startswith("hf-bf16"), keep=base_impl.endswith("-keep"))
    else:
        out = run_trl(model, plan_data, common, params, method, precision, packed=base_impl == "trl-packed")
    mem = peak.read()
    if out["real_tokens"] != plan_data["budget"]:
        raise SystemExit(f"{impl}/{method} trained on {out['real_tokens']} real tokens, not the planned {plan_data['budget']}")
    flops_per_token = useful_flops_per_token(project, method, params, plan_data, precision, dev.type)
    return {"impl": impl, "method": method, "precision": out.pop("precision", precision), "allocator": allocator.in_use(),
            "load_seconds": round(load_seconds, 3), "wall_seconds": round(time.perf_counter() - start, 3),
            **out, "tokens_per_second": round(out["timed_tokens"] / out["timed_seconds"], 2),

            "peak_memory_bytes": mem["peak_bytes"], "memory_measure": mem["measure"],
            "useful_flops_per_token": round(flops_per_token),
            "achieved_flops": out["timed_tokens"] * flops_per_token / out["timed_seconds"]}


def apply_variant(variant: str, precision: str) -> str:
    """Patch tuneoff for one VARIANTS entry (this process only); returns the precision to train in."""
    import contextlib
    import functools

    import torch

    from tuneoff.modeling import loss
    from tuneoff.training import loop as train

    if variant in ("bf16", "fp32"):
        return variant
    if variant in ("per-tensor-adamw", "foreach-adamw"):
        train.make_optimizer = functools.partial(train.make_optimizer, fused=False)
        if variant == "foreach-adamw":  # on a CPU torch's unfused default is the per-tensor loop
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

        # the loop's steps and its val passes (loss.eval_loss) both
        train.batch_loss = loss.batch_loss = lambda model, *args: batch_loss(FullLogits(model), *args)
    elif variant == "masked-attention":  # the model keeps transformers' SDPA, over whole packed rows
        train.attention.packed = contextlib.nullcontext
    elif variant == "1-thread":
        torch.set_num_threads(1)
    elif variant == "torch-dropout":
        train.dropout.cheaper = contextlib.nullcontext
    return precision


def timed(ends: list[float], tokens: list[int]) -> dict:
    """The same warm-up for every impl: steps 2..n, from the end of step 1 (`ends`: each step's end,
    `tokens`: each step's real tokens)."""
    return {"timed_seconds": round(ends[-1] - ends[0], 4), "timed_tokens": sum(tokens[1:len(ends)]),
            "first_step_tokens": tokens[0]}


class StepClock:
    """A tuneoff tracker that notes when each step ends (train() logs every step with log_every = 1)."""

    def __init__(self):
        self.ends, self.tokens = [], []

    def log(self, metrics: dict, step: int | None = None) -> None:
        if "train/tokens" in metrics:
            self.ends.append(time.perf_counter())
            self.tokens.append(metrics["train/tokens"] - sum(self.tokens))

    def __getattr__(self, name):  # the tracker's other methods: nothing to do
        return lambda *args, **kwargs: None


def run_tuneoff(model, plan_data, common, params, dev, precision) -> dict:
    from tuneoff.training.loop import train

    val = {k: v[:1] for k, v in plan_data["rows"].items()}  # train() checks val loss before and after: keep it to one row
    clock = StepClock()
    with tempfile.TemporaryDirectory() as logs:
        result = train(model, plan_data["rows"], val, common.model_copy(update={"log_every": 1}), params.rates[0], dev,
                       precision, Path(logs), "tuneoff", tracker=clock)
    return {"steps": result.steps, "real_tokens": result.real_tokens, "loss_tokens": result.loss_tokens,
            "train_seconds": round(result.train_seconds, 3), "final_train_loss": round(result.final_train_loss, 6),
            **timed(clock.ends, clock.tokens),
            "examples_sha256": examples_sha256([ex["input_ids"] for b in step_batches(plan_data) for ex in b])}


class Counter:
    """Wraps a collator: counts the real (non-padding) and supervised tokens it hands the model, per batch."""

    def __init__(self, collate):
        self.collate, self.real, self.loss, self.batches, self.examples = collate, 0, 0, [], []

    def __call__(self, items):
        batch = self.collate(items)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())  # padding-free: all real
        if mask is not None:
            self.examples += [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], mask)]
        else:  # one packed row: an example starts where position_ids restart at 0
            ids, pos = batch["input_ids"].flatten().tolist(), batch["position_ids"].flatten().tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
            self.examples += [ids[a:b] for a, b in zip(starts, starts[1:])]
        self.real += real
        self.batches.append(real)  # in the order the steps take them (the dataloader runs one batch ahead)
        self.loss += int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels: position 0 never counts
        return batch


def step_clock():
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    return Clock()


def trainer_args(common, lr: float, steps: int, bf16: bool, out_dir: str, **extra) -> dict:
    import torch

    return dict(output_dir=out_dir, learning_rate=lr, lr_scheduler_type="cosine",
                warmup_steps=math.ceil(common.warmup_fraction * steps), weight_decay=common.weight_decay,
                max_grad_norm=common.max_grad_norm, optim="adamw_torch_fused", seed=common.seed, bf16=bf16,
                use_cpu=not torch.cuda.is_available(),  # bf16=True on a CPU needs it said
                gradient_checkpointing=common.gradient_checkpointing, logging_steps=1,  # as tuneoff here: every step
                report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                **extra)


def trainer_result(trainer, clock, counter) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.state.global_step, "real_tokens": counter.real, "loss_tokens": counter.loss,
            "train_seconds": round(clock.seconds, 3), "final_train_loss": round(losses[-1], 6) if losses else None,
            **timed(clock.ends, counter.batches), "examples_sha256": examples_sha256(counter.examples)}


def own_batch_size(plan_data: dict) -> int:
    """The examples a Trainer takes per step: the mean number in a tuneoff step, so about as many steps."""
    batches = step_batches(plan_data)
    return max(1, round(sum(len(b) for b in batches) / len(batches)))


def keep_supervised_logits(trainer_class):
    """`trainer_class` with the output layer run only where a label is (logits_to_keep): the positions
    any example in the batch supervises, so the loss is the Trainer's own, token-mean cross-entropy."""
    import torch

    class Keep(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            targets = labels[:, 1:]  # position p predicts token p + 1
            keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
            outputs = model(**inputs, logits_to_keep=keep)
            picked = targets[:, keep]
            loss = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), picked.flatten(),
                                                     ignore_index=-100, reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else (picked != -100).sum())
            return (loss, outputs) if return_outputs else loss

    return Keep


def run_hf(model, plan_data, common, params, bf16: bool, keep: bool = False) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    examples = [ex for batch in step_batches(plan_data) for ex in batch]  # tuneoff's examples, HF's batches
    batch_size = own_batch_size(plan_data)
    counter = Counter(DataCollatorForSeq2Seq(plan_data["tokenizer"], padding="longest", label_pad_token_id=-100))
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(**trainer_args(common, params.rates[0], math.ceil(len(examples) / batch_size), bf16, out_dir,
                                                per_device_train_batch_size=batch_size, num_train_epochs=1,
                                                train_sampling_strategy="group_by_length", remove_unused_columns=False))
        trainer = (keep_supervised_logits(Trainer) if keep else Trainer)(
            model=model, args=args, train_dataset=examples, data_collator=counter, callbacks=[clock])
        trainer.train()
    return trainer_result(trainer, clock, counter) | {"precision": "bf16" if bf16 else "fp32", "batch_size": batch_size}


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


def run_trl(model, plan_data, common, params, method: str, precision: str, packed: bool) -> dict:
    """SFTTrainer padded (no packing, length-grouped, hf's batch size), or `packed` padding-free."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    examples = [ex for batch in step_batches(plan_data) for ex in batch]
    dataset = Dataset.from_list(examples)  # pre-tokenized, labels given
    if packed:  # TRL packs like tuneoff (best-fit decreasing into rows of seq_len), so about as many rows result
        rows_estimate = math.ceil(sum(len(ex["input_ids"]) for ex in examples) / plan_data["seq_len"])
        batch_size, steps_estimate = common.batch_size, math.ceil(rows_estimate / common.batch_size)
        how = dict(packing=True, packing_strategy="bfd", padding_free=True)
    else:
        batch_size = own_batch_size(plan_data)
        steps_estimate = math.ceil(len(examples) / batch_size)
        how = dict(packing=False, padding_free=False, train_sampling_strategy="group_by_length")
    peft_config = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
        target_modules=list(params.target_modules), task_type="CAUSAL_LM") if METHODS[method].adapter else None
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(**trainer_args(common, params.rates[0], steps_estimate, precision == "bf16", out_dir,
                                        per_device_train_batch_size=batch_size, num_train_epochs=1,
                                        max_length=plan_data["seq_len"], dataset_num_proc=None, **how))
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=plan_data["tokenizer"],
                             peft_config=peft_config, callbacks=[clock])
        counter = trainer.data_collator = Counter(trainer.data_collator)  # the dataloader is built in train()
        trainer.train()
    return trainer_result(trainer, clock, counter) | {"precision": precision, "batch_size": batch_size,
                                                       "packed_rows": len(trainer.train_dataset) if packed else None}


# ---------------------------------------------------------------- the driver

def start_on(impl: str) -> dict[str, str]:
    """The environment an impl's process starts with: tcmalloc for `<impl>+tcmalloc`, else the system's malloc
    (tuneoff/training/allocator.py)."""
    from tuneoff.training import allocator

    return allocator.environment("tcmalloc" if impl.endswith("+tcmalloc") else "system")


def ratios(runs: list[dict], method: str, a: str, b: str) -> dict | None:
    """a's tokens/s over b's, paired by round (the two ran minutes apart, in the same machine state):
    the median over rounds and the spread (min, max)."""
    by_round = {(r["impl"], r["round"]): r["tokens_per_second"] for r in runs if r["method"] == method}
    paired = [by_round[a, k] / by_round[b, k] for (impl, k) in by_round if impl == a and (b, k) in by_round]
    if not paired:
        return None
    return {"median": round(statistics.median(paired), 3), "min": round(min(paired), 3), "max": round(max(paired), 3),
            "rounds": len(paired)}


def summarise(runs: list[dict], methods: list[str], impls: list[str]) -> dict:
    """Per method: each impl's median over rounds, and tuneoff's per-round ratios to the fastest HF row
    and the fastest TRL row (all on the system's malloc), and tuneoff+tcmalloc's, as the stage ships."""
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

        for key, other in (("best_hf", fastest(HF)), ("best_trl", fastest(TRL))):
            for impl in ("tuneoff", "tuneoff+tcmalloc"):
                if impl in med and other:
                    name = key if impl == "tuneoff" else f"{key}_shipped"
                    entry[name] = {"impl": other, "speedup": ratios(runs, method, impl, other),
                                   "memory_ratio": round(med[impl]["peak_memory_bytes"] / med[other]["peak_memory_bytes"], 3)}
        # the target: >= 1.3x the best fair HF row, peak memory no higher; "above the noise": every round faster
        if "best_hf" in entry:
            hf = entry["best_hf"]
            entry["meets_target"] = hf["speedup"]["median"] >= 1.3 and hf["memory_ratio"] <= 1.0
            entry["faster_every_round"] = hf["speedup"]["min"] > 1.0
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

    def said(c: dict, who: str) -> str:
        x = c["speedup"]
        return (f"{x['median']:.2f}x {who} ({c['impl']}; per round {x['min']:.2f}-{x['max']:.2f} over {x['rounds']}), "
                f"peak memory {c['memory_ratio']:.2f}x")

    for method, entry in result["summary"].items():
        parts = [said(entry[k], who) for k, who in (("best_hf", "the fastest HF row"), ("best_trl", "the fastest TRL row"))
                 if k in entry]
        if parts:
            lines.append(f"- {method}: tuneoff {'; '.join(parts)}; target (1.3x HF, memory no higher) met: "
                         f"{entry.get('meets_target')}; faster than HF in every round: {entry.get('faster_every_round')}")
        shipped = [said(entry[k], who) for k, who in (("best_hf_shipped", "the fastest HF row"),) if k in entry]
        if shipped:
            lines.append(f"  - as the train stage ships (tuneoff+tcmalloc, the others on the system's malloc): {shipped[0]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=5)
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
    allowed_impls = [*IMPLS, *(f"tuneoff+{v}" for v in VARIANTS), *(f"{b}+tcmalloc" for b in IMPLS)]
    for name, given, allowed in (("method", methods, METHODS), ("impl", impls, allowed_impls)):
        if bad := [x for x in given if x not in allowed]:
            sys.exit(f"unknown {name} {bad}; allowed: {list(allowed)}")
    if any(i.startswith("trl") for i in impls):
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
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **start_on(impl)})
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
    result = {"label": args.label or "benchmark run", "task": args.task, "project": project.name,
              "steps": next((r["steps"] for r in runs if r["impl"] == "tuneoff"), None), "budget": budgets.pop(),
              "rounds": args.rounds, "methods": methods, "impls": impls, "peak": peak, "runs": runs,
              "summary": summarise(runs, methods, impls)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
