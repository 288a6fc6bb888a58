import re
from pathlib import Path

import pytest
import yaml

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import (
    BakeoffParams,
    CommonTrainParams,
    LoraParams,
    QloraParams,
    QuantizeParams,
    read_params,
    section,
)

ROOT = Path(__file__).resolve().parents[1]


def params_with(tmp_path, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_params_are_valid():
    lora = section(LoraParams, "train", "lora", path=ROOT / "params.yaml")
    qlora = section(QloraParams, "train", "qlora", path=ROOT / "params.yaml")
    common = section(CommonTrainParams, "train", "common", path=ROOT / "params.yaml")
    # the fair comparison: LoRA and QLoRA differ only in the quantized base
    assert (lora.rank, lora.alpha, lora.target_modules) == (qlora.rank, qlora.alpha, qlora.target_modules)
    assert common.token_budget > 0


@pytest.mark.parametrize("key, value, message", [
    ("train__lora__rank", 0, "train.lora.rank = 0: Input should be greater than 0"),
    ("train__lora__rank", "sixteen", "train.lora.rank = 'sixteen'"),
    ("train__common__precision", "fp8", "train.common.precision = 'fp8'"),
    ("train__common__optimizer", "sgd", "train.common.optimizer = 'sgd'"),
    ("train__common__micro_batch_size", -1, "train.common.micro_batch_size = -1: Input should be greater than or equal to 0"),
    ("quantize__quant_type", "int3", "quantize.quant_type = 'int3'"),
    # strict: no bool as a number, no string as a number, no float cut to an int, only finite floats
    ("train__common__batch_size", True, "train.common.batch_size = True: Input should be a valid integer"),
    ("train__lora__rank", 8.5, "train.lora.rank = 8.5: Input should be a valid integer"),
    ("train__lora__lr", float("inf"), "train.lora.lr = inf: Input should be a finite number"),
    ("train__lora__alpha", "32", "train.lora.alpha = '32': Input should be a valid number"),
    ("train__common__weight_decay", float("nan"), "train.common.weight_decay = nan: Input should be a finite number"),
])
def test_bad_values_name_the_key_and_value(tmp_path, key, value, message):
    path = params_with(tmp_path, **{key: value})
    model = {"lora": LoraParams, "qlora": QloraParams, "common": CommonTrainParams,
             "quant_type": QuantizeParams}[key.split("__")[1]]
    with pytest.raises(TuneoffError) as e:
        section(model, *key.split("__")[:2], path=path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bakeoff_method_lists_must_agree(tmp_path):
    assert section(BakeoffParams, "bakeoff", path=ROOT / "params.yaml").methods == ["full", "lora", "qlora"]
    path = params_with(tmp_path, bakeoff__float_methods=["full"])  # lora dropped, still listed as an adapter
    with pytest.raises(TuneoffError, match=r"params.yaml: bakeoff: adapter_methods must list the adapter methods that train, \['qlora'\]"):
        section(BakeoffParams, "bakeoff", path=path)
    path = params_with(tmp_path, bakeoff__nf4_methods=["lora"])
    with pytest.raises(TuneoffError, match="bakeoff.nf4_methods.0 = 'lora'"):
        section(BakeoffParams, "bakeoff", path=path)
    path = params_with(tmp_path, bakeoff__float_adapter_methods=[])  # lora would train but never be evaluated
    with pytest.raises(TuneoffError, match=r"bakeoff: float_adapter_methods must list the adapter methods of float_methods, \['lora'\]"):
        section(BakeoffParams, "bakeoff", path=path)


def test_unknown_key_is_a_typo_not_ignored(tmp_path):
    path = params_with(tmp_path, train__lora__rnak=8)
    with pytest.raises(TuneoffError, match="unknown key 'train.lora.rnak'"):
        section(LoraParams, "train", "lora", path=path)


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(TuneoffError, match="missing key 'train.dora'"):
        section(LoraParams, "train", "dora", path=ROOT / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lora: [1, 2\n")
    with pytest.raises(TuneoffError, match=r"params.yaml line \d+: not valid YAML"):
        section(LoraParams, "train", "lora", path=bad)


def test_task_sections_name_the_task_key(tmp_path):
    from tuneoff.core.params import TaskParams

    path = params_with(tmp_path, tasks__banking77__text_colum="text")
    with pytest.raises(TuneoffError, match="unknown key 'tasks.banking77.text_colum'"):
        section(TaskParams, "tasks", "banking77", path=path)
    path = params_with(tmp_path, tasks__extraction__kind="extract")
    with pytest.raises(TuneoffError, match="tasks.extraction.kind = 'extract': allowed:"):
        section(TaskParams, "tasks", "extraction", path=path)
    with pytest.raises(TuneoffError, match="missing key 'tasks.nope'"):
        section(TaskParams, "tasks", "nope", path=ROOT / "params.yaml")


def user_task_template() -> dict:
    """The commented task entries under `tasks:` in params.yaml, uncommented."""
    text = (ROOT / "params.yaml").read_text()
    block = text[text.index("\ntasks:\n"):].split("\n")[2:]
    lines = []
    for line in block:
        if not line.startswith("  #"):
            break
        if re.match(r"^  # ( *[a-z_]+:.*)$", line):
            lines.append(line[4:])
    return yaml.safe_load("\n".join(lines))


def test_params_yaml_template_shows_every_user_task_key_at_its_default():
    from tuneoff.core.params import CsvTask, HfDiskTask, JsonlTask, TaskParams

    template = user_task_template()
    models = {"csv": CsvTask, "jsonl": JsonlTask, "hf_disk": HfDiskTask}
    assert sorted(entry["kind"] for entry in template.values()) == sorted(models)
    for name, entry in template.items():
        model = models[entry["kind"]]
        assert list(entry) == list(model.model_fields), name  # every key, required ones first
        parsed = section(TaskParams, "tasks", name, data={"tasks": template})
        for key, field in model.model_fields.items():
            if not field.is_required():
                assert entry[key] == field.default == getattr(parsed, key), (name, key)


def test_a_csv_task_needs_only_its_file_and_columns():
    from tuneoff.core.params import TaskParams

    data = {"tasks": {"clinc": {"kind": "csv", "path": "data/raw/clinc.csv", "text_column": "query",
                                "label_column": "intent"}}}
    task = section(TaskParams, "tasks", "clinc", data=data)
    assert (task.test_path, task.labels_path, task.labels_in_prompt) == ("", "", False)
    assert task.system_prompt == "Classify the text. Answer with the label only."


def test_every_missing_key_is_named_at_once():
    from tuneoff.core.params import TaskParams

    data = {"tasks": {"clinc": {"kind": "csv", "text_column": "query"}}}
    with pytest.raises(TuneoffError) as e:
        section(TaskParams, "tasks", "clinc", data=data)
    assert str(e.value) == "params.yaml: missing keys 'tasks.clinc.path', 'tasks.clinc.label_column'"
    data["tasks"]["clinc"]["path"] = "clinc.csv"
    with pytest.raises(TuneoffError, match=r"^params.yaml: missing key 'tasks.clinc.label_column'$"):
        section(TaskParams, "tasks", "clinc", data=data)


def test_an_exponent_without_a_point_is_a_float(tmp_path):
    """`lr: 1e-3` is a float to DVC (YAML 1.2), so it is one here too (PyYAML alone reads a string)."""
    path = tmp_path / "params.yaml"
    path.write_text(re.sub(r"(\n  lora:\n    lr: )\S+", r"\g<1>1e-3", (ROOT / "params.yaml").read_text()))
    assert section(LoraParams, "train", "lora", path=path).lr == 0.001


def test_a_lone_surrogate_escape_in_params_is_one_line(tmp_path):
    """YAML's "\\ud83d" is a lone surrogate: a stage writing it (a system prompt) would fail with a traceback."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + '\nnotes: ["ok", "smile \\ud83d"]\n')
    with pytest.raises(TuneoffError, match=r"params.yaml: notes\[1\]: a lone surrogate '\\ud83d' at character 6"):
        read_params(path)
