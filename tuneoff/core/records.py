"""The files stages hand each other, defined once: train.json (what a train stage measured),
eval.json (what an evaluate stage scored) and comparison.json (the report's rows, pairs and
verdicts, which register acts on). Writers build these; readers get them validated, so a file
from an older version is a one-line error naming it, not a KeyError three modules later.

train.json holds what was measured and the shapes that set it, not prices or predictions: dollars
and the estimator's predictions are computed where they are reported (report, `tuneoff results`),
so a price edit reruns only the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from typing_extensions import (  # pydantic validates typing's TypedDict only from 3.12
    NotRequired,
    TypedDict,
)

from tuneoff.core.errors import TuneoffError


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


R = TypeVar("R")


class ParamCounts(Record):
    trainable: int
    total: int
    trainable_percent: float


class Tokens(Record):
    budget: int
    real: int
    supervised: int
    steps: int
    batch_rows: int


class Loss(Record):
    train_final: float
    val: float  # after training; before it, the base's val loss is quantize.json's (models/quantize.json)


class Memory(Record):
    peak_memory_bytes: int
    measure: str  # cpu_peak_rss... | cuda_max_memory_allocated
    peak_reserved_bytes: int | None = None  # CUDA only
    load_peak_memory_bytes: int
    allocator: str  # the C malloc behind a CPU's peak RSS


class Setup(Record):
    """The shapes the run trained with: what the estimator needs to predict its memory and time."""

    base: str  # the folder of the base it trained on (its config.json)
    seq_len: int
    steps: int
    # one forward and backward pass: a step, or one of its micro-batches (train.common.micro_batch_size)
    max_step_tokens: int  # the most real tokens in one pass (a CPU attends per example over them)
    max_supervised_positions: int  # the most positions one pass's output layer ran on
    gradient_checkpointing: bool
    rank: int | None  # adapters only
    target_modules: list[str] | None
    dropout: float | None
    # the defaults are what a train.json written before these keys trained with
    micro_batch_rows: int | None = None  # the most rows in one pass; None: a whole step's (tokens.batch_rows)
    optimizer: str = "adamw"  # train.common.optimizer
    devices: int = 1  # train.common.devices: the processes (devices) that trained it, each on its share of a step's rows
    distributed: str | None = None  # with devices > 1: ddp, fsdp or deepspeed (tuneoff/training/distributed.py)


class Output(Record):
    path: str
    kind: Literal["model", "adapter"]
    weights_bytes: int  # what the method produced
    folder_bytes: int  # with config and tokenizer


class Timing(Record):
    """Seconds; after a resume, train and eval seconds include the steps before the checkpoint, load
    and wall seconds are this process's only. wall_seconds is what a rented device bills."""

    resumed_from_step: int | None
    load_seconds: float
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    tokens_per_second: float
    stage_seconds: float | None = None  # the whole process, start-up and imports included (measure.process_seconds)


class Tuning(Record):
    """The learning rate a method trained at, and how it was picked (tuneoff/training/tune.py)."""

    lr: float  # the rate the whole budget trained at
    tuned: bool  # false: one rate in params.yaml, no pilots
    candidates: list[float]
    pilot_tokens: int | None = None  # the token budget of each pilot
    pilot_val_loss: dict[str, float] | None = None  # candidate (as written, e.g. "0.001") -> val loss after its pilot
    at_edge: Literal["smallest", "largest"] | None = None  # the chosen rate is the list's smallest or largest
    tied_with: list[float] | None = None  # other candidates whose pilot val loss equals the chosen one's
    seconds: float = 0.0  # the pilots' wall time (model builds included), part of timing.wall_seconds

    def line(self) -> str:
        """The rate and how it was chosen, for logs and the report."""
        if not self.tuned:
            return f"lr {self.lr:g} (one rate given, not tuned)"
        pilots = ", ".join(f"{rate} -> {loss:.4f}" for rate, loss in self.pilot_val_loss.items())
        line = (f"lr {self.lr:g}, the lowest val loss of {len(self.candidates)} pilots of {self.pilot_tokens:,} tokens "
                f"({pilots})")
        if self.tied_with:
            line += f"; tied with {', '.join(f'{r:g}' for r in self.tied_with)}"
        if self.at_edge:
            line += f"; the {self.at_edge} rate tried: widen the list"
        return line


class TrainRecord(Record):
    task: str
    method: str
    device: str  # params.yaml cost / estimate.devices key: cpu, H100-80GB, ...
    precision: str
    seed: int
    params: ParamCounts
    tokens: Tokens
    loss: Loss
    memory: Memory
    setup: Setup
    output: Output
    timing: Timing  # timing lives in its own keys: everything else is reproducible run to run on CPU
    tuning: Tuning | None = None  # None: written before learning rates could be tuned


class EvalTiming(Record):
    load_seconds: float
    generate_seconds: float
    examples_per_second: float
    stage_seconds: float | None = None  # the whole process, start-up and imports included (measure.process_seconds)
    read_off: int | None = None  # replies greedy decoding would give read off the reference's loss pass, not generated


class EvalRecord(Record):
    """eval.json: the model as deployed, scored on the task's test split. A method scored in several
    deployable forms (QLoRA) also has `forms` (each one's scores) and which is `deployed_form`."""

    task: str
    model: str  # base or a method
    evaluated: str  # the folder scored (the deployed form's, for QLoRA)
    scorer: str
    metrics: dict  # n, main_metric, main, ci_low, ci_high and the scorer's own metrics
    test_loss: float | None
    timing: EvalTiming
    max_new_tokens: int | None = None  # the reply limit generation used (tuneoff/evaluation/generate.py reply_limit)
    forms: dict[str, dict] | None = None  # form -> n, main, ci_low, ci_high, test_loss, examples_per_second
    deployed_form: str | None = None


# comparison.json: plain dicts in the report and the decision (built and read in one process), validated
# where register reads the file


class RunCosts(TypedDict):
    """A trained method's costs in the report: measured (train.json) and priced (params.yaml cost)."""

    peak_memory_bytes: int
    memory_measure: str
    train_seconds: float
    gpu_hours: float
    device_hours: float
    cost_usd: float | None  # null on a device params.yaml has no price for
    trainable_percent: float
    artifact_bytes: int
    artifact_kind: str
    device: str
    precision: str
    estimate: dict  # the estimator's prediction for the run: peak_memory_bytes, phase, train_flops, train_seconds
    tuning: dict | None  # train.json's tuning, with `usd`: what its pilots cost (inside cost_usd)
    cost_usd_final: float | None  # the final run alone, without the pilots


class ComparisonRow(TypedDict):
    """The base or one method on one task; `failed` (and null scores) when the flow gave up on it."""

    method: str
    main: float | None
    ci_low: float | None
    ci_high: float | None
    test_loss: float | None
    metrics: dict
    examples_per_second: NotRequired[float | None]
    forms: dict | None
    deployed_form: str | None
    train: RunCosts | None  # None for the base
    gap_to_full_points: float | None
    failed: NotRequired[str]


class Pair(TypedDict):
    """a - b on the same test items: the main metric in points, and the per-example loss beside it."""

    a: str
    b: str
    n: int
    diff_points: float
    ci_points: list[float]
    p_value: float | None  # McNemar (score test: < 0.05 exactly when the interval excludes 0); None over seeds
    only_a: int | None  # items only a got right (a score: scored higher); None over several seeds
    only_b: int | None
    interval: str
    loss: dict | None
    seeds: NotRequired[list[int]]  # how many seeds of a and of b, when either trained with more than one
    # a score in [0, 1] (free-form, judged): only_a / only_b count the items a / b scored higher on
    sd_points: NotRequired[float]  # the per-item sd of a - b, what "what would settle it" sizes a test set from
    ungraded: NotRequired[int]  # items left out because the judge gave one of them no grade


class TaskComparison(TypedDict):
    task: str
    scorer: str
    task_type: str
    main_metric: str
    rows: list[ComparisonRow]
    pairs: list[Pair]
    form_pairs: list[Pair]
    seeds: NotRequired[dict | None]  # each method's main metric per training seed and their spread
    conditions: dict
    general: NotRequired[dict | None]  # general ability against the base (tuneoff/decision/general.py)


class Decision(TypedDict):
    method: str | None  # the recommended method; None unless the verdict is decided
    verdict: Literal["decided", "inconclusive", "none"]
    rationale: str
    settle: str | None
    numbers: dict


class Comparison(TypedDict):
    tasks: list[TaskComparison]
    decisions: dict[str, Decision]
    quantization: dict | None


def read_jsonl(path: Path) -> list:
    """The rows of a JSONL file write_jsonl wrote. Split on "\\n" only: str.splitlines() also breaks
    at U+2028, U+2029 and U+0085, which write_jsonl (ensure_ascii=False) leaves raw inside strings."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def read(kind: type[R], path: Path) -> R:
    """`path` as a `kind`, or a one-line error naming the file and what is wrong with it."""
    try:
        return TypeAdapter(kind).validate_python(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise TuneoffError(f"{path} not found: run the stage that writes it (`dvc repro`)") from None
    except json.JSONDecodeError as e:
        raise TuneoffError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TuneoffError(f"{path}: {where}: {first['msg']} (written by an older tuneoff? rerun its stage: "
                           f"`dvc repro --force <stage>`)") from None
