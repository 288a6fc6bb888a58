"""Built-in *free-form* task: a restaurant's attributes in, one descriptive sentence out, with several
reference sentences per prompt, shaped as the E2E NLG data-to-text set the LoRA paper reports on.

A meaning representation such as `name[Aromi], eatType[pub], food[Italian], area[Aberdeen City]` asks
for a sentence; each prompt has 3-8 references, written from different templates (different order,
different words), so a reply is scored against all of them with ROUGE-L (tuneoff/evaluation/metrics.py):
exact match would score every good paraphrase 0. The places are the UK subdivisions pycountry ships.
"""

from __future__ import annotations

import random

import pycountry

SYSTEM_PROMPT = "Describe the restaurant in one sentence, using every attribute given."
NAMES = ["Aromi", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe",
         "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge", "The Cricketers", "The Eagle",
         "The Golden Curry", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat",
         "The Vaults", "The Waterman", "Wildwood", "Zizzi", "Alimentum", "Bibimbap House", "Cotto Cafe", "The Dumpling Tree"]
EAT_TYPES = ["coffee shop", "pub", "restaurant"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "Thai"]
PRICES = ["cheap", "moderately priced", "high-priced"]
RATINGS = ["low", "medium", "high"]
# each template uses every attribute; {family} reads "family-friendly" / "not family-friendly"
TEMPLATES = [
    "{name} is a {price} {food} {eat} in {area} with a {rating} customer rating; it is {family}.",
    "In {area} there is a {family} {eat} called {name} that serves {price} {food} food and is rated {rating}.",
    "{name}, which is a {eat} serving {food} food in {area}, is {price}, {family} and has a {rating} rating.",
    "For {price} {food} food in {area}, try {name}, a {family} {eat} rated {rating} by customers.",
    "Rated {rating} by its customers, {name} is a {family} {eat} in {area} offering {price} {food} food.",
    "{name} serves {food} food in {area}. It is a {price} {eat}, {family}, with a {rating} rating.",
    "Located in {area}, the {eat} {name} has {price} {food} food, a {rating} customer rating and is {family}.",
    "There is a {rating}-rated {food} {eat} in {area} named {name}; it is {price} and {family}.",
]


def areas() -> list[str]:
    """Place names from pycountry's ISO 3166-2 subdivisions of the United Kingdom (English names: a Welsh
    one in brackets dropped), sorted."""
    return sorted({s.name.split(" [")[0] for s in pycountry.subdivisions.get(country_code="GB")})


def generate(n_prompts: int, seed: int) -> list[dict]:
    """Chat examples, one per (prompt, reference): n_prompts distinct prompts, 3-8 references each."""
    rng = random.Random(seed)
    places, seen, examples = areas(), set(), []
    while len(seen) < n_prompts:
        slots = {"name": rng.choice(NAMES), "eat": rng.choice(EAT_TYPES), "food": rng.choice(FOODS),
                 "price": rng.choice(PRICES), "rating": rng.choice(RATINGS), "area": rng.choice(places),
                 "family": rng.choice(["family-friendly", "not family-friendly"])}
        prompt = (f"name[{slots['name']}], eatType[{slots['eat']}], food[{slots['food']}], priceRange[{slots['price']}], "
                  f"customerRating[{slots['rating']}], area[{slots['area']}], "
                  f"familyFriendly[{'yes' if slots['family'] == 'family-friendly' else 'no'}]")
        if prompt in seen:
            continue
        seen.add(prompt)
        for template in rng.sample(TEMPLATES, rng.randint(3, 8)):
            examples.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": prompt},
                                          {"role": "assistant", "content": template.format(**slots)}]})
    return examples
