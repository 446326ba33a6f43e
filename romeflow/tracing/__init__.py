"""Causal tracing (Section 2 of the paper)."""
