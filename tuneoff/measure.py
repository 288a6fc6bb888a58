"""What a run costs: peak memory, the device it ran on, and dollars.

Peak memory on a GPU is `torch.cuda.max_memory_allocated()` (and `_reserved()`), reset before
the measured work. On a CPU it is the process's peak resident set (VmHWM), reset by writing
"5" to /proc/self/clear_refs (Linux >= 4.0); where that is unavailable the lifetime peak
(ru_maxrss) is reported and named as such.
"""

from __future__ import annotations

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


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU: true with AMX tiles. AVX512-BF16 alone is not
    enough: on this project's 2-core avx512_bf16 machine (no AMX) oneDNN's bf16 matmul ran at
    ~170 GFLOP/s against ~300 for fp32 (1024x576 @ 576x1536, 2 threads)."""
    return "amx_bf16" in cpu_flags()


def resolve_precision(precision: str, dev: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it faster than fp32, else fp32."""
    if precision != "auto":
        return precision
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


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


def cost(seconds: float, device_key: str, price_per_hour: dict[str, float]) -> dict:
    """Device-hours and dollars for `seconds` on `device_key`; an unpriced GPU costs null, not 0."""
    hours = seconds / 3600
    price = price_per_hour.get(device_key)
    return {"device": device_key, "device_hours": round(hours, 6),
            "gpu_hours": 0.0 if device_key == "cpu" else round(hours, 6),
            "price_per_hour": price, "usd": None if price is None else round(hours * price, 6)}


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())
