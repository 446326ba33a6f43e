"""The typed parameter model: the edit layer a model gets by default, and the named inserts."""

from __future__ import annotations

import pytest

from romeflow.engine.inserts import INSERTS
from romeflow.params import ConfigError, parse_params


def test_the_edit_layer_defaults_to_the_models_measured_one():
    p = parse_params({"model": "gemma-3-270m", "rome": {"layer": "default"}})
    assert p.rome.layer == 1  # Gemma-3-270M's measured layer (docs/layer-sweep.md)
    assert p.for_model("smollm2-135m").rome.layer == 4  # another model on the command line: its own layer
    assert parse_params({"model": "smollm2-135m"}).rome.layer == 4  # no rome.layer at all: the same default
    explicit = parse_params({"model": "gemma-3-270m", "rome": {"layer": 6}})
    assert explicit.for_model("smollm2-135m").rome.layer == 6  # a layer the file sets is kept for any model
    with pytest.raises(ConfigError, match=r"rome\.layer: /some/folder has no measured default edit layer"):
        parse_params({"rome": {"layer": "default"}}).for_model("/some/folder")


def test_every_named_insert_is_a_value_of_rome_insert():
    for name in INSERTS:
        assert parse_params({"rome": {"insert": name}}).method("rome").insert == name
    with pytest.raises(ConfigError, match=r"rome\.insert: must be 'rank-one' or 'family' or 'entity'"):
        parse_params({"rome": {"insert": "gated-v0"}})


def test_the_gated_insert_takes_its_own_measured_layer_unless_one_is_set():
    p = parse_params({"model": "gemma-3-270m", "rome": {"layer": "default", "insert": "gated"}})
    assert p.rome.layer == 3  # Gemma-3-270M's gated layer (docs/specificity.md); linear inserts: 1
    linear = parse_params({"model": "gemma-3-270m", "rome": {"layer": "default", "insert": "family"}})
    assert linear.rome.layer == 1 and linear.method("gated").layer == 3 and linear.method("entity").layer == 1
    assert linear.rome_variant("g:insert=gated")[1].layer == 3
    assert linear.rome_variant("g1:insert=gated:layer=1")[1].layer == 1  # a variant's own layer wins
    assert parse_params({"rome": {"layer": 2, "insert": "family"}}).method("gated").layer == 2  # a set layer wins
    assert linear.for_model("smollm2-135m").method("gated").layer == 4  # no gated layer measured there: its own
