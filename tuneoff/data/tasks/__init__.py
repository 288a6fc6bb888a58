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
)
from tuneoff.data.tasks import extraction, iso_codes, loaders

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    examples: list[dict]  # {"messages": [...], "split"?: "train"|"val"|"test"}
    scorer: str  # "json_fields" | "exact" | "label"
    labels: list[str] = field(default_factory=list)  # closed label set, for "label" tasks


def build_task(params, prep: PrepareParams) -> Task:
    """The examples and scorer for one `tasks.<name>` entry of params.yaml."""
    if isinstance(params, ExtractionTask):
        return Task(extraction.generate(params.n_examples, prep.seed), "json_fields")
    if isinstance(params, IsoCodesTask):
        return Task(iso_codes.generate(params.n_facts, prep.seed, prep.val_fraction), "exact")
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


def drop_overlap(given: dict[str, list[dict]]) -> dict[str, int]:
    """Drop from val each example whose prompt is in train, and from test each whose prompt is in
    train or val; a prompt repeated within val or test counts once. Returns how many each lost.
    The held-out side gives them up, not train: a test item seen in training scores memory, and
    train (so the token budget's epochs) stays as the data gave it."""
    seen = {prompt(ex) for ex in given["train"]}
    dropped = {}
    for name in ("val", "test"):
        kept = []
        for ex in given[name]:
            if prompt(ex) not in seen:
                seen.add(prompt(ex))
                kept.append(ex)
        dropped[f"{name}_dropped"] = len(given[name]) - len(kept)
        given[name] = kept
    return dropped


def split(examples: list[dict], prep: PrepareParams, where: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Deterministic train/val/test split, and how many val and test examples drop_overlap dropped.
    Val or test examples the data names are kept (the first max_*_examples of them, drawn at random);
    a split the data does not provide is carved from the training pool, at most max_*_examples of it,
    so what a cap leaves out stays in train. `where` names the task and its files in errors."""
    given = {s: [ex for ex in examples if ex.get("split") == s] for s in SPLITS}
    pool = given["train"] + [ex for ex in examples if "split" not in ex]
    random.Random(prep.seed).shuffle(pool)
    caps = {"val": prep.max_val_examples, "test": prep.max_test_examples}
    for name, fraction in (("test", prep.test_fraction), ("val", prep.val_fraction)):
        if not given[name]:
            n = max(1, round(len(examples) * fraction))
            n = min(n, caps[name] or n)
            given[name], pool = pool[:n], pool[n:]
    given["train"] = pool
    before = {name: len(given[name]) for name in SPLITS}
    overlap = drop_overlap(given)
    out = {}
    for name in SPLITS:
        items = [{"messages": ex["messages"]} for ex in given[name]]
        if caps.get(name) and len(items) > caps[name]:
            items = random.Random(prep.seed).sample(items, caps[name])
        if not items and before[name]:
            earlier = "train" if name == "val" else "train or val"
            raise TuneoffError(f"{where}: the {name} split is empty: its {before[name]} examples all repeat a prompt "
                               f"of {earlier}")
        if not items:
            raise TuneoffError(f"{where}: the {name} split is empty: the data has too few examples ({len(examples)})")
        out[name] = items
    return out, overlap
