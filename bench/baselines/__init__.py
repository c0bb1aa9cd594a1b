"""Baselines the benchmark compares fastgate with (nginx's config is generated in bench.targets)."""
