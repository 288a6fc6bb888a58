"""A small file registry of model versions and stages, updated under a lock. Whether a new version
replaces production is the caller's judgement (stages/register.py scores both on the same items).

A DVC stage cannot commit, so this file (each version's lineage: git revision, dvc.lock hashes of
its inputs, params, metrics) is what the register stage writes and judges against; the bake-off
flow then commits it and writes the same versions and stages as GTO git tags on that commit
(flows/publish.py), for `gto show`, `dvc artifacts get --stage` and DVC Studio.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock

from tuneoff.core.atomic import atomic_dir, write_json


def register(registry_dir: Path, name: str, entry: dict, judge, publish_to: Path | None = None, card=None) -> dict:
    """Add `entry` as the next version of model `name`. `judge(production)`, given the current
    production version (None if there is none), returns (promote, reason): whether the new version
    replaces it. It runs under the registry's lock, so concurrent registrations are judged one after
    another, each against the production the one before it left.

    Idempotent on lineage: an entry whose method, path and folder hashes (entry["lineage"]["outs"],
    same_model) match a registered version is that version again, not a new one (a rerun after a crash
    between registering and publishing, or a retrain that gave the same weights). A production version
    is published to `publish_to` under the same lock, so the registry and the published folder never
    disagree, with `card(version)` (text) as its README.md. Returns the version."""
    registry_dir.mkdir(parents=True, exist_ok=True)
    path = registry_dir / "registry.json"
    with FileLock(str(registry_dir / ".registry.lock")):
        data = json.loads(path.read_text()) if path.is_file() else {"models": {}}
        versions = data["models"].setdefault(name, [])
        version = next((v for v in versions if same_model(v, entry)), None)
        if version is None:
            production = next((v for v in versions if v["stage"] == "production"), None)
            promote, reason = judge(production)
            if promote and production is not None:
                production["stage"] = "archived"
            version = {"version": len(versions) + 1, "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **entry, "stage": "production" if promote else "staging", "reason": reason}
            versions.append(version)
            write_json(path, data)
        if publish_to is not None and version["stage"] == "production":
            publish(Path(version["path"]), publish_to, card(version) if card else None)
    return version


def same_model(version: dict, entry: dict) -> bool:
    """The same trained model: method, path and the hash of every folder in its lineage (the base, the
    prepared data, the trained and merged weights: DVC's ".dir" hashes) alike. Not the git commit, nor the
    runs' records (train.json and its loss curves hold measured seconds): retraining to the same weights,
    or a commit that changes nothing the model depends on, does not make a new model."""
    def folders(v: dict) -> dict:
        return {p: h for p, h in v.get("lineage", {}).get("outs", {}).items() if str(h).endswith(".dir")}

    return (bool(folders(entry)) and folders(version) == folders(entry)
            and (version["method"], version["path"]) == (entry["method"], entry["path"]))


def publish(source: Path, dest: Path, card: str | None = None) -> None:
    """Make `dest` a copy of the model folder `source` (hard links where the filesystem allows:
    a model's weights are not duplicated on disk), with `card` as its README.md, replacing what
    was there in one step."""
    with atomic_dir(dest) as tmp:
        for f in sorted(Path(source).rglob("*")):
            if f.is_file() and not (card and f == Path(source) / "README.md"):
                target = tmp / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")


def model_card(name: str, version: dict, task: str, base_model: str, metric: str, rationale: str) -> str:
    """A Hugging Face model card (its metadata block and markdown) for a published version: what it
    is, the verdict that chose it with its intervals, what it cost, and its lineage."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    is_adapter = (Path(version["path"]) / "adapter_config.json").is_file()
    data = ModelCardData(base_model=base_model, library_name="peft" if is_adapter else "transformers",
                         tags=["tuneoff", version["method"]], model_name=name, eval_results=[EvalResult(
                             task_type="text-generation", dataset_type=task, dataset_name=f"{task} (held-out test split)",
                             metric_type=metric, metric_value=version["main"])])
    train, lineage = version["metrics"]["train"] or {}, version["lineage"]
    low, high = version["ci"]
    rows = [("method", f"{version['method']}" + (f" ({version['form']}, on {version['base']})" if "form" in version else "")),
            (metric, f"{100 * version['main']:.1f}% [95% CI {100 * low:.1f}, {100 * high:.1f}] on "
                     f"{version['test_examples']} held-out test items (test split sha256 {version['test_sha256'][:12]})"),
            ("stage", f"{version['stage']}: {version['reason']}"),
            ("training cost", f"{train.get('train_seconds', 0):.0f} s on {train.get('device', '?')}, "
                              f"{train.get('gpu_hours') or 0:.4f} GPU-h, ${train.get('cost_usd') or 0:.4f}, peak memory "
                              f"{(train.get('peak_memory_bytes') or 0) / 2**30:.2f} GiB ({train.get('memory_measure', '?')})"),
            ("trainable", f"{train.get('trainable_percent', 0):.2f}% of the parameters"),
            ("lineage", f"git {lineage.get('git') or 'n/a'}; dvc.lock outputs: "
                        + ", ".join(f"`{p}` {h}" for p, h in sorted(lineage.get("outs", {}).items())))]
    body = "\n".join([f"# {name} v{version['version']}", "", f"Chosen by a tuneoff bake-off on `{task}`: {rationale}", "",
                      "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
                      "Registered by tuneoff (registry/registry.json holds every version)."])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").content
