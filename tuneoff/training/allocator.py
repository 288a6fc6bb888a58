"""The C allocator a training process runs on: tcmalloc where the machine has it, as PyTorch's own
CPU launcher (`python -m torch.backends.xeon.run_cpu`) preloads it by default.

A CPU train step allocates and frees a few GB of tensors whose sizes change from step to step.
glibc's malloc serves them from its heap after the first step and keeps the freed holes resident,
so the peak RSS climbs over the first steps. Handing the holes back after each step (malloc_trim)
lowers the peak but slows the step, since the pages fault back in. tcmalloc reuses freed memory by
size class: a lower peak, no slower. jemalloc was slower with its defaults, and its peak grew every
step when told to keep its freed pages. Measured per step and allocator:
benchmarks/results/peak_per_step.txt (`benchmarks/peak_per_step.py`), docs/performance.md.

A process's allocator is fixed when it starts, so `python -m tuneoff.training.launch` sets it before
the train stage's Python starts. On a GPU it only serves host memory; `allocator: system` opts out.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

from tuneoff.core.errors import TuneoffError

# tcmalloc prints a line for every allocation above 1 GiB by default (a large model's load does some)
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


def library() -> str | None:
    """tcmalloc's shared library where the machine has one (gperftools' minimal build or its full one)."""
    if os.name != "posix":
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def environment(choice: str) -> dict[str, str]:
    """The environment variables that start a process on `choice` (train.common.allocator):
    "auto" is tcmalloc where the machine has it, else the system's malloc."""
    lib = None if choice == "system" else library()
    if lib is None:
        if choice == "tcmalloc":
            raise TuneoffError("params.yaml: train.common.allocator: tcmalloc, but it is not installed "
                               "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4; or set it to auto or system)")
        return {}
    preload = " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, **QUIET}


def in_use() -> str:
    """"tcmalloc" when this process runs on it, else "system"."""
    maps = Path("/proc/self/maps")
    return "tcmalloc" if maps.is_file() and "libtcmalloc" in maps.read_text() else "system"
