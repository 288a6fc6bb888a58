"""DVC stage `import_base`: the base model -> `--out` (models/base/ in dvc.yaml: safetensors, tokenizer,
provenance)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import user_errors
from tuneoff.core.params import BaseModelParams, section
from tuneoff.core.tracking import stage_run
from tuneoff.modeling.base_model import import_base

@user_errors
def main(out: Path) -> None:
    params = section(BaseModelParams, "base_model")
    with atomic_dir(out) as tmp:
        record = import_base(params, tmp)
        write_json(tmp / "provenance.json", record)
    with stage_run("import_base", {"base_model": params.model_dump()}) as tracker:
        tracker.summary({"parameters": record["parameters"], "architecture": record["architecture"],
                         "source": record["source"]})
    print(f"import_base: {record['parameters']:,} parameters -> {out}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stages.import_base")
    parser.add_argument("--out", type=Path, required=True, help="the base model's folder")
    main(**vars(parser.parse_args()))
