"""`tuneoff estimate` and `tuneoff plan`: the estimator on the command line, as tables or JSON.

Every default comes from the project's params.yaml (train.common, train.lora / train.qlora,
prepare.seq_len, estimate:, plan:), so a bare `tuneoff estimate --model llama-3-8b` answers for
the bake-off this project would run; each flag overrides one of them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import FULL, LORA, METHODS
from tuneoff.core.params import (
    CommonTrainParams,
    CostParams,
    EstimateParams,
    LoraParams,
    PlanParams,
    PrepareParams,
    QuantizeParams,
    read_params,
    section,
)
from tuneoff.estimator import architectures, estimate, memory

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser, plan: bool) -> None:
    parser.add_argument("--model", required=True, help=f"a catalog name ({', '.join(architectures.CATALOG)}), "
                                                       "a config.json or a model folder")
    if plan:
        parser.add_argument("--task-type", required=True, choices=["classification", "format", "generation",
                                                                   "knowledge", "reasoning"])
        parser.add_argument("--tolerance", type=float, required=True,
                            help="the accuracy gap to full fine-tuning you would accept, in points")
        parser.add_argument("--device", required=True, help="the target device: any words of its name (a10g, h100, "
                                                            "'a100 80'), from params.yaml estimate.devices")
        parser.add_argument("--examples", type=int, help="training examples (default: the --dataset's)")
    else:
        parser.add_argument("--method", default="full,lora,qlora", help="comma-separated (default: all three)")
        parser.add_argument("--device", help="one device (default: every GPU in params.yaml estimate.devices)")
    data = parser.add_argument_group("data (for time and cost)")
    data.add_argument("--tokens", type=float, help="tokens per epoch (with any padding: the matmuls run on it)")
    data.add_argument("--dataset", type=Path, help="a prepared folder (data/prepared/<task>): its tokens, padding, "
                                                   "examples and supervised share")
    data.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    data.add_argument("--runs", type=Path, default=Path("runs"),
                      help="measured runs that calibrate the utilisation (default: runs/)")
    setup = parser.add_argument_group("training setup (default: params.yaml)")
    setup.add_argument("--batch-size", type=int, help="rows per step (train.common.batch_size)")
    setup.add_argument("--micro-batch-size", type=int,
                       help="rows per forward and backward, gradients accumulated over the step; 0 = the whole step "
                            "(train.common.micro_batch_size)")
    setup.add_argument("--seq-len", type=int, help="tokens per row (prepare.seq_len)")
    setup.add_argument("--precision", choices=memory.PRECISIONS,
                       help="bf16 = autocast over float32 master weights (tuneoff's); bf16-pure = weights and "
                            "optimizer states in bf16 (torchtune's); default: train.common.precision")
    setup.add_argument("--optimizer", choices=memory.OPTIMIZERS,
                       help="adamw is torch's; the others are bitsandbytes' (paged: CUDA unified memory, ordinary "
                            "memory on a CPU); default: train.common.optimizer")
    setup.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction)
    setup.add_argument("--rank", type=int, help="LoRA rank (train.lora.rank / train.qlora.rank)")
    setup.add_argument("--target-modules", help="comma-separated, or all-linear (train.<method>.target_modules)")
    setup.add_argument("--supervised-fraction", type=float,
                       help="share of positions the output layer runs on (tuneoff: assistant tokens; "
                            "default: the --dataset's, else 1)")
    setup.add_argument("--attention", choices=["packed", "per-example", "causal"], default="packed",
                       help="packed rows get a block-diagonal mask per layer (tuneoff on a GPU); per-example: causal "
                            "attention on each example of a packed row (tuneoff on a CPU); causal: SDPA's is_causal")
    setup.add_argument("--gpus", type=int, default=1, help="FSDP full sharding over this many GPUs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


class Context:
    """The project's params, the model, the devices and the data the flags name."""

    def __init__(self, args: argparse.Namespace):
        data = read_params()
        self.args = args
        self.common = section(CommonTrainParams, "train", "common", data=data)
        self.seq_len = args.seq_len or section(PrepareParams, "prepare", data=data).seq_len
        self.adapters = {name: section(LoraParams, "train", name, data=data)
                         for name, m in METHODS.items() if m.adapter}
        self.double_quant = section(QuantizeParams, "quantize", data=data).double_quant
        self.params = section(EstimateParams, "estimate", data=data)
        self.plan_params = section(PlanParams, "plan", data=data) if hasattr(args, "task_type") else None
        self.catalog = estimate.devices(self.params, section(CostParams, "cost", data=data).price_per_hour)
        self.shape = architectures.resolve(args.model)
        self.meta = _dataset_meta(args.dataset) if args.dataset else None
        if args.device:
            self.targets = [estimate.find_device(args.device, self.catalog)]
        else:
            self.targets = [d for d in self.catalog if d.kind == "cuda"]
        kinds = {d.kind for d in self.targets}
        if len(kinds) > 1 or not self.targets:
            raise TuneoffError("--device: one device, or none for every GPU")
        self.kind = kinds.pop()

    def setup(self, method: str) -> memory.Setup:
        a, lora = self.args, self.adapters.get(method)
        precision = a.precision or _resolve_precision(self.common.precision, self.kind)
        fraction = a.supervised_fraction if a.supervised_fraction is not None else (
            self.meta["supervised_fraction"] if self.meta else 1.0)
        if not 0 < fraction <= 1:
            raise TuneoffError(f"--supervised-fraction {fraction}: must be in (0, 1]")
        batch = a.batch_size or self.common.batch_size
        micro = self.common.micro_batch_size if a.micro_batch_size is None else a.micro_batch_size
        if micro < 0:
            raise TuneoffError(f"--micro-batch-size {micro}: must be at least 0")
        rows = min(micro or batch, batch)  # what one forward and backward pass holds activations for
        lora_fields = {"rank": None, "target_modules": None, "dropout": None}  # full fine-tuning has none
        if lora:
            targets = a.target_modules.split(",") if a.target_modules else lora.target_modules
            lora_fields = {"rank": a.rank or lora.rank, "target_modules": memory.expand_targets(targets),
                           "dropout": lora.dropout}
        return memory.Setup(
            method=method, batch_size=rows, seq_len=self.seq_len, precision=precision, device=self.kind,
            optimizer=a.optimizer or self.common.optimizer,
            gradient_checkpointing=(self.common.gradient_checkpointing if a.gradient_checkpointing is None
                                    else a.gradient_checkpointing),
            **lora_fields, supervised_positions=max(1, round(fraction * rows * self.seq_len)),
            attention=a.attention, double_quant=self.double_quant, gpus=a.gpus, sharded=True, accumulates=rows < batch)

    def positions(self) -> float | None:
        """Token positions to train on (padding included), from --tokens or --dataset, times --epochs."""
        if self.args.tokens is not None:
            return self.args.tokens * self.args.epochs
        if self.meta:
            return self.meta["real_tokens"] / (1 - self.meta["padding_fraction"]) * self.args.epochs
        return None


def _resolve_precision(precision: str, kind: str) -> str:
    if precision != "auto":
        return precision
    if kind == "cuda":
        return "bf16"
    from tuneoff.core.measure import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


def _dataset_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise TuneoffError(f"--dataset {folder}: no meta.json (a prepared folder: data/prepared/<task>)")
    train = json.loads(path.read_text())["train"]
    examples = json.loads(path.read_text())["examples"]["train"]
    return {"real_tokens": train["real_tokens"], "padding_fraction": train["padding_fraction"], "examples": examples,
            "supervised_fraction": train["loss_tokens"] / train["real_tokens"]}


def run_estimate(args: argparse.Namespace) -> None:
    ctx = Context(args)
    methods = [m.strip() for m in args.method.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TuneoffError(f"--method {','.join(unknown)}: allowed: {', '.join(METHODS)}")
    positions = ctx.positions()
    overhead = estimate.overhead_bytes(ctx.params, ctx.kind)
    out = {"model": _model(ctx.shape), "tokens": positions, "methods": {}}
    for method in methods:
        setup = ctx.setup(method)
        est = memory.estimate(ctx.shape, setup, overhead)
        devices = {}
        for device in ctx.targets:
            fit = estimate.fit(est, device, ctx.params.tight_fraction)
            cost = (estimate.time_and_cost(ctx.shape, setup, positions, device, ctx.params, args.runs)
                    if positions else None)
            devices[device.name] = {"fit": asdict(fit), "time_and_cost": cost}
        out["methods"][method] = {"setup": _setup(setup), "memory": est.as_dict(), "devices": devices}
    print(json.dumps(out, indent=2) if args.json else render_estimate(ctx, out))


def run_plan(args: argparse.Namespace) -> None:
    from tuneoff.estimator import plan

    ctx = Context(args)
    examples = args.examples or (ctx.meta and ctx.meta["examples"])
    positions = ctx.positions()
    if not examples or positions is None:
        raise TuneoffError("plan needs the dataset's size: --dataset data/prepared/<task>, or --examples and --tokens")
    if args.tolerance < 0:
        raise TuneoffError(f"--tolerance {args.tolerance}: must be at least 0 points")
    device = ctx.targets[0]
    result = plan.plan(ctx.shape, args.task_type, device, examples, positions, args.tolerance, ctx.setup(LORA.name),
                       ctx.plan_params, ctx.params, args.runs)
    out = {"model": _model(ctx.shape), "device": device.name, "examples": examples, "tokens": positions,
           "task_type": args.task_type, "tolerance_points": args.tolerance,
           "proposal": {"method": result["method"], "rank": result["rank"], "target_modules": result["target_modules"],
                        "setup": result["setup"] and _setup(result["setup"])},
           "reasons": result["reasons"], "bakeoff": result["bakeoff"],
           "options": {m: {"setup": _setup(o["setup"]), "peak_bytes": o["estimate"].peak_bytes, "fit": asdict(o["fit"]),
                           "time_and_cost": o["cost"]} for m, o in result["options"].items()}}
    print(json.dumps(out, indent=2) if args.json else render_plan(out))


def _model(shape: architectures.Shape) -> dict:
    return {"name": shape.name, "parameters": shape.parameter_count(), "layers": shape.layers, "hidden": shape.hidden,
            "vocab": shape.vocab}


def _setup(setup: memory.Setup) -> dict:
    d = asdict(setup)
    d["supervised_positions"] = setup.positions
    if setup.adapter:
        d["target_modules"] = list(setup.target_modules)
    else:
        for key in ("rank", "target_modules", "dropout"):
            d.pop(key)
    return d


def _size(n: float | None, unit: str = "GiB") -> str:
    return "-" if not n else f"{n / (GIB if unit == 'GiB' else 2**20):.2f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def render_estimate(ctx: Context, out: dict) -> str:
    methods = list(out["methods"])
    first = next(iter(out["methods"].values()))["setup"]
    shape = ctx.shape
    lines = [f"{shape.name}: {shape.parameter_count():,} parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocabulary {shape.vocab:,}); batch {first['batch_size']} x {first['seq_len']} tokens"
             f"{' per micro-batch, gradients accumulated' if first['accumulates'] else ''}, "
             f"{first['precision']}, {first['optimizer']}, gradient checkpointing "
             f"{'on' if first['gradient_checkpointing'] else 'off'}, {first['attention']} attention, output layer on "
             f"{first['supervised_positions']:,} positions per {'micro-batch' if first['accumulates'] else 'step'}, "
             f"{ctx.kind}"
             + (f", FSDP over {first['gpus']} GPUs (per GPU)" if first["gpus"] > 1 else ""), ""]
    mem = {m: out["methods"][m]["memory"] for m in methods}
    unit = "GiB" if max(mem[m]["peak_tensor_bytes"] for m in methods) >= GIB / 4 else "MiB"
    size = lambda n: _size(n, unit)  # noqa: E731
    rows = [[unit, *methods],
            ["trainable parameters", *(f"{mem[m]['params']['trainable']:,}" for m in methods)]]
    rows += [[t, *(size(mem[m]["terms"][t]) for m in methods)] for t in mem[methods[0]]["terms"]
             if any(mem[m]["terms"][t] for m in methods)]
    rows += [["peak happens at", *(mem[m]["phase"] for m in methods)],
             ["  transient buffers then", *(size(mem[m]["at_peak"].get("transient")) for m in methods)],
             ["peak, tensors", *(size(mem[m]["peak_tensor_bytes"]) for m in methods)],
             ["framework overhead", *(size(mem[m]["overhead_bytes"]) for m in methods)],
             ["peak", *(size(mem[m]["peak_bytes"]) for m in methods)]]
    held = ("gradients are held through each micro-batch's activations" if first["accumulates"]
            else "gradients and activations are not both held at the peak")
    lines += [_table(rows), f"({held}; --json itemizes what is)", ""]
    tokens = out["tokens"]
    header = "peak vs memory" + (f"; train time and cost for {tokens:,.0f} token positions" if tokens else "")
    rows = [[header, *methods]]
    for device in ctx.targets:
        cells = []
        for m in methods:
            d = out["methods"][m]["devices"][device.name]
            cell = {"fits": "fits", "tight": "tight", "no": "no"}[d["fit"]["status"]]
            cost = d["time_and_cost"]
            if cost and d["fit"]["status"] != "no":
                cell += f" {cost['train_hours']:.3g} h" + (f" ${cost['usd']:,.2f}" if cost["usd"] is not None else "")
            cells.append(cell)
        rows.append([f"{device.name} ({device.memory_gib:g} GiB)", *cells])
    lines.append(_table(rows))
    if tokens:
        util = {m: out["methods"][m]["devices"][ctx.targets[0].name]["time_and_cost"] for m in methods}
        lines.append("utilisation (achieved / peak FLOP/s): " + ", ".join(
            f"{m} {u['utilisation']:.2f} ({u['utilisation_source']})" for m, u in util.items()))
    return "\n".join(lines)


def render_plan(out: dict) -> str:
    p = out["proposal"]
    what = ("nothing fits" if p["method"] is None else "full fine-tuning" if p["method"] == FULL.name else
            f"{p['method']}, rank {p['rank']}, on {', '.join(p['target_modules'])}")
    lines = [f"{out['model']['name']} on {out['device']}: {out['examples']:,} {out['task_type']} examples, "
             f"tolerance {out['tolerance_points']:g} point(s)", f"start with: {what}", "", "why:"]
    lines += [f"  - {r}" for r in out["reasons"]]
    rows = [["bake-off (each method as it fits)", "batch", "checkpointing", "peak GiB", "fits", "hours", "USD"]]
    for m, o in out["options"].items():
        s, c = o["setup"], o["time_and_cost"]
        rows.append([m, str(s["batch_size"]), "on" if s["gradient_checkpointing"] else "off", _size(o["peak_bytes"]),
                     o["fit"]["status"], f"{c['train_hours']:.3g}" if o["fit"]["status"] != "no" else "-",
                     f"{c['usd']:,.2f}" if c["usd"] is not None and o["fit"]["status"] != "no" else "-"])
    b = out["bakeoff"]
    lines += ["", _table(rows), f"the bake-off ({', '.join(b['methods']) or 'nothing'}): {b['hours']:.3g} device-hours"
              + (f", ${b['usd']:,.2f}" if b["usd"] is not None else "")
              + "".join(f"; {m} left out ({why})" for m, why in b["left_out"].items())]
    return "\n".join(lines)
