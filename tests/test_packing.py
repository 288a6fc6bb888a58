import torch
from transformers import AutoModelForCausalLM

from tuneoff.packing import IGNORE, pack, tokenize_chat
from tuneoff.tasks import extraction

CHAT = [
    {"role": "system", "content": "Answer with the code only."},
    {"role": "user", "content": "What is the alpha-3 code of Norway?"},
    {"role": "assistant", "content": "NOR"},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "PER"},
]


def test_only_assistant_turns_are_trainable(tokenizer):
    ids, trainable = tokenize_chat(tokenizer, CHAT)
    learned = tokenizer.decode([i for i, t in zip(ids, trainable) if t])
    # both assistant answers and their end-of-turn markers, and nothing of system or user
    assert learned.replace("\n", "") == "NOR<|im_end|>PER<|im_end|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_targets_are_next_token_of_assistant_text(tokenizer):
    ids, trainable = tokenize_chat(tokenizer, CHAT[:3])
    packed = pack([(ids, trainable)], seq_len=128, pad_id=tokenizer.pad_token_id)
    targets = packed.targets[0]
    n = len(ids)
    expected = [ids[t + 1] if trainable[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
    assert targets[:n].tolist() == expected
    assert (targets[n:] == IGNORE).all() and int(packed.real_tokens[0]) == n


def test_first_fit_decreasing_fills_rows_and_counts_cuts(tokenizer):
    examples = [tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(20, 0)]
    lengths = [len(ids) for ids, _ in examples]
    seq_len = max(lengths) * 2
    packed = pack(examples, seq_len, tokenizer.pad_token_id)
    assert int(packed.real_tokens.sum()) == sum(lengths)
    assert len(packed.input_ids) <= -(-sum(lengths) // seq_len) + 1  # at most one row more than perfect
    # a row shorter than the longest example is cut; a row too short for any answer is dropped
    cut = pack(examples, max(lengths) - 3, tokenizer.pad_token_id)
    assert cut.truncated > 0 and cut.examples == 20


def test_packed_rows_do_not_attend_across_examples(tiny_base, tokenizer):
    """Logits of an example packed behind another equal its logits alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    a, b = (tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(2, 1))
    packed = pack([a, b], seq_len=len(a[0]) + len(b[0]), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        inputs = {"input_ids": packed.input_ids.long(), "position_ids": packed.position_ids.long()}
        together = model(**inputs, use_cache=False).logits[0]
        leaky = model(**inputs, use_cache=True).logits[0]  # a KV cache hides the example boundaries
        for ids, _ in (a, b):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            row = packed.input_ids[0].tolist()
            start = next(s for s in range(len(row)) if row[s : s + len(ids)] == ids)
            torch.testing.assert_close(together[start : start + len(ids)], alone, atol=1e-4, rtol=1e-4)
            if start > 0:  # the test can fail: the cached forward does attend across
                assert not torch.allclose(leaky[start : start + len(ids)], alone, atol=1e-4)


def test_example_without_answer_in_window_is_dropped(tokenizer):
    ids, trainable = tokenize_chat(tokenizer, CHAT[:3])
    first_answer = trainable.index(True)
    packed = pack([(ids, trainable), (ids, trainable)][:1] + [(ids[:first_answer], trainable[:first_answer])],
                  seq_len=128, pad_id=tokenizer.pad_token_id)
    assert packed.dropped == 1 and packed.examples == 1
