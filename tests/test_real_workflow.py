"""`dvc repro` end to end on the real default model (Gemma-3-270M), in a temporary git repository.

The project's own dvc.yaml, stages/, params.yaml and data/heldout.txt, with only edits/curie.yaml
active, and the trace stage's committed per-fact rows (so that it only aggregates them). The model
and its statistics come from the usual cache ($ROMEFLOW_CACHE), so after the real engine tests this
costs a few minutes. ROMEFLOW_SKIP_REAL=1 skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.real, pytest.mark.workflow,
              pytest.mark.skipif(os.environ.get("ROMEFLOW_SKIP_REAL") == "1", reason="ROMEFLOW_SKIP_REAL=1")]


def test_dvc_repro_on_gemma(tmp_path):
    repo = tmp_path / "project"
    (repo / "edits").mkdir(parents=True)
    (repo / "data").mkdir()
    for f in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / f, repo / f)
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "romeflow", repo / "romeflow", ignore=shutil.ignore_patterns("__pycache__"))  # stage deps
    shutil.copy(REPO / "data" / "heldout.txt", repo / "data" / "heldout.txt")
    shutil.copy(REPO / "edits" / "curie.yaml", repo / "edits" / "curie.yaml")
    shutil.copy(REPO / "data" / "known_1000.json", repo / "data" / "known_1000.json")
    (repo / "reports" / "trace").mkdir(parents=True)  # the trace stage's per-fact rows: it only aggregates them
    shutil.copy(REPO / "reports" / "trace" / "rows.jsonl", repo / "reports" / "trace" / "rows.jsonl")
    params = (REPO / "params.yaml").read_text()
    params = re.sub(r"(?ms)^manifests:.*?\n\n", "manifests:\n  - curie\n\n", params)
    (repo / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def repro() -> set[str]:
        r = sh("dvc", "repro")
        return set(re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr))

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.analytics", "false")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "project")

    assert repro() == {"stats", "edit", "eval@curie", "stack", "trace"}
    assert json.loads((repo / "reports" / "trace" / "layer.json").read_text())["layer"] >= 0
    report = json.loads((repo / "reports" / "curie.json").read_text())
    assert report["post"]["ES"] == 100.0 and report["post"]["rewrite_top1"] == 100.0
    # neighbours are scored, never held: NS is what the edit left of them (the gate's floor, 50, or more)
    assert report["post"]["NS"] >= 50.0 and "neighbor_top1_kept" in report["post"]
    other = report["other_subjects"][0]
    assert other["held"] == ["Marie Curie"] and other["subject"] == "Pierre Curie"  # curie.yaml's protect:
    stack = json.loads((repo / "reports" / "stack.json").read_text())
    assert stack["gate"]["passed"] and stack["composed"]["edits"] == 1
    assert stack["damage"]["heldout"]["perplexity_increase_pct"] < 5.0
    assert repro() == set()
