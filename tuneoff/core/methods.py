"""The methods a bake-off compares, as data: every module asks this table instead of comparing names.

    name   trains                           base it trains on   its DVC stages per task
    full   every weight                     models/base         train, evaluate_full
    lora   a PEFT adapter, frozen base      models/base         train, merge, evaluate
    qlora  a PEFT adapter, frozen 4-bit     models/base-nf4     train_nf4, merge, merge_nf4, evaluate_nf4

(each evaluate stage also scores the model's general ability), and with bakeoff.more_seeds,
train_seed (train_seed_nf4 for qlora) once per extra seed.

What ships: full ships its weights; lora its adapter merged into the float base; qlora the best
of its deployable forms on the test set (tuneoff/modeling/merge.py FORMS).

A new arm (say LoRA on every linear layer) is a row here and its sections in params.yaml:
train.<name> (an adapter's rank and targets), estimate.utilisation.{cpu,cuda}.<name>,
dispatch.hardware.<name>, and the bakeoff lists it runs in. Everything else reads this table
(tests/test_method_table.py adds one and runs it through the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneoff.core.errors import TuneoffError

FLOAT_BASE, NF4_BASE = Path("models/base"), Path("models/base-nf4")
BASE = "base"  # the untuned base model: scored like a method, never trained


@dataclass(frozen=True)
class Method:
    name: str
    adapter: bool  # a LoRA adapter on a frozen base; otherwise every weight trains
    quantized: bool  # the frozen base is the 4-bit copy the quantize stage makes
    colour: str  # its colour in every chart

    @property
    def base(self) -> Path:
        return NF4_BASE if self.quantized else FLOAT_BASE

    @property
    def kind(self) -> str:
        """What its train stage saves: a whole model or an adapter."""
        return "adapter" if self.adapter else "model"

    def stages(self, task: str, more_seeds: list[int] | tuple[int, ...] = ()) -> list[str]:
        """Its dvc.yaml stages for `task`, in the order they run; with bakeoff.more_seeds, one more
        train_seed stage (training and scoring) per seed."""
        again = [f"{'train_seed_nf4' if self.quantized else 'train_seed'}@{task}-{self.name}-{s}" for s in more_seeds]
        if not self.adapter:
            return [f"train@{task}-{self.name}", f"evaluate_full@{task}", *again]
        if self.quantized:
            return [f"train_nf4@{task}-{self.name}", f"merge@{task}-{self.name}", f"merge_nf4@{task}-{self.name}",
                    f"evaluate_nf4@{task}-{self.name}", *again]
        return [f"train@{task}-{self.name}", f"merge@{task}-{self.name}", f"evaluate@{task}-{self.name}", *again]

    def train_stage(self, task: str) -> str:
        return self.stages(task)[0]


FULL = Method("full", adapter=False, quantized=False, colour="C0")
LORA = Method("lora", adapter=True, quantized=False, colour="C1")
QLORA = Method("qlora", adapter=True, quantized=True, colour="C2")
METHODS = {m.name: m for m in (FULL, LORA, QLORA)}
COLOURS = {BASE: "grey", **{m.name: m.colour for m in METHODS.values()}}

# the comparisons the decision and the claims check use: each method against the base, each adapter
# against full fine-tuning, QLoRA against LoRA
PAIRS = [*((m, BASE) for m in METHODS), *((m.name, FULL.name) for m in METHODS.values() if m.adapter),
         (QLORA.name, LORA.name)]


def method(name: str) -> Method:
    """The method called `name`; an unknown name is a one-line error that lists the known ones."""
    if name not in METHODS:
        raise TuneoffError(f"unknown method {name!r}; allowed: {list(METHODS)}")
    return METHODS[name]


def unit_stages(unit: str, tasks: list[str], more_seeds: list[int] | tuple[int, ...] = ()) -> list[str]:
    """The stages of one unit of the bake-off (a method, or the base) over every task."""
    if unit == BASE:
        return [f"evaluate_base@{t}" for t in tasks]
    return [s for t in tasks for s in method(unit).stages(t, more_seeds)]
