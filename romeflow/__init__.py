"""romeflow: factual edits of language models (ROME) as versioned, reproducible artifacts."""

__version__ = "0.1.0"
