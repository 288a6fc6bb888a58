"""One base model and the LoRA adapters resident on it.

The base loads once; adapters load onto it with PEFT's `load_adapter` and leave with
`delete_adapter`; at most `max_resident` stay, the least recently used leaving first, and one
that is known but not resident loads again when a request names it. A batch runs all its
adapters at once: PEFT's `adapter_names` sends each row through its own adapter's A and B
matrices (rows named "__base__" through none) on top of one pass through the shared base
weights. Nothing is merged into the base, so every adapter's output stays its own.

A QLoRA adapter (trained on the 4-bit NF4 base) served on the float base is the model the
merge stage builds, and the registry deploys, for QLoRA: the float base plus the adapter. It
differs from the model as trained by the quantization error, which merge.json records; the
listing says so. Serve on the NF4 base (`--base models/base-nf4`) to run QLoRA adapters as
trained, at the price of LoRA adapters then running on a base they were not trained on.

Only the engine's thread changes the model (load, unload, generate); HTTP handlers read the
bookkeeping (what is known and resident) under a lock.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from collections import Counter, OrderedDict, deque
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tuneoff.core.errors import TuneoffError
from tuneoff.core.methods import LORA, QLORA
from tuneoff.modeling.merge import is_4bit, load_base
from tuneoff.serving.catalog import WEIGHTS, AdapterSpec

log = logging.getLogger("tuneoff.serve")
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


class UnknownModel(TuneoffError):
    """A request or admin call named a model this server does not serve."""

    def __init__(self, name: str, available: list[str], reason: str | None = None):
        self.name, self.available = name, available
        super().__init__(reason or f"model {name!r} not found; available: {', '.join(available)}")


class AdapterConflict(TuneoffError):
    """An adapter of that name is already known (replace it explicitly)."""


class AdapterLoadError(TuneoffError):
    """A known adapter failed to load (its folder changed or vanished since it was checked)."""


class MultiLoraModel:
    """The base in `base_dir`, served as `base_name`, and up to `max_resident` LoRA adapters on it."""

    def __init__(self, base_dir: Path, base_name: str, dev: torch.device, dtype: torch.dtype, max_resident: int,
                 max_rank: int):
        base_dir = Path(base_dir)
        if not (base_dir / "config.json").is_file():
            raise TuneoffError(f"--base {base_dir}: no config.json, not a Hugging Face model folder")
        self.base_dir, self.base_name, self.dev, self.max_resident = base_dir, base_name, dev, max_resident
        self.max_rank = max_rank  # the largest LoRA rank an adapter may have (--max-lora-rank)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)  # encodes, on the API's one tokenizer thread
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # decodes, on the engine thread: a fast tokenizer used from two threads at once can fail
        # ("Already borrowed") when one call changes its padding or truncation state
        self.decoder = AutoTokenizer.from_pretrained(base_dir)
        self.base_is_4bit = is_4bit(base_dir)
        self.base = load_base(base_dir, dev, dtype).eval()
        self.context = getattr(self.base.config, "max_position_embeddings", None)
        self.peft = None  # the PeftModel wrapping self.base, made when the first adapter loads
        self.known: dict[str, AdapterSpec] = {}
        self.refused: dict[str, str] = {}  # registered models this base cannot serve, and why
        self.resident: OrderedDict[str, float] = OrderedDict()  # name -> its load seconds; least recent first
        self.counters: Counter = Counter()
        self.load_seconds: deque[float] = deque(maxlen=1000)
        self.lock = threading.RLock()

    # -- what HTTP handlers read ---------------------------------------------------------------

    def names(self) -> list[str]:
        with self.lock:
            return [self.base_name, *sorted(self.known)]

    def resolve(self, name: str) -> str | None:
        """The adapter a request's `model` names (None: the base alone); UnknownModel if none."""
        if name == self.base_name:
            return None
        with self.lock:
            if name in self.known:
                return name
        available = self.names()
        if name in self.refused:
            raise UnknownModel(name, available, f"model {name!r}: {self.refused[name]}; "
                                                f"available here: {', '.join(available)}")
        raise UnknownModel(name, available)

    def listing(self) -> list[dict]:
        """Every servable model: the base, then each known adapter with whether it is resident."""
        with self.lock:
            rows = [{"id": self.base_name, "adapter": False, "resident": True, "path": str(self.base_dir),
                     "base_4bit": self.base_is_4bit}]
            lru = list(self.resident)
            for name in sorted(self.known):
                spec = self.known[name]
                rows.append({"id": name, "adapter": True, "resident": name in self.resident,
                             "lru_position": lru.index(name) if name in self.resident else None,
                             "method": spec.method, "source": spec.source, "path": str(spec.path),
                             "note": self.serving_note(spec)})
        return rows

    def stats(self) -> dict:
        with self.lock:
            loads = list(self.load_seconds)
            return {"known_adapters": len(self.known), "resident_adapters": list(self.resident),
                    "max_resident": self.max_resident, "adapter_loads": self.counters["loads"],
                    "adapter_evictions": self.counters["evictions"],
                    "load_seconds": {"count": len(loads), "mean": sum(loads) / len(loads) if loads else None,
                                     "max": max(loads, default=None), "last": loads[-1] if loads else None}}

    def serving_note(self, spec: AdapterSpec) -> str | None:
        """What differs between the adapter as trained and as served on this base."""
        if spec.method == QLORA.name and not self.base_is_4bit:
            note = "trained on the 4-bit NF4 base, served on this float base (as the merge stage merges it)"
            try:
                gap = json.loads((spec.path.parent / "merge.json").read_text())["vs_trained_4bit"]
                note += f"; top-1 agreement with the model as trained: {gap['top1_agreement']:.1%} (merge.json)"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            return note
        if spec.method == LORA.name and self.base_is_4bit:
            return "trained on the float base, served on this 4-bit base"
        return None

    # -- changes: only on the engine thread ----------------------------------------------------

    def add(self, spec: AdapterSpec, replace: bool = False, load: bool = True) -> None:
        """Make `spec` known (checked against this base first); load it now if `load`."""
        self.check_fits(spec)
        with self.lock:
            if spec.name in self.known and not replace:
                raise AdapterConflict(f"adapter {spec.name!r} is already served (from {self.known[spec.name].path}); "
                                      "send \"replace\": true to swap in the new folder")
        if spec.name in self.resident:
            self._unload(spec.name)
        with self.lock:
            previous, self.known[spec.name] = self.known.get(spec.name), spec
        if load:
            failed = self.make_resident([spec.name])
            if failed:
                with self.lock:  # a failed replacement leaves the previous folder known (it loads on demand)
                    if previous is None:
                        del self.known[spec.name]
                    else:
                        self.known[spec.name] = previous
                raise failed[spec.name]

    def remove(self, name: str) -> AdapterSpec:
        """Forget the adapter `name`, unloading it if resident."""
        if name not in self.known:
            raise UnknownModel(name, self.names())
        if name in self.resident:
            self._unload(name)
        with self.lock:
            return self.known.pop(name)

    def make_resident(self, names: list[str]) -> dict[str, Exception]:
        """Load each of `names` that is not resident, unloading the least recently used adapters
        not in `names` to stay within the cap; mark all of them most recently used. Returns the
        adapters that could not be made resident, with the error."""
        wanted = list(dict.fromkeys(names))
        assert len(wanted) <= self.max_resident, "the engine never batches more adapters than the cap"
        failed: dict[str, Exception] = {}
        for name in wanted:
            with self.lock:
                spec = self.known.get(name)
                if name in self.resident:
                    self.resident.move_to_end(name)
                    continue
            if spec is None:
                failed[name] = UnknownModel(name, self.names())
                continue
            while len(self.resident) >= self.max_resident:
                self._unload(next(n for n in self.resident if n not in wanted), evicted=True)
            try:
                self._load(spec)
            except Exception as e:  # noqa: BLE001 - one adapter's failure must not fail the others' requests
                log.error("adapter %s failed to load from %s: %s", name, spec.path, e)
                # one line: PEFT's "Error(s) in loading state_dict" goes on with a line per tensor
                reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
                failed[name] = AdapterLoadError(f"adapter {name!r} failed to load from {spec.path}: {reason}")
        return failed

    def check_fits(self, spec: AdapterSpec) -> None:
        """Reject an adapter whose LoRA matrices do not fit this base's layers, or whose rank is above
        the server's cap, from the safetensors header alone (no weights read), before PEFT would
        half-inject it."""
        from safetensors import safe_open

        try:
            with safe_open(str(spec.path / WEIGHTS), "pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise TuneoffError(f"adapter {spec.name!r}: {spec.path / WEIGHTS} is not readable safetensors: {e}") from e
        matched = 0
        for key, shape in shapes.items():
            m = LORA_KEY.fullmatch(key)
            if not m:
                continue
            module_path, which = m.groups()
            try:
                module = self.base.get_submodule(module_path)
            except AttributeError:
                raise TuneoffError(f"adapter {spec.name!r} ({spec.path}) targets {module_path}, which the base "
                                   f"{self.base_dir} does not have: it was trained on another architecture") from None
            layer = getattr(module, "base_layer", module)  # a layer PEFT already wrapped for another adapter
            want = getattr(layer, "in_features", None) if which == "A" else getattr(layer, "out_features", None)
            got, rank = (shape[1], shape[0]) if which == "A" else (shape[0], shape[1])
            if rank > self.max_rank:
                raise TuneoffError(f"adapter {spec.name!r} ({spec.path}) has LoRA rank {rank}, above this server's "
                                   f"--max-lora-rank {self.max_rank}")
            if want is not None and got != want:
                side = "inputs" if which == "A" else "outputs"
                raise TuneoffError(f"adapter {spec.name!r} ({spec.path}) does not fit the base {self.base_dir}: "
                                   f"{module_path} has {want} {side}, the adapter's lora_{which} {got}: "
                                   "it was trained on another base model")
            matched += 1
        if not matched:
            raise TuneoffError(f"adapter {spec.name!r}: {spec.path / WEIGHTS} holds no LoRA weights")

    def _load(self, spec: AdapterSpec) -> None:
        from peft import PeftModel

        start = time.perf_counter()
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, spec.path, adapter_name=spec.name,
                                                      low_cpu_mem_usage=True)
            else:
                self.peft.load_adapter(spec.path, adapter_name=spec.name, low_cpu_mem_usage=True)
            self.peft.set_adapter(spec.name)  # keeps PEFT's active adapter a resident one; batches name theirs
            self.peft.eval()
        except Exception:
            if self.peft is None:  # a first load injects layers into the base before reading the weights
                _strip_lora(self.base)
            elif spec.name in self.peft.peft_config:
                self._delete(spec.name)
            raise
        seconds = time.perf_counter() - start
        with self.lock:
            self.resident[spec.name] = seconds
            self.load_seconds.append(seconds)
            self.counters["loads"] += 1
        log.info("adapter %s loaded in %.3f s from %s%s", spec.name, seconds, spec.path,
                 f" ({note})" if (note := self.serving_note(spec)) else "")

    def _unload(self, name: str, evicted: bool = False) -> None:
        self._delete(name)
        with self.lock:
            del self.resident[name]
            self.counters["evictions"] += evicted
        log.info("adapter %s %s", name, "evicted (least recently used)" if evicted else "unloaded")

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():  # "Adapter X was active which is now deleted": expected here
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(name)
        remaining = [n for n in self.peft.peft_config if n != name]
        if remaining:
            self.peft.set_adapter(remaining[0])

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[str | None], **kwargs):
        """`generate` over a left-padded batch, row i through adapter `adapters[i]` (None: the base)."""
        if not self.resident:  # no adapter loaded: every row is the base (PEFT cannot run with none)
            assert all(a is None for a in adapters)
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        names = ["__base__" if a is None else a for a in adapters]
        return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **kwargs)


def _strip_lora(model: torch.nn.Module) -> None:
    """Put back every layer PEFT wrapped in `model` (as `PeftModel.unload` does), so that a first
    adapter load that failed part-way leaves the plain base behind."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # PEFT's record of the injected adapters
        del model.peft_config
