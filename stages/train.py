"""DVC stages `train@<task>-<method>` and `train_nf4@<task>-qlora`: one method on one task's prepared data
(`--prepared`), from the base it trains on (`--base`: models/base, or models/base-nf4 for qlora).

Outputs, in `--run-dir` (runs/<task>/<method>/): model/ (full weights for `full`, the PEFT adapter for `lora` and
`qlora`), train.json (what the run measured and the shapes it trained with: tuneoff/core/records.py
TrainRecord; dollars and predictions are the report's) and loss.csv / val_loss.csv for `dvc plots`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import tuneoff
from tuneoff.core import measure
from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.methods import method as method_named
from tuneoff.core.params import (
    CheckpointParams,
    CommonTrainParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.records import (
    Loss,
    Memory,
    Output,
    ParamCounts,
    Setup,
    Timing,
    Tokens,
    TrainRecord,
    Tuning,
)
from tuneoff.core.tracking import NoTracker, flat, stage_run
from tuneoff.data.rows import load_rows
from tuneoff.modeling import methods
from tuneoff.modeling.base_model import save_tokenizer
from tuneoff.training import allocator, distributed, tune
from tuneoff.training.checkpoint import Checkpointer, fingerprint
from tuneoff.training.loop import TrainResult, step_shapes, train


@user_errors
def main(task: str, method: str, base: Path, prepared: Path, run: Path, seed: int | None = None) -> Path:
    """Train `method` on `task` into `run`; with `seed` (one of bakeoff.more_seeds), the same run with
    that seed (stages/train_seed.py: `run` is then runs/<task>/<method>/seeds/<seed>/)."""
    spec = method_named(method)
    data = read_params()
    check_task(task, data)
    common = section(CommonTrainParams, "train", "common", data=data)
    out, label = run, f"{task}/{method}"
    if seed is not None:
        if seed == common.seed:
            raise TuneoffError(f"params.yaml: bakeoff.more_seeds: {seed} is train.common.seed already")
        common, label = common.model_copy(update={"seed": seed}), f"{label}-seed{seed}"
    params = section(methods.PARAMS_BY_METHOD[method], "train", method, data=data)
    checkpoint = section(CheckpointParams, "checkpoint", data=data)
    check_inputs(task, method, params, common, prepared, base)

    # one of train.common.devices processes (tuneoff/training/distributed.py): the main one tracks and writes
    acc = distributed.accelerator()
    if common.devices > 1 and acc is None:
        raise TuneoffError(f"params.yaml: train.common.devices is {common.devices}: run the stage through its "
                           f"launcher, python -m tuneoff.training.launch stages.train {task} {method} (as dvc.yaml does)")
    main_process = acc is None or acc.is_main_process
    sections = {"train.common": common.model_dump(), f"train.{method}": params.model_dump()}
    tracking = (stage_run("train", sections, task=task, method=method, data=data) if main_process
                else contextlib.nullcontext(NoTracker()))
    with tracking as tracker:
        dev = acc.device if acc else measure.device()
        precision = precision_on(dev, common)
        peak = measure.PeakMemory(dev)
        stage_start = time.perf_counter()
        train_rows, val_rows = load_rows(prepared / "train.safetensors"), load_rows(prepared / "val.safetensors")
        tuning = tune_rate(method, params, base, precision, dev, common, train_rows, val_rows, label)

        build_start = time.perf_counter()
        peak.reset()
        model, sharded = build_model(method, params, base, precision, dev, common, acc)
        load_seconds = time.perf_counter() - build_start
        load_memory = peak.read()
        counts = param_counts(model)

        out.mkdir(parents=True, exist_ok=True)
        # the stage owns model/, train.json and the loss logs in `out`, not the folder: merge and
        # evaluate write beside them. Each appears whole or not at all.
        checkpointer = checkpointer_for(sections, precision, dev, prepared, base, checkpoint, task, label, acc)
        with atomic_dir(out / "model") if main_process else contextlib.nullcontext() as model_dir:
            peak.reset()  # training peak: weights + gradients + optimizer state + activations
            try:
                result = train(model, train_rows, val_rows, common, tuning.lr, dev, precision, out, label,
                               tracker, checkpointer, acc)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                    raise
                raise TuneoffError(out_of_memory(method, common, train_rows["input_ids"].shape[1], dev)) from None
            train_memory = peak.read()  # with several processes: the main one's (each holds its device's share)
            # sharded weights (FSDP, DeepSpeed) are gathered whole: every process takes part, the main one saves
            state_dict = acc.get_state_dict(model) if sharded else None
            if not main_process:
                return out
            methods.save(model, method, model_dir, state_dict)
            save_tokenizer(AutoTokenizer.from_pretrained(base), model_dir)
            record = TrainRecord(
                task=task, method=method, device=measure.device_name(dev), precision=precision, seed=common.seed,
                params=counts,
                tokens=Tokens(budget=common.token_budget, real=result.real_tokens, supervised=result.loss_tokens,
                              steps=result.steps, batch_rows=common.batch_size),
                loss=Loss(train_final=round(result.final_train_loss, 6), val=round(result.val_loss, 6)),
                memory=memory_record(train_memory, load_memory, dev),
                setup=setup_record(method, params, base, common, dev, train_rows),
                output=Output(path=str(out / "model"), kind=spec.kind,
                              weights_bytes=measure.dir_bytes(model_dir, "*.safetensors"),
                              folder_bytes=measure.dir_bytes(model_dir)),
                timing=timing_record(result, load_seconds, stage_start),
                tuning=tuning)
            write_json(out / "train.json", record.model_dump())
        checkpointer.clear()
        track(tracker, record, label, out / "model")
    gib = train_memory["peak_bytes"] / 2**30
    print(f"train {label}: {result.steps} steps, {result.real_tokens:,} tokens in {result.train_seconds:.0f} s "
          f"({record.timing.tokens_per_second:.0f} tok/s), val loss "
          f"{result.val_loss:.3f}, peak {gib:.2f} GiB ({train_memory['measure']}) -> {out}/")
    return out


def check_inputs(task: str, method: str, params, common: CommonTrainParams, prepared: Path, base: Path) -> None:
    """What the run needs before anything loads: the prepared rows, its base, and params its method can train with."""
    if not (prepared / "train.safetensors").is_file():
        raise TuneoffError(f"{prepared}/train.safetensors not found: run `dvc repro prepare@{task}` first")
    spec = method_named(method)
    if not (base / "config.json").is_file():
        raise TuneoffError(f"{base}/ has no model: run "
                           f"`dvc repro {'quantize' if spec.quantized else 'import_base'}` first")
    methods.validate(method, params, base)
    if len(params.rates) > 1 and common.devices > 1:
        raise TuneoffError(f"params.yaml: train.{method}.lr is a list of candidates, which pilots tune on one device "
                           f"only; give one rate or set train.common.devices: 1")


def precision_on(dev: torch.device, common: CommonTrainParams) -> str:
    """train.common.precision on `dev` (auto resolved), with a warning where bf16 runs slower than fp32."""
    precision = measure.resolve_precision(common.precision, dev)
    if precision in ("bf16", "bf16-pure") and dev.type == "cpu" and not measure.cpu_has_fast_bf16():
        print(f"warning: precision {precision} on a CPU without AMX is slower than fp32 here", file=sys.stderr)
    return precision


def tune_rate(method: str, params, base: Path, precision: str, dev: torch.device, common: CommonTrainParams,
              train_rows: dict, val_rows: dict, label: str) -> Tuning:
    """The rate to train at: train.<method>.lr, or of a list of candidates the one whose pilot reached the
    lowest val loss (tune.pick)."""
    def pilot(rate: float, settings: CommonTrainParams) -> float:
        """tune.pick's pilot: `method` built afresh from the run's seed, trained at `rate` on the pilot's
        settings, its val loss (logs to a scratch folder: only the loss is kept, in train.json)."""
        torch.manual_seed(settings.seed)
        model = methods.build(method, params, base, precision, dev, common.gradient_checkpointing)
        with tempfile.TemporaryDirectory() as logs:
            result = train(model, train_rows, val_rows, settings, rate, dev, precision, Path(logs),
                           f"{label} pilot lr={rate:g}")
        del model
        gc.collect()
        return result.val_loss

    tuning = tune.pick(params.rates, common, pilot)
    if tuning.tuned:
        print(f"train {label}: {tuning.line()}")
    return tuning


def build_model(method: str, params, base: Path, precision: str, dev: torch.device, common: CommonTrainParams, acc):
    """The method's trainable model from the run's seed, and whether accelerate shards it (FSDP, ZeRO-3)."""
    torch.manual_seed(common.seed)
    # FSDP and ZeRO-3 take the model from host memory and move only each device's shard onto it
    sharded = acc is not None and acc.distributed_type.value in ("FSDP", "DEEPSPEED")
    model = methods.build(method, params, base, precision, torch.device("cpu") if sharded else dev,
                          common.gradient_checkpointing)
    if acc:  # the same initial weights everywhere (above); each process's own dropout draws from here on
        torch.manual_seed(common.seed + acc.process_index)
    return model, sharded


def checkpointer_for(sections: dict, precision: str, dev: torch.device, prepared: Path, base: Path,
                     checkpoint: CheckpointParams, task: str, label: str, acc) -> Checkpointer:
    """The run's checkpoints under checkpoint.dir. A checkpoint resumes only the run it came from: same
    params (`sections`), data, base, code and device."""
    run_id = fingerprint({**sections, "precision": precision, "device": measure.device_name(dev)},
                         prepared, base, Path(tuneoff.__file__).parent, Path(__file__))
    return Checkpointer(Path(checkpoint.dir) / task / label.split("/")[1], run_id, checkpoint.every_steps, acc)


def param_counts(model) -> ParamCounts:
    trainable, total = methods.trainable_and_total(model)
    return ParamCounts(trainable=trainable, total=total, trainable_percent=round(100 * trainable / total, 4))


def memory_record(train_memory: dict, load_memory: dict, dev: torch.device) -> Memory:
    """train.json `memory`: the training peak (measure.PeakMemory's), and the peak while the model was built."""
    return Memory(peak_memory_bytes=train_memory["peak_bytes"], measure=train_memory["measure"],
                  peak_reserved_bytes=train_memory.get("peak_reserved_bytes") if dev.type == "cuda" else None,
                  load_peak_memory_bytes=load_memory["peak_bytes"], allocator=allocator.in_use())


def setup_record(method: str, params, base: Path, common: CommonTrainParams, dev: torch.device, train_rows: dict) -> Setup:
    """train.json `setup`: the shapes the run trained with, what the estimator predicts its memory and time from."""
    spec = method_named(method)
    lora = params if spec.adapter else None
    return Setup(base=str(base), gradient_checkpointing=common.gradient_checkpointing,
                 optimizer=common.optimizer, devices=common.devices,
                 distributed=(distributed.strategy(common, method, dev.type == "cuda")
                              if common.devices > 1 else None),
                 **step_shapes(train_rows, common),
                 rank=lora.rank if lora else None,
                 target_modules=sorted(lora.target_modules) if lora else None,
                 dropout=lora.dropout if lora else None)


def timing_record(result: TrainResult, load_seconds: float, stage_start: float) -> Timing:
    return Timing(resumed_from_step=result.resumed_from_step, load_seconds=round(load_seconds, 3),
                  train_seconds=round(result.train_seconds, 3), eval_seconds=round(result.eval_seconds, 3),
                  wall_seconds=round(time.perf_counter() - stage_start, 3),
                  tokens_per_second=round(result.real_tokens / result.train_seconds, 2),
                  stage_seconds=measure.process_seconds())


def track(tracker, record: TrainRecord, label: str, model_dir: Path) -> None:
    """train.json's numbers as the tracker's summary, and the model as its artifact (named for `label`)."""
    metrics = record.model_dump()
    tracker.summary(flat({k: v for k, v in metrics.items() if k not in ("task", "method")}))
    tracker.artifact(label.replace("/", "-"), "model", model_dir, {
        "task": record.task, "method": record.method, "kind": record.output.kind, "trained_on": f"{record.task}-data",
        "base": record.setup.base, "metrics": metrics})


def out_of_memory(method: str, common: CommonTrainParams, seq_len: int, dev: torch.device) -> str:
    """The one-line error for a training step that ran out of memory: what was tried, on what,
    and what to change (each of these lowers the peak: activations scale with rows x seq_len)."""
    where = measure.device_name(dev)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        where += f" ({total / 2**30:.1f} GiB, peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB allocated)"
    rows = min(common.micro_batch_size or common.batch_size, common.batch_size)  # rows per forward and backward
    advice = [f"set train.common.micro_batch_size under {rows} (the same steps, run in parts)"] if rows > 1 else []
    if common.batch_size > 1:
        advice.append(f"lower train.common.batch_size (now {common.batch_size} rows of {seq_len} tokens)")
    else:  # one row a step: only a shorter row is smaller
        advice.append(f"lower prepare.seq_len (now one row of {seq_len} tokens a step)")
    if not common.gradient_checkpointing:
        advice.append("set train.common.gradient_checkpointing: true")
    if not method_named(method).quantized:
        advice.append("train qlora (4-bit base)")
    return (f"out of memory training {method} on {where}: "
            + ", or ".join(advice) + "; `tuneoff estimate` compares the options before a run")


def arguments(prog: str) -> argparse.ArgumentParser:
    """The train stage's command line (stages/train_seed.py adds the seed)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("task")
    parser.add_argument("method")
    parser.add_argument("--base", type=Path, required=True, help="the base model the method trains on")
    parser.add_argument("--prepared", type=Path, required=True, help="the task's prepared data")
    # not `--run`: torchrun (devices > 1) reads an abbreviation of its own --run-path in its script's arguments
    parser.add_argument("--run-dir", dest="run", type=Path, required=True, help="the run's folder: model/, train.json, loss logs")
    return parser


if __name__ == "__main__":
    main(**vars(arguments("python -m stages.train").parse_args()))
