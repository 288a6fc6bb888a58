"""`python -m tuneoff.training.launch stages.train TASK METHOD`: run a stage module in a fresh Python started
on the allocator `train.common.allocator` names (tuneoff/training/allocator.py). A process's malloc is fixed
when it starts, so this sets it (LD_PRELOAD) before the stage's Python does, as PyTorch's CPU launcher
`torch.backends.xeon.run_cpu` does; the stage then runs as `python -m stages.train ...` would."""

from __future__ import annotations

import os
import sys

from tuneoff.core.errors import user_errors
from tuneoff.core.params import CommonTrainParams, section
from tuneoff.training import allocator


@user_errors
def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m tuneoff.training.launch <module> [args...]")
    env = {**os.environ, **allocator.environment(section(CommonTrainParams, "train", "common").allocator)}
    os.execve(sys.executable, [sys.executable, "-m", *argv], env)


if __name__ == "__main__":
    main(sys.argv[1:])
