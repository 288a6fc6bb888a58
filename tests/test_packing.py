import contextlib

import torch
from transformers import AutoModelForCausalLM

from tuneoff.data.packing import IGNORE, example_spans, pack, tokenize_chat
from tuneoff.data.tasks import extraction

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


def test_per_example_attention_matches_the_masked_row(tiny_base, tokenizer):
    """attention.packed_attention (SDPA on each example's span) gives the logits and gradients of
    transformers' SDPA with its block-diagonal mask, on a row of three examples and trailing padding."""
    from tuneoff.training import attention

    examples = [tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(3, 2)]
    packed = pack(examples, seq_len=sum(len(ids) for ids, _ in examples) + 7, pad_id=tokenizer.pad_token_id)
    assert len(packed.input_ids) == 1 and int(packed.real_tokens[0]) < packed.input_ids.shape[1]
    inputs = {"input_ids": packed.input_ids.long(), "position_ids": packed.position_ids.long(), "use_cache": False}
    spans = example_spans(packed.position_ids)
    assert len(spans[0]) == 4 and spans[0][-1][1] == packed.input_ids.shape[1]  # 3 examples + the padding

    results = []
    for use_spans in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        context = attention.packed(model) if use_spans else contextlib.nullcontext()
        with context:
            logits = model(**inputs, **({"packed_spans": spans} if use_spans else {})).logits
            logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert model.config._attn_implementation == "sdpa"  # restored: a saved model does not need tuneoff
    (masked, masked_grads), (per_example, grads) = results
    torch.testing.assert_close(per_example, masked, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, masked_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # and the spans matter: attention over the whole row (no mask, causal) gives other logits
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with attention.packed(model):
        whole = model(**inputs, packed_spans=[[(0, packed.input_ids.shape[1])]]).logits.detach()
    assert not torch.allclose(whole, masked, atol=1e-3)


def test_per_example_attention_under_bf16_autocast_attends_in_float32():
    """In a bf16 run the attention itself runs in float32 (CPU flash attention's bf16 backward is about
    twice as slow): same output as float32 SDPA on each span, rounded once to bf16, and gradients reach
    bf16 inputs."""
    import torch.nn.functional as F

    from tuneoff.training import attention

    torch.manual_seed(0)
    q = torch.randn(1, 4, 12, 8, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    spans = [[(0, 5), (5, 12)]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.packed_attention(None, q, k, v, None, packed_spans=spans)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 12, 4, 8)
    expected = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(),
                                                         is_causal=True, enable_gqa=True) for a, b in spans[0]], 2)
    torch.testing.assert_close(out, expected.transpose(1, 2).bfloat16(), atol=0, rtol=0)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    # a full fine-tune's rotary embeddings leave q and k in float32 beside a bf16 v: the same result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = attention.packed_attention(None, q.float(), k.float(), v, None, packed_spans=spans)
    torch.testing.assert_close(mixed, out, atol=0, rtol=0)


def test_batch_loss_on_one_row_of_real_tokens_matches_the_padded_rows(tiny_base, tokenizer):
    """With per-example attention, batch_loss joins the batch's rows into one row of their real tokens
    (no compute on padding): the loss, its token count and the gradients are those of the padded rows
    under transformers' masked SDPA."""
    from tuneoff.modeling.loss import batch_loss
    from tuneoff.training import attention

    examples = [tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(7, 3)]
    packed = pack(examples, seq_len=max(len(ids) for ids, _ in examples) * 2 + 5, pad_id=tokenizer.pad_token_id)
    rows = {k: v.long() for k, v in packed.tensors().items()}
    idx = torch.arange(len(rows["input_ids"]))
    assert len(idx) >= 3 and (rows["real_tokens"] < rows["input_ids"].shape[1]).all()  # every row has padding
    results = []
    for joined in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        with attention.packed(model) if joined else contextlib.nullcontext():
            loss, n = batch_loss(model, rows, idx, torch.device("cpu"), "fp32")
            (loss / n).backward()
        results.append((loss.detach(), n, {name: p.grad for name, p in model.named_parameters()}))
    (padded, n_padded, padded_grads), (joined, n_joined, grads) = results
    assert n_joined == n_padded > 0
    torch.testing.assert_close(joined, padded, atol=1e-4, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_example_maps_every_position_to_its_source(tokenizer):
    """`example` holds each position's index in pack()'s input (-1 on padding); a dropped example owns none."""
    examples = [tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(9, 4)]
    ids, trainable = examples[5]
    examples[5] = (ids[: trainable.index(True)], trainable[: trainable.index(True)])  # no answer: dropped
    packed = pack(examples, seq_len=max(len(ids) for ids, _ in examples) * 2, pad_id=tokenizer.pad_token_id)
    assert packed.dropped == 1 and len(packed.input_ids) > 1  # packed out of input order, over several rows
    owner = packed.example
    assert ((owner >= 0).sum(1) == packed.real_tokens).all()  # every real token has an owner, padding none
    assert set(owner.unique().tolist()) == {-1} | set(range(9)) - {5}
    for i, (ids, _) in enumerate(examples):
        if i == 5:
            continue
        (row,) = (owner == i).any(1).nonzero()[:, 0].tolist()  # one example, one row
        at = (owner[row] == i).nonzero()[:, 0]
        assert at.tolist() == list(range(int(at[0]), int(at[0]) + len(ids)))  # contiguous
        assert packed.input_ids[row, at].tolist() == ids and packed.position_ids[row, at].tolist() == list(range(len(ids)))
    assert (packed.targets[owner < 0] == IGNORE).all()  # every loss position belongs to an example


def test_packed_losses_match_each_example_alone(tiny_base, tokenizer):
    """The loss over packed rows (padded rows, and the rows joined as training joins them on a CPU)
    equals the token-weighted mean of each example's loss computed alone, unpacked."""
    import torch.nn.functional as F

    from tuneoff.modeling.loss import batch_loss, eval_loss
    from tuneoff.training import attention

    examples = [tokenize_chat(tokenizer, ex["messages"]) for ex in extraction.generate(8, 5)]
    packed = pack(examples, seq_len=max(len(ids) for ids, _ in examples) * 2 + 3, pad_id=tokenizer.pad_token_id)
    rows = {k: v.long() for k, v in packed.tensors().items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    sums, counts = [], []
    with torch.no_grad():
        for ids, trainable in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            keep = torch.tensor(trainable[1:])  # position t predicts token t+1
            sums.append(float(F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum")))
            counts.append(int(keep.sum()))
    alone = sum(sums) / sum(counts)
    cpu = torch.device("cpu")
    for joined in (False, True):
        with attention.packed(model) if joined else contextlib.nullcontext():
            idx = torch.arange(len(rows["input_ids"]))
            per_position, n = batch_loss(model, rows, idx, cpu, "fp32", reduction="none")
            total, _ = batch_loss(model, rows, idx, cpu, "fp32")
            mean = eval_loss(model, rows, 2, cpu, "fp32")
        assert n == sum(counts) and per_position.shape == (n,)
        torch.testing.assert_close(per_position.sum(), total, atol=1e-3, rtol=1e-5)
        assert abs(mean - alone) < 1e-5 * alone