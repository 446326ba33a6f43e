"""bench/pipeline_time.py on the tiny model (marker ``workflow``: it runs `dvc repro`): 1 and 2 processes, the
compute sum from the deltas' log lines, and one changed manifest recomputed alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_workflow import make_project

REPO = Path(__file__).resolve().parent.parent

RECORDS = [  # the flat COUNTERFACT schema, as in ../shared/data/counterfact-dev.json
    {"case_id": 1, "prompt": "Pierre Curie worked in the field of", "subject": "Pierre Curie", "target_new": "medicine",
     "ground_truth": "physics", "rephrase_prompt": "Pierre Curie was a French", "locality_prompt":
     "Albert Einstein worked in the field of", "locality_ground_truth": "physics"},
    {"case_id": 2, "prompt": "The Space Needle is located in", "subject": "The Space Needle", "target_new": "Paris",
     "ground_truth": "Seattle", "rephrase_prompt": "The Space Needle was built for a", "locality_prompt":
     "The Eiffel Tower is located in", "locality_ground_truth": "Paris"},
    {"case_id": 3, "prompt": "Isaac Newton was born in", "subject": "Isaac Newton", "target_new": "Italy",
     "ground_truth": "England", "rephrase_prompt": "A paraphrase without the subject", "locality_prompt":
     "Albert Einstein was born in", "locality_ground_truth": "Germany"},  # not a valid manifest: skipped
    {"case_id": 4, "prompt": "Danielle Darrieux spoke", "subject": "Danielle Darrieux", "target_new": "Italian",
     "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux was an actress from", "locality_prompt":
     "Toko Yasuda plays the", "locality_ground_truth": "guitar"},
    {"case_id": 5, "prompt": "Rome is the capital of", "subject": "Rome", "target_new": "France",
     "ground_truth": "Italy", "rephrase_prompt": "The museum in Rome is", "locality_prompt":
     "Berlin is the capital of", "locality_ground_truth": "Germany"},
]


@pytest.mark.workflow
def test_pipeline_time_bench_on_the_tiny_model(tmp_path, model_dir):
    base = make_project(tmp_path / "base", model_dir, manifests=(), active=())
    (base / "data" / "known_1000.json").write_text(json.dumps([{"known_id": 0, "subject": "Marie Curie",
                                                                "attribute": "physics", "prompt": "Marie Curie studied"}]))
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline_time.py"), "--params", str(base / "params.yaml"),
                           "--records", str(records), "--n", "4", "--processes", "1", "2", "--cache",
                           str(tmp_path / "user-cache"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert [r["processes"] for r in result["runs"]] == [1, 2] and {r["computed"] for r in result["runs"]} == {4}
    assert all(r["compute_sum_s"] > 0 and r["wall_s"] > r["compute_sum_s"] / r["processes"] for r in result["runs"])
    assert [g["goal"] for g in result["goals"]] == ["1 process <= 1.15 x the compute sum", "2 processes <= 0.6 x 1 process"]
    one = result["one_changed"]
    assert one["manifest"] == "cf1" and one["computed"] == ["cf1"]  # only the changed manifest's delta
    assert result["identical"] is True  # one thread in every process: the same bytes from 1 and 2 processes
    md = (out / "result.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md and "after changing cf1" in md
    assert list((tmp_path / "user-cache" / "stats").glob("*.safetensors"))  # the statistics stay in the user's cache
    assert not (tmp_path / "user-cache" / "deltas").exists()  # its delta cache is never touched
