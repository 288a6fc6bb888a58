"""Memory, time and cost of a training run before it runs: memory.py and throughput.py put together
with params.yaml's device catalog, for the CLI (`tuneoff estimate`, `tuneoff plan`) and the report
(each run's prediction beside what its train.json measured)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import EstimateParams
from tuneoff.core.records import TrainRecord, read
from tuneoff.estimator import memory, throughput
from tuneoff.estimator.architectures import Shape, from_config
from tuneoff.estimator.throughput import Device

GIB = 2**30


def devices(params: EstimateParams, prices: dict[str, float]) -> list[Device]:
    return [Device(name, spec.memory_gib, {"fp32": spec.tflops_fp32, "bf16": spec.tflops_bf16}, prices.get(name),
                   "cpu" if name == "cpu" else "cuda") for name, spec in params.devices.items()]


def find_device(query: str, catalog: list[Device]) -> Device:
    """A device by any words of its name, case-insensitive: `h100`, `a100 80`, `4090`."""
    words = query.lower().replace("-", " ").split()
    found = [d for d in catalog if all(w in d.name.lower().replace("-", " ") for w in words)]
    exact = [d for d in found if d.name.lower() == query.lower()]
    if len(exact) == 1 or len(found) == 1:
        return (exact or found)[0]
    names = ", ".join(d.name for d in (found or catalog))
    raise TuneoffError(f"device {query!r}: {'ambiguous' if found else 'unknown'}; "
                       f"{'matches' if found else 'params.yaml estimate.devices has'}: {names}")


def cost(seconds: float, device_key: str, price_per_hour: dict[str, float]) -> dict:
    """Device-hours and dollars for `seconds` on `device_key`; an unpriced GPU costs null, not 0."""
    hours = seconds / 3600
    price = price_per_hour.get(device_key)
    return {"device": device_key, "device_hours": round(hours, 6),
            "gpu_hours": 0.0 if device_key == "cpu" else round(hours, 6),
            "price_per_hour": price, "usd": None if price is None else round(hours * price, 6)}



@dataclass(frozen=True)
class Fit:
    status: str  # fits | tight | no
    need_gib: float
    have_gib: float


def fit(est: memory.Estimate, device: Device, tight_fraction: float) -> Fit:
    """Whether the peak (tensors + framework overhead) fits in one device's memory."""
    need, have = est.peak_bytes / GIB, device.memory_gib
    status = "no" if need > have else "tight" if need > (1 - tight_fraction) * have else "fits"
    return Fit(status, round(need, 2), have)


def overhead_bytes(params: EstimateParams, device_kind: str) -> int:
    return int(getattr(params.overhead_gib, device_kind) * GIB)


def time_and_cost(shape: Shape, setup: memory.Setup, positions: float, device: Device, params: EstimateParams,
                  runs_dir: Path | None) -> dict:
    """Predicted train hours and dollars for `positions` token positions (padding included) on `device`
    (x setup.gpus), with the utilisation calibrated from runs_dir's measured runs when there are any."""
    prior = getattr(getattr(params.utilisation, device.kind), setup.method)
    cal = (throughput.calibrate(measured_runs(runs_dir), device, setup.method, setup.precision, prior) if runs_dir
           else throughput.Calibration(prior, "prior"))
    flops = throughput.flops_per_position(shape, setup)
    seconds = throughput.train_seconds(positions, flops, device, setup.precision, cal.utilisation) / setup.gpus
    hours = seconds / 3600
    usd = None if device.usd_per_hour is None else hours * setup.gpus * device.usd_per_hour
    return {"device": device.name, "gpus": setup.gpus, "flops_per_position": flops, "train_flops": positions * flops,
            "utilisation": round(cal.utilisation, 4), "utilisation_source": cal.source, "calibration_runs": list(cal.runs),
            "train_hours": hours, "usd": usd, "usd_per_hour": device.usd_per_hour}


def setup_for_run(method: str, lora, batch_rows: int, gradient_checkpointing: bool, precision: str, optimizer: str,
                  device_kind: str, seq_len: int, supervised_positions: int, base_config: dict, devices: int = 1,
                  strategy: str | None = None) -> memory.Setup:
    """The Setup tuneoff's own train stage runs: its loop, its precision and optimizer, packed rows (attended
    per example on a CPU). `lora` has the adapter's rank, target_modules and dropout (train.<method>, or a
    train.json's setup); None for full fine-tuning. `devices` processes with `strategy` ddp, fsdp or
    deepspeed (tuneoff/training/distributed.py): FSDP and ZeRO-3 shard the weights and states."""
    quant = base_config.get("quantization_config") or {}
    return memory.Setup(method=method, batch_size=batch_rows, seq_len=seq_len, precision=precision,
                        device=device_kind, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                        rank=lora.rank if lora else None,
                        target_modules=memory.expand_targets(lora.target_modules) if lora else None,
                        dropout=lora.dropout if lora else None, supervised_positions=supervised_positions,
                        attention="per-example" if device_kind == "cpu" else "packed",
                        double_quant=bool(quant.get("bnb_4bit_use_double_quant", False)), gpus=devices,
                        sharded=strategy in ("fsdp", "deepspeed"), accumulates=False)


def one_pass(setup: memory.Setup, pass_rows: int) -> memory.Setup:
    """The rows one forward and backward pass runs: a step's, or with gradient accumulation
    (train.common.micro_batch_size) one micro-batch's, `pass_rows` being the most any pass has. Activations
    are held for one pass at a time, and its supervised positions (what train.json records) are its own."""
    return replace(setup, batch_size=min(pass_rows, setup.batch_size), accumulates=pass_rows < setup.batch_size)


def joined_rows(setup: memory.Setup, step_tokens: int) -> memory.Setup:
    """The shape a pass's activations take: with per-example attention (a CPU), loss.batch_loss joins
    the pass's rows into one row of their real tokens; `step_tokens` is the most any pass has."""
    return replace(setup, batch_size=1, seq_len=step_tokens) if setup.attention == "per-example" else setup


def for_record(record: TrainRecord, estimate_params: EstimateParams, prices: dict[str, float],
               root: Path = Path(".")) -> tuple[dict, dict]:
    """What the estimator predicts for the run a train.json describes: its "estimate" (memory and FLOPs,
    a function of the config and data alone) and "timing" (seconds at params.yaml's utilisation prior,
    on the device the run used). Computed where it is reported, so a price edit retrains nothing."""
    shape, setup = record_setup(record, root)
    s = record.setup
    return predict(shape, setup, s.steps, s.micro_batch_rows or record.tokens.batch_rows, s.max_step_tokens,
                   record.device, estimate_params, prices)


def record_setup(record: TrainRecord, root: Path = Path(".")) -> tuple[Shape, memory.Setup]:
    """The architecture and Setup of the run a train.json describes (its base's config.json under `root`)."""
    s = record.setup
    config = json.loads((root / s.base / "config.json").read_text())
    setup = setup_for_run(record.method, s if s.rank is not None else None, record.tokens.batch_rows,
                          s.gradient_checkpointing, record.precision, s.optimizer,
                          "cpu" if record.device == "cpu" else "cuda", s.seq_len, s.max_supervised_positions, config,
                          s.devices, s.distributed)
    return from_config(config, s.base), setup


def measured_runs(runs_dir: Path) -> list[throughput.Measured]:
    """The train stage's runs under runs_dir (runs/<task>/<method>/train.json, in a project whose folder
    holds runs_dir) with the FLOPs they trained: what calibrates the utilisation. Unreadable runs are skipped."""
    out = []
    for path in sorted(Path(runs_dir).glob("*/*/train.json")):
        try:
            record = read(TrainRecord, path)
            shape, setup = record_setup(record, Path(runs_dir).resolve().parent)
        except (TuneoffError, OSError):
            continue
        per_pass = one_pass(setup, record.setup.micro_batch_rows or record.tokens.batch_rows)
        # per device: each of `gpus` trained its share of the steps' positions in train_seconds
        flops = record.setup.steps * setup.tokens * throughput.flops_per_position(shape, per_pass) / setup.gpus
        out.append(throughput.Measured(record.method, record.device, record.precision, flops,
                                       record.timing.train_seconds, str(path.parent)))
    return out


def predict(shape: Shape, setup: memory.Setup, steps: int, pass_rows: int, pass_tokens: int, device_name: str,
            estimate_params: EstimateParams, prices: dict[str, float]) -> tuple[dict, dict]:
    """Peak memory and FLOPs of `steps` steps of `setup` (the most rows and real tokens in one forward and
    backward pass being `pass_rows` and `pass_tokens`), and their seconds on `device_name` when params.yaml's
    catalog has it."""
    per_pass = one_pass(setup, pass_rows)
    memory_setup = joined_rows(per_pass, pass_tokens)
    est = memory.estimate(shape, memory_setup, overhead_bytes(estimate_params, setup.device))
    flops = throughput.flops_per_position(shape, per_pass)  # setup.positions is a pass's: so is the supervised share
    estimate = {
        "measure": "cpu_peak_rss" if setup.device == "cpu" else "cuda_max_memory_allocated",
        # comparable to memory.peak_memory_bytes: a CPU's resident set includes the process, CUDA's allocator does not
        "peak_memory_bytes": est.peak_bytes if setup.device == "cpu" else est.peak_tensor_bytes,
        "peak_tensor_bytes": est.peak_tensor_bytes, "overhead_bytes": est.overhead_bytes, "phase": est.phase,
        "at_peak": est.at_peak, "params": est.params,
        "setup": {"batch_rows": memory_setup.batch_size, "seq_len": memory_setup.seq_len,
                  "supervised_positions": setup.positions, "precision": setup.precision,
                  "optimizer": setup.optimizer, "gradient_checkpointing": setup.gradient_checkpointing},
        "flops_per_position": round(flops), "train_flops": round(steps * setup.tokens * flops),
    }
    catalog = {d.name: d for d in devices(estimate_params, prices)}
    if device_name not in catalog:
        return estimate, {"train_seconds": None, "reason": f"{device_name!r} is not in params.yaml estimate.devices"}
    device = catalog[device_name]
    utilisation = getattr(getattr(estimate_params.utilisation, device.kind), setup.method)
    seconds = throughput.train_seconds(steps * setup.tokens, flops, device, setup.precision, utilisation)
    return estimate, {"train_seconds": round(seconds, 3), "utilisation": utilisation,
                      "peak_tflops": device.tflops["fp32" if setup.precision == "fp32" else "bf16"],
                      "source": f"params.yaml estimate.utilisation.{device.kind}.{setup.method}"}
