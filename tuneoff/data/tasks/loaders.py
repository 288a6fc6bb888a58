"""Loaders for a team's own data: JSONL (chat or instruction form), CSV classification, and a
Hugging Face dataset saved with `save_to_disk`. Every problem is reported as one line naming
the file, line and key.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tuneoff.core.errors import TuneoffError

ROLES = ("system", "user", "assistant")
# One record over a million characters (~250k tokens) fits no context window trained here: it is
# a broken file (a lost newline, a pasted dump), and tokenizing it would take minutes first.
MAX_RECORD_CHARS = 1_000_000
# Chat and instruction records are two levels deep, a JSON answer a few more; past 32 it is not a
# record (json.loads itself fails near Python's recursion limit, ~1,000, with a RecursionError).
MAX_JSON_DEPTH = 32


def _check_length(text: str, where: str) -> None:
    if len(text) > MAX_RECORD_CHARS:
        raise TuneoffError(f"{where}: {len(text):,} characters in one record (limit {MAX_RECORD_CHARS:,}); "
                           "is a newline missing?")


def _check_value(value: object, where: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH, and a lone surrogate in any string, keys
    included: json.loads accepts the escape "\\ud83d", but no UTF-8 file can hold it, so prepare's
    write would fail with a traceback. A stack, not recursion, so any depth is measured."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise TuneoffError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack += [(x, depth + 1) for x in (*item.keys(), *item.values())]
        elif isinstance(item, list):
            stack += [(x, depth + 1) for x in item]
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                surrogate = f"\\u{ord(item[e.start]):04x}"  # escaped: the raw one cannot be printed either
                raise TuneoffError(f"{where}: text is not valid Unicode (a lone surrogate {surrogate})") from None


def _parse(text: str, path: Path, line: int | None) -> object:
    """json.loads of a JSONL file's `line` (None: the whole file), checked by _check_value; every
    failure, a nesting too deep for the parser's recursion included, is one line naming the line."""
    where = str(path) if line is None else f"{path} line {line}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuneoffError(f"{path} line {line or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise TuneoffError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_value(value, where)
    return value


def _open_text(path: Path):
    if not path.is_file():
        raise TuneoffError(f"{path}: file not found")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise TuneoffError(f"{path}: looks binary (NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TuneoffError(f"{path} line {line}: not valid UTF-8") from None
    if not text.strip():
        raise TuneoffError(f"{path}: file is empty")
    return text


def record_to_messages(rec: object, where: str, system_prompt: str) -> list[dict]:
    """One record in chat form ({"messages": [...]}) or instruction form
    ({"instruction", "input"?, "output"}) -> a validated list of chat messages."""
    if not isinstance(rec, dict):
        raise TuneoffError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages:
            raise TuneoffError(f'{where}: key "messages" must be a non-empty list')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise TuneoffError(f'{where}: messages[{i}] needs "role" in {list(ROLES)}')
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise TuneoffError(f'{where}: messages[{i}] has empty or missing "content"')
        if not any(m["role"] == "assistant" for m in messages):
            raise TuneoffError(f"{where}: messages has no assistant turn to learn from")
        if messages[-1]["role"] != "assistant":  # the last turn is the answer trained on and scored
            raise TuneoffError(f"{where}: the last message is the {messages[-1]['role']}'s, not the assistant's: "
                               "which turn is the answer?")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[0]["role"] != "system" and system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    for key in ("instruction", "output"):
        if key not in rec:
            raise TuneoffError(f'{where}: missing key "{key}" (or give "messages")')
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise TuneoffError(f'{where}: key "{key}" is empty')
    user = rec["instruction"] if not rec.get("input") else f"{rec['instruction']}\n\n{rec['input']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def load_jsonl(path: Path, system_prompt: str) -> list[dict]:
    text = _open_text(path)
    examples = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        _check_length(line, f"{path} line {n}")
        rec = _parse(line, path, n)
        examples.append({"messages": record_to_messages(rec, f"{path} line {n}", system_prompt)})
    return examples


def read_labels(path: Path) -> list[str]:
    labels = _parse(_open_text(path), path, None)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise TuneoffError(f"{path}: expected a JSON list of non-empty label strings")
    return labels


def load_csv(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) rows of a classification CSV."""
    csv.field_size_limit(MAX_RECORD_CHARS + 1)  # past it, _check_length names the line
    reader = csv.DictReader(io.StringIO(_open_text(path), newline=""), strict=True)
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise TuneoffError(f"{path} line 1: not valid CSV ({e})") from None
    for key, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in columns:
            raise TuneoffError(f"{path}: no column {col!r} ({key}); columns are {columns}")
        if columns.count(col) > 1:  # csv.DictReader would silently keep the last one
            raise TuneoffError(f"{path} line 1: the header names column {col!r} ({key}) {columns.count(col)} times: "
                               "which one is meant?")
    rows = []
    while True:
        try:
            rec = next(reader, None)
        except csv.Error as e:
            # line_num counts the lines of the rows read whole: the bad row starts on the next one
            raise TuneoffError(f"{path} line {reader.line_num + 1}: not valid CSV ({e})") from None
        if rec is None:
            break
        n = reader.line_num
        text, label = (rec.get(text_column) or "").strip(), (rec.get(label_column) or "").strip()
        _check_length(text, f"{path} line {n}")
        if not text:
            raise TuneoffError(f"{path} line {n}: empty {text_column!r}")
        if not label:
            raise TuneoffError(f"{path} line {n}: empty {label_column!r}")
        rows.append((text, label))
    if not rows:
        raise TuneoffError(f"{path}: no data rows")
    return rows


def classification_examples(rows, labels: list[str], path: Path, system_prompt: str, labels_in_prompt: bool):
    """Chat examples for (text, label) rows; a label outside `labels` is an error naming the row."""
    allowed = set(labels)
    system = system_prompt + (" Labels: " + ", ".join(labels) + "." if labels_in_prompt else "")
    examples = []
    for i, (text, label) in enumerate(rows):
        if label not in allowed:
            raise TuneoffError(f"{path} row {i + 1}: label {label!r} is not in the label set")
        examples.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": text},
            {"role": "assistant", "content": label},
        ]})
    return examples


def load_hf_disk(path: Path, system_prompt: str) -> list[dict]:
    """A dataset saved with `save_to_disk`; a DatasetDict keeps its train/validation/test splits."""
    import datasets

    if not path.exists():
        raise TuneoffError(f"{path}: not found")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise TuneoffError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    split_names = {"train": "train", "validation": "val", "val": "val", "test": "test"}
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    examples = []
    for name, part in parts:
        if name is not None and name not in split_names:
            raise TuneoffError(f"{path}: unknown split {name!r}; expected {sorted(split_names)}")
        for i, rec in enumerate(part):
            ex = {"messages": record_to_messages(rec, f"{path} [{name or 'data'}] row {i}", system_prompt)}
            if name is not None:
                ex["split"] = split_names[name]
            examples.append(ex)
    return examples
