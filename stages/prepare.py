"""DVC stage `prepare@<task>`: raw task data (params.yaml tasks.<task>) -> `--out` (data/prepared/<task>/).

Writes the chat examples of each split as JSONL (what evaluate generates from), each split
tokenized with the base model's chat template and packed into rows of `prepare.seq_len`
tokens (what train and the loss checks read), and meta.json (scorer, labels, counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

from tuneoff.core.atomic import atomic_dir, write_json, write_jsonl
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.params import (
    PrepareParams,
    TaskParams,
    check_task,
    read_params,
    section,
)
from tuneoff.core.tracking import flat, stage_run
from tuneoff.data.packing import pack, tokenize_chat
from tuneoff.data.tasks import SPLITS, build_task, source, split

@user_errors
def main(task: str, base: Path, out: Path) -> None:
    data = read_params()
    check_task(task, data)
    prep = section(PrepareParams, "prepare", data=data)
    spec = section(TaskParams, "tasks", task, data=data)
    if not (base / "config.json").is_file():
        raise TuneoffError(f"{base}/ has no model: run `dvc repro import_base` first")
    built = build_task(spec, prep)
    splits, overlap = split(built.examples, prep, source(task, spec))
    tokenizer = AutoTokenizer.from_pretrained(base)
    meta = {"task": task, "kind": spec.kind, "scorer": built.scorer, "labels": built.labels,
            "seq_len": prep.seq_len, "examples": {k: len(v) for k, v in splits.items()}, "overlap": overlap}
    several = {k: sum(len(ex.get("references", [None])) for ex in v) for k, v in splits.items() if k != "train"}
    if any(n > len(splits[k]) for k, n in several.items()):  # val and test items with several references: how many
        meta["references"] = several
    with atomic_dir(out) as tmp:
        for name, examples in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", examples)
        for name in SPLITS:  # train and val rows feed the loop; test is packed only for its counts
            packed = pack([tokenize_chat(tokenizer, ex["messages"]) for ex in splits[name]],
                          prep.seq_len, tokenizer.pad_token_id)
            if name != "test":
                save_file(packed.tensors(), tmp / f"{name}.safetensors")
            slots = packed.input_ids.numel()
            meta[name] = {"rows": len(packed.input_ids), "real_tokens": int(packed.real_tokens.sum()),
                          "loss_tokens": int((packed.targets != -100).sum()),
                          "padding_fraction": round(1 - int(packed.real_tokens.sum()) / slots, 4),
                          "truncated": packed.truncated, "dropped": packed.dropped}
        write_json(tmp / "meta.json", meta)
    with stage_run("prepare", {"prepare": prep.model_dump(), f"tasks.{task}": spec.model_dump()}, task=task,
                   data=data) as tracker:
        tracker.summary(flat({k: v for k, v in meta.items() if k not in ("labels", "task")}))
        tracker.artifact(f"{task}-data", "dataset", out, meta)
    if any(overlap.values()):
        test, val = overlap["test_dropped"], overlap["val_dropped"]
        print(f"prepare@{task}: dropped {test} test example{'s' * (test != 1)} whose prompt is also in train or val "
              f"and {val} val example{'s' * (val != 1)} whose prompt is also in train (meta.json: overlap)")
    tr = meta["train"]
    print(f"prepare@{task}: {meta['examples']} examples; train {tr['real_tokens']:,} tokens in {tr['rows']} rows "
          f"of {prep.seq_len} ({tr['padding_fraction']:.1%} padding) -> {out}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.prepare")
    parser.add_argument("task")
    parser.add_argument("--base", type=Path, required=True, help="the base model folder, whose tokenizer packs the rows")
    parser.add_argument("--out", type=Path, required=True, help="the prepared task's folder")
    main(**vars(parser.parse_args()))
