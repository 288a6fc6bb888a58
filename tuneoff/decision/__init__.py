"""The verdict: paired statistics, the three-way decision, the report and the registry."""
