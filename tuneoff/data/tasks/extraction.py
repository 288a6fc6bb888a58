"""Built-in *format* task: free-text support messages -> a JSON ticket record; and the same
messages as a *classification* task, `triage`: the issue type alone.

Generated from templates with a fixed seed, so it runs offline and is identical on every
machine. The skill is structure (which span goes in which field, a closed set of issue
types, null for what is missing), not knowledge: the seed article predicts LoRA within
1-3% of full fine-tuning on both. Triage's answers are a word or two, so the default run can
score 300 test items of it in well under a minute, where extraction's ~45-token records take
several: enough items for a 2-point margin to decide.
"""

from __future__ import annotations

import json
import random

ISSUES = {
    "refund": ["I want a refund for {product}", "please give me my money back for {product}",
               "can I return {product} and get refunded", "I'd like to be reimbursed for {product}"],
    "damaged": ["{product} arrived broken", "the {product} I got is damaged",
                "my {product} came with a cracked casing", "{product} stopped working after one day"],
    "late_delivery": ["{product} still hasn't arrived", "where is my {product}? it's two weeks late",
                      "the delivery of {product} is overdue", "tracking for {product} hasn't moved in days"],
    "wrong_item": ["I ordered {product} but got something else", "you sent me the wrong item instead of {product}",
                   "the box had a different product, not {product}", "received the wrong colour of {product}"],
    "billing": ["I was charged twice for {product}", "there's an extra fee on my bill for {product}",
                "my card was billed the wrong amount for {product}", "I see an unknown charge related to {product}"],
    "cancel": ["please cancel my order of {product}", "I no longer want {product}, cancel it",
               "stop the shipment of {product}", "I need to cancel {product} before it ships"],
}
URGENCY_CUES = {
    "high": ["This is urgent!", "I need this sorted today.", "Please respond ASAP.", "This is the third time I'm asking!"],
    "normal": ["", "Thanks.", "Let me know what you can do.", "Appreciate the help."],
    "low": ["No rush.", "Whenever you get a chance.", "Not urgent, just letting you know.", "Take your time."],
}
PRODUCTS = ["wireless headphones", "coffee maker", "standing desk", "yoga mat", "phone case", "air fryer",
            "mechanical keyboard", "running shoes", "desk lamp", "water bottle", "backpack", "smart watch",
            "blender", "office chair", "electric kettle", "bluetooth speaker", "winter jacket", "monitor stand"]
FIRST = ["Maria", "James", "Aisha", "Chen", "Lukas", "Priya", "Diego", "Sofia", "Tom", "Fatima", "Kenji",
         "Olga", "Samuel", "Hannah", "Mateo", "Zara", "Ravi", "Emma", "Noah", "Leila"]
LAST = ["Garcia", "Smith", "Khan", "Wang", "Muller", "Patel", "Lopez", "Rossi", "Brown", "Haddad",
        "Tanaka", "Ivanova", "Okafor", "Schmidt", "Silva", "Ahmed", "Nair", "Dubois", "Kim", "Novak"]
OPENERS = ["Hi,", "Hello team,", "Hey there.", "Good morning,", "", "To whom it may concern,"]

# Short on purpose: the fields' values (issue types, urgency levels, null for what is missing) are what
# fine-tuning teaches, and every token here is paid again by each example, in training and in scoring.
SYSTEM_PROMPT = "Extract the ticket as JSON: name, order_id, product, issue, urgency."


def _example(rng: random.Random) -> dict:
    issue = rng.choice(list(ISSUES))
    urgency = rng.choice(list(URGENCY_CUES))
    product = rng.choice(PRODUCTS)
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() < 0.8 else None
    order_id = f"ORD-{rng.randint(10000, 99999)}" if rng.random() < 0.75 else None

    parts = [rng.choice(OPENERS), rng.choice(ISSUES[issue]).format(product=product) + "."]
    if order_id:
        parts.append(rng.choice(["Order {o}.", "My order number is {o}.", "(order {o})", "Ref: {o}."]).format(o=order_id))
    parts.append(rng.choice(URGENCY_CUES[urgency]))
    if name:
        parts.append(rng.choice(["- {n}", "Regards, {n}", "Thanks, {n}", "{n} here."]).format(n=name))
    message = " ".join(p for p in parts if p)
    message = message[0].upper() + message[1:]

    record = {"name": name, "order_id": order_id, "product": product, "issue": issue, "urgency": urgency}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": message},
            {"role": "assistant", "content": json.dumps(record)},
        ]
    }


TRIAGE_PROMPT = "Classify the support message as one of: " + ", ".join(ISSUES) + ". Answer with the label only."


def triage(n_examples: int, seed: int) -> list[dict]:
    """generate()'s messages, each answered with its issue type (one of ISSUES)."""
    return [{"messages": [{"role": "system", "content": TRIAGE_PROMPT}, ex["messages"][1],
                          {"role": "assistant", "content": json.loads(ex["messages"][2]["content"])["issue"]}]}
            for ex in generate(n_examples, seed)]


def generate(n_examples: int, seed: int) -> list[dict]:
    """`n_examples` distinct tickets; the same seed gives the same list everywhere."""
    rng = random.Random(seed)
    seen, examples = set(), []
    for _ in range(n_examples * 20):
        ex = _example(rng)
        key = ex["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            examples.append(ex)
        if len(examples) == n_examples:
            break
    return examples
