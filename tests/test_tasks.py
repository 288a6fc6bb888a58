import json
from pathlib import Path

import pytest
import yaml
from conftest import BANKING77, ROOT

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import CsvTask, HfDiskTask, JsonlTask, PrepareParams
from tuneoff.data.tasks import build_task, extraction, iso_codes, source, split
from tuneoff.data.tasks.loaders import load_jsonl

PREP = PrepareParams(seed=0, seq_len=256, val_fraction=0.1, test_fraction=0.1, max_val_examples=0, max_test_examples=0)


def test_extraction_is_deterministic_json_with_the_promised_fields():
    a, b = extraction.generate(50, 7), extraction.generate(50, 7)
    assert a == b and a != extraction.generate(50, 8)
    for ex in a:
        record = json.loads(ex["messages"][-1]["content"])
        assert list(record) == ["name", "order_id", "product", "issue", "urgency"]
        assert record["issue"] in extraction.ISSUES and record["urgency"] in ("low", "normal", "high")
        if record["order_id"]:
            assert record["order_id"] in ex["messages"][1]["content"]


def test_triage_labels_extractions_messages_with_their_issue_type():
    """The default run's classification task: extraction's messages, answered with the issue type alone,
    scored as labels from a closed set that its system prompt names."""
    from tuneoff.core.params import TriageTask

    task = build_task(TriageTask(kind="triage", n_examples=40), PREP)
    assert task.scorer == "label" and task.labels == list(extraction.ISSUES)
    records = extraction.generate(40, PREP.seed)
    for ex, record in zip(task.examples, records):
        assert ex["messages"][1] == record["messages"][1]
        assert ex["messages"][-1]["content"] == json.loads(record["messages"][-1]["content"])["issue"]
        assert all(label in ex["messages"][0]["content"] for label in extraction.ISSUES)


def test_iso_codes_test_asks_trained_facts_in_a_held_out_phrasing():
    examples = iso_codes.generate(60, 0, 0.1)
    train = [ex for ex in examples if ex["split"] == "train"]
    held_out = [ex for ex in examples if ex["split"] != "train"]
    assert len(train) == 120 and len(held_out) == 60
    trained_answers = {ex["messages"][-1]["content"] for ex in train}
    trained_questions = {ex["messages"][1]["content"] for ex in train}
    for ex in held_out:
        assert ex["messages"][-1]["content"] in trained_answers  # the fact was trained
        assert ex["messages"][1]["content"] not in trained_questions  # but never asked this way


def test_split_is_deterministic_and_disjoint():
    examples = extraction.generate(100, 0)
    s1, overlap = split(examples, PREP, "tasks.t")
    assert (s1, overlap) == split(examples, PREP, "tasks.t") and overlap == {"val_dropped": 0, "test_dropped": 0}
    assert {k: len(v) for k, v in s1.items()} == {"train": 80, "val": 10, "test": 10}
    keys = [ex["messages"][1]["content"] for part in s1.values() for ex in part]
    assert len(keys) == len(set(keys)) == 100


def test_a_capped_split_is_capped_before_it_is_carved_so_the_rest_trains():
    capped = PREP.model_copy(update={"max_val_examples": 4, "max_test_examples": 3})
    parts, _ = split(extraction.generate(100, 0), capped, "tasks.t")
    assert {k: len(v) for k, v in parts.items()} == {"train": 93, "val": 4, "test": 3}


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_chat_and_instruction_forms(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json.dumps({"instruction": "Add", "input": "2 3", "output": "5"}),
        "",
    ]))
    examples = load_jsonl(path, "Be brief.")
    assert [m["role"] for m in examples[0]["messages"]] == ["system", "user", "assistant"]
    assert examples[1]["messages"][1]["content"] == "Add\n\n2 3"


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2: not valid JSON"),
    ('{"instruction": "a"}\n', 'line 1: missing key "output"'),
    ('{"instruction": "a", "output": "  "}\n', 'line 1: key "output" is empty'),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "line 1: messages has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', 'line 1: messages[0] needs "role"'),
    ("", "file is empty"),
])
def test_jsonl_errors_name_file_line_and_key(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(TuneoffError) as e:
        load_jsonl(path, "")
    assert str(path) in str(e.value) and message in str(e.value)


def test_not_utf8_binary_and_missing_files(tmp_path):
    with pytest.raises(TuneoffError, match="line 2: not valid UTF-8"):
        load_jsonl(write(tmp_path / "latin1.jsonl", b'{"a": 1}\n{"b": "caf\xe9"}\n', "wb"), "")
    with pytest.raises(TuneoffError, match="looks binary"):
        load_jsonl(write(tmp_path / "x.jsonl", b"\x00\x01\x02", "wb"), "")
    with pytest.raises(TuneoffError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl", "")


def csv_task(path, **kw):
    base = dict(kind="csv", path=str(path), test_path="", text_column="text", label_column="label",
                labels_path="", labels_in_prompt=True, system_prompt="Classify.")
    return CsvTask(**{**base, **kw})


def test_csv_classification_and_its_errors(tmp_path):
    path = write(tmp_path / "c.csv", "text,label\n" + "my card is lost,lost_card\n\"hi, there\",greeting\n" * 10)
    task = build_task(csv_task(path), PREP)
    assert task.scorer == "label" and task.labels == ["greeting", "lost_card"]
    assert "Labels: greeting, lost_card." in task.examples[0]["messages"][0]["content"]
    with pytest.raises(TuneoffError, match="no column 'category' \\(label_column\\)"):
        build_task(csv_task(path, label_column="category"), PREP)
    labels = write(tmp_path / "labels.json", '["lost_card"]')
    with pytest.raises(TuneoffError, match="row 2: label 'greeting' is not in the label set"):
        build_task(csv_task(path, labels_path=str(labels)), PREP)
    empty = write(tmp_path / "e.csv", "text,label\nhello,\n")
    with pytest.raises(TuneoffError, match="line 2: empty 'label'"):
        build_task(csv_task(empty), PREP)


@pytest.mark.skipif(not BANKING77.exists(), reason="../shared/data/banking77 not present")
def test_banking77_through_the_csv_loader_with_params_only():
    task = build_task(csv_task(BANKING77 / "train.csv", test_path=str(BANKING77 / "test.csv"),
                               label_column="category", labels_path=str(BANKING77 / "categories.json"),
                               labels_in_prompt=False), PREP)
    parts, overlap = split(task.examples, PREP, "tasks.t")
    assert len(task.labels) == 77
    # test.csv has 3080 rows: 6 are in train.csv word for word (dropped) and 1 is there twice (one item);
    # val is carved from train.csv's 10003 rows by prompt, so the text train.csv repeats stays on one side
    assert overlap == {"val_dropped": 0, "test_dropped": 6}
    assert len(parts["test"]) == 3073 and len(parts["train"]) + len(parts["val"]) == 10003


def test_hf_dataset_on_disk_keeps_its_splits(tmp_path):
    import datasets

    rows = [{"instruction": f"Say {i}", "output": str(i)} for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                          "test": datasets.Dataset.from_list(rows[16:])}).save_to_disk(tmp_path / "ds")
    task = build_task(HfDiskTask(kind="hf_disk", path=str(tmp_path / "ds"), system_prompt="", scorer="exact"), PREP)
    parts, _ = split(task.examples, PREP, "tasks.t")
    assert [ex["messages"][-1]["content"] for ex in parts["test"]] == ["16", "17", "18", "19"]
    assert len(parts["val"]) == 2 and len(parts["train"]) == 14


def test_jsonl_task_with_separate_test_file(tmp_path):
    line = lambda i: json.dumps({"instruction": f"Say {i}", "output": str(i)})  # noqa: E731
    train = write(tmp_path / "train.jsonl", "\n".join(line(i) for i in range(30)))
    test = write(tmp_path / "test.jsonl", "\n".join(line(i) for i in range(100, 105)))
    task = build_task(JsonlTask(kind="jsonl", path=str(train), test_path=str(test), system_prompt="", scorer="exact"), PREP)
    assert len(split(task.examples, PREP, "tasks.t")[0]["test"]) == 5


def say(i, output=None):
    return json.dumps({"instruction": f"Say {i}", "output": output or str(i)})


def test_test_examples_whose_prompt_is_trained_are_dropped(tmp_path):
    train = write(tmp_path / "train.jsonl", "\n".join(say(i) for i in range(30)))
    # "Say 3" is trained (with another answer: the prompt is what is compared) and "Say 101" comes twice: one item
    test = write(tmp_path / "test.jsonl", "\n".join([say(100), say(3, "three"), say(101), say(101)]))
    task = build_task(JsonlTask(kind="jsonl", path=str(train), test_path=str(test), system_prompt="", scorer="exact"), PREP)
    parts, overlap = split(task.examples, PREP, "tasks.t")
    assert [ex["messages"][-1]["content"] for ex in parts["test"]] == ["100", "101"]
    assert overlap == {"val_dropped": 0, "test_dropped": 1} and len(parts["train"]) + len(parts["val"]) == 30
    write(test, "\n".join([say(3), say(4)]))
    spec = JsonlTask(kind="jsonl", path=str(train), test_path=str(test), system_prompt="", scorer="exact")
    with pytest.raises(TuneoffError) as e:
        split(build_task(spec, PREP).examples, PREP, source("sayit", spec))
    assert str(e.value) == (f"tasks.sayit ({train}, {test}): the test split is empty: each of its 2 prompts is in "
                            "train or val too")


def test_a_file_that_repeats_examples_still_splits_clean(tmp_path):
    path = write(tmp_path / "repeats.jsonl", "\n".join(say(i) for i in [*range(30), *range(10)]))
    parts, overlap = split(build_task(JsonlTask(kind="jsonl", path=str(path), test_path="", system_prompt="",
                                                scorer="exact"), PREP).examples, PREP, "tasks.t")
    prompts = {name: [ex["messages"][0]["content"] for ex in parts[name]] for name in parts}
    assert not set(prompts["val"]) & set(prompts["train"])
    assert not set(prompts["test"]) & set(prompts["train"] + prompts["val"])
    assert len(set(prompts["test"])) == len(prompts["test"]) == 3 and len(set(prompts["val"])) == len(prompts["val"]) == 3
    # 30 prompts, 10% each to val and test, drawn by prompt: train keeps every record of the other 24 (a repeated
    # one twice), nothing is dropped
    held_out = prompts["val"] + prompts["test"]
    assert len(prompts["train"]) == 40 - sum(1 + (int(p.split()[1]) < 10) for p in held_out)
    assert overlap == {"val_dropped": 0, "test_dropped": 0}


def prepare_task(tmp_path, tiny_base, monkeypatch, name, entry, files):
    """Run `prepare@name` in tmp_path with `entry` as the task's params and `files` under data/raw/."""
    from stages import prepare

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"][name] = entry
    params["bakeoff"]["tasks"] = [name]
    params["tracking"]["enabled"] = False
    write(tmp_path / "params.yaml", yaml.safe_dump(params))
    (tmp_path / "data/raw").mkdir(parents=True)
    for file, text in files.items():
        write(tmp_path / "data/raw" / file, text)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/base").symlink_to(tiny_base)
    monkeypatch.chdir(tmp_path)
    prepare.main(name, base=Path("models/base"), out=Path("data/prepared") / name)
    return json.loads((tmp_path / "data/prepared" / name / "meta.json").read_text())


def test_prepare_runs_on_a_csv_task_with_only_the_required_keys(tmp_path, tiny_base, monkeypatch, capsys):
    entry = {"kind": "csv", "path": "data/raw/clinc.csv", "text_column": "query",
             "label_column": "intent"}  # as the README's table lists them: nothing optional
    rows = "".join(f"what's my balance {i},balance\nfreeze my card {i},freeze\n" for i in range(10))
    meta = prepare_task(tmp_path, tiny_base, monkeypatch, "clinc", entry, {"clinc.csv": "query,intent\n" + rows})
    assert meta["scorer"] == "label" and meta["labels"] == ["balance", "freeze"]
    assert meta["examples"] == {"train": 16, "val": 2, "test": 2}
    assert meta["overlap"] == {"val_dropped": 0, "test_dropped": 0} and "dropped" not in capsys.readouterr().out
    system = json.loads((tmp_path / "data/prepared/clinc/train.jsonl").read_text().splitlines()[0])["messages"][0]
    assert system == {"role": "system", "content": "Classify the text. Answer with the label only."}


def test_prepare_records_and_notes_the_test_examples_it_dropped(tmp_path, tiny_base, monkeypatch, capsys):
    entry = {"kind": "jsonl", "path": "data/raw/train.jsonl", "test_path": "data/raw/test.jsonl"}
    files = {"train.jsonl": "\n".join(say(i) for i in range(30)), "test.jsonl": "\n".join(say(i) for i in (2, 100, 101))}
    meta = prepare_task(tmp_path, tiny_base, monkeypatch, "sayit", entry, files)
    assert meta["examples"]["test"] == 2 and meta["overlap"] == {"val_dropped": 0, "test_dropped": 1}
    test = (tmp_path / "data/prepared/sayit/test.jsonl").read_text()
    assert '"Say 2"' not in test and '"Say 100"' in test
    assert "prepare@sayit: dropped 1 test example whose prompt is also in train or val" in capsys.readouterr().out


def test_several_references_per_prompt_are_one_item_and_no_prompt_crosses_splits():
    # 60 prompts with 1-5 answers each (as data-to-text and paraphrase data come): split by prompt, each
    # answer a training example, each held-out prompt one item with every distinct reference
    records = [{"messages": [{"role": "user", "content": f"describe {i}"}, {"role": "assistant", "content": f"it is {i} v{k}"}]}
               for i in range(60) for k in range(1 + i % 5)] + [{"messages": [{"role": "user", "content": "describe 3"},
                                                                              {"role": "assistant", "content": "it is 3 v0"}]}]
    parts, overlap = split(records, PREP, "tasks.t")
    assert overlap == {"val_dropped": 0, "test_dropped": 0}
    prompts = {name: [ex["messages"][0]["content"] for ex in part] for name, part in parts.items()}
    assert len(prompts["val"]) == len(prompts["test"]) == 6 and len(set(prompts["test"])) == 6  # 10% of 60 prompts
    assert not set(prompts["train"]) & set(prompts["val"]) and not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["val"]) & set(prompts["test"])
    for item in parts["val"] + parts["test"]:
        i = int(item["messages"][0]["content"].split()[1])
        assert item.get("references", [item["messages"][-1]["content"]]) == [f"it is {i} v{k}" for k in range(1 + i % 5)]
    assert len(parts["train"]) == len(records) - sum(1 + int(p.split()[1]) % 5 + (p == "describe 3")
                                                     for p in prompts["val"] + prompts["test"])


def test_the_built_in_free_form_task_has_several_references_per_prompt():
    from tuneoff.core.params import RestaurantsTask
    from tuneoff.data.tasks import prompt

    task = build_task(RestaurantsTask(kind="restaurants", n_prompts=60, scorer="rouge_l"), PREP)
    per_prompt = {}
    for ex in task.examples:
        per_prompt.setdefault(prompt(ex), []).append(ex["messages"][-1]["content"])
    assert task.scorer == "rouge_l" and len(per_prompt) == 60 and all(3 <= len(v) <= 8 for v in per_prompt.values())
    parts, _ = split(task.examples, PREP, "tasks.restaurants")
    assert len(parts["test"]) == len(parts["val"]) == 6  # 10% of the prompts each
    assert sum(len(ex.get("references", [1])) for ex in parts["val"] + parts["test"]) + len(parts["train"]) == len(task.examples)
