"""The one training loop every method shares, with its CPU kernels, checkpoints and launcher."""
