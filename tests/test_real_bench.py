"""A small `romeflow bench counterfact` run on the real default model (Gemma-3-270M): two records,
every method, generation for one record. Slow (~3 min on 2 CPU cores); ROMEFLOW_SKIP_REAL=1 skips it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from romeflow.cli import main
from romeflow.schemas import validate

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.environ.get("ROMEFLOW_SKIP_REAL") == "1", reason="ROMEFLOW_SKIP_REAL=1")]

RECORDS = [
    {"case_id": 1, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux, a native speaker of",
     "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"},
    {"case_id": 2, "prompt": "The Space Needle is located in the city of", "subject": "The Space Needle",
     "target_new": "Paris", "ground_truth": "Seattle", "rephrase_prompt": "The Space Needle can be found in the city of",
     "locality_prompt": "Pike Place Market is located in the city of", "locality_ground_truth": "Seattle"},
]


def test_bench_on_gemma(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["bench"]["generation"].update({"new_tokens": 12, "records": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()  # rome.protect_sources: relative to the params file's folder
    (tmp_path / "data" / "known_1000.json").write_bytes((REPO / "data" / "known_1000.json").read_bytes())
    (tmp_path / "data" / "heldout.txt").write_bytes((REPO / "data" / "heldout.txt").read_bytes())  # PPL+
    (tmp_path / "cf.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "--threads", "1", "bench", "counterfact",
                                  "--records", str(tmp_path / "cf.json"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert validate("bench", report) == []
    m = {name: {k: (v["value"] if v else None) for k, v in row["metrics"].items()}
         for name, row in report["methods"].items()}
    assert set(m) == {"unedited", "rome", "ft", "ftl", "kn"}
    assert m["unedited"]["ES"] == 0.0 and m["unedited"]["NS"] == 100.0  # Gemma knows both facts
    assert m["rome"]["ES"] == 100.0 and m["rome"]["PS"] == 100.0
    assert m["rome"]["EM"] > 50
    assert all(m[name]["GE"] is not None for name in m)
