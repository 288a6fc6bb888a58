"""What every stage shares: typed params, one-line errors, atomic writes, W&B tracking, device and memory measures."""
