"""What each unit's pod asks the GPU pool for: the Prefect job variables `gpu_count`, `node_selector`
and `memory_request` of infra/k8s/gpu-pool-job-template.json, from params.yaml `dispatch.hardware`.

A unit that names no GPU gets the first of `dispatch.gpus` (smallest first) that holds the peak the
estimator predicts for its train stage (tuneoff/estimator/train_stage.py for_train_stage, the same
prediction train.json records) with `estimate.tight_fraction` of the card to spare, as `tuneoff
estimate` calls a fit that is not tight. That peak is per GPU: with `train.common.devices` above 1 the
train stage runs one process on each of that many GPUs (FSDP shards a full fine-tune between them), so
a unit that trains asks for at least that many.
"""

from __future__ import annotations

from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import BASE, LORA, METHODS
from tuneoff.core.params import (
    CommonTrainParams,
    DispatchParams,
    EstimateParams,
    section,
)

# NVIDIA GPU Feature Discovery (the GPU Operator) labels each node with its GPU's name, spaces as hyphens:
# "NVIDIA H100 80GB HBM3" -> nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3
GPU_LABEL = "nvidia.com/gpu.product"
GIB = 2**30


def job_variables(unit: str, tasks: list[str], data: dict) -> dict:
    """The job variables for `unit` (a method, or the base); a GPU chosen by the estimate when it names none."""
    dispatch = section(DispatchParams, "dispatch", data=data)
    wanted = getattr(dispatch.hardware, unit)
    estimate_params = section(EstimateParams, "estimate", data=data)
    devices = section(CommonTrainParams, "train", "common", data=data).devices
    if unit != BASE and wanted.gpu_count < devices:
        raise TuneoffError(f"params.yaml: dispatch.hardware.{unit}.gpu_count {wanted.gpu_count} is less than "
                           f"train.common.devices {devices}: the train stage runs one process per GPU")
    gpu = wanted.gpu or choose_gpu(unit, peak_gib(unit, tasks, data), dispatch.gpus, estimate_params)
    variables = {"gpu_count": wanted.gpu_count,
                 "node_selector": {GPU_LABEL: gpu.replace(" ", "-"), **wanted.node_selector}}
    return variables | ({"memory_request": wanted.memory} if wanted.memory else {})


def choose_gpu(unit: str, need_gib: float, gpus: list[str], estimate_params: EstimateParams) -> str:
    """The first of `gpus` whose memory (estimate.devices) holds `need_gib` with tight_fraction to spare:
    the allocator's fragmentation and the estimate's own error live in that share."""
    unknown = [g for g in gpus if g not in estimate_params.devices or g == "cpu"]
    if unknown:
        raise TuneoffError(f"params.yaml: dispatch.gpus: {unknown} not in estimate.devices, which holds each GPU's "
                           "memory")
    usable = {g: (1 - estimate_params.tight_fraction) * estimate_params.devices[g].memory_gib for g in gpus}
    for gpu, gib in usable.items():
        if need_gib <= gib:
            return gpu
    largest = max(usable, key=usable.get)
    raise TuneoffError(f"{unit}: the estimator predicts a {need_gib:.1f} GiB peak; the largest of dispatch.gpus, "
                       f"{largest}, holds {usable[largest]:.1f} GiB with estimate.tight_fraction spare: list a larger "
                       f"GPU, lower train.common.batch_size or turn on gradient_checkpointing (`tuneoff estimate`)")


def peak_gib(unit: str, tasks: list[str], data: dict) -> float:
    """The predicted GPU peak of the unit's train stage, the largest over `tasks` (their prepared rows
    set the step shapes). The base unit only evaluates the float base, so it is sized as LoRA, which
    holds that base plus a training step."""
    from tuneoff.data.rows import load_rows
    from tuneoff.estimator import train_stage
    from tuneoff.modeling.methods import PARAMS_BY_METHOD

    method = METHODS[LORA.name if unit == BASE else unit]
    common = section(CommonTrainParams, "train", "common", data=data)
    params = section(PARAMS_BY_METHOD[method.name], "train", method.name, data=data)
    precision = "bf16" if common.precision == "auto" else common.precision  # auto on a GPU, as `tuneoff estimate`
    estimate_params = section(EstimateParams, "estimate", data=data)
    peaks = []
    for task in tasks:
        rows = load_rows(Path("data/prepared") / task / "train.safetensors")
        try:
            est, _ = train_stage.for_train_stage(method.name, params, common, precision, "cuda", "", method.base,
                                                 rows, estimate_params, {})
        except TuneoffError as e:
            raise TuneoffError(f"{e}; name a GPU in params.yaml dispatch.hardware.{unit}.gpu") from None
        peaks.append((est["peak_tensor_bytes"] + est["overhead_bytes"]) / GIB)
    return max(peaks)
