"""benchmarks/train_throughput.py and eval_throughput.py on the tiny model: every impl (on QLoRA)
runs, on identical real-token budgets, and batched generation predicts what per-example does."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tuneoff.core import measure
from tuneoff.data.tasks import extraction
from tuneoff.training import allocator

HAS_TRL = importlib.util.find_spec("trl") is not None
# bf16 on a CPU without bf16 instructions runs in a slow fallback (minutes); the harness refuses it there
HAS_BF16 = measure.device().type == "cuda" or measure.cpu_has_bf16()


def tiny_project(dest: Path, tiny_base: Path, tiny_nf4: Path | None) -> tuple[Path, Path]:
    """What the scripts read from a project, for the tiny model: models/base(-nf4), data/prepared/extraction
    (train/test JSONL and meta.json; the packed train rows are left to the script), and a params file with a
    small batch."""
    shutil.copytree(tiny_base, dest / "models/base")
    if tiny_nf4:
        shutil.copytree(tiny_nf4, dest / "models/base-nf4")
    prepared = dest / "data/prepared/extraction"
    prepared.mkdir(parents=True)
    examples = extraction.generate(40, 0)  # 32 train, 8 test
    for name, items in (("train", examples[:32]), ("test", examples[32:])):
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps({"messages": ex["messages"]}) + "\n" for ex in items))
    (prepared / "meta.json").write_text(json.dumps({"seq_len": 256}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["common"].update(batch_size=2, log_every=1)
    params["evaluate"].update(batch_size=4, max_new_tokens=8)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest, dest / "params.yaml"


def run_script(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tiny_base, tmp_path_factory, request):
    nf4 = request.getfixturevalue("tiny_nf4")
    return tiny_project(tmp_path_factory.mktemp("bench-project"), tiny_base, nf4)


def test_train_harness_gives_every_impl_the_same_examples_tokens_and_warm_up(project, tmp_path):
    """Every impl trains on the same examples (their token ids, as each one's collator or loop saw
    them) and so the same real tokens, each batching its own way; each one's first step is untimed
    and its tokens/s counts only the steps after it. All start on the system's malloc but the
    +tcmalloc rows."""
    folder, params = project
    # QLoRA takes every impl's longest path (the NF4 base, an adapter, HF's and TRL's quantized loading); full and
    # LoRA differ from it only in the base and in what trains, and the train stage's own tests cover those
    methods = ["qlora"]
    variants = ["tuneoff+full-logits", "tuneoff+per-tensor-adamw"]
    impls = (["tuneoff", "hf-fp32", "hf-fp32-keep", "tuneoff+tcmalloc"] + (["hf-bf16"] if HAS_BF16 else [])
             + (["trl", "trl-packed"] if HAS_TRL else []) + variants)
    out = tmp_path / "train.json"
    run_script("benchmarks/train_throughput.py", "--project", str(folder), "--task", "extraction", "--methods",
               ",".join(methods), "--impls", ",".join(impls), "--rounds", "1", "--steps", "3", "--params", str(params),
               "--out", str(out))
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {(r["impl"], r["method"]) for r in runs} == {(i, m) for i in impls for m in methods}
    assert len({r["real_tokens"] for r in runs}) == 1 and result["budget"] > 0
    assert len({r["examples_sha256"] for r in runs}) == 1
    for r in runs:
        assert r["tokens_per_second"] > 0 and r["peak_memory_bytes"] > 0 and r["achieved_flops"] > 0
        assert r["steps"] >= 2 and 0 < r["first_step_tokens"] < r["real_tokens"]
        assert r["timed_tokens"] == r["real_tokens"] - r["first_step_tokens"]  # the same warm-up: step 1 untimed
        assert r["timed_seconds"] < r["train_seconds"]
        if r["impl"].startswith("tuneoff"):
            assert r["steps"] == 3
        assert r["allocator"] == ("tcmalloc" if r["impl"].endswith("+tcmalloc") and allocator.library() else "system")
    hf = {r["method"]: r for r in runs if r["impl"] == "hf-fp32"}
    assert all(r["batch_size"] > 1 for r in hf.values())  # its own batches, not tuneoff's steps
    assert all("best_hf" in result["summary"][m] and result["summary"][m]["best_hf"]["speedup"]["rounds"] == 1
               for m in methods)
    # a variant changes how tuneoff computes, not what: the same losses (the output layer on every
    # position, the per-tensor optimizer loop, another allocator); so does HF's logits_to_keep override
    loss = {(r["impl"], r["method"]): r["final_train_loss"] for r in runs}
    for method in methods:
        for variant in [*variants, "tuneoff+tcmalloc"]:
            assert loss[variant, method] == pytest.approx(loss["tuneoff", method], rel=1e-4), (variant, method)
        assert loss["hf-fp32-keep", method] == pytest.approx(loss["hf-fp32", method], rel=1e-3), method
    assert out.with_suffix(".md").is_file()


def test_eval_harness_batched_matches_per_example(project, tmp_path):
    folder, params = project
    out = tmp_path / "eval.json"
    run_script("benchmarks/eval_throughput.py", "--project", str(folder), "--task", "extraction", "--examples", "8",
               "--params", str(params), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["identical_predictions"] and not result["mismatches"] and result["examples"] == 8
    assert result["batched"]["examples_per_second"] > 0 and result["per_example"]["examples_per_second"] > 0


def load_train_harness():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks/train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_harness_refuses_bf16_on_a_cpu_without_bf16_instructions(monkeypatch):
    harness = load_train_harness()
    avx2, avx512_bf16 = {"avx2", "fma", "avx512f"}, {"avx2", "avx512f", "avx512_bf16"}
    impls = ["tuneoff", "hf-fp32", "hf-bf16", "hf-bf16+tcmalloc", "tuneoff+bf16", "tuneoff+fp32", "trl"]
    message = harness.bf16_refusal(impls, "fp32", "cpu", avx2)
    assert message.startswith("hf-bf16, hf-bf16+tcmalloc, tuneoff+bf16 would train in bf16, but this CPU has no bf16 "
                              "instructions") and "leave hf-bf16, hf-bf16+tcmalloc, tuneoff+bf16 out of --impls" in message
    # precision: bf16 in the params puts every impl that follows them in bf16 too
    assert harness.bf16_refusal(["tuneoff", "trl", "tuneoff+fp32"], "bf16", "cpu", avx2).startswith("tuneoff, trl would")
    assert harness.bf16_refusal(impls, "fp32", "cpu", avx512_bf16) is None
    assert harness.bf16_refusal(impls, "fp32", "cpu", {"amx_bf16"}) is None
    assert harness.bf16_refusal(impls, "fp32", "cuda", avx2) is None
    assert harness.bf16_refusal(["tuneoff", "hf-fp32", "tuneoff+fp32"], "fp32", "cpu", avx2) is None
    # and the script stops on it before timing anything, on a CPU that reports no bf16 flags
    if measure.device().type == "cuda":
        return  # bf16 runs on a GPU
    monkeypatch.setattr(measure, "cpu_flags", lambda: avx2)
    monkeypatch.setattr(harness, "matmul_peak", lambda: pytest.fail("timed a matmul before refusing"))
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--project", ".", "--task", "extraction", "--methods", "lora",
                                      "--impls", "tuneoff,hf-bf16", "--out", "unused.json"])
    with pytest.raises(SystemExit, match="^hf-bf16 would train in bf16, but this CPU has no bf16 instructions"):
        harness.main()
