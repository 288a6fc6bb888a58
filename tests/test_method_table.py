"""A method is one row of tuneoff/core/methods.py and one section of params.yaml: a fourth arm, LoRA
on every linear layer, added in a copy of the project by editing those two files alone, trains,
merges, is scored and is judged against full fine-tuning by `dvc repro report`."""

import json
import subprocess

import pytest
import yaml
from conftest import make_project, run

pytestmark = pytest.mark.slow
ROW = 'LORA_ALL = Method("lora_all", adapter=True, quantized=False, colour="C3")\n'
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def add_lora_all(project):
    table = project / "tuneoff/core/methods.py"
    text = table.read_text()
    assert "METHODS = {m.name: m for m in (FULL, LORA, QLORA)}" in text
    table.write_text(text.replace("METHODS = {m.name: m for m in (FULL, LORA, QLORA)}",
                                  ROW + "METHODS = {m.name: m for m in (FULL, LORA, QLORA, LORA_ALL)}"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lora_all"] = {**params["train"]["lora"], "target_modules": ALL_LINEAR}
    for device in ("cpu", "cuda"):
        params["estimate"]["utilisation"][device]["lora_all"] = params["estimate"]["utilisation"][device]["lora"]
    params["dispatch"]["hardware"]["lora_all"] = params["dispatch"]["hardware"]["lora"]
    # this bake-off: one task, full against the new arm
    params["bakeoff"].update(tasks=["iso_codes"], float_methods=["full", "lora_all"], nf4_methods=[],
                             adapter_methods=["lora_all"], float_adapter_methods=["lora_all"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_fourth_method_is_a_row_of_the_table_and_a_section_of_params(tmp_path, tiny_base):
    project = make_project(tmp_path, tiny_base)
    add_lora_all(project)
    changed = subprocess.run(["git", "diff", "--name-only"], cwd=project, capture_output=True, text=True,
                             check=True).stdout.split()
    assert changed == ["params.yaml", "tuneoff/core/methods.py"]

    out = run(["dvc", "repro", "report"], project)
    for stage in ("train@iso_codes-lora_all", "merge@iso_codes-lora_all", "evaluate@iso_codes-lora_all",
                  "train@iso_codes-full", "evaluate_full@iso_codes", "report"):
        assert f"Running stage '{stage}'" in out
    runs = project / "runs/iso_codes"
    new, full = (json.loads((runs / m / "train.json").read_text()) for m in ("lora_all", "full"))
    assert sorted(new["setup"]["target_modules"]) == ALL_LINEAR
    assert 0 < new["params"]["trainable"] < full["params"]["trainable"]
    assert new["tokens"] == full["tokens"]  # the same data and budget as every other arm
    assert (runs / "lora_all/model/adapter_model.safetensors").is_file()
    assert (runs / "lora_all/merged/model.safetensors").is_file()

    comparison = json.loads((project / "reports/comparison.json").read_text())
    task = comparison["tasks"][0]
    assert [r["method"] for r in task["rows"]] == ["base", "full", "lora_all"]
    assert {(p["a"], p["b"]) for p in task["pairs"]} >= {("lora_all", "base"), ("lora_all", "full")}
    assert comparison["decisions"]["iso_codes"]["method"] in ("full", "lora_all", None)
    assert "| lora_all - full |" in (project / "reports/report.md").read_text()
