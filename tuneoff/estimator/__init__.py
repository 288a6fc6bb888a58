"""Peak memory, time and cost of each method before a run (tuneoff estimate / plan)."""
