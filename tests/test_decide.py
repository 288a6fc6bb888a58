"""The verdict on constructed per-item scores where the answer is known: clearly better, clearly
within the margin, overlapping (inconclusive); champion vs challenger on the same items; and what
register does with a verdict that is not decided."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from tuneoff.core.params import DecideParams
from tuneoff.decision.decide import decide, replaces_champion
from tuneoff.decision.pairs import paired
from tuneoff.decision.registry import register
from tuneoff.decision.report import claims, markdown, stage_seconds

GIB = 2**30
RULES = DecideParams(max_gap_points=2.0, memory_budget_gb=0, bootstrap_samples=500, seed=0, max_general_drop_points=0,
                     sample_replies=3)
N = 400


def scores(right: int, n: int = N, first: int = 0) -> list[bool]:
    """n items, `right` of them correct, starting at item `first` (wrapping around)."""
    return [(i - first) % n < right for i in range(n)]


def items(correct: list[bool]) -> list[dict]:
    return [{"expected": f"answer {i}", "correct": c, "loss": 1.0 - 0.5 * c} for i, c in enumerate(correct)]


def row(method, correct, cost=1.0, mem=4.0):
    main = sum(correct) / len(correct)
    return {"method": method, "main": main, "ci_low": main - 0.03, "ci_high": main + 0.03, "test_loss": 1.0,
            "metrics": {}, "examples_per_second": 10.0,
            "train": None if method == "base" else {"cost_usd": cost, "peak_memory_bytes": mem * GIB, "train_seconds": 60,
                                                    "trainable_percent": 100.0 if method == "full" else 0.5,
                                                    "memory_measure": "cpu_peak_rss"}}


def comparison(base, full, lora, qlora, task_type="format"):
    """Per-item 0/1 scores for each model on the same N items."""
    per_item = {"base": base, "full": full, "lora": lora, "qlora": qlora}
    return {"task": "t", "main_metric": "accuracy", "task_type": task_type,
            "conditions": {"test_examples": N},
            "rows": [row("base", base), row("full", full, cost=10, mem=8), row("lora", lora, cost=2, mem=4),
                     row("qlora", qlora, cost=2.5, mem=3)],
            "pairs": paired({m: items(c) for m, c in per_item.items()}, 500, 0)}


def test_adapter_clearly_within_the_margin_wins_on_cost():
    # lora differs from full on 2 of 400 items: the interval is about [-1, +1] points, inside -2
    full = scores(300)
    lora = scores(300, first=1)
    d = decide(comparison(base=scores(100), full=full, lora=lora, qlora=scores(200)), RULES)
    assert d["verdict"] == "decided" and d["method"] == "lora"
    assert "non-inferior" in d["rationale"] and "at 20% of full's cost" in d["rationale"]


def test_every_adapter_clearly_behind_goes_to_full():
    d = decide(comparison(base=scores(40), full=scores(300), lora=scores(200), qlora=scores(190)), RULES)
    assert d["verdict"] == "decided" and d["method"] == "full"
    assert "every adapter is shown to be more than 2 points behind" in d["rationale"]


def test_overlapping_intervals_are_inconclusive_with_what_would_settle_it():
    # lora 1 point behind full, but the two disagree on 60 items: the interval spans the margin
    full = scores(200)
    lora = scores(196, first=28)
    d = decide(comparison(base=scores(40), full=full, lora=lora, qlora=scores(150)), RULES)
    assert d["verdict"] == "inconclusive" and d["method"] is None
    assert "lora - full -1.0 points" in d["rationale"] and "nothing is promoted" in d["rationale"]
    assert "test items for 80% power at this difference and discordance (now 400)" in d["settle"] and "twice the token budget" in d["settle"]


def test_point_estimates_that_differ_are_not_a_verdict():
    # what the old rule got wrong: 11% vs 6% on 100 items, disagreeing on 13 -> 5 points "behind", but the
    # interval reaches well inside the margin
    full, lora = scores(11, 100), scores(6, 100, first=4)
    per_item = {"base": scores(1, 100), "full": full, "lora": lora}
    c = {"task": "t", "main_metric": "exact_match", "task_type": "format", "conditions": {"test_examples": 100},
         "rows": [row("base", per_item["base"]), row("full", full, cost=10), row("lora", lora, cost=2)],
         "pairs": paired({m: items(v) for m, v in per_item.items()}, 500, 0)}
    d = decide(c, RULES)
    assert d["verdict"] == "inconclusive" and d["method"] is None


def test_no_method_shown_to_beat_the_base_is_inconclusive_and_names_none():
    same = scores(100)
    d = decide(comparison(base=same, full=scores(102, first=1), lora=scores(101), qlora=scores(99, first=2)), RULES)
    assert d["verdict"] == "inconclusive" and d["method"] is None
    assert "No method is shown to beat the untuned base" in d["rationale"]


def test_a_method_worse_than_the_base_is_out_and_the_cheapest_adapter_wins_without_full():
    d = decide(comparison(base=scores(350), full=scores(200), lora=scores(390), qlora=scores(385)), RULES)
    assert "full is worse than the untuned base" in d["rationale"]
    assert d["verdict"] == "decided" and d["method"] == "lora"


def test_memory_budget_excludes_full_and_picks_the_adapter_that_fits():
    rules = DecideParams(max_gap_points=2, memory_budget_gb=3.5, bootstrap_samples=500, seed=0, max_general_drop_points=0,
                         sample_replies=0)
    d = decide(comparison(base=scores(100), full=scores(300), lora=scores(250), qlora=scores(240)), rules)
    assert d["method"] == "qlora"
    assert "full needs 8.0 GiB" in d["rationale"] and "lora needs 4.0 GiB" in d["rationale"]


def test_a_method_shown_to_lose_general_ability_is_out_over_the_limit(tmp_path):
    """decide.max_general_drop_points: lora loses 30 points on a general benchmark against the base
    (on the same 400 items), full 1; over a 5-point limit lora is out and full, not lora, wins; at
    0 general ability does not decide. The cross-task pairing reads the base's own predictions."""
    from tuneoff.decision.general import general_ability, table

    general_items = {"base": scores(200), "full": scores(196, first=2), "lora": scores(80), "qlora": scores(200)}
    for model, correct in general_items.items():
        (tmp_path / "t" / model).mkdir(parents=True)
        cross = {} if model == "base" else {"u": scores(5, 10)}
        (tmp_path / "t" / model / "benchmark-items.json").write_text(json.dumps(
            {"benchmarks": {"bench": correct}, "cross_task": cross}))
    (tmp_path / "u/base").mkdir(parents=True)
    (tmp_path / "u/base/predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items(scores(7, 20))))
    general = general_ability("t", ["full", "lora", "qlora"], tmp_path)
    lora_vs_base = next(p for p in general["pairs"] if (p["a"], p["b"], p["benchmark"]) == ("lora", "base", "bench"))
    assert lora_vs_base["diff_points"] == -30.0 and lora_vs_base["ci_points"][1] < -5
    cross = next(p for p in general["pairs"] if (p["a"], p["benchmark"]) == ("full", "u"))
    assert cross["n"] == 10 and cross["diff_points"] == -20.0  # 5 of 10 right against the base's 7 of the same 10
    assert general["scores"]["u"]["base"] == {"score": 0.7, "n": 10, "kind": "cross-task"}
    assert "| bench | 400 | 50.0 | 49.0 (-1.0 [" in "\n".join(table(general))
    c = comparison(base=scores(100), full=scores(300), lora=scores(300, first=1), qlora=scores(200))
    c["general"] = general
    assert decide(c, RULES)["method"] == "lora"
    d = decide(c, RULES.model_copy(update={"max_general_drop_points": 5}))
    assert d["method"] == "full" and "lora loses more than the 5-point limit of general ability" in d["rationale"]
    assert "bench -30.0 points [" in d["rationale"]
    checked = {x["claim"]: x for x in claims({**c, "general": general})}
    on_bench = checked["LoRA within 1-3 points of full fine-tuning on general benchmarks (bench; taken as: at most 3 apart)"]
    assert on_bench["status"] == "does not hold" and on_bench["evidence"].startswith("lora - full: -29.0 points")


def test_the_base_scored_once_pairs_with_every_task(tmp_path):
    """The base's general benchmarks are scored by the first task's evaluate_base only; another task's
    base file names it (benchmarks_of), and that task's methods pair with those items."""
    from tuneoff.decision.general import general_ability

    for task, model, written in (("u", "base", {"benchmarks": {"bench": scores(200)}, "cross_task": {}}),
                                 ("t", "base", {"benchmarks": {}, "cross_task": {}, "benchmarks_of": "u"}),
                                 ("t", "full", {"benchmarks": {"bench": scores(150)}, "cross_task": {}})):
        (tmp_path / task / model).mkdir(parents=True)
        (tmp_path / task / model / "benchmark-items.json").write_text(json.dumps(written))
    general = general_ability("t", ["full"], tmp_path)
    assert general["scores"]["bench"]["base"]["score"] == 0.5
    assert next(p for p in general["pairs"] if p["a"] == "full")["diff_points"] == -12.5


def test_no_benchmarks_leave_no_general_section(tmp_path):
    """benchmarks.tasks: [] and cross_task_limit: 0: the stages write empty scores; nothing is shown or judged."""
    from tuneoff.decision.general import claims as general_claims
    from tuneoff.decision.general import drops, general_ability, table

    for model in ("base", "full", "lora"):
        (tmp_path / "t" / model).mkdir(parents=True)
        (tmp_path / "t" / model / "benchmark-items.json").write_text(json.dumps({"benchmarks": {}, "cross_task": {}}))
    general = general_ability("t", ["full", "lora"], tmp_path)
    assert general == {"scores": {}, "pairs": []}
    assert table(general) == [] and general_claims(general) == [] and drops(general, "lora", 1) == []
    assert general_ability("t", ["full"], tmp_path / "none") is None  # the stage has not run: no section


def test_a_failed_method_is_excluded_and_named():
    c = comparison(base=scores(100), full=scores(300), lora=scores(300, first=1), qlora=scores(299))
    c["rows"][2] = {"method": "lora", "failed": "CUDA out of memory", "main": None, "ci_low": None, "ci_high": None,
                    "train": None}
    c["pairs"] = [p for p in c["pairs"] if "lora" not in (p["a"], p["b"])]
    d = decide(c, RULES)
    assert d["method"] == "qlora" and "lora failed (CUDA out of memory)" in d["rationale"]
    c["rows"][0] = dict(c["rows"][2], method="base")
    assert decide(c, RULES)["method"] is None


def test_a_report_where_every_unit_failed_says_so(tmp_path):
    """The flow gave up on every unit (all workers gone, say): the report still writes, each row
    naming its failure, instead of failing on the missing training conditions."""
    from tuneoff.core.params import CostParams, EstimateParams, read_params, section
    from tuneoff.decision.report import compare_task, markdown

    (tmp_path / "prepared/t").mkdir(parents=True)
    (tmp_path / "prepared/t/meta.json").write_text(json.dumps(
        {"scorer": "json_fields", "kind": "extraction", "examples": {"train": 48, "val": 6, "test": 6}}))
    for method in ("base", "full", "lora", "qlora"):
        (tmp_path / "runs/t" / method).mkdir(parents=True)
        (tmp_path / "runs/t" / method / "failed.json").write_text(json.dumps({"error": f"{method}: worker lost"}))
    params = read_params(ROOT / "params.yaml")
    c = compare_task("t", ["full", "lora", "qlora"], section(EstimateParams, "estimate", data=params),
                     section(CostParams, "cost", data=params).price_per_hour, runs=tmp_path / "runs",
                     prepared=tmp_path / "prepared")
    decision = decide(c, RULES)
    text = markdown([c], {"t": decision})
    assert decision["method"] is None and "No method finished training: nothing to compare." in text
    assert all(f"{m}: worker lost" in text for m in ("base", "full", "lora", "qlora"))


def test_claims_are_judged_on_the_interval():
    checked = {x["claim"]: x["status"] for x in claims(comparison(
        base=scores(100), full=scores(300), lora=scores(300, first=1), qlora=scores(240)))}
    assert checked["LoRA within 1-3 points of full fine-tuning (format task; taken as: at most 3 behind)"] == "holds"
    assert checked["QLoRA within 0.5-1.5 points of LoRA (taken as: at most 1.5 behind)"] == "does not hold"
    assert checked["LoRA trains a fraction of a percent of the parameters"] == "holds"
    assert checked["QLoRA needs 40-60% less memory than LoRA"] == "does not hold"  # 3 vs 4 GiB: 25%
    knowledge = {x["claim"]: x["status"] for x in claims(comparison(
        base=scores(100), full=scores(200), lora=scores(195, first=30), qlora=scores(150), task_type="knowledge"))}
    assert knowledge["LoRA 4-7 points behind full fine-tuning on knowledge tasks"] == "cannot tell at this power"


# -- champion vs challenger, on the same items -----------------------------------------------------

def test_a_champion_that_is_better_on_the_same_items_is_not_replaced():
    promote, reason = replaces_champion(scores(200), scores(260), margin=2.0)
    assert not promote and "production is better" in reason


def test_a_challenger_at_least_as_good_replaces_the_champion():
    promote, reason = replaces_champion(scores(262, first=1), scores(260), margin=2.0)
    assert promote and "promoted" in reason


def test_a_challenger_that_cannot_be_sized_leaves_production():
    promote, reason = replaces_champion(scores(205, first=40), scores(200), margin=2.0)
    assert not promote and "cannot tell" in reason


def test_promotion_is_the_judges_under_the_lock(tmp_path):
    def by_score(main):
        return lambda production: (production is None or main > production["main"], "judged")

    v1 = register(tmp_path, "t-model", {"method": "lora", "main": 0.80}, by_score(0.80))
    v2 = register(tmp_path, "t-model", {"method": "full", "main": 0.78}, by_score(0.78))
    v3 = register(tmp_path, "t-model", {"method": "lora", "main": 0.85}, by_score(0.85))
    assert (v1["stage"], v2["stage"], v3["stage"]) == ("production", "staging", "production")
    stored = json.loads((tmp_path / "registry.json").read_text())["models"]["t-model"]
    assert [v["stage"] for v in stored] == ["archived", "staging", "production"]
    assert [v["version"] for v in stored] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["inconclusive", "none"])
def test_a_verdict_that_is_not_decided_registers_and_promotes_nothing(tmp_path, monkeypatch, kind):
    from stages import register as register_stage

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "reports").mkdir()
    decision = {"method": None, "verdict": kind, "rationale": "cannot tell", "settle": None, "numbers": {}}
    task = {"task": "extraction", "scorer": "json_fields", "task_type": "format", "main_metric": "exact_match",
            "rows": [], "pairs": [], "form_pairs": [], "conditions": {}}
    (tmp_path / "reports/comparison.json").write_text(json.dumps(
        {"tasks": [task], "decisions": {"extraction": decision}, "quantization": None}))
    monkeypatch.chdir(tmp_path)
    register_stage.main(Path("reports/comparison.json"), Path("data/prepared"), Path("runs"), Path("registry"),
                        Path("models/production"))
    written = json.loads((tmp_path / "registry/decision.json").read_text())["extraction"]
    assert written["registered"] is None and "nothing registered" in written["register"]
    assert not (tmp_path / "registry/registry.json").exists()
    assert not list((tmp_path / "models/production").iterdir())


def test_over_seeds_no_difference_on_few_items_is_not_a_certainty():
    """Two methods that agree on all 20 items on every seed: the t interval alone says [0, 0]; the
    interval keeps the first seeds' score interval's width, so the margin cannot be shown on 20 items."""
    from tuneoff.decision.pairs import pair_over_seeds

    same = items(scores(15, n=20))
    pair = pair_over_seeds("lora", "full", {"lora": [same, same], "full": [same, same]})
    assert pair["diff_points"] == 0 and pair["seeds"] == [2, 2]
    assert pair["ci_points"][0] < -2 and pair["ci_points"][1] > 2


def test_full_not_shown_to_beat_the_base_is_still_the_reference():
    """Full not shown to beat the base is missing evidence, not a reason to drop it: an adapter is
    recommended only if it is non-inferior to full anyway (issue 38's example: full - base +3.0 [-1.7,
    +7.7], lora - base +1.5 shown, lora - full -1.5 [-6, +3]: full may be 6 points better)."""
    d = decide(comparison(base=scores(100), full=scores(112, first=50), lora=scores(106), qlora=scores(90)), RULES)
    assert d["verdict"] == "inconclusive" and d["method"] is None
    assert "full fine-tuning is not shown to beat the untuned base (+3.0 points" in d["rationale"]
    assert "lora - full -1.5 points" in d["rationale"] and "full: " in d["settle"]
    # far above full, both adapters are within its margin; lora is shown 25 points behind qlora, so not lora
    base, full = scores(40), scores(41)
    ahead = decide(comparison(base=base, full=full, lora=scores(200), qlora=scores(300)), RULES)
    assert ahead["verdict"] == "decided" and ahead["method"] == "qlora"
    assert "Full fine-tuning itself is not shown to beat the untuned base" in ahead["rationale"]
    close = decide(comparison(base=base, full=full, lora=scores(300), qlora=scores(302)), RULES)
    assert close["method"] == "lora"


def test_adapters_that_cannot_be_told_apart_are_not_decided_by_their_points():
    # full worse than the base: out on evidence; lora and qlora disagree on 80 items, 0 points apart (+-4)
    d = decide(comparison(base=scores(250), full=scores(100), lora=scores(300), qlora=scores(300, first=40)), RULES)
    assert d["verdict"] == "inconclusive" and "no adapter is shown to be within 2 points of the others" in d["rationale"]
    assert "lora - qlora" in d["settle"]
    clear = decide(comparison(base=scores(250), full=scores(100), lora=scores(300), qlora=scores(301)), RULES)
    assert clear["verdict"] == "decided" and clear["method"] == "lora"


def test_a_failed_full_fine_tune_leaves_the_adapters_unjudged():
    c = comparison(base=scores(100), full=scores(300), lora=scores(300, first=1), qlora=scores(299))
    c["rows"][1] = {"method": "full", "failed": "worker lost", "main": None, "ci_low": None, "ci_high": None,
                    "train": None}
    c["pairs"] = [p for p in c["pairs"] if "full" not in (p["a"], p["b"])]
    d = decide(c, RULES)
    assert d["verdict"] == "inconclusive" and "Full fine-tuning failed (worker lost)" in d["rationale"]
    assert "--methods full" in d["settle"]


def test_stage_seconds_come_from_each_record_and_a_seed_counts_once(tmp_path):
    """The report's time breakdown: each record's timing.stage_seconds, named by task, model and stage;
    a seed's train.json is inside its eval.json's process, so only the latter counts."""
    records = {"t/lora/train.json": 30.0, "t/lora/eval.json": 12.5, "t/lora/merge.json": 4.0,
               "t/base/eval.json": 8.0, "t/lora/seeds/1/train.json": 20.0, "t/lora/seeds/1/eval.json": 26.0,
               "t/lora/predictions.json": 99.0}
    for name, seconds in records.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"timing": {"stage_seconds": seconds}}))
    (tmp_path / "t/full").mkdir()
    (tmp_path / "t/full/train.json").write_text(json.dumps({"timing": {"train_seconds": 3}}))  # an older record
    seconds = stage_seconds(tmp_path, {"timing": {"seconds": 5.0, "stage_seconds": 9.0}})
    assert seconds == {"t/lora train": 30.0, "t/lora seed 1 (train + evaluate)": 26.0, "t/lora evaluate": 12.5,
                       "quantize": 9.0, "t/base evaluate": 8.0, "t/lora merge": 4.0}
    table = markdown([], stages=seconds)
    assert "6 stages, 90 s in all" in table and "| t/lora train | 30.0 | 33.5% |" in table
    assert "Where the time went" not in markdown([], stages={})


def free_form(base_mean: float, gains: dict[str, float], n: int = 300, seed: int = 0) -> dict:
    """ROUGE-like scores in [0, 1] per item: the base's, and each method's the base's plus its gain with noise
    on the half of the items where the tuned models reply differently (elsewhere all reply as the base);
    the tuned models' replies differ from each other a little."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.clip(rng.beta(2, 5, n) + base_mean - 2 / 7, 0, 1)
    moved, noise = rng.random(n) < 0.5, rng.normal(0, 0.1, n)
    per_item = {"base": base}
    for m, g in gains.items():
        per_item[m] = np.where(moved, np.clip(base + g + noise + rng.normal(0, 0.02, n), 0, 1), base)
    recs = {m: [{"expected": f"answer {i}", "correct": v == 1.0, "score": float(v), "loss": 1.0 - float(v)}
                for i, v in enumerate(s)] for m, s in per_item.items()}
    rows = [row(m, [True]) | {"main": float(np.mean(s))} for m, s in per_item.items()]
    for r, cost, mem in zip(rows[1:], (10, 2, 2.5), (8, 4, 3)):
        r["train"].update(cost_usd=cost, peak_memory_bytes=mem * GIB)
    return {"task": "t", "scorer": "rouge_l", "main_metric": "rouge_l", "task_type": "generation",
            "conditions": {"test_examples": n}, "rows": rows, "pairs": paired(recs, 500, 0)}


def test_a_continuous_score_decides_on_its_own_interval_in_points():
    c = free_form(0.25, {"full": 0.2, "lora": 0.2, "qlora": 0.19})
    pairs = {(p["a"], p["b"]): p for p in c["pairs"]}
    assert pairs[("full", "base")]["interval"].startswith("t with range pseudo-items") and pairs[("full", "base")]["sd_points"] > 0
    assert pairs[("full", "base")]["ci_points"][0] > 5  # about +10 points (half the items moved by 0.2)
    d = decide(c, RULES)
    assert d["verdict"] == "decided" and d["method"] == "lora" and "of rouge_l" in d["rationale"]


def test_a_continuous_score_that_cannot_decide_sizes_a_test_set_from_its_spread():
    c = free_form(0.25, {"full": 0.2, "lora": 0.12, "qlora": 0.11}, n=60)
    d = decide(c, RULES)
    assert d["verdict"] == "inconclusive" and "power at this difference and spread (now 60)" in d["settle"]


def test_a_metric_every_model_scores_zero_on_decides_nothing():
    # exact match 0 for every model, the base included (free-form replies scored by exact match): no verdict,
    # no claim, no test-set size; the report names a scorer that can see the replies and the loss that does
    c = comparison(scores(0), scores(0), scores(0), scores(0))
    c["scorer"] = "exact"
    for p in c["pairs"]:
        p["loss"] = {"diff": -0.8, "ci": [-0.9, -0.7], "n": N, "interval": "bca"} if p["b"] == "base" else p["loss"]
    d = decide(c, RULES)
    assert d["verdict"] == "inconclusive" and d["method"] is None
    assert "accuracy cannot tell these models apart on this task" in d["rationale"] and "rouge_l or chrf" in d["rationale"]
    assert "full - base -0.800 [-0.900, -0.700]" in d["rationale"] and "test items" not in d["settle"]
    assert not [x for x in claims(c) if "LoRA within" in x["claim"] or "QLoRA within" in x["claim"]]


def test_a_free_form_challenger_is_weighed_on_its_scores():
    champion = [0.40 + 0.001 * (i % 50) for i in range(400)]
    better = [min(x + 0.05, 1.0) for x in champion]  # 5 points of ROUGE-L better on every item
    promote, why = replaces_champion(better, champion, 2.0, continuous=True)
    assert promote and "challenger - production +5.0 points" in why
    promote, why = replaces_champion(champion, better, 2.0, continuous=True)
    assert not promote and "production is better" in why


def test_over_seeds_a_score_is_paired_on_its_values():
    from tuneoff.decision.pairs import pair_over_seeds

    def run(shift, ungraded=()):
        return [{"expected": f"a{i}", "correct": False, "score": None if i in ungraded else 0.3 + shift + 0.01 * (i % 7),
                 "loss": 1.0} for i in range(200)]

    pair = pair_over_seeds("lora", "full", {"lora": [run(0.10), run(0.12, ungraded=(5,))], "full": [run(0.0), run(0.01)]})
    assert pair["n"] == 199 and pair["seeds"] == [2, 2] and pair["diff_points"] == pytest.approx(10.5, abs=0.01)
    assert pair["ci_points"][0] < 10.5 < pair["ci_points"][1] and pair["loss"]["n"] == 200
