"""tuneoff: a fair bake-off between full fine-tuning, LoRA and QLoRA."""

__version__ = "0.1.0"
