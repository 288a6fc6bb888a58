"""A team's own extraction data, shaped as real slot-filling data is: records of several intents, each
carrying its own keys (a playlist request has `playlist`, a weather request `city`), in instruction
form and in chat form (some with a clarifying turn), brought through params only. The stage functions
run in process on the tiny model: prepare, train (full), evaluate (own task and cross-task) and report."""

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

INTENTS = {  # intent -> the keys its records always have, and the keys some have
    "AddToPlaylist": (["playlist"], ["artist"]),
    "GetWeather": (["city"], ["day"]),
    "BookRestaurant": (["party_size"], ["cuisine", "day"]),
    "PlayMusic": (["artist"], ["service"]),
}
VALUES = {"playlist": ["road trip", "chill mix", "gym"], "artist": ["Queen", "Adele", "Miles Davis"],
          "city": ["Oslo", "Lima", "Pune"], "day": ["today", "friday"], "party_size": [2, 4, 6],
          "cuisine": ["thai", "pizza"], "service": ["spotify", "deezer"]}


def utterances(n: int, seed: int) -> list[tuple[str, dict]]:
    """(utterance, slots) pairs: every slot's value is in the text, the intent is a slot too."""
    rng, out = random.Random(seed), []
    for i in range(n):
        intent = list(INTENTS)[i % len(INTENTS)]
        required, optional = INTENTS[intent]
        keys = required + [k for k in optional if rng.random() < 0.5]
        slots = {"intent": intent, **{k: rng.choice(VALUES[k]) for k in keys}}
        text = f"request {i}: " + ", ".join(f"{k} {v}" for k, v in slots.items() if k != "intent")
        out.append((text, slots))
    return out


def instruction_records(n: int) -> str:
    return "\n".join(json.dumps({"instruction": "Extract the intent and its slots as JSON.", "input": text,
                                 "output": json.dumps(slots)}) for text, slots in utterances(n, 0))


def chat_records(n: int) -> str:
    lines = []
    for i, (text, slots) in enumerate(utterances(n, 1)):
        turns = [{"role": "system", "content": "Reply with the intent and slots as JSON."}]
        if i % 3 == 0:  # the assistant asks first; the JSON answer is the last turn
            turns += [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "What can I do?"}]
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": json.dumps(slots)}]
        lines.append(json.dumps({"messages": turns}))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base):
    """A folder with params.yaml naming the two tasks (params only), their files, and the tiny base."""
    path = tmp_path_factory.mktemp("own-data")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"] = {"slots": {"kind": "jsonl", "path": "data/raw/slots.jsonl", "scorer": "json_fields"},
                       "slots_chat": {"kind": "jsonl", "path": "data/raw/slots_chat.jsonl", "scorer": "json_fields"}}
    params["bakeoff"].update(tasks=["slots", "slots_chat"], float_methods=["full"], nf4_methods=[], adapter_methods=[],
                             float_adapter_methods=[])
    params["prepare"].update(seq_len=256, max_val_examples=4, max_test_examples=12)
    params["train"]["common"].update(batch_size=2, token_budget=800, log_every=2)
    params["evaluate"].update(max_new_tokens=8, bootstrap_samples=100)
    params["benchmarks"].update(tasks=[], cross_task_limit=4)
    params["tracking"]["enabled"] = False
    params["checkpoint"]["every_steps"] = 0
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "data/raw").mkdir(parents=True)
    (path / "data/raw/slots.jsonl").write_text(instruction_records(80))
    (path / "data/raw/slots_chat.jsonl").write_text(chat_records(60))
    (path / "models").mkdir()
    (path / "models/base").symlink_to(tiny_base)
    return path


def test_records_with_different_keys_run_through_prepare_evaluate_and_report(project, monkeypatch):
    from stages import evaluate, prepare, report, train

    monkeypatch.chdir(project)
    for task in ("slots", "slots_chat"):
        prepare.main(task, base=Path("models/base"), out=Path("data/prepared") / task)
        meta = json.loads((project / "data/prepared" / task / "meta.json").read_text())
        # test and val are 10% each, val capped at 4 before it is carved: the rest of its 10% trains
        assert meta["scorer"] == "json_fields" and meta["examples"] == {
            "slots": {"train": 68, "val": 4, "test": 8}, "slots_chat": {"train": 50, "val": 4, "test": 6}}[task]
    for task in ("slots", "slots_chat"):
        train.main(task, "full", base=Path("models/base"), prepared=Path("data/prepared") / task,
                   run=Path("runs") / task / "full")
        for model, folder in (("base", Path("models/base")), ("full", Path("runs") / task / "full/model")):
            evaluate.main(task, model, model_dir=folder, prepared=Path("data/prepared"), run=Path("runs") / task / model)
    report.main(Path("runs"), Path("data/prepared"), Path("models/quantize.json"), Path("reports"))

    comparison = json.loads((project / "reports/comparison.json").read_text())
    text = (project / "reports/report.md").read_text()
    for c in comparison["tasks"]:
        test = [json.loads(json.loads(line)["messages"][-1]["content"])
                for line in (project / "data/prepared" / c["task"] / "test.jsonl").read_text().splitlines()]
        expected = {k: sum(k in ref for ref in test) for ref in test for k in ref}  # per key: the records with it
        assert len({k for ref in test for k in ref}) > 2  # the test records do carry different keys
        for row in c["rows"]:
            fields = row["metrics"]["field_accuracy"]
            assert {k: f["n"] for k, f in fields.items()} == expected
            assert all(0 <= f["accuracy"] <= 1 for f in fields.values()) and row["metrics"]["extra_keys"] >= 0
        assert "| key | records | base | full |" in text
        assert all(f"| {k} | {n} | " in text for k, n in expected.items())
    # each tuned model also answered the other task's first 4 test items, scored the same way
    for task, other in (("slots", "slots_chat"), ("slots_chat", "slots")):
        bench = json.loads((project / "runs" / task / "full/benchmark.json").read_text())
        assert bench["cross_task"][other]["n"] == 4 and bench["cross_task"][other]["main_metric"] == "exact_match"
