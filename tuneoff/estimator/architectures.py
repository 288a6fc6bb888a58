"""The shape of a dense decoder-only model (Llama, Mistral, Qwen2, Qwen3), from its config.json or
from a built-in catalog, and its exact parameter counts.

The catalog holds the config.json numbers of common models, copied from their Hugging Face
repositories, so `tuneoff estimate` plans for an 8B or 70B model without downloading anything.
tests/test_memory.py builds every entry on the meta device with transformers and checks that
`parameter_count()` equals the built model's count to the parameter, and checks the published
totals it knows (Llama 3 8B: 8,030,261,248).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneoff.core.errors import TuneoffError

# model_type -> whether q/k/v carry a bias by default, and whether q and k are RMS-normed per head
FAMILIES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """What the memory and FLOP formulas need from a config.json."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    def linear(self, module: str) -> tuple[int, int, bool]:
        """(in_features, out_features, has_bias) of a decoder layer's Linear, or of lm_head."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q, self.qkv_bias), "k_proj": (h, kv, self.qkv_bias), "v_proj": (h, kv, self.qkv_bias),
                "o_proj": (q, h, self.o_bias), "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias),
                "down_proj": (i, h, self.mlp_bias), "lm_head": (h, self.vocab, False)}[module]

    def linear_params(self, module: str) -> int:
        fan_in, fan_out, bias = self.linear(module)
        return fan_in * fan_out + (fan_out if bias else 0)

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one decoder layer's Linears: the weights QLoRA stores in 4 bits."""
        return sum(self.linear_params(m) for m in LAYER_LINEARS)

    @property
    def layer_norm_params(self) -> int:
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """0 when tied: the output layer reuses the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def parameter_count(self) -> int:
        """Every parameter, counted as transformers' model.parameters() counts them (a tied matrix once)."""
        return (self.embedding_params + self.lm_head_params + self.hidden
                + self.layers * (self.layer_linear_params + self.layer_norm_params))

    def non_embedding_params(self) -> int:
        return self.layers * (self.layer_linear_params + self.layer_norm_params) + self.hidden


def from_config(config: dict, name: str) -> Shape:
    """A Shape from a config.json's contents; unsupported architectures are a one-line error."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise TuneoffError(f"{name}: model_type {model_type!r} is not supported: the estimator knows dense decoders "
                           f"of types {sorted(FAMILIES)}")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        qkv_bias, qk_norm = FAMILIES[model_type]
        return Shape(
            name=name, model_type=model_type, vocab=int(config["vocab_size"]), hidden=hidden,
            intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),  # False is every family's class default
            qkv_bias=bool(config.get("attention_bias", qkv_bias)), o_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=qk_norm)
    except KeyError as e:
        raise TuneoffError(f"{name}: config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise TuneoffError(f"{name}: config.json has a malformed number ({e})") from None


def resolve(model: str) -> Shape:
    """A catalog name (llama-3-8b), a config.json, or a model folder holding one."""
    if model in CATALOG:
        return from_config(CATALOG[model], model)
    path = Path(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise TuneoffError(f"model {model!r}: not a catalog name ({', '.join(CATALOG)}) and no config.json at "
                           f"{config_path}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TuneoffError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TuneoffError(f"{config_path}: expected a JSON object")
    return from_config(config, str(config_path))


def _llama(vocab, hidden, intermediate, layers, heads, kv_heads, tied, head_dim=None, model_type="llama"):
    config = {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "tie_word_embeddings": tied}
    return config | ({"head_dim": head_dim} if head_dim else {})


# config.json numbers of each model's Hugging Face repository (meta-llama/..., mistralai/..., Qwen/...,
# HuggingFaceTB/...); Llama 3.1 has the shapes of Llama 3.
CATALOG: dict[str, dict] = {
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, True, 64),
    "smollm2-360m": _llama(49152, 960, 2560, 32, 15, 5, True, 64),
    "smollm2-1.7b": _llama(49152, 2048, 8192, 24, 32, 32, True, 64),
    "llama-3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, True, 64),
    "llama-3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, True, 128),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, False, 128),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, False, 128),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, False, 128),
    "mistral-7b": _llama(32768, 4096, 14336, 32, 32, 8, False, 128, "mistral"),  # v0.3 (v0.1: vocab 32000)
    "qwen2.5-0.5b": _llama(151936, 896, 4864, 24, 14, 2, True, 64, "qwen2"),
    "qwen2.5-1.5b": _llama(151936, 1536, 8960, 28, 12, 2, True, 128, "qwen2"),
    "qwen2.5-7b": _llama(152064, 3584, 18944, 28, 28, 4, False, 128, "qwen2"),
    "qwen3-8b": _llama(151936, 4096, 12288, 36, 32, 8, False, 128, "qwen3"),
}
