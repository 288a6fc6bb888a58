"""Score one model on a task's test split: its greedy answer to each item, scored, and the loss
of each item's reference answer under the model. The per-item records are what a paired
comparison between methods reads (predictions.jsonl).

Both come from one pass over each batch's prompts: the prompt's keys and values are computed once,
then the reference is read on a copy of them (its loss) and the answer generated from them. Scoring
the reference on its own packed rows, as the train loop does, would compute every prompt a second
time: on extraction the prompt is ~70% of an item's tokens. The prompt tokens every item shares (the
chat template's opening, a system prompt) run once per test set. Where the reference pass shows that
greedy decoding would return the reference, the reply is read off it and not generated; a CPU decodes
at a cost about proportional to the rows decoded, so each batch generates only its other items, from
the cache it already has.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import EvaluateParams
from tuneoff.core.records import read_jsonl
from tuneoff.data.packing import IGNORE, tokenize_chat
from tuneoff.evaluation.generate import reply_limit
from tuneoff.evaluation.judge import grade_all
from tuneoff.evaluation.metrics import score

RECORD_COLUMNS = ["input", "expected", "produced", "correct", "loss"]  # the first keys of each record


@dataclass(frozen=True)
class TestSet:
    scorer: str
    labels: list[str]
    conversations: list[list[dict]]  # each test item without its reference answer, in test.jsonl order
    references: list[str]  # the answer each item's loss is read on (its first reference)
    all_references: list[list[str]]  # every reference each item has, what its reply is scored against


def load_test(prepared: Path, split: str = "test") -> TestSet:
    """data/prepared/<task>/'s test split (or `split`: val, where choices are made): the chat examples,
    each ending with its reference answer."""
    for name in ("meta.json", f"{split}.jsonl"):
        if not (prepared / name).is_file():
            raise TuneoffError(f"{prepared / name} not found: run `dvc repro prepare@{prepared.name}` first")
    meta = json.loads((prepared / "meta.json").read_text())
    examples = read_jsonl(prepared / f"{split}.jsonl")
    return TestSet(meta["scorer"], meta["labels"], [ex["messages"][:-1] for ex in examples],
                   [ex["messages"][-1]["content"] for ex in examples],
                   [ex.get("references") or [ex["messages"][-1]["content"]] for ex in examples])


@dataclass
class Scored:
    metrics: dict  # scoring.score's: main, its 95% CI, n, the scorer's own metrics
    records: list[dict]  # per item, in test.jsonl order: RECORD_COLUMNS (+ the scorer's per-item fields)
    test_loss: float  # mean loss over every reference token (token-weighted, as train's eval_loss)
    generate_seconds: float
    max_new_tokens: int  # the reply limit generation used (generate.reply_limit)
    read_off: int  # replies read off the teacher-forced pass, not generated (answer_and_losses)

    @property
    def examples_per_second(self) -> float:
        return len(self.records) / self.generate_seconds


def split_item(tokenizer, conversation: list[dict], reference: str) -> tuple[list[int], list[int], int]:
    """One test item as the model reads it (packing.tokenize_chat, as prepare tokenizes): its token ids
    through the reference's last assistant token, each position's target (the next token where that is
    assistant output, else IGNORE) and the prompt's length (the tokens before the reference)."""
    ids, trainable = tokenize_chat(tokenizer, [*conversation, {"role": "assistant", "content": reference}])
    end = max(i for i, t in enumerate(trainable) if t) + 1 if any(trainable) else len(ids)
    start = end
    while start > 0 and trainable[start - 1]:
        start -= 1
    if start == 0:
        raise TuneoffError("the chat template put no prompt token before the reference answer")
    targets = [ids[t + 1] if trainable[t + 1] else IGNORE for t in range(end - 1)]
    return ids[:end], targets, start


def _padded(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


@torch.no_grad()
def answer_and_losses(model, tokenizer, test: TestSet, batch_size: int, max_new_tokens: int, dev: torch.device,
                      label: str, read_off: bool = True) -> tuple[list[str], list[float], list[int], int]:
    """Each item's greedy reply, and its reference's summed loss and loss-token count, in test order,
    and how many replies were read off the teacher-forced pass instead of generated.

    The prompt tokens every item shares (shared_prefix: the chat template's opening and a system prompt)
    run once, into a KV cache each batch starts from. Per batch of prompts (sorted by length, left-padded
    after that prefix): the rest of the prompt less its last token runs into the cache; the last prompt
    token and the reference run on a copy of it (teacher-forced: the reference's loss); generate() then
    continues from the cache, so it computes only the last prompt token before it decodes. Loss positions inside the prompt (an earlier assistant
    turn) are scored in the first pass. The loss is computed in float32 from the model's logits.

    An item whose reference greedy decoding would reproduce (greedy_from_reference: the argmax at every
    reference position is the reference token, through its end) is not generated: its reply is the
    reference, read off the pass that computed its loss. As a model learns its task most items take this
    path; `read_off=False` generates every item (the test compares the two)."""
    items = [split_item(tokenizer, c, r) for c, r in zip(test.conversations, test.references)]
    order = sorted(range(len(items)), key=lambda i: items[i][2])
    replies, sums, counts = [""] * len(items), [0.0] * len(items), [0] * len(items)
    read_off_items = 0
    pad = tokenizer.pad_token_id
    model.eval()
    shared = shared_prefix(items)
    prefix = torch.tensor([items[0][0][:shared]], device=dev)
    prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache if shared else None
    for first in tqdm(range(0, len(order), batch_size), desc=label, unit="batch", file=sys.stderr,
                      mininterval=1 if sys.stderr.isatty() else 15):
        idx = order[first : first + batch_size]
        ids, targets, starts = zip(*(items[i] for i in idx))
        # the prompts after the shared prefix, less their last token, left-padded; positions continue the prefix's
        head = _padded([x[shared : s - 1] for x, s in zip(ids, starts)], pad, left=True)
        head_mask = _padded([[1] * (s - 1 - shared) for s in starts], 0, left=True)
        head_targets = _padded([list(t[shared : s - 1]) for t, s in zip(targets, starts)], IGNORE, left=True)
        head_pos = shared + (head_mask.cumsum(1) - 1).clamp(min=0)
        head_mask = torch.cat([torch.ones(len(idx), shared, dtype=head_mask.dtype), head_mask], 1)
        # the last prompt token and the reference, right-padded, positions continuing
        tail = _padded([x[s - 1 :] for x, s in zip(ids, starts)], pad, left=False)
        tail_mask = _padded([[1] * (len(x) - s + 1) for x, s in zip(ids, starts)], 0, left=False)
        tail_targets = _padded([list(t[s - 1 :]) + [IGNORE] for t, s in zip(targets, starts)], IGNORE, left=False)
        tail_pos = torch.tensor(starts)[:, None] - 1 + torch.arange(tail.shape[1])
        head, head_mask, head_pos, tail, tail_mask, tail_pos = (
            t.to(dev) for t in (head, head_mask, head_pos, tail, tail_mask, tail_pos))

        cache = None
        if shared:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
        keep = head_targets != IGNORE
        out = model(input_ids=head, attention_mask=head_mask, position_ids=head_pos, cache=cache, use_cache=True,
                    logits_to_keep=keep.to(dev) if keep.any() else 1)
        cache, losses = out.cache, [(keep, out.logits if keep.any() else None)]
        tail_keep = tail_targets != IGNORE
        out = model(input_ids=tail, attention_mask=torch.cat([head_mask, tail_mask], 1), position_ids=tail_pos,
                    cache=copy.deepcopy(cache), use_cache=True, logits_to_keep=tail_keep.to(dev))
        losses.append((tail_keep, out.logits))
        for (keep, logits), wanted in zip(losses, (head_targets, tail_targets)):
            if logits is None:
                continue
            per_position = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), wanted[keep].to(dev),
                                           reduction="none").cpu()
            rows = keep.nonzero()[:, 0]  # row-major, the order the kept logits come in
            for row, loss in zip(rows.tolist(), per_position.tolist()):
                sums[idx[row]] += loss
                counts[idx[row]] += 1

        known = greedy_from_reference(tail_keep, out.logits, tail_targets, tokenizer.eos_token_id, max_new_tokens)
        for row, tokens in enumerate(known):
            if tokens is not None:
                replies[idx[row]] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        todo = [row for row, tokens in enumerate(known) if tokens is None or not read_off]
        read_off_items += len(idx) - len(todo)
        if not todo:
            continue
        rows = torch.tensor(todo, device=dev)
        cache.batch_select_indices(rows)
        prompt = torch.cat([prefix.expand(len(idx), -1), head, tail[:, :1]], 1)[rows]
        generated = model.generate(input_ids=prompt, attention_mask=torch.cat([head_mask, tail_mask[:, :1]], 1)[rows],
                                   cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                                   temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                   eos_token_id=tokenizer.eos_token_id)
        for row, reply in zip(todo, generated[:, prompt.shape[1] :]):
            replies[idx[row]] = tokenizer.decode(reply, skip_special_tokens=True).strip()
    return replies, sums, counts, read_off_items


def shared_prefix(items: list[tuple[list[int], list[int], int]]) -> int:
    """How many leading tokens every item's prompt shares (the chat template's opening, a system prompt),
    short of each prompt's last two tokens (the batch's pass before the reference keeps one) and of the
    first loss position: computed once per test set, not once per item. 0 for a single item."""
    if len(items) < 2:
        return 0
    first = items[0][0]
    limit = min(min(start - 2, next((p for p, t in enumerate(targets) if t != IGNORE), start)) for _, targets, start in items)
    shared = 0
    while shared < limit and all(ids[shared] == first[shared] for ids, _, _ in items):
        shared += 1
    return shared


def greedy_from_reference(keep: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, eos: int,
                          max_new_tokens: int) -> list[list[int] | None]:
    """Per row, greedy decoding's reply tokens where the teacher-forced pass already gives them: when the
    argmax at every reference position, through its first `eos`, is the reference token, greedy decoding
    would produce exactly the reference and stop there. None where it would not (a different argmax, no
    eos in the reference, or a reply longer than max_new_tokens): that row is generated. `logits` are the
    kept positions' (keep: [rows, positions]) in row-major order, `targets` the tokens they predict."""
    rows = keep.nonzero()[:, 0].tolist()
    wanted, argmax = targets[keep].tolist(), logits.argmax(-1).tolist()
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(keep.shape[0])]
    for row, w, a in zip(rows, wanted, argmax):
        per_row[row].append((w, a))
    out = []
    for pairs in per_row:
        end = next((j for j, (w, _) in enumerate(pairs) if w == eos), None)
        right = end is not None and end + 1 <= max_new_tokens and all(w == a for w, a in pairs[: end + 1])
        out.append([w for w, _ in pairs[:end]] if right else None)
    return out


def score_replies(test: TestSet, predictions: list[str], params: EvaluateParams) -> tuple[dict, list[dict]]:
    """metrics.score of these replies to the first len(predictions) items of `test`; a judge's grades are
    fetched (or read from its cache) first, and what it was asked goes in metrics["judge"]."""
    n = len(predictions)
    rows = usage = None
    if test.scorer == "judge":
        prompts = [c[-1]["content"] for c in test.conversations[:n]]
        rows, usage = grade_all(params.judge, prompts, test.all_references[:n], predictions)
    metrics, per_item = score(test.scorer, predictions, test.all_references[:n], test.labels, params.bootstrap_samples,
                              params.seed, rows=rows)
    if usage is not None:
        metrics["judge"] = usage
    return metrics, per_item


def score_model(model, tokenizer, test: TestSet, params: EvaluateParams, dev: torch.device, label: str) -> Scored:
    """Generate, score and compute each reference's loss (answer_and_losses)."""
    start = time.perf_counter()
    limit = reply_limit(tokenizer, [r for refs in test.all_references for r in refs], params.max_new_tokens)
    predictions, sums, counts, read_off = answer_and_losses(model, tokenizer, test, params.batch_size, limit, dev, label)
    generate_seconds = time.perf_counter() - start
    metrics, per_item = score_replies(test, predictions, params)
    # an item with no reference token (an empty answer) has no loss: null
    losses = [round(total / n, 6) if n else None for total, n in zip(sums, counts)]
    items = zip(test.conversations, test.references, test.all_references, predictions, per_item, losses)
    records = [{"input": conv[-1]["content"], "expected": ref, "produced": pred, "correct": row["correct"],
                "loss": loss, **row, **({"references": refs} if len(refs) > 1 else {})}
               for conv, ref, refs, pred, row, loss in items]  # then the scorer's own fields
    test_loss = sum(sums) / max(sum(counts), 1)
    return Scored(metrics, records, test_loss, generate_seconds, limit, read_off)
