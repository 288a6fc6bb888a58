"""Write the shipped benchmark subsets (200 questions each) from the full files in ../shared/data.

Run from anywhere: `python data/general/make_subsets.py`. A fixed seed picks the questions and they
keep their order in the source file, so rerunning it rewrites the same bytes.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"  # <project>/data/general -> <project>/../shared/data
N_QUESTIONS = 200
SEED = 0


def pick(items: list, n: int = N_QUESTIONS, seed: int = SEED) -> list:
    """n items chosen with a fixed seed, in their original order."""
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def answers(cell: str) -> list[str]:
    """A TruthfulQA answer cell ("a; b; c") as its non-empty answers (some cells end in a stray ";")."""
    return [a.strip() for a in cell.strip().removesuffix(";").split("; ") if a.strip()]


def truthfulqa_mc(row: dict) -> dict | None:
    """The best answer (label 0) against the incorrect ones; None when no incorrect answer is left."""
    best = row["Best Answer"].strip()
    choices = list(dict.fromkeys([best, *answers(row["Incorrect Answers"])]))  # dedupe, keep order
    if len(choices) < 2:
        return None
    return {"question": row["Question"].strip(), "choices": choices, "label": 0}


def main() -> None:
    lines = (SHARED / "openbookqa" / "test.jsonl").read_text().splitlines(keepends=True)
    (HERE / "openbookqa" / "test.jsonl").write_text("".join(pick(lines)))

    with open(SHARED / "truthfulqa" / "TruthfulQA.csv", newline="") as f:
        docs = [doc for row in csv.DictReader(f) if (doc := truthfulqa_mc(row))]
    with open(HERE / "truthfulqa" / "mc.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in pick(docs))


if __name__ == "__main__":
    main()
