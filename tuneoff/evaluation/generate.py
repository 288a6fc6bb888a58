"""Batched greedy generation with left padding, for evaluation."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm


def chat_prompt(tokenizer, conversation: list[dict]) -> str:
    """The prompt text a chat model answers: the conversation in the tokenizer's chat template,
    ending with the assistant turn's opening. Evaluation and the server build prompts the same way."""
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def reply_limit(tokenizer, references: list[str], cap: int) -> int:
    """How many tokens a reply may take: twice the longest reference's, plus 8, and at most `cap`
    (evaluate.max_new_tokens). Every scorer compares the whole stripped reply with its reference (the
    text, the parsed JSON record, the label), so a reply that long cannot score, and a batch stops
    generating when its last reply ends: on short-answer tasks an untuned base that never stops had
    made every batch run to `cap`."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(cap, 2 * longest + 8)


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], batch_size: int, max_new_tokens: int,
             dev: torch.device, label: str, cache: str = "dynamic") -> list[str]:
    """The model's greedy reply to each conversation (its last assistant turn removed by the caller).
    Prompts are sorted by length so a batch pads little; replies come back in input order."""
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at the same column
    prompts = [chat_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=label, unit="batch", file=sys.stderr,
                      mininterval=1 if sys.stderr.isatty() else 15):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **({} if cache == "dynamic" else {"cache_implementation": cache}))
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :]):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return replies
