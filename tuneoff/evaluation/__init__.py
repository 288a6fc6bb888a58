"""Scoring a model on the held-out test set: batched generation and the task metrics."""
