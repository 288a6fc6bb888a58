"""The decision rules on hand-made comparisons (each branch), and registry promotion."""

import json


from tuneoff.decide import decide
from tuneoff.params import RegisterParams
from tuneoff.registry import register

GIB = 2**30
RULES = RegisterParams(max_gap_points=2.0, memory_budget_gb=0)


def row(method, main, ci=0.02, cost=1.0, mem=4.0, full_main=None):
    return {"method": method, "main": main, "ci_low": main - ci, "ci_high": main + ci, "test_loss": 1.0,
            "metrics": {}, "gap_to_full_points": None if full_main is None else round(100 * (full_main - main), 2),
            "train": None if method == "base" else {"cost_usd": cost, "peak_memory_bytes": mem * GIB}}


def comparison(base, full, lora, qlora):
    f = full
    return {"task": "t", "main_metric": "accuracy", "rows": [
        row("base", base), row("full", full, cost=10, mem=8, full_main=f),
        row("lora", lora, cost=2, mem=4, full_main=f), row("qlora", qlora, cost=2.5, mem=3, full_main=f)]}


def test_lora_within_threshold_wins_on_cost():
    d = decide(comparison(base=0.30, full=0.90, lora=0.89, qlora=0.885), RULES)
    assert d["method"] == "lora"
    assert "98.9% of full fine-tuning's accuracy" in d["rationale"] and "at 20% of its cost" in d["rationale"]


def test_gap_above_threshold_escalates_to_full_with_advice():
    d = decide(comparison(base=0.30, full=0.90, lora=0.84, qlora=0.83), RULES)
    assert d["method"] == "full"
    assert "6.0 points behind" in d["rationale"] and "rank 64 on all linear layers" in d["rationale"]


def test_memory_budget_excludes_full_and_picks_the_adapter_that_fits():
    d = decide(comparison(base=0.30, full=0.90, lora=0.80, qlora=0.79), RegisterParams(max_gap_points=2, memory_budget_gb=3.5))
    assert d["method"] == "qlora"
    assert "full needs 8.0 GiB" in d["rationale"] and "lora needs 4.0 GiB" in d["rationale"]


def test_method_that_does_not_beat_the_base_is_out():
    d = decide(comparison(base=0.50, full=0.90, lora=0.47, qlora=0.895), RULES)
    assert d["method"] == "qlora" and "lora does not beat the untuned base" in d["rationale"]


def test_nothing_qualifies():
    d = decide(comparison(base=0.95, full=0.90, lora=0.90, qlora=0.90), RULES)
    assert d["method"] is None and "No method qualifies" in d["rationale"]


def test_promotion_only_when_production_is_beaten(tmp_path):
    v1 = register(tmp_path, "t-model", {"method": "lora", "main": 0.80})
    v2 = register(tmp_path, "t-model", {"method": "full", "main": 0.78})
    v3 = register(tmp_path, "t-model", {"method": "lora", "main": 0.85})
    assert (v1["stage"], v2["stage"], v3["stage"]) == ("production", "staging", "production")
    assert "does not beat production v1" in v2["reason"] and "beats production v1" in v3["reason"]
    stored = json.loads((tmp_path / "registry.json").read_text())["models"]["t-model"]
    assert [v["stage"] for v in stored] == ["archived", "staging", "production"]
    assert [v["version"] for v in stored] == [1, 2, 3]


def failed(method):
    return {"method": method, "failed": "CUDA out of memory", "main": None, "ci_low": None, "ci_high": None,
            "test_loss": None, "metrics": {}, "gap_to_full_points": None, "train": None}


def test_a_failed_method_is_excluded_and_named():
    c = comparison(base=0.30, full=0.90, lora=0.89, qlora=0.885)
    c["rows"][2] = failed("lora")
    d = decide(c, RULES)
    assert d["method"] == "qlora" and "lora failed (CUDA out of memory)" in d["rationale"]
    c["rows"][0] = failed("base")
    assert decide(c, RULES)["method"] is None
