"""Bad input gets one clear line, never another exception: data files, params, model folders,
names used as paths, and an out-of-memory step. Property-based where the input space is open."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from conftest import stage_command
from hypothesis import strategies as st

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import (
    BakeoffParams,
    CheckpointParams,
    CommonTrainParams,
    LoraParams,
    TaskParams,
    check_task,
    read_params,
    section,
)
from tuneoff.data.tasks.loaders import (
    MAX_RECORD_CHARS,
    load_csv,
    load_jsonl,
    read_labels,
)

ROOT = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# -- data files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("huge.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "' + "x" * MAX_RECORD_CHARS + '", "output": "b"}\n',
     "huge.jsonl line 2: 1,000,034 characters in one record (limit 1,000,000); is a newline missing?"),
    ("array.jsonl", '[1, 2]\n', "array.jsonl line 1: expected a JSON object, got list"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}\n',
     'content.jsonl line 1: messages[0] has empty or missing "content"'),
    ("blank.jsonl", "\n\n  \n", "blank.jsonl: file is empty"),
    ("last.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}\n', "last.jsonl line 1: the last message is the user's, not the assistant's: "
     "which turn is the answer?"),
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "note": '
     + "[" * 33 + "]" * 33 + "}\n", "deep.jsonl line 2: JSON nested deeper than 32 levels"),
    ("deeper.jsonl", '{"instruction": "a", "output": "b", "note": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "deeper.jsonl line 1: JSON nested deeper than 32 levels"),  # past the parser's recursion limit
])
def test_jsonl_bad_files(tmp_path, name, content, message):
    with pytest.raises(TuneoffError) as e:
        load_jsonl(write(tmp_path / name, content), "")
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_a_json_string_may_hold_unicode_line_separators(tmp_path):
    path = write(tmp_path / "ls.jsonl", '{"instruction": "a\u2028b", "output": "c"}\n')
    assert load_jsonl(path, "")[0]["messages"][0]["content"] == "a\u2028b"


def test_files_the_project_writes_read_back_whole_with_unicode_line_separators(tmp_path):
    from tuneoff.core.atomic import write_json, write_jsonl
    from tuneoff.core.records import read_jsonl
    from tuneoff.decision.pairs import read_items
    from tuneoff.evaluation.score import load_test

    text = "a\u2028b\u2029c\x85d"  # str.splitlines() breaks at each; write_jsonl leaves them raw
    examples = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}] * 2
    write_jsonl(tmp_path / "test.jsonl", examples)
    write_json(tmp_path / "meta.json", {"scorer": "exact", "labels": []})
    test = load_test(tmp_path)
    assert test.references == [text, text] and test.conversations == [ex["messages"][:1] for ex in examples]
    records = [{"input": text, "correct": True}, {"input": "x", "correct": False}]
    write_jsonl(tmp_path / "predictions.jsonl", records)
    assert read_items(tmp_path / "predictions.jsonl") == read_jsonl(tmp_path / "predictions.jsonl") == records


@pytest.mark.parametrize("record, surrogate", [
    ('{"instruction": "a\\ud83d", "output": "b"}', "\\ud83d"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\udc00b"}]}', "\\udc00"),
    ('{"instruction": "a", "output": "b", "note": {"x": ["\\ud800"]}}', "\\ud800"),  # a field no one reads
])
def test_a_lone_surrogate_escape_is_one_line_naming_the_line(tmp_path, record, surrogate):
    path = write(tmp_path / "x.jsonl", '{"instruction": "\\ud83d\\ude00 pair", "output": "ok"}\n' + record + "\n")
    with pytest.raises(TuneoffError) as e:
        load_jsonl(path, "")
    assert str(e.value) == f"{path} line 2: text is not valid Unicode (a lone surrogate {surrogate})"
    assert load_jsonl(write(tmp_path / "ok.jsonl", '{"instruction": "\\ud83d\\ude00", "output": "b"}\n'),
                      "")[0]["messages"][0]["content"] == "\U0001f600"  # a surrogate pair is one character
    with pytest.raises(TuneoffError, match=r"labels.json: text is not valid Unicode \(a lone surrogate \\ud83d\)"):
        read_labels(write(tmp_path / "labels.json", '["ok", "\\ud83d"]'))


@pytest.mark.parametrize("content, message", [
    ("text,label\n" + "x" * (MAX_RECORD_CHARS + 10) + ",a\n", "huge.csv line 2: not valid CSV (field larger than field limit"),
    ('text,label\nok,a\n"unclosed,a\nmore\n', "huge.csv line 3: not valid CSV (unexpected end of data)"),
    ("text,label\nhello,a\nworld\n", "huge.csv line 3: empty 'label'"),
    ("text,label\n", "huge.csv: no data rows"),
    ("text,label,text\nhello,a,world\n", "huge.csv line 1: the header names column 'text' (text_column) 2 times: "
     "which one is meant?"),
    (b"text,label\nok,a\n\xed\xa0\xbd,a\n", "huge.csv line 3: not valid UTF-8"),  # a lone surrogate, encoded
])
def test_csv_bad_files(tmp_path, content, message):
    with pytest.raises(TuneoffError) as e:
        load_csv(write(tmp_path / "huge.csv", content), "text", "label")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_json_nested_to_the_limit_loads_and_past_it_is_one_line(tmp_path):
    at_limit = '{"instruction": "a", "output": "b", "note": ' + "[" * 31 + "]" * 31 + "}\n"  # 32 levels with the record
    assert load_jsonl(write(tmp_path / "ok.jsonl", at_limit), "")
    with pytest.raises(TuneoffError) as e:
        read_labels(write(tmp_path / "labels.json", "[" * 50_000 + "]" * 50_000))
    assert str(e.value) == f"{tmp_path / 'labels.json'}: JSON nested deeper than 32 levels"


def test_csv_quoted_field_may_span_lines(tmp_path):
    rows = load_csv(write(tmp_path / "multi.csv", 'text,label\n"two\nlines",a\n'), "text", "label")
    assert rows == [("two\nlines", "a")]


@PROPERTY
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_are_data_or_a_clear_error(tmp_path, data):
    for loader in (lambda p: load_jsonl(p, "sys"), lambda p: load_csv(p, "text", "label"), read_labels):
        path = write(tmp_path / "any.txt", data)
        try:
            result = loader(path)
        except TuneoffError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            continue
        assert result  # what loads is non-empty, well-formed data
        for item in result:
            if isinstance(item, dict):
                assert item["messages"][-1]["role"] == "assistant" or any(m["role"] == "assistant" for m in item["messages"])
                assert all(isinstance(m["content"], str) and m["content"].strip() for m in item["messages"])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
                           max_leaves=10)
records = st.one_of(json_values, st.fixed_dictionaries({"instruction": json_values, "output": json_values}),
                    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
                        {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": json_values}),
                        max_size=3)}))


@PROPERTY
@given(st.lists(records, min_size=1, max_size=4))
def test_any_json_records_are_examples_or_a_clear_error(tmp_path, recs):
    path = write(tmp_path / "recs.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    try:
        examples = load_jsonl(path, "")
    except TuneoffError as e:
        assert f"{path} line " in str(e) and "\n" not in str(e)
        return
    assert len(examples) == len(recs)


# -- params -------------------------------------------------------------------------------------

def params_file(tmp_path, section_keys, value) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = data
    for key in section_keys[:-1]:
        node = node[key]
    node[section_keys[-1]] = value
    return write(tmp_path / "params.yaml", yaml.safe_dump(data))


@PROPERTY
@given(st.sampled_from([("train", "common"), ("train", "lora"), ("bakeoff",), ("checkpoint",), ("tasks", "banking77")]),
       st.sampled_from(["seed", "batch_size", "rank", "target_modules", "tasks", "every_steps", "kind", "path", "rnak"]),
       json_values)
def test_any_params_value_is_valid_or_names_its_key(tmp_path, where, key, value):
    model = {("train", "common"): CommonTrainParams, ("train", "lora"): LoraParams, ("bakeoff",): BakeoffParams,
             ("checkpoint",): CheckpointParams, ("tasks", "banking77"): TaskParams}[where]
    path = params_file(tmp_path, [*where, key], value)
    try:
        accepted = section(model, *where, path=path)
    except TuneoffError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        assert ".".join(where) in str(e)
    else:  # accepted as written: no coercion (true as 1, "3" as 3, 2.5 as 2) and no unknown key
        kept = getattr(accepted, key)
        assert kept == value and type(kept) is type(value), (key, value, kept)


@PROPERTY
@given(st.text(max_size=200))
def test_any_params_text_is_a_mapping_or_a_clear_error(tmp_path, text):
    path = write(tmp_path / "params.yaml", text)
    try:
        assert isinstance(read_params(path), dict)
    except TuneoffError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@pytest.mark.parametrize("task", ["../etc", "a/b", "", "-rf", "x" * 65, "tâche"])
def test_task_names_that_would_escape_their_folder_are_refused(tmp_path, task):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["bakeoff"]["tasks"] = [task]
    with pytest.raises(TuneoffError, match=r"bakeoff.tasks.0 = .*should match pattern"):
        section(BakeoffParams, "bakeoff", data=data)
    data["bakeoff"]["tasks"] = ["extraction"]
    with pytest.raises(TuneoffError, match=r"task .* is not in bakeoff.tasks \['extraction'\]"):
        check_task(task, data)


# -- model folders ------------------------------------------------------------------------------

def import_base_in(tmp_path, model_dir: Path) -> subprocess.CompletedProcess:
    """The import_base stage, run for real in a scratch project pointing at `model_dir`."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base_model"].update(source="path", path=str(model_dir))
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run(stage_command("import_base"), cwd=project, env=env,
                          capture_output=True, text=True)


def broken(tmp_path, tiny_base, how: str) -> Path:
    folder = tmp_path / how
    shutil.copytree(tiny_base, folder)
    if how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "pickled-weights":
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    elif how == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).unlink()
    elif how == "no-chat-template":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        for f in folder.glob("chat_template.*"):
            f.unlink()
    elif how == "remote-code":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("how, message", [
    ("no-weights", "no .safetensors weights"),
    ("pickled-weights", "no .safetensors weights (only pickled ['pytorch_model.bin']: tuneoff loads safetensors only"),
    ("no-tokenizer", "no tokenizer (tokenizer.json or tokenizer_config.json)"),
    ("no-chat-template", "has no chat template"),
    ("remote-code", "the model needs its own Python code (auto_map in config.json)"),
])
def test_a_bad_model_folder_fails_import_with_one_line_and_no_output(tmp_path, tiny_base, how, message):
    proc = import_base_in(tmp_path, broken(tmp_path, tiny_base, how))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert not (tmp_path / "project/models").exists() or not any((tmp_path / "project/models").iterdir())


def test_debug_env_shows_the_traceback(tmp_path, tiny_base):
    folder = broken(tmp_path, tiny_base, "no-weights")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base_model"].update(source="path", path=str(folder))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "TUNEOFF_DEBUG": "1"}
    proc = subprocess.run(stage_command("import_base"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "TuneoffError" in proc.stderr


# -- a bug, and a network error -----------------------------------------------------------------

def test_a_bug_is_one_line_naming_its_traceback_and_the_flow_does_not_retry_it(tmp_path, monkeypatch, capsys):
    """An exception tuneoff did not expect (here a KeyError, as real data once raised in scoring)
    fails the same way every time: one line naming it and where its traceback is, and no retry."""
    from prefect.states import Failed

    from flows.bakeoff import transient
    from flows.shell import CommandFailed
    from tuneoff.core.errors import user_errors

    @user_errors
    def evaluate(task: str, model: str):
        return {"name": "x"}["album"]

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate("slots", "lora")
    line = capsys.readouterr().err
    assert e.value.code == 1 and line.count("\n") == 1 and "Traceback" not in line
    assert line.startswith("error: KeyError: 'album' at tests/test_bad_input.py:")
    assert line.endswith(" (traceback: logs/test_bad_input-slots-lora.traceback)\n")
    saved = (tmp_path / "logs/test_bad_input-slots-lora.traceback").read_text()
    assert saved.startswith("Traceback") and "KeyError: 'album'" in saved
    cmd = "python -m stages.evaluate slots lora --model-dir runs/slots/lora/merged --prepared data/prepared --run-dir runs/slots/lora"
    output = (f"Running stage 'evaluate@slots-lora':\n> {cmd}\n{line}ERROR: failed to "
              f"reproduce 'evaluate@slots-lora': failed to run: {cmd}, exited with 1\n")
    failed = CommandFailed(("dvc", "repro"), 1, tmp_path, output)
    assert failed.line == "evaluate@slots-lora: " + line.removeprefix("error: ").strip()
    assert not transient(None, None, Failed(data=failed))


def test_a_network_or_storage_error_keeps_its_traceback_and_the_flow_retries_it():
    import errno

    import requests
    from prefect.states import Failed

    from flows.bakeoff import transient
    from flows.shell import CommandFailed
    from tuneoff.core.errors import user_errors

    for error in (requests.exceptions.ConnectionError("Connection reset by peer"), TimeoutError("read timed out"),
                  OSError(errno.EIO, "Input/output error")):
        @user_errors
        def pull():
            try:
                raise error
            except Exception as e:
                raise RuntimeError("download failed") from e  # a library wrapping it

        with pytest.raises(RuntimeError):
            pull()
    output = "Traceback (most recent call last):\n  ...\nrequests.exceptions.ConnectionError: reset\n"
    assert transient(None, None, Failed(data=CommandFailed(("dvc", "repro"), 1, ".", output)))


# -- out of memory ------------------------------------------------------------------------------

def test_out_of_memory_names_the_setting_to_change():
    from stages.train import out_of_memory

    common = section(CommonTrainParams, "train", "common", path=ROOT / "params.yaml").model_copy(update={"batch_size": 3})
    message = out_of_memory("full", common, 448, torch.device("cpu"))
    assert message == ("out of memory training full on cpu: set train.common.micro_batch_size under 3 (the same "
                       "steps, run in parts), or lower train.common.batch_size (now 3 rows of 448 tokens), or set "
                       "train.common.gradient_checkpointing: true, or train qlora (4-bit base); `tuneoff estimate` "
                       "compares the options before a run")
    one_row = out_of_memory("lora", common.model_copy(update={"batch_size": 1}), 448, torch.device("cpu"))
    assert one_row == ("out of memory training lora on cpu: lower prepare.seq_len (now one row of 448 tokens a step), "
                       "or set train.common.gradient_checkpointing: true, or train qlora (4-bit base); `tuneoff estimate` "
                       "compares the options before a run")


# -- the registry under concurrent writers ------------------------------------------------------

def _register(registry: str, i: int) -> None:
    from tuneoff.decision.registry import register

    def judge(production):  # under the lock, against whatever production the writer before left
        return production is None or i / 10 > production["main"], "judged"

    register(Path(registry), "extraction-model", {"method": "lora", "main": i / 10, "writer": i}, judge)


def test_eight_concurrent_registrations_lose_and_duplicate_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # separate interpreters, as separate stages would be
    procs = [ctx.Process(target=_register, args=(str(tmp_path), i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    versions = json.loads((tmp_path / "registry.json").read_text())["models"]["extraction-model"]
    assert sorted(v["version"] for v in versions) == list(range(1, 9))
    assert sorted(v["writer"] for v in versions) == list(range(8))
    assert sum(v["stage"] == "production" for v in versions) == 1
    # production is the best version seen at each step, so in the end the best of all
    assert next(v for v in versions if v["stage"] == "production")["writer"] == 7
    assert not list(tmp_path.glob(".registry.json.tmp-*"))


# -- files stages hand each other -----------------------------------------------------------------

def test_results_with_a_broken_comparison_is_one_line(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/comparison.json").write_text('{"tasks": 1}')
    done = subprocess.run([sys.executable, "-m", "tuneoff.cli", "results"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: reports/comparison.json: tasks: Input should be a valid list "
                                                "(written by an older tuneoff? rerun its stage: `dvc repro --force <stage>`)"]


def test_a_stale_or_broken_train_json_is_one_line_naming_the_file(tmp_path):
    from tuneoff.core.records import TrainRecord, read

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"task": "t", "method": "lora", "cost": {"usd": 1.0}}))  # an older tuneoff's file
    with pytest.raises(TuneoffError, match=r"train.json: device: Field required .*dvc repro --force"):
        read(TrainRecord, path)
    path.write_text("{")
    with pytest.raises(TuneoffError, match=r"train.json: not JSON"):
        read(TrainRecord, path)
