"""Each unit's hardware (flows/hardware.py): the GPU the estimator's peak fits, or the one params.yaml
names, as the job variables the bake-off flow hands to run_deployment (tests/test_flows.py checks a real
dispatched run carries them). No Prefect server here."""

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from flows.hardware import GPU_LABEL, job_variables
from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import DispatchParams, read_params, section
from tuneoff.data.packing import IGNORE
from tuneoff.estimator.architectures import CATALOG

L4, A100, H100 = "NVIDIA L4", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def workspace(root, model: str, seq_len: int = 448, rows: int = 12) -> None:
    """What the orchestrator holds when it dispatches: the bases' config.json (a catalog model's
    numbers) and task t's prepared rows, every position real and all but the first supervised."""
    for folder, extra in (("base", {}), ("base-nf4", {"quantization_config": {"bnb_4bit_use_double_quant": True}})):
        (root / "models" / folder).mkdir(parents=True)
        (root / "models" / folder / "config.json").write_text(json.dumps(CATALOG[model] | extra))
    targets = torch.ones(rows, seq_len, dtype=torch.long)
    targets[:, 0] = IGNORE
    (root / "data/prepared/t").mkdir(parents=True)
    save_file({"input_ids": torch.ones(rows, seq_len, dtype=torch.long), "targets": targets,
               "real_tokens": torch.full((rows,), seq_len)}, root / "data/prepared/t/train.safetensors")


def params(**hardware) -> dict:
    data = read_params(ROOT / "params.yaml")
    data["train"]["common"]["batch_size"] = 3  # the sizes below are at 3 rows of 448 tokens a step
    for unit, wanted in hardware.items():
        data["dispatch"]["hardware"][unit].update(wanted)
    return data


def gpu(variables: dict) -> str:
    return variables["node_selector"][GPU_LABEL]


def test_full_fine_tuning_gets_a_bigger_gpu_than_qlora(tmp_path, monkeypatch):
    workspace(tmp_path, "llama-3.2-3b")  # full ~60 GiB, LoRA ~13, QLoRA ~9 at batch 3 x 448, bf16
    monkeypatch.chdir(tmp_path)
    chosen = {u: gpu(job_variables(u, ["t"], params())) for u in ("full", "lora", "qlora", "base")}
    assert chosen == {"full": "NVIDIA-A100-SXM4-80GB", "lora": "NVIDIA-L4", "qlora": "NVIDIA-L4", "base": "NVIDIA-L4"}


def test_an_8b_model_needs_a_bigger_gpu_for_lora_and_fits_none_for_full(tmp_path, monkeypatch):
    workspace(tmp_path, "llama-3-8b")  # LoRA ~25 GiB: over an L4's 22.5; full ~150 GiB
    monkeypatch.chdir(tmp_path)
    assert gpu(job_variables("lora", ["t"], params())) == "NVIDIA-A100-SXM4-80GB"
    assert gpu(job_variables("qlora", ["t"], params())) == "NVIDIA-L4"
    assert job_variables("qlora", ["t"], params()) == {"gpu_count": 1, "node_selector": {GPU_LABEL: "NVIDIA-L4"}}
    with pytest.raises(TuneoffError) as e:
        job_variables("full", ["t"], params())
    message = str(e.value)
    assert message.startswith("full: the estimator predicts a 150.") and A100 in message and "\n" not in message


def test_a_named_gpu_is_used_as_given_without_an_estimate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no model, no data: nothing is estimated
    data = params(full={"gpu": H100, "gpu_count": 2, "memory": "200Gi", "node_selector": {"pool": "spot"}})
    assert job_variables("full", ["t"], data) == {"gpu_count": 2, "memory_request": "200Gi",
                                                  "node_selector": {GPU_LABEL: "NVIDIA-H100-80GB-HBM3", "pool": "spot"}}


@pytest.mark.parametrize("hardware, message", [
    ({"lora": {"gpu": "h100"}}, "params.yaml: dispatch: hardware.lora.gpu = 'h100' is not one of gpus"),
    ({"full": {"gpus": 2}}, "unknown key 'dispatch.hardware.full.gpus'"),
    ({"full": {"memory": "64GB"}}, "dispatch.hardware.full.memory = '64GB'"),
    ({"full": {"gpu_count": 0}}, "dispatch.hardware.full.gpu_count = 0"),
])
def test_bad_hardware_is_one_line_naming_the_key(hardware, message):
    with pytest.raises(TuneoffError) as e:
        section(DispatchParams, "dispatch", data=params(**hardware))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_gpu_the_estimator_does_not_know_is_named(tmp_path, monkeypatch):
    workspace(tmp_path, "llama-3.2-1b")
    monkeypatch.chdir(tmp_path)
    data = params()
    data["dispatch"]["gpus"] = ["NVIDIA A100-PCIE-40GB"]
    with pytest.raises(TuneoffError, match=r"dispatch.gpus: \['NVIDIA A100-PCIE-40GB'\] not in estimate.devices"):
        job_variables("lora", ["t"], data)



def test_several_devices_shard_a_full_fine_tune_and_need_as_many_gpus(tmp_path, monkeypatch):
    """train.common.devices: 4 on GPUs is FSDP for full: the 8B's ~150 GiB, sharded four ways, fits an 80 GB
    card; a unit asking for fewer GPUs than the train stage starts processes is a one-line error."""
    workspace(tmp_path, "llama-3-8b")
    monkeypatch.chdir(tmp_path)
    data = params(full={"gpu_count": 4})
    data["train"]["common"].update(devices=4, batch_size=4)
    assert job_variables("full", ["t"], data) == {"gpu_count": 4, "node_selector": {GPU_LABEL: "NVIDIA-A100-SXM4-80GB"}}
    with pytest.raises(TuneoffError, match=r"^params.yaml: dispatch.hardware.lora.gpu_count 1 is less than "
                                           r"train.common.devices 4: the train stage runs one process per GPU$"):
        job_variables("lora", ["t"], data)
