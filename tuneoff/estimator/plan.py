"""`tuneoff plan`: the seed article's advice as explicit rules, checked against the estimator.

From a task type, a target device, a dataset size and an accuracy tolerance, propose a starting
method, rank and target modules with the reason for each choice, and the cost of the bake-off that
would check the proposal. The numbers the rules use (expected gaps, ranks, the dataset size that
justifies full fine-tuning) live in params.yaml `plan:`, each with the article's sentence it encodes.

The rules, in order:
1. Rank by task type ("rank 8 for simple classification and formatting, 16-32 for most, 64+ for
   complex reasoning").
2. Target modules: q_proj and v_proj ("the standard baseline"), or every linear layer when the
   tolerance is tighter than the gap the article expects for the task type, or the task is
   knowledge- or reasoning-heavy ("can yield 1-2% gains on harder tasks"); a tight tolerance also
   doubles the rank (up to 64) before anyone reaches for full fine-tuning.
3. Method: full fine-tuning when a knowledge or reasoning task has at least
   `full_finetune_min_examples` examples and full fine-tuning fits; otherwise LoRA ("run a LoRA
   baseline first"); QLoRA when LoRA does not fit the device ("when GPU memory is the primary
   constraint"). A method that does not fit at the project's batch is retried with gradient
   checkpointing, then with smaller batches.
4. The bake-off: every method that fits, on the same tokens, with its hours and dollars.
"""

from __future__ import annotations

from dataclasses import replace

from tuneoff.core.methods import FULL, LORA, METHODS, QLORA
from tuneoff.core.params import EstimateParams, PlanParams
from tuneoff.estimator import estimate, memory
from tuneoff.estimator.architectures import Shape
from tuneoff.estimator.throughput import Device


def fitting_setup(shape: Shape, setup: memory.Setup, device: Device, params: EstimateParams
                  ) -> tuple[memory.Setup, memory.Estimate, estimate.Fit]:
    """`setup` as given if it fits `device`; else with gradient checkpointing; else with halved batches.
    Returns the last one tried when nothing fits."""
    overhead = estimate.overhead_bytes(params, device.kind)
    candidates = [setup, replace(setup, gradient_checkpointing=True)]
    batch = setup.batch_size // 2
    while batch >= 1:
        candidates.append(replace(setup, gradient_checkpointing=True, batch_size=batch))
        batch //= 2
    for candidate in candidates:
        est = memory.estimate(shape, candidate, overhead)
        fit = estimate.fit(est, device, params.tight_fraction)
        if fit.status != "no":
            return candidate, est, fit
    return candidate, est, fit


def plan(shape: Shape, task_type: str, device: Device, examples: int, positions: float, tolerance_points: float,
         base: memory.Setup, plan_params: PlanParams, estimate_params: EstimateParams, runs_dir) -> dict:
    """The proposal (method, rank, target modules, setup), the reasons, and the bake-off's cost."""
    reasons = []
    gap = plan_params.expected_gap_points[task_type]
    rank = plan_params.rank[task_type]
    reasons.append(f"rank {rank}: the article's starting rank for {task_type} tasks (params.yaml plan.rank)")
    tight = tolerance_points < gap
    hard = task_type in ("knowledge", "reasoning")
    if tight:
        rank = min(2 * rank, 64)
        reasons.append(f"rank {rank}: the tolerance ({tolerance_points:g} point(s)) is under LoRA's expected gap for "
                       f"{task_type} ({gap:g} points), so start one rank step higher")
    targets = memory.expand_targets(plan_params.wide_targets if tight or hard else plan_params.baseline_targets)
    reasons.append(f"target modules {', '.join(targets)}: " + (
        "every linear layer, for a tight tolerance or a knowledge/reasoning task ('1-2% gains on harder tasks')"
        if tight or hard else "q_proj and v_proj, the article's baseline; widen them if the bake-off shows a gap"))

    options = {}
    for method in METHODS:
        setup = replace(base, method=method, rank=rank, target_modules=targets)
        setup, est, fit = fitting_setup(shape, setup, device, estimate_params)
        cost = estimate.time_and_cost(shape, setup, positions, device, estimate_params, runs_dir)
        options[method] = {"setup": setup, "estimate": est, "fit": fit, "cost": cost}
    fits = {m for m, o in options.items() if o["fit"].status != "no"}

    if hard and examples >= plan_params.full_finetune_min_examples and FULL.name in fits:
        method = FULL.name
        reasons.append(f"full fine-tuning: a {task_type} task with {examples:,} examples (at least "
                       f"{plan_params.full_finetune_min_examples:,}: 'larger datasets can leverage the additional capacity')")
    elif LORA.name in fits:
        method = LORA.name
        if hard and examples >= plan_params.full_finetune_min_examples:
            reasons.append(f"full fine-tuning would be the article's pick for {examples:,} {task_type} examples, but it "
                           f"needs {options[FULL.name]['fit'].need_gib:g} GiB on {device.name}")
        reasons.append("LoRA: 'the default recommendation ... run a LoRA baseline first'" + (
            f"; full fine-tuning is worth its cost only if the bake-off shows a gap over {tolerance_points:g} points"
            if FULL.name in fits else "; full fine-tuning does not fit this device"))
    elif QLORA.name in fits:
        method = QLORA.name
        need = options[LORA.name]["fit"].need_gib
        reasons.append(f"QLoRA: LoRA needs {need:g} GiB even with gradient checkpointing at batch 1, over the "
                       f"{device.memory_gib:g} GiB of {device.name}; QLoRA is expected within "
                       f"{plan_params.qlora_gap_points:g} point(s) of LoRA")
        if tolerance_points < gap + plan_params.qlora_gap_points:
            reasons.append(f"warning: LoRA's expected gap plus QLoRA's ({gap + plan_params.qlora_gap_points:g} points) "
                           f"is over the tolerance: plan a larger device for the comparison run")
    else:
        method = None
        reasons.append(f"nothing fits {device.name} ({device.memory_gib:g} GiB), even QLoRA at batch 1 with gradient "
                       f"checkpointing needs {options[QLORA.name]['fit'].need_gib:g} GiB: a larger device, or FSDP "
                       f"over several (--gpus)")
    chosen = options.get(method)
    if chosen and chosen["setup"] != replace(base, method=method, rank=rank, target_modules=targets):
        s = chosen["setup"]
        reasons.append(f"batch {s.batch_size} x {s.seq_len} tokens, gradient checkpointing "
                       f"{'on' if s.gradient_checkpointing else 'off'}: what fits {device.name}")
    bakeoff = {m: o for m, o in options.items() if m in fits}
    usd = [o["cost"]["usd"] for o in bakeoff.values()]
    return {
        "method": method, "rank": rank if method != FULL.name else None,
        "target_modules": list(targets) if method not in (None, FULL.name) else None,
        "setup": chosen and chosen["setup"], "reasons": reasons, "options": options,
        "bakeoff": {"methods": sorted(bakeoff, key=list(METHODS).index),
                    "hours": sum(o["cost"]["train_hours"] for o in bakeoff.values()),
                    "usd": None if None in usd else sum(usd),
                    "left_out": {m: f"needs {o['fit'].need_gib:g} GiB" for m, o in options.items() if m not in fits}},
    }
