"""Evaluation: metrics, datasets, prompt scoring, the benchmarks and their plots."""
