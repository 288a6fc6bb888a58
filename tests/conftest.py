"""Tiny things for tests: a 2-layer Llama (hidden 64) and a BPE tokenizer with a ChatML template,
both built here from a config, so no test touches a hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROOT = Path(__file__).resolve().parents[1]
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneoff.tasks import extraction, iso_codes

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
    """The tiny base quantized as the quantize stage does it (needs bitsandbytes)."""
    pytest.importorskip("bitsandbytes")
    from tuneoff import quantize
    from tuneoff.params import QuantizeParams

    path = tmp_path_factory.mktemp("tiny-nf4")
    model = quantize.quantize(tiny_base, QuantizeParams(quant_type="nf4", double_quant=True, check_rows=2),
                              torch.device("cpu"))
    model.save_pretrained(path)
    return path
