"""The general-ability benchmarks: lm-eval's score agrees with a hand count on the tiny model, and
the shipped tasks run offline from data/general/."""

from __future__ import annotations

import json
import socket

import datasets
import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from tuneoff.core.errors import TuneoffError
from tuneoff.evaluation.general import run_benchmarks

ITEMS = [
    ("Extract the name from: Maria sent the invoice.", ["Maria", "the invoice", "sent", "nobody"]),
    ("What is the ISO code of France?", ["FR", "DE", "ES"]),
    ("Which city is the capital of Japan?", ["Tokyo", "Osaka", "Kyoto", "Nagoya"]),
    ("Extract the date from: paid on 2024-03-01.", ["2024-03-01", "paid", "on"]),
    ("What is the ISO code of Italy?", ["IT", "IL", "IS", "IN"]),
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model(tiny_base):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@torch.no_grad()
def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of the log-probabilities of `choice`'s tokens after `context`, split as lm-eval splits a
    pair: the target delimiter's space moves to the continuation, and the continuation's tokens are
    those of the whole string past the context's own tokens."""
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + " " + choice).input_ids
    logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    positions = torch.arange(len(context_ids), len(whole))
    return logprobs[positions - 1, torch.tensor(whole)[positions]].sum().item()


def test_acc_matches_a_hand_count(model, tokenizer, tmp_path):
    """Targets are set from the hand argmax (right on even items, wrong on odd), so both outcomes
    occur whatever the random tiny model prefers."""
    picks = [max(range(len(choices)), key=lambda i: choice_logprob(model, tokenizer, q, choices[i]))
             for q, choices in ITEMS]
    labels = [pick if n % 2 == 0 else (pick + 1) % len(choices) for n, (pick, (_, choices)) in
              enumerate(zip(picks, ITEMS))]
    hand_correct = [pick == label for pick, label in zip(picks, labels)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": choices, "label": label}) + "\n"
                            for (q, choices), label in zip(ITEMS, labels)))
    (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))

    scores = run_benchmarks(model, tokenizer, ["tiny_mc"], limit=None, batch_size=2, include_path=tmp_path)

    assert hand_correct == [True, False, True, False, True]
    assert scores["tiny_mc"] == {"acc": pytest.approx(3 / 5), "acc_norm": None, "n": 5, "correct": hand_correct}


def test_unknown_task_names_task_and_path(model, tokenizer, tmp_path):
    with pytest.raises(TuneoffError, match=f"'nope'.*{tmp_path}"):
        run_benchmarks(model, tokenizer, ["nope"], limit=1, batch_size=1, include_path=tmp_path)


def test_shipped_tasks_run_offline(model, tokenizer, monkeypatch):
    """The YAMLs' data_files are relative to the project root; no host name is ever looked up."""
    monkeypatch.chdir(ROOT)
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or [])
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE before datasets is imported

    scores = run_benchmarks(model, tokenizer, ["openbookqa_local", "truthfulqa_local_mc1"], limit=3, batch_size=4)

    assert lookups == []
    for name, score in scores.items():
        assert score["n"] == 3 == len(score["correct"]), name
        assert score["acc"] == pytest.approx(sum(score["correct"]) / 3), name
    assert isinstance(scores["openbookqa_local"]["acc_norm"], float)
    assert scores["truthfulqa_local_mc1"]["acc_norm"] is None
