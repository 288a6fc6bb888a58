"""A task turns raw data into chat examples (system/user/assistant) and names the scorer the
evaluate stage uses. Built-in tasks are generated; a team's own data comes through loaders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import (
    CsvTask,
    ExtractionTask,
    HfDiskTask,
    IsoCodesTask,
    JsonlTask,
    PrepareParams,
    RestaurantsTask,
    TriageTask,
)
from tuneoff.data.tasks import extraction, iso_codes, loaders, restaurants

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    examples: list[dict]  # {"messages": [...], "split"?: "train"|"val"|"test"}
    scorer: str  # "json_fields" | "exact" | "label" | "rouge_l" | "chrf" | "judge"
    labels: list[str] = field(default_factory=list)  # closed label set, for "label" tasks


def build_task(params, prep: PrepareParams) -> Task:
    """The examples and scorer for one `tasks.<name>` entry of params.yaml."""
    if isinstance(params, ExtractionTask):
        return Task(extraction.generate(params.n_examples, prep.seed), "json_fields")
    if isinstance(params, TriageTask):
        return Task(extraction.triage(params.n_examples, prep.seed), "label", list(extraction.ISSUES))
    if isinstance(params, IsoCodesTask):
        return Task(iso_codes.generate(params.n_facts, prep.seed, prep.val_fraction), "exact")
    if isinstance(params, RestaurantsTask):
        return Task(restaurants.generate(params.n_prompts, prep.seed), params.scorer)
    if isinstance(params, JsonlTask):
        examples = loaders.load_jsonl(Path(params.path), params.system_prompt)
        if params.test_path:
            test = loaders.load_jsonl(Path(params.test_path), params.system_prompt)
            examples += [{**ex, "split": "test"} for ex in test]
        return Task(examples, params.scorer)
    if isinstance(params, CsvTask):
        path = Path(params.path)
        rows = loaders.load_csv(path, params.text_column, params.label_column)
        test_rows = loaders.load_csv(Path(params.test_path), params.text_column, params.label_column) if params.test_path else []
        labels = loaders.read_labels(Path(params.labels_path)) if params.labels_path else sorted({lab for _, lab in rows})
        make = lambda rs, p: loaders.classification_examples(rs, labels, p, params.system_prompt, params.labels_in_prompt)  # noqa: E731
        examples = make(rows, path) + [{**ex, "split": "test"} for ex in make(test_rows, Path(params.test_path))]
        return Task(examples, "label", labels)
    if isinstance(params, HfDiskTask):
        return Task(loaders.load_hf_disk(Path(params.path), params.system_prompt), params.scorer)
    raise TypeError(f"unhandled task params {type(params).__name__}")


def source(name: str, params) -> str:
    """`tasks.<name>` and the files it reads (none for a built-in task), as errors about its splits name them."""
    files = [f for f in (getattr(params, "path", ""), getattr(params, "test_path", "")) if f]
    return f"tasks.{name} ({', '.join(files) or 'generated'})"


def prompt(example: dict) -> tuple:
    """What the model is asked: every message before the final (assistant) answer."""
    return tuple((m["role"], m["content"]) for m in example["messages"][:-1])


def group_by_prompt(examples: list[dict]) -> list[list[dict]]:
    """Examples with the same prompt, in first-seen order: one item with several references (data-to-text,
    paraphrase and support data often give a prompt 5-10 answers). Splits are drawn by these groups."""
    groups: dict[tuple, list[dict]] = {}
    for ex in examples:
        groups.setdefault(prompt(ex), []).append(ex)
    return list(groups.values())


def held_out_item(group: list[dict]) -> dict:
    """A val or test item: its prompt once, the first reference as the answer (what its loss is read on)
    and, when there are several, every distinct reference in `references` (what a reply is scored against)."""
    references = list(dict.fromkeys(ex["messages"][-1]["content"] for ex in group))
    return {"messages": group[0]["messages"], **({"references": references} if len(references) > 1 else {})}


def drop_overlap(given: dict[str, list[list[dict]]]) -> dict[str, int]:
    """Drop from val each item (prompt group) whose prompt is in train, and from test each whose prompt is
    in train or val. Returns how many records each lost. The held-out side gives them up, not train: a
    test item seen in training scores memory, and train (so the token budget's epochs) stays as the data
    gave it. A split drawn from the data never overlaps (it is drawn by prompt); a split the data names may."""
    seen = {prompt(group[0]) for group in given["train"]}
    dropped = {}
    for name in ("val", "test"):
        kept = [group for group in given[name] if prompt(group[0]) not in seen]
        seen |= {prompt(group[0]) for group in kept}
        dropped[f"{name}_dropped"] = sum(map(len, given[name])) - sum(map(len, kept))
        given[name] = kept
    return dropped


def split(examples: list[dict], prep: PrepareParams, where: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Deterministic train/val/test split by prompt, and how many val and test records drop_overlap dropped.
    Records that share a prompt are one item: they land in the same split; train keeps each (prompt,
    reference) pair as an example, val and test one item per prompt with every reference (held_out_item).
    Val or test items the data names are kept (the first max_*_examples of them, drawn at random); a
    split the data does not provide is carved from the training pool, at most max_*_examples items of it,
    so what a cap leaves out stays in train. `where` names the task and its files in errors."""
    given = {s: group_by_prompt([ex for ex in examples if ex.get("split") == s]) for s in SPLITS}
    pool = group_by_prompt([ex for ex in examples if ex.get("split") == "train"] + [ex for ex in examples if "split" not in ex])
    random.Random(prep.seed).shuffle(pool)
    prompts = len(group_by_prompt(examples))
    caps = {"val": prep.max_val_examples, "test": prep.max_test_examples}
    for name, fraction in (("test", prep.test_fraction), ("val", prep.val_fraction)):
        if not given[name]:
            n = max(1, round(prompts * fraction))
            n = min(n, caps[name] or n)
            given[name], pool = pool[:n], pool[n:]
    given["train"] = pool
    before = {name: len(given[name]) for name in SPLITS}
    overlap = drop_overlap(given)
    out = {}
    for name in SPLITS:
        if name == "train":
            items = [{"messages": ex["messages"]} for group in given[name] for ex in group]
        else:
            items = [held_out_item(group) for group in given[name]]
        if caps.get(name) and len(items) > caps[name]:
            items = random.Random(prep.seed).sample(items, caps[name])
        if not items and before[name]:
            earlier = "train" if name == "val" else "train or val"
            raise TuneoffError(f"{where}: the {name} split is empty: each of its {before[name]} prompts is in "
                               f"{earlier} too")
        if not items:
            raise TuneoffError(f"{where}: the {name} split is empty: the data has too few examples ({len(examples)})")
        out[name] = items
    return out, overlap
