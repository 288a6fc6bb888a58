"""Free-form replies with several references per prompt, shaped as E2E NLG is (a restaurant's meaning
representation in, one sentence out, 2-6 human references per prompt), brought through params only in
instruction form and in chat form: prepare keeps every reference and no prompt crosses splits, evaluate
scores ROUGE-L, chrF and BLEU against all of them, and the report gives a verdict on ROUGE-L with its
paired interval and shows the replies. The stage functions run in process on the tiny model."""

import itertools
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

NAMES = ["Blue Spice", "The Mill", "Aromi", "Cotto", "Giraffe", "Zizzi", "The Punter", "Wildwood", "Alimentum",
         "Strada", "The Phoenix", "Fitzbillies"]
SLOTS = {"eatType": ["coffee shop", "pub", "restaurant"], "food": ["Italian", "French", "Chinese", "English"],
         "area": ["riverside", "city centre"], "priceRange": ["cheap", "moderate", "high"]}
TEMPLATES = ["{name} is a {eatType} serving {food} food in the {area}, with {priceRange} prices.",
             "In the {area} there is a {priceRange} {food} {eatType} called {name}.",
             "{name} is a {priceRange} {eatType} in the {area} that serves {food} food.",
             "For {food} food at {priceRange} prices, try {name}, a {eatType} in the {area}.",
             "{name}, a {food} {eatType}, is in the {area} and its prices are {priceRange}.",
             "Located in the {area}, {name} is a {eatType} offering {priceRange} {food} food."]
INSTRUCTION = "Describe the restaurant in one sentence."


def meanings(n: int, seed: int) -> list[dict]:
    """n distinct meaning representations, each with 2-6 references."""
    rng = random.Random(seed)
    combos = rng.sample(list(itertools.product(NAMES, *SLOTS.values())), n)
    out = []
    for combo in combos:
        slots = dict(zip(["name", *SLOTS], combo))
        mr = ", ".join(f"{k}[{v}]" for k, v in slots.items())
        out.append({"mr": mr, "references": [t.format(**slots) for t in rng.sample(TEMPLATES, rng.randint(2, 6))]})
    return out


def lines(items: list[dict], chat: bool, seed: int) -> str:
    """One record per (prompt, reference), shuffled so a prompt's references are spread over the file."""
    records = []
    for it in items:
        for ref in it["references"]:
            if chat:
                records.append({"messages": [{"role": "system", "content": INSTRUCTION},
                                             {"role": "user", "content": it["mr"]},
                                             {"role": "assistant", "content": ref}]})
            else:
                records.append({"instruction": INSTRUCTION, "input": it["mr"], "output": ref})
    random.Random(seed).shuffle(records)
    return "\n".join(json.dumps(r) for r in records)


DATA = {"e2e": meanings(300, 0), "e2e_chat": meanings(200, 1)}


@pytest.fixture(scope="module")
def e2e_base(tmp_path_factory):
    """The tiny 2-layer Llama with a byte-level BPE tokenizer trained on this data (conftest's is trained on
    the extraction task and spells these words in letters, so a tiny model's greedy reply is spaces):
    its words are tokens, and a few steps teach it the commonest ones."""
    from conftest import CHATML, build_tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("e2e-base")
    corpus = [INSTRUCTION] + [text for items in DATA.values() for it in items for text in [it["mr"], *it["references"]]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    build_tiny_model(len(fast)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, e2e_base):
    """A folder with params.yaml naming the two free-form tasks (params only), their files, and the tiny base."""
    path = tmp_path_factory.mktemp("free-form")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"] = {"e2e": {"kind": "jsonl", "path": "data/raw/e2e.jsonl", "scorer": "rouge_l"},
                       "e2e_chat": {"kind": "jsonl", "path": "data/raw/e2e_chat.jsonl", "scorer": "rouge_l"}}
    params["bakeoff"].update(tasks=["e2e", "e2e_chat"], float_methods=["full"], nf4_methods=[], adapter_methods=[],
                             float_adapter_methods=[])
    params["prepare"].update(seq_len=256, max_val_examples=4, max_test_examples=24)
    params["train"]["common"].update(batch_size=2, token_budget=5000, log_every=5)
    params["train"]["full"]["lr"] = 3e-2  # the tiny model learns the task's commonest words within the budget
    params["evaluate"].update(max_new_tokens=24, bootstrap_samples=100)
    params["benchmarks"].update(tasks=[], cross_task_limit=0)
    params["decide"]["sample_replies"] = 3
    params["tracking"]["enabled"] = False
    params["checkpoint"]["every_steps"] = 0
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "data/raw").mkdir(parents=True)
    (path / "data/raw/e2e.jsonl").write_text(lines(DATA["e2e"], chat=False, seed=2))
    (path / "data/raw/e2e_chat.jsonl").write_text(lines(DATA["e2e_chat"], chat=True, seed=3))
    (path / "models").mkdir()
    (path / "models/base").symlink_to(e2e_base)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def mr(prompt: str) -> str:
    """The meaning representation a user turn asks about (instruction form puts the instruction first)."""
    return prompt.split("\n\n")[-1]


def test_free_form_replies_with_several_references_get_a_verdict_on_rouge_l(project, monkeypatch):
    from stages import evaluate, prepare, report, train
    from tuneoff.decision.report import REPLY_COLUMNS, reply_rows

    monkeypatch.chdir(project)
    for task, items in DATA.items():
        prepare.main(task, base=Path("models/base"), out=Path("data/prepared") / task)
        out = project / "data/prepared" / task
        meta = json.loads((out / "meta.json").read_text())
        refs = {it["mr"]: it["references"] for it in items}
        split = {name: read(out / f"{name}.jsonl") for name in ("train", "val", "test")}
        prompts = {name: {mr(ex["messages"][-2]["content"]) for ex in rows} for name, rows in split.items()}
        # drawn by prompt: 10% of the prompts to test (capped at 24) and to val (capped at 4), none in two splits
        n_test = min(24, len(items) // 10)
        assert meta["examples"]["test"] == len(split["test"]) == len(prompts["test"]) == n_test
        assert meta["examples"]["val"] == len(prompts["val"]) == 4 and meta["overlap"] == {"val_dropped": 0,
                                                                                        "test_dropped": 0}
        assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
        assert not prompts["val"] & prompts["test"]
        # every reference kept: each held-out item holds all of its prompt's, train every pair of its prompts
        for ex in split["val"] + split["test"]:
            kept = ex.get("references", [ex["messages"][-1]["content"]])
            assert kept[0] == ex["messages"][-1]["content"] and sorted(kept) == sorted(refs[mr(ex["messages"][-2]["content"])])
        by_prompt = defaultdict(list)
        for ex in split["train"]:
            by_prompt[mr(ex["messages"][-2]["content"])].append(ex["messages"][-1]["content"])
        assert all(sorted(v) == sorted(refs[k]) for k, v in by_prompt.items()) and len(by_prompt) == len(items) - n_test - 4
        assert meta["references"]["test"] == sum(len(refs[p]) for p in prompts["test"]) > n_test
        train.main(task, "full", base=Path("models/base"), prepared=Path("data/prepared") / task,
                   run=Path("runs") / task / "full")
        for model, folder in (("base", Path("models/base")), ("full", Path("runs") / task / "full/model")):
            evaluate.main(task, model, model_dir=folder, prepared=Path("data/prepared"), run=Path("runs") / task / model)
            ev = json.loads((project / "runs" / task / model / "eval.json").read_text())
            assert ev["metrics"]["main_metric"] == "rouge_l" and ev["metrics"]["main"] == ev["metrics"]["rouge_l"]
            assert all(0 <= ev["metrics"][k] <= 1 for k in ("rouge_l", "chrf", "bleu", "exact_match"))
            records = read(project / "runs" / task / model / "predictions.jsonl")
            assert all(r["score"] == r["rouge_l"] and 0 <= r["chrf"] <= 1 for r in records)
            assert all(sorted(r.get("references", [r["expected"]])) == sorted(refs[mr(r["input"])]) for r in records)
    report.main(Path("runs"), Path("data/prepared"), Path("models/quantize.json"), Path("reports"))

    comparison = json.loads((project / "reports/comparison.json").read_text())
    text = (project / "reports/report.md").read_text()
    for c in comparison["tasks"]:
        (pair,) = c["pairs"]
        assert (pair["a"], pair["b"]) == ("full", "base") and pair["interval"].startswith("t with range pseudo-items")
        lo, hi = pair["ci_points"]
        assert lo < pair["diff_points"] < hi and pair["sd_points"] > 0 and pair["n"] == c["conditions"]["test_examples"]
        full = next(r for r in c["rows"] if r["method"] == "full")
        assert full["metrics"]["chrf"] > 0 and full["main"] > 0  # trained on the task, it shares words with it
        decision = comparison["decisions"][c["task"]]
        assert f"{pair['diff_points']:+.1f} points [{lo:+.1f}, {hi:+.1f}]" in decision["rationale"]  # on rouge_l
        if decision["verdict"] == "inconclusive":  # sized from the score's spread, not from a 0/1 table
            assert "test items for 80% power at this difference and spread" in decision["settle"]
        assert f"| full - base | {pair['diff_points']:+.1f} [{lo:+.1f}, {hi:+.1f}] | " in text
        assert len(c["samples"]) == 3 and all(set(s["replies"]) == {"base", "full"} for s in c["samples"])
    assert "| method | rouge_l (0-100) [95% CI] |" in text and "| method | rouge_l | chrf | bleu | exact_match |" in text
    assert "Main metric: rouge_l, ROUGE-L F1 against the best reference, 0-100." in text
    assert "items scored higher by a / by b | t test p |" in text
    rows = reply_rows(comparison["tasks"])  # the W&B Table report/replies: each sampled item, per model
    assert len(rows) == 2 * 3 * 2 and all(len(r) == len(REPLY_COLUMNS) for r in rows)
    sample = comparison["tasks"][0]["samples"][0]
    assert "Reading the replies: 3 test items" in text and "References: " + " / ".join(sample["references"]) in text
