"""A split's packed rows as prepare saved them (data/prepared/<task>/<split>.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_rows(path: Path) -> dict[str, torch.Tensor]:
    """The rows' tensors (packing.Packed.tensors), as int64."""
    return {k: v.long() for k, v in load_file(path).items()}
