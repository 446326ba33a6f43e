"""The DVC configuration: stages depend on the romeflow source they run; a default remote shares the
artifacts, and a fresh clone's `dvc pull` from it has a clean `dvc status` without computing anything
(a tiny fake pipeline in a temporary git repository, with the same kind of remote)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_depends_on_the_romeflow_source_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    engine = {"stats": "romeflow/engine/statistics.py", "edit": "romeflow/engine/rome.py", "eval": "romeflow/evaluation/scoring.py",
              "stack": "romeflow/pipeline/workflow.py", "trace": "romeflow/tracing/causal.py"}
    for name, stage in stages.items():
        deps = (stage.get("do") or stage)["deps"]
        sources = [d for d in deps if isinstance(d, str) and d.startswith("romeflow/")]
        assert engine[name] in sources, (name, deps)
        assert "romeflow/engine/models.py" in sources, name
        for d in sources:
            assert (REPO / d).is_file(), d
        assert not any(d.startswith("romeflow/cli") for d in sources)  # the command line is not the computation


def test_the_edit_stage_depends_on_what_a_delta_records_and_keeps_its_deltas():
    """The romeflow files the `edit` stage depends on are exactly batch.EDIT_SOURCES, whose sha256 each delta
    records among its inputs: when DVC re-runs the stage for an engine change every delta is stale, and for any
    other change (a manifest, the list) only the deltas whose own inputs changed. Its output folder persists
    while it runs, so the up-to-date deltas are there to be kept."""
    from romeflow.pipeline.batch import EDIT_SOURCES

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["edit"]
    assert sorted(d for d in stage["deps"] if d.startswith("romeflow/")) == sorted(EDIT_SOURCES)
    assert {"edits", "stats", "stages/edit.py"} <= set(stage["deps"])
    assert set(stage["params"]) == {"model", "rome", "manifests"}  # not `processes`: no re-run for a machine setting
    assert stage["outs"] == [{"deltas": {"persist": True}}]
    evals = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["eval"]["do"]
    assert "deltas/${item}.safetensors" in evals["deps"]  # one manifest's eval: its own delta only


def test_the_default_remote_is_a_local_folder_beside_the_repository():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    default = config["core"]["remote"]
    url = config[f"'remote \"{default}\"'"]["url"]  # DVC writes the section as ['remote "NAME"']
    assert not url.startswith(("s3://", "gs://", "http")), url
    where = (REPO / ".dvc" / url).resolve()  # DVC resolves a relative url from .dvc/
    assert where.parent == REPO.parent and where.name == "romeflow-dvc-remote"


def _run(cwd: Path, *argv: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "dvc", *argv[1:]] if argv[0] == "dvc" else list(argv)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


STAGE = """import hashlib, sys
text = open("data/in.txt").read() + open("src/engine.py").read()
open("out/delta.bin", "w").write(hashlib.sha256(text.encode()).hexdigest() * 100)
open("reports/r.json", "w").write('{"ES": 100}')
"""

PIPELINE = """stages:
  edit:
    cmd: python stage.py
    deps: [stage.py, src/engine.py, data/in.txt]
    outs: [out/delta.bin]
    metrics:
      - reports/r.json:
          cache: false
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_fresh_clone_pulls_the_outputs_and_is_clean(tmp_path):
    repo, remote, clone = tmp_path / "repo", tmp_path / "romeflow-dvc-remote", tmp_path / "clone"
    for d in ("data", "src", "out", "reports"):
        (repo / d).mkdir(parents=True)
    (repo / "data" / "in.txt").write_text("facts\n")
    (repo / "src" / "engine.py").write_text("ENGINE = 1\n")
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(PIPELINE)
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "dvc", "config", "core.analytics", "false")
    _run(repo, "dvc", "remote", "add", "-d", "local", "../romeflow-dvc-remote")  # as .dvc/config has it
    _run(repo, "dvc", "repro", "-q")
    _run(repo, "dvc", "push", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "pipeline")
    assert any(remote.rglob("*")), "dvc push put nothing in the remote"

    _run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "out" / "delta.bin").exists()
    _run(clone, "dvc", "pull", "-q")
    assert (clone / "out" / "delta.bin").read_text() == (repo / "out" / "delta.bin").read_text()
    assert "up to date" in _run(clone, "dvc", "status").lower()  # nothing to recompute
    # a change in the engine's source makes the stage stale
    (clone / "src" / "engine.py").write_text("ENGINE = 2\n")
    assert "modified:" in _run(clone, "dvc", "status")
