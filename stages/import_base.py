"""DVC stage `import_base`: the base model -> models/base/ (safetensors, tokenizer, provenance)."""

from __future__ import annotations

from pathlib import Path

from tuneoff.atomic import atomic_dir, write_json
from tuneoff.base_model import import_base
from tuneoff.errors import user_errors
from tuneoff.params import BaseModelParams, section
from tuneoff.tracking import stage_run

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
