"""`python -m tuneoff.training.launch stages.train TASK METHOD --base ... --run-dir ...`: run a stage module in a fresh Python started
on the allocator `train.common.allocator` names (tuneoff/training/allocator.py). A process's malloc is fixed
when it starts, so this sets it (LD_PRELOAD) before the stage's Python does, as PyTorch's CPU launcher
`torch.backends.xeon.run_cpu` does; the stage then runs as `python -m stages.train ...` would.

With `train.common.devices` above 1 the stage runs as that many processes instead, started by accelerate's
launcher (torch's on a CPU): tuneoff/training/distributed.py."""

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
    common = section(CommonTrainParams, "train", "common")
    env = {**os.environ, **allocator.environment(common.allocator)}
    command = [sys.executable, "-m", *argv]
    if common.devices > 1 and len(argv) >= 3:  # <module> <task> <method> [seed] --base ... (dvc.yaml)
        from tuneoff.core import measure
        from tuneoff.training import distributed

        dev = measure.device()
        command, extra = distributed.command(argv, common, argv[2], measure.resolve_precision(common.precision, dev),
                                             dev.type == "cuda")
        env.update(extra)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
