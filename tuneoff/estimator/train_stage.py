"""What the estimator predicts for a train stage before it runs (flows/hardware.py sizes a GPU by it):
the stage's step shapes come from the training loop's own plan of its rows. A module of its own, so
that estimate.py, which the report stage imports, does not import the training loop."""

from __future__ import annotations

import json
from pathlib import Path

from tuneoff.core.methods import METHODS
from tuneoff.core.params import EstimateParams
from tuneoff.estimator.architectures import from_config
from tuneoff.estimator.estimate import predict, setup_for_run
from tuneoff.training.distributed import strategy
from tuneoff.training.loop import step_shapes


def for_train_stage(method: str, params, common, precision: str, dev_type: str, device_name: str, base: Path,
                    train_rows: dict, estimate_params: EstimateParams, prices: dict[str, float]) -> tuple[dict, dict]:
    """What the estimator predicts for a train stage before it runs, from its params and prepared rows."""
    config = json.loads((Path(base) / "config.json").read_text())
    shapes = step_shapes(train_rows, common)
    setup = setup_for_run(method, params if METHODS[method].adapter else None, common.batch_size,
                          common.gradient_checkpointing, precision, common.optimizer, dev_type, shapes["seq_len"],
                          shapes["max_supervised_positions"], config, common.devices,
                          strategy(common, method, dev_type == "cuda") if common.devices > 1 else None)
    return predict(from_config(config, str(base)), setup, shapes["steps"], shapes["micro_batch_rows"],
                   shapes["max_step_tokens"], device_name, estimate_params, prices)
