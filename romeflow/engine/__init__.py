"""The engine: models and their adapter table, statistics, the ROME equations, the editors."""
