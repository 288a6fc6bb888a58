"""Configurations tried as DVC experiments: rank/target sweeps and the escalation ladder."""
