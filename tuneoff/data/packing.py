"""Chat formatting with loss on assistant tokens only, and packing into fixed-length rows.

Packing puts several examples in one row so training does not burn compute on padding.
Each example restarts its position ids at 0; with no attention mask and no KV cache
(use_cache=False), transformers reads those restarts as sequence boundaries and builds a
block-diagonal causal mask, so no token attends across examples (tests/test_packing.py
checks the logits match unpacked examples, and that a cache would break this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneoff.core.errors import TuneoffError

IGNORE = -100


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation in the model's chat template, and for each token whether it
    is assistant output the model should learn (the assistant's text and its end-of-turn marker)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character ranges of assistant turns in `text`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(before) or not text.startswith(through):
            raise TuneoffError("the chat template does not render conversations prefix-consistently; "
                               "cannot tell assistant tokens apart")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trainable = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trainable


@dataclass
class Packed:
    input_ids: torch.Tensor  # [rows, seq_len]
    position_ids: torch.Tensor  # [rows, seq_len], restarting at 0 for every example
    targets: torch.Tensor  # [rows, seq_len], next token to predict, IGNORE where no loss
    real_tokens: torch.Tensor  # [rows] non-padding tokens per row
    example: torch.Tensor  # [rows, seq_len], the source example's index in pack()'s input, -1 on padding
    examples: int
    truncated: int  # examples cut to seq_len
    dropped: int  # examples with no assistant token left after the cut

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "targets": self.targets, "real_tokens": self.real_tokens, "example": self.example}


def pack(tokenized: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> Packed:
    """First-fit-decreasing packing of examples into rows of `seq_len` tokens. `example` maps each
    position back to its example's index in `tokenized` (the split's JSONL line), so a loss per
    position can be summed per example; a dropped example owns no position."""
    items, truncated, dropped = [], 0, 0
    for index, (ids, trainable) in enumerate(tokenized):
        if len(ids) > seq_len:
            ids, trainable = ids[:seq_len], trainable[:seq_len]
            truncated += 1
        # position t predicts token t+1, and carries loss when that token is assistant output
        targets = [ids[t + 1] if trainable[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        if all(t == IGNORE for t in targets):
            dropped += 1
            continue
        items.append((ids, targets, index))
    if not items:
        raise TuneoffError(f"no example has an assistant token within seq_len={seq_len}")

    rows: list[list[tuple[list[int], list[int], int]]] = []
    free: list[int] = []
    for item in sorted(items, key=lambda it: -len(it[0])):
        n = len(item[0])
        slot = next((r for r, space in enumerate(free) if space >= n), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(item)
        free[slot] -= n

    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int32)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.int32)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int32)
    real = torch.zeros(len(rows), dtype=torch.int32)
    example = torch.full((len(rows), seq_len), -1, dtype=torch.int32)
    for r, row in enumerate(rows):
        at = 0
        for ids, tgt, index in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids, dtype=torch.int32)
            position_ids[r, at : at + n] = torch.arange(n, dtype=torch.int32)
            targets[r, at : at + n] = torch.tensor(tgt, dtype=torch.int32)
            example[r, at : at + n] = index
            at += n
        real[r] = at
        # padding is its own segment (positions restart at 0), so it never joins an example
        position_ids[r, at:] = torch.arange(seq_len - at, dtype=torch.int32)
    return Packed(input_ids, position_ids, targets, real, example, len(items), truncated, dropped)


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of each example: its position ids restart at 0. Trailing padding
    is a span of its own (pack restarts its positions too), so every position is covered."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        out.append(list(zip(starts, starts[1:])))
    return out
