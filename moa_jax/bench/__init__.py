"""Benchmarks: speed and memory vs baselines (CLIs that print a table and write JSON)."""
