"""Compatibility names for romeflow.params (the one reader of params.yaml)."""

from __future__ import annotations

from .params import ConfigError, Params, StatsParams, load_params, stage_params

Settings = Params
load_settings = load_params
stage_settings = stage_params

__all__ = ["ConfigError", "Params", "Settings", "StatsParams", "load_settings", "stage_settings"]
