import json

import pytest

from tuneoff.evaluation.generate import reply_limit
from tuneoff.evaluation.metrics import bootstrap_ci, macro_f1, score

RECORD = {"name": "Maria Garcia", "order_id": "ORD-12345", "product": "blender", "issue": "refund", "urgency": "high"}


def test_json_fields_scores_exact_fields_and_malformed_output():
    ref = json.dumps(RECORD)
    wrong_urgency = json.dumps({**RECORD, "urgency": "low"})
    preds = [ref, wrong_urgency, '{"name": "Maria Garcia", "order_id": ', "[1, 2]"]
    metrics, rows = score("json_fields", preds, [ref] * 4, [], 200, 0)
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert [r["valid_json"] for r in rows] == [True, True, False, False]  # a JSON list is not a record
    assert metrics["exact_match"] == 0.25 and metrics["valid_json"] == 0.5
    assert metrics["field_accuracy"]["urgency"] == {"n": 4, "accuracy": 0.25}
    assert metrics["field_accuracy"]["name"] == {"n": 4, "accuracy": 0.5}
    assert metrics["main_metric"] == "exact_match" and metrics["main"] == 0.25


def test_json_fields_scores_each_key_where_its_record_has_it():
    """Records of several intents carry different keys: each key's accuracy is over the records that
    have it; a key the reply leaves out is wrong, one the reply adds makes the record inexact."""
    playlist = {"intent": "AddToPlaylist", "playlist": "road trip", "artist": "Queen"}
    weather = {"intent": "GetWeather", "city": "Oslo", "day": None}
    refs = [json.dumps(r) for r in (playlist, playlist, weather, weather)]
    preds = [json.dumps(playlist),
             json.dumps({**playlist, "city": "Oslo"}),  # an extra key
             json.dumps({"intent": "GetWeather", "city": "Oslo"}),  # "day" left out (its value is null)
             json.dumps({**weather, "city": "Bergen"})]
    metrics, rows = score("json_fields", preds, refs, [], 200, 0)
    assert [r["correct"] for r in rows] == [True, False, False, False]
    assert [r["extra_keys"] for r in rows] == [[], ["city"], [], []] and metrics["extra_keys"] == 1
    assert rows[2]["fields"] == {"intent": True, "city": True, "day": False}
    assert metrics["field_accuracy"] == {"intent": {"n": 4, "accuracy": 1.0}, "playlist": {"n": 2, "accuracy": 1.0},
                                         "artist": {"n": 2, "accuracy": 1.0}, "city": {"n": 2, "accuracy": 0.5},
                                         "day": {"n": 2, "accuracy": 0.5}}


def test_exact_match_ignores_surrounding_whitespace_only():
    metrics, rows = score("exact", [" NOR\n", "nor", "NOR."], ["NOR"] * 3, [], 200, 0)
    assert [r["correct"] for r in rows] == [True, False, False]


def test_label_accuracy_macro_f1_and_out_of_set_answers():
    refs = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "something else"]
    metrics, _ = score("label", preds, refs, ["a", "b", "c"], 200, 0)
    assert metrics["accuracy"] == 0.5 and metrics["in_label_set"] == 0.75
    # F1: a = 2/3, b = 2/3, c = 0
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert macro_f1(refs, refs) == 1.0


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    small = [True, False] * 10
    large = [True, False] * 500
    lo_s, hi_s = bootstrap_ci(small, 1000, 0)
    lo_l, hi_l = bootstrap_ci(large, 1000, 0)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert bootstrap_ci(small, 1000, 0) == (lo_s, hi_s)  # seeded


def test_the_reply_limit_leaves_room_for_any_reply_that_can_score(tokenizer):
    """Generation stops at twice the longest reference plus 8 tokens (evaluate.max_new_tokens at most):
    room for a reply that scores in another layout, such as a pretty-printed JSON record."""
    record = {"name": "Ada Lovelace", "city": "Paris", "order": "A-1234", "issue": "refund", "urgent": True}
    references = ["USD", json.dumps(record)]
    tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    assert reply_limit(tokenizer, references, 10_000) == 2 * max(tokens) + 8
    assert reply_limit(tokenizer, references, 5) == 5
    assert reply_limit(tokenizer, ["USD"], 10_000) == 2 * tokens[0] + 8
    pretty = json.dumps(record, indent=2)
    assert len(tokenizer(pretty, add_special_tokens=False)["input_ids"]) <= reply_limit(tokenizer, references, 10_000)
    metrics, _ = score("json_fields", [pretty], [references[1]], [], 10, 0)
    assert metrics["main"] == 1.0


@pytest.mark.parametrize("adapter", [False, True])
def test_answers_and_losses_from_one_prompt_pass_match_generate_and_each_item_alone(tiny_base, tokenizer, adapter):
    """Scoring reads each prompt once (its KV cache feeds both the reference's loss and generation):
    the replies are generate()'s, item for item, and each reference's loss is the item's loss computed
    alone, over the same tokens prepare trains on; an earlier assistant turn's loss counts too. The same
    through a PEFT adapter (register scores QLoRA's nf4 form as one)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tuneoff.data.packing import tokenize_chat
    from tuneoff.data.tasks import extraction
    from tuneoff.evaluation.generate import generate
    from tuneoff.evaluation.score import TestSet, answer_and_losses, shared_prefix, split_item

    extraction_chats = [ex["messages"] for ex in extraction.generate(7, 3)]
    two_turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Order ORD-12345 is late."}, {"role": "assistant", "content": "{}"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    if adapter:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    cpu = torch.device("cpu")
    # with the two-turn item the items share the template's first token; without it, the system prompt too
    for chats in (extraction_chats + [two_turns], extraction_chats):
        test = TestSet("exact", [], [c[:-1] for c in chats], [c[-1]["content"] for c in chats],
                       [[c[-1]["content"]] for c in chats])
        shared = shared_prefix([split_item(tokenizer, c[:-1], c[-1]["content"]) for c in chats])
        system_turn = len(tokenize_chat(tokenizer, chats[0][:1])[0])
        assert shared == 1 if two_turns in chats else shared > system_turn
        replies, sums, counts, _ = answer_and_losses(model, tokenizer, test, 3, 12, cpu, "test")
        assert replies == generate(model, tokenizer, test.conversations, 3, 12, cpu, "test")
        with torch.no_grad():
            for chat, total, n in zip(chats, sums, counts):
                ids, trainable = tokenize_chat(tokenizer, chat)
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                keep = torch.tensor(trainable[1:])  # position t predicts token t+1
                assert n == int(keep.sum())  # every assistant turn: the two-turn item's first one too
                alone = float(F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum"))
                assert total == pytest.approx(alone, rel=1e-4)


def test_replies_read_off_the_reference_pass_are_the_replies_generate_gives(tiny_base, tokenizer):
    """An item whose reference the model's teacher-forced argmax reproduces through its end is not
    generated (issue 44): its reply is read off the loss pass. On a tiny model fitted to six iso_codes
    items, two more it never saw and one fitted item asked with a longer reference than it learned, the
    replies, scores and losses are the same with and without reading off, and generate()'s, item for item;
    some items take each path."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneoff.data.packing import IGNORE
    from tuneoff.data.tasks import iso_codes
    from tuneoff.evaluation.generate import generate
    from tuneoff.evaluation.score import TestSet, answer_and_losses, split_item

    chats = [ex["messages"] for ex in iso_codes.generate(8, 0, 0.1) if ex["split"] == "train"][::2]
    fitted, unseen = chats[:6], chats[6:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    items = [split_item(tokenizer, c[:-1], c[-1]["content"]) for c in fitted]
    width = max(len(ids) for ids, _, _ in items)
    ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _, _ in items])
    targets = torch.tensor([[IGNORE] + t + [IGNORE] * (width - len(t) - 1) for _, t, _ in items])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(input_ids=ids, labels=torch.where(targets == IGNORE, -100, ids)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    longer = [*fitted[0][:-1], {"role": "assistant", "content": fitted[0][-1]["content"] + " (ISO)"}]
    test_chats = fitted + unseen + [longer]
    test = TestSet("exact", [], [c[:-1] for c in test_chats], [c[-1]["content"] for c in test_chats],
                   [[c[-1]["content"]] for c in test_chats])
    cpu = torch.device("cpu")
    read = answer_and_losses(model, tokenizer, test, 4, 16, cpu, "read off")
    generated = answer_and_losses(model, tokenizer, test, 4, 16, cpu, "generated", read_off=False)
    assert read[0] == generated[0] == generate(model, tokenizer, test.conversations, 4, 16, cpu, "generate")
    assert read[1:3] == generated[1:3]
    assert generated[3] == 0 and 0 < read[3] < len(test_chats)
    assert sum(r == c[-1]["content"] for r, c in zip(read[0], fitted)) == read[3]  # read off exactly where right
