"""`python -m romeflow.cli` (bench/kill9.py, the parallel statistics' launcher tests)."""

from . import main

main()
