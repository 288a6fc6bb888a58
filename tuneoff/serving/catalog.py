"""Which adapters a server may serve: names and folders checked, the registry's versions resolved.

A name becomes a PEFT adapter name (a key of torch ModuleDicts) and an OpenAI `model` value, so
it is letters, digits, '_' and '-' only: no '.', '/', '..' or anything PEFT reserves. A folder
named at run time through the admin endpoint must resolve, symlinks followed, inside one of the
server's adapter roots, so a client cannot make the server read an arbitrary path. Folders given
by the operator (`--adapter`, the registry) are trusted as given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import FULL, METHODS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
PEFT_RESERVED = {"__base__"}  # PEFT's name for "no adapter" in a mixed batch
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter the server knows; it is resident only while `MultiLoraModel` holds it."""

    name: str
    path: Path
    method: str | None  # lora | qlora when known (the registry, or the train.json beside the folder)
    source: str  # where it came from: "registry iso_codes-model v1", "--adapter", "admin"


def check_name(name: str, taken_by_base: str) -> str:
    """`name` if it can name an adapter, else a TuneoffError saying what is allowed."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TuneoffError(f"adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
                           "letter or digit (no '.', '/' or spaces)")
    if name == taken_by_base or name in PEFT_RESERVED:
        raise TuneoffError(f"adapter name {name!r} is reserved (the base model is served as {taken_by_base!r})")
    import torch

    if hasattr(torch.nn.Module, name):  # PEFT keys each adapter's layers by name on torch modules: `half` clashes
        raise TuneoffError(f"adapter name {name!r} is a torch module attribute (PEFT cannot load it): choose another")
    return name


def check_adapter_dir(path: Path) -> Path:
    """The resolved folder if it holds a LoRA adapter saved by PEFT (config + safetensors weights)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise TuneoffError(f"{path}: not a folder")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise TuneoffError(f"{path}: no {CONFIG}: not a PEFT adapter folder (a full fine-tune is a whole "
                           "model: serve it on its own with `tuneoff serve --base <folder>`)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise TuneoffError(f"{config_file}: unreadable: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise TuneoffError(f"{config_file}: peft_type {kind!r}: only LoRA adapters can be served")
    if not (path / WEIGHTS).is_file():
        # a pickled adapter_model.bin is not loaded: unpickling a file a client named could run code
        raise TuneoffError(f"{path}: no {WEIGHTS} (only safetensors weights are served)")
    return path


def within_roots(path: str, roots: list[Path]) -> Path:
    """`path` (relative to the first root, or absolute) resolved; an error unless it lies inside a root."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise TuneoffError("adapter path: give a folder path")
    candidate = Path(path) if Path(path).is_absolute() else roots[0] / path
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise TuneoffError(f"adapter path {path!r} is outside the adapter roots "
                           f"({', '.join(str(r) for r in roots)}; see `tuneoff serve --adapter-root`)")
    return resolved


def adapter_method(folder: Path) -> str | None:
    """lora or qlora, from the train.json the pipeline writes beside an adapter (runs/<task>/<method>/)."""
    train = Path(folder).parent / "train.json"
    try:
        method = json.loads(train.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None
    return method if method in METHODS and METHODS[method].adapter else None


def parse_adapter_arg(arg: str) -> tuple[str, Path]:
    """`NAME=PATH` from the command line."""
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise TuneoffError(f"--adapter {arg!r}: write it as NAME=PATH (e.g. extraction-lora=runs/extraction/lora/model)")
    return name, Path(path)


def from_registry(registry_dir: Path, stage: str,
                  base: Path) -> tuple[list[tuple[str, Path, str, str]], dict[str, str]]:
    """The adapters of each model's `stage` version in `registry_dir`/registry.json, as (name,
    folder, method, source), and the models that cannot be served on `base` with the reason.

    Paths in the registry are relative to the project, the registry folder's parent. A version
    without an `adapter` key (registered before the key existed) uses the train stage's adapter
    beside its merged folder: runs/<task>/<method>/{model,merged}. A version whose `base` (the base
    its deployed form runs on: models/base-nf4 for QLoRA deployed as nf4 or nf4-merged) is not
    `base` is refused: on another base the adapter computes another function than the one scored."""
    registry_file = Path(registry_dir) / "registry.json"
    if not registry_file.is_file():
        raise TuneoffError(f"{registry_file} not found: run the pipeline's register stage first, "
                           "or give adapter folders with --adapter NAME=PATH")
    project = Path(registry_dir).resolve().parent
    adapters, refused = [], {}
    for name, versions in json.loads(registry_file.read_text())["models"].items():
        version = next((v for v in reversed(versions) if v["stage"] == stage), None)
        if version is None:
            continue
        what = f"registry {name} v{version['version']} ({version['method']}, {stage})"
        if version["method"] == FULL.name:
            refused[name] = (f"{what} is a full fine-tune, a whole model rather than an adapter on this base; "
                             f"serve it on its own: tuneoff serve --base {project / version['path']} --base-name {name}")
            continue
        needs, form = version.get("base"), version.get("form")
        if needs and (project / needs).resolve() != Path(base).resolve():
            # a merged form is a whole model too: it can also be served on its own
            alone = "" if form == "nf4" else (f", or its merged model on its own: tuneoff serve --base "
                                              f"{project / version['path']} --base-name {name}")
            refused[name] = (f"{what} is deployed as {form or 'an adapter'} on the base {needs}, not this "
                             f"server's {base}; serve it on its base: tuneoff serve --base {project / needs}{alone}")
            continue
        folder = version.get("adapter") or str(Path(version["path"]).with_name("model"))
        if not (project / folder).is_dir():
            raise TuneoffError(f"{what}: adapter folder {project / folder} not found (`dvc pull` it, or rerun "
                               "the pipeline)")
        adapters.append((name, project / folder, version["method"], what))
    return adapters, refused
