"""Built-in *knowledge* task: ISO 3166-1 and ISO 4217 codes, from the data `pycountry` ships.

Facts the model must absorb, not a format to learn: numeric country codes in particular
cannot be guessed from a name. Every fact is trained in two phrasings; val asks a few of the
facts, and test all the others, in a third, held-out phrasing, so the score measures what
was absorbed rather than what was memorised verbatim. The seed article predicts a
4-7% gap between LoRA and full fine-tuning on tasks like this.
"""

from __future__ import annotations

import random
from collections import Counter

import pycountry

SYSTEM_PROMPT = "Answer with the requested ISO code only."

# (fact kind, [train phrasing 1, train phrasing 2, held-out phrasing])
PHRASINGS = {
    "alpha_3": ["What is the ISO 3166-1 alpha-3 code of {name}?",
                "Give the three-letter ISO country code for {name}.",
                "{name}: which alpha-3 code does ISO 3166-1 assign to it?"],
    "numeric": ["What is the ISO 3166-1 numeric code of {name}?",
                "Give the three-digit ISO numeric country code for {name}.",
                "{name}: which numeric code does ISO 3166-1 assign to it?"],
    "currency": ["What is the ISO 4217 code of the currency {name}?",
                 "Give the three-letter currency code for the {name}.",
                 "{name}: which code does ISO 4217 assign to this currency?"],
}


def _facts() -> list[tuple[str, str, str]]:
    """(kind, subject name, answer) for every country and currency pycountry knows."""
    facts = []
    for c in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        facts.append(("alpha_3", c.name, c.alpha_3))
        facts.append(("numeric", c.name, c.numeric))
    for cur in sorted(pycountry.currencies, key=lambda c: c.alpha_3):
        facts.append(("currency", cur.name, cur.alpha_3))
    # a name with two codes (Bolívar Soberano: VED and VES) is a question with no one answer
    asked = Counter((kind, name) for kind, name, _ in facts)
    return [f for f in facts if asked[f[0], f[1]] == 1]


def _chat(question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def generate(n_facts: int, seed: int, val_fraction: float) -> list[dict]:
    """Examples with a fixed `split`: every fact twice in train, and once more, reworded, in val or test."""
    rng = random.Random(seed)
    facts = _facts()
    rng.shuffle(facts)
    facts = facts[:n_facts]
    n_val = max(1, round(len(facts) * val_fraction))
    examples = []
    for i, (kind, name, answer) in enumerate(facts):
        train_q, train_q2, held_out_q = (p.format(name=name) for p in PHRASINGS[kind])
        examples += [{"messages": _chat(q, answer), "split": "train"} for q in (train_q, train_q2)]
        examples.append({"messages": _chat(held_out_q, answer), "split": "val" if i < n_val else "test"})
    return examples
