"""What a run costs: peak memory, the device it ran on, and dollars.

Peak memory on a GPU is `torch.cuda.max_memory_allocated()` (and `_reserved()`), reset before
the measured work. On a CPU it is the process's peak resident set (VmHWM), reset by writing
"5" to /proc/self/clear_refs (Linux >= 4.0); where that is unavailable the lifetime peak
(ru_maxrss) is reported and named as such.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(dev: torch.device) -> str:
    """The key the price table uses: torch's GPU name, or "cpu"."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with these /proc/cpuinfo flags) has bf16 instructions: AVX512-BF16 or
    AMX. Without them bf16 matmuls run in a slow fallback (on a 2-core AVX2 machine the benchmark
    harness's bf16 matmul and bf16 training took its test past 15 minutes), so bf16 is not worth
    timing there. Having them does not make bf16 faster than fp32: see cpu_has_fast_bf16."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU: true with AMX tiles. AVX512-BF16 alone is not
    enough: on this project's 2-core avx512_bf16 machine (no AMX) oneDNN's bf16 matmul ran at
    ~170 GFLOP/s against ~300 for fp32 (1024x576 @ 576x1536, 2 threads)."""
    return "amx_bf16" in cpu_flags()


def resolve_precision(precision: str, dev: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it faster than fp32, else fp32; never bf16-pure, which
    changes what trains (bf16 weights and optimizer states), not only how fast: a user's explicit choice."""
    if precision != "auto":
        return precision
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def process_seconds() -> float | None:
    """Wall seconds since this process started, Python's start-up and imports included: what a stage
    costs a run (each stage's record keeps it as timing.stage_seconds, the report adds them up).
    From Linux's /proc; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return None
    return round(uptime - started, 1)


def eval_dtype(setting: str, dev: torch.device) -> torch.dtype:
    """What evaluation loads models in (params.yaml evaluate.dtype). `auto`: bf16 on a GPU that has it,
    as a GPU run trains (an 8B model in float32 would take twice the memory and time); float32 on
    a CPU, where bf16 matmuls need AMX to be fast and where the CPU results so far were scored."""
    if setting == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, setting)


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_memory_bytes(dev: torch.device) -> int | None:
    """Memory in use now: allocated CUDA memory on a GPU, the resident set on a CPU."""
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _status_bytes("VmRSS")


@dataclass
class PeakMemory:
    """Peak memory of the work between reset() and read()."""

    dev: torch.device
    measure: str = ""

    def reset(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.measure = "cuda_max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.measure = "cpu_peak_rss"
        except OSError:
            self.measure = "cpu_peak_rss_lifetime"

    def read(self) -> dict:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.dev),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.dev), "measure": self.measure}
        hwm = _status_bytes("VmHWM") if self.measure == "cpu_peak_rss" else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": peak, "measure": self.measure}


class TensorPeak:
    """The peak of bytes held in tensors during a block, on a CPU: what torch.cuda.max_memory_allocated
    reports on a GPU, without the process and the C allocator around it (the peak RSS has both).

    Replays the allocation events of torch's profiler (profile_memory=True), so it slows the block
    down; for tests and benchmarks, not for the train stage. Tensors alive before the block are not
    in `peak_bytes`: add them (model_bytes) for a whole-process figure.
    """

    def __enter__(self) -> "TensorPeak":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events = sorted((e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        held = self.peak_bytes = 0
        for e in events:
            held += e.nbytes()
            self.peak_bytes = max(self.peak_bytes, held)


def model_bytes(model) -> int:
    """Bytes of a model's parameters, buffers and bitsandbytes quant states, each storage once."""
    storages: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        for s in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                add(getattr(s, name, None))
    return sum(storages.values())


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())
