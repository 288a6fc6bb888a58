"""Tiny things for tests: a 2-layer Llama (hidden 64) and a BPE tokenizer with a ChatML template,
both built here from a config, so no test touches a hub."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROOT = Path(__file__).resolve().parents[1]
API_KEY = f"wandb-test-{uuid.uuid4().hex}"  # set for the runs; must never reach a file (nor is it in this one)
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneoff.data.tasks import extraction, iso_codes

    corpus = [m["content"] for ex in extraction.generate(200, 0) for m in ex["messages"]]
    corpus += [m["content"] for ex in iso_codes.generate(100, 0, 0.1) for m in ex["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny base model folder (safetensors + tokenizer + chat template)."""
    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def tiny_nf4(tiny_base, tmp_path_factory) -> Path:
    """The tiny base quantized as the quantize stage does it (bitsandbytes: a declared dependency, so
    its absence fails the QLoRA tests instead of skipping them)."""
    from tuneoff.core.params import QuantizeParams
    from tuneoff.modeling import quantize

    path = tmp_path_factory.mktemp("tiny-nf4")
    model = quantize.quantize(tiny_base, QuantizeParams(quant_type="nf4", double_quant=True, check_rows=2),
                              torch.device("cpu"))
    model.save_pretrained(path)
    return path


def run(cmd, cwd, env: dict | None = None) -> str:
    """Run a command in `cwd` with this venv's tools and offline W&B; fail the test on failure."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "WANDB_MODE": "offline", "WANDB_API_KEY": API_KEY,
           "TUNEOFF_RUN_GROUP": "bakeoff-test", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stage_command(name: str, **item) -> list[str]:
    """The command dvc.yaml gives stage `name` for one `item` (`task=`, `method=`, `seed=`; a foreach
    stage's `task` is its ${item}), as this interpreter runs it: the paths it reads and writes are dvc.yaml's."""
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    cmd = body.get("do", body)["cmd"]
    for key, value in item.items():
        cmd = cmd.replace(f"${{item.{key}}}", str(value))
    if "task" in item:
        cmd = cmd.replace("${item}", str(item["task"]))
    words = cmd.split()
    assert words[0] == "python" and "${" not in cmd, f"dvc.yaml {name}: {cmd!r} (item {item})"
    return [sys.executable, *words[1:]]


def make_project(dest: Path, tiny_base: Path) -> Path:
    """A copy of the project (what git would commit) in `dest`, set to the tiny model and a tiny
    budget, committed to its own git repository."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["base_model"].update(source="path", path=str(tiny_base))
    params["bakeoff"]["tasks"] = ["extraction", "iso_codes"]  # a JSON record exercises more of scoring than a label
    params["tasks"]["extraction"]["n_examples"] = 60
    params["tasks"]["iso_codes"]["n_facts"] = 30
    params["prepare"].update(seq_len=256, max_val_examples=8, max_test_examples=8)
    params["evaluate"].update(max_new_tokens=8, bootstrap_samples=200)
    params["benchmarks"].update(limit=4, batch_size=4, cross_task_limit=4)
    params["train"]["common"].update(batch_size=2, token_budget=1500, log_every=2, eval_every=2)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest
