"""DVC stage `import_base`: the base model -> models/base/ (safetensors, tokenizer, provenance)."""

from __future__ import annotations

from pathlib import Path

from tuneoff.core.atomic import atomic_dir, write_json
from tuneoff.core.errors import user_errors
from tuneoff.core.params import BaseModelParams, section
from tuneoff.core.tracking import stage_run
from tuneoff.modeling.base_model import import_base

OUT = Path("models/base")


@user_errors
def main() -> None:
    params = section(BaseModelParams, "base_model")
    with atomic_dir(OUT) as tmp:
        record = import_base(params, tmp)
        write_json(tmp / "provenance.json", record)
    with stage_run("import_base", {"base_model": params.model_dump()}) as tracker:
        tracker.summary({"parameters": record["parameters"], "architecture": record["architecture"],
                         "source": record["source"]})
    print(f"import_base: {record['parameters']:,} parameters -> {OUT}/")


if __name__ == "__main__":
    main()
