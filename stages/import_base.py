"""DVC stage `import_base`: the base model -> models/base/ (safetensors, tokenizer, provenance)."""

from __future__ import annotations

from pathlib import Path

from tuneoff.atomic import atomic_dir, write_json
from tuneoff.base_model import import_base
from tuneoff.errors import user_errors
from tuneoff.params import BaseModelParams, section

OUT = Path("models/base")


@user_errors
def main() -> None:
    params = section(BaseModelParams, "base_model")
    with atomic_dir(OUT) as tmp:
        record = import_base(params, tmp)
        write_json(tmp / "provenance.json", record)
    print(f"import_base: {record['parameters']:,} parameters -> {OUT}/")


if __name__ == "__main__":
    main()
