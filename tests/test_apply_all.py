"""`romeflow apply-all`: many deltas with the model loaded once per process, over N processes; byte-identical
to one process and to `romeflow apply`; only the deltas whose inputs changed are computed; a killed
distributed run leaves whole deltas only and the next run computes the rest."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from romeflow.pipeline import batch
from romeflow.pipeline.deltas import load_delta

from test_workflow import MANIFESTS, cli, make_project


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def computed(result) -> list[str]:
    """The deltas a run computed: one stderr line each, from every rank (a spawned rank writes to the
    process's stderr, which CliRunner does not capture, so the summary line counts them all)."""
    return sorted(re.findall(r"computed (\S+) in [0-9.]+ s \(rank", result.stderr))


def summary(result) -> tuple[int, int, int]:
    """(computed, from the cache, up to date) from the summary line on stdout."""
    m = re.search(r"apply-all: (\d+) computed \(\d+ process(?:es)?\), (\d+) from the cache, (\d+) up to date", result.stdout)
    assert m, result.output
    return int(m[1]), int(m[2]), int(m[3])


def run(root: Path, *args):
    r = cli(root, "--threads", "1", "apply-all", *args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def project(tmp_path, model_dir):
    return make_project(tmp_path / "p", model_dir, active=("a", "b", "c", "bad"))


def test_two_processes_equal_one_process_and_apply_byte_for_byte(project):
    r = run(project)
    assert summary(r) == (4, 0, 0) and computed(r) == ["a", "b", "bad", "c"]
    one = digests(project / "deltas")
    assert list(one) == ["a.safetensors", "b.safetensors", "bad.safetensors", "c.safetensors"]
    shutil.rmtree(project / "deltas")
    shutil.rmtree(project.parent / "cache" / "deltas")  # nothing to copy: every delta computed again
    r = run(project, "--processes", "2")
    assert summary(r) == (4, 0, 0)
    assert digests(project / "deltas") == one  # rank 0 computed a and bad, rank 1 b and c: the same bytes
    for name in ("a", "c"):  # and `romeflow apply` with the same thread count writes the same bytes too
        r = cli(project, "--threads", "1", "apply", f"edits/{name}.yaml", "--out", f"single/{name}.safetensors")
        assert r.exit_code == 0, r.output
        assert digests(project / "single")[f"{name}.safetensors"] == one[f"{name}.safetensors"]
    assert summary(run(project)) == (0, 0, 4)  # all up to date: nothing computed, no model loaded
    assert "loaded " not in run(project).stderr


def test_only_the_deltas_whose_inputs_changed_are_computed(project, monkeypatch):
    run(project)
    first = digests(project / "deltas")
    manifest = project / "edits" / "a.yaml"
    manifest.write_text(MANIFESTS["a"].replace("target: medicine", "target: music"))
    r = run(project)
    assert computed(r) == ["a"] and summary(r) == (1, 0, 3)
    now = digests(project / "deltas")
    assert now["a.safetensors"] != first["a.safetensors"]
    assert {k: v for k, v in now.items() if k != "a.safetensors"} == {k: v for k, v in first.items() if k != "a.safetensors"}
    manifest.write_text(MANIFESTS["a"])  # changed back: its first delta comes from the cache
    r = run(project)
    assert computed(r) == [] and summary(r) == (0, 1, 3) and digests(project / "deltas") == first
    r = run(project, "b", "c")  # names given: only those
    assert summary(r) == (0, 0, 2)
    # every input counts: a hyper-parameter, the engine's source (what dvc.yaml's edit stage depends on)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  lr: 0.1\n", "  lr: 0.2\n"))
    assert computed(run(project)) == ["a", "b", "bad", "c"]
    monkeypatch.setattr(batch, "source_sha256", lambda: "0" * 64)
    assert summary(run(project, "a")) == (1, 0, 0)
    # a delta written by `romeflow apply` records the same inputs as apply-all's: up to date for apply-all
    monkeypatch.undo()
    recorded = load_delta(project / "deltas" / "c.safetensors").meta["inputs_sha256"]
    r = cli(project, "--threads", "1", "apply", "edits/c.yaml", "--out", "deltas/c.safetensors")
    assert r.exit_code == 0, r.output
    assert load_delta(project / "deltas" / "c.safetensors").meta["inputs_sha256"] == recorded
    assert summary(run(project, "c")) == (0, 0, 1)


def _many(project: Path, n: int) -> list[str]:
    """n one-edit manifests m00..m<n-1>, all active (the other manifests' facts, other subjects)."""
    names = [f"m{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        subject = f"Person {i} Curie"
        (project / "edits" / f"{name}.yaml").write_text(
            f'edits:\n  - subject: {subject}\n    relation: "{{}} worked in the field of"\n    target: medicine\n')
    params = project / "params.yaml"
    text = params.read_text()
    start = text.index("manifests:")
    end = text.index("\n\n", start)
    params.write_text(text[:start] + "manifests:\n" + "".join(f"  - {n}\n" for n in names) + text[end:])
    return names


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for c in children:
                if c not in found:
                    found.add(c)
                    todo.append(c)
    return found


def _gone(pids: set[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = {p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)}
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc to find the spawned ranks")
def test_a_killed_distributed_run_leaves_whole_deltas_and_resumes(project):
    names = _many(project, 24)
    run(project)  # the reference: one process
    reference = digests(project / "deltas")
    assert len(reference) == 24
    shutil.rmtree(project / "deltas")
    shutil.rmtree(project.parent / "cache" / "deltas")

    # rank 0 is killed (SIGKILL) as soon as the first delta appears: the spawned rank gets SIGINT (its
    # parent-death signal) and stops; whatever was written is whole
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "romeflow.cli", "--params", "params.yaml", "--cache",
                             str(project.parent / "cache"), "--threads", "1", "apply-all", "--processes", "2"],
                            cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deltas = project / "deltas"
    end = time.monotonic() + 300
    while not list(deltas.glob("*.safetensors")) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    children = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert children and _gone(children, 30), "a spawned rank outlived the killed run"
    written = digests(deltas)
    assert 1 <= len(written) < 24, "the run was not interrupted"
    for name, digest in written.items():  # no partial delta: each is the complete, reference one
        assert digest == reference[name], name
        load_delta(deltas / name)

    r = run(project, "--processes", "2")  # resumes: computes only what is missing
    assert summary(r) == (24 - len(written), 0, len(written))
    assert digests(deltas) == reference
    leftovers = [p for f in (deltas, project.parent / "cache" / "deltas") for p in f.glob(".romeflow-tmp-*")]
    assert leftovers == []  # the killed run's temporaries are gone too
    assert set(names) == {p.stem for p in deltas.glob("*.safetensors")}


def test_under_torchrun_equals_one_process(project, tmp_path):
    """torchrun's 2 processes (what `accelerate launch --multi_gpu` runs underneath on GPUs) split the deltas
    as --processes 2 does; the statistics, missing from this cache, are computed by rank 0 alone."""
    run(project)
    reference = digests(project / "deltas")
    shutil.rmtree(project / "deltas")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "romeflow.cli",
                           "--params", "params.yaml", "--cache", str(tmp_path / "fresh-cache"), "--threads", "1",
                           "apply-all"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(rank 1 of 2)" in done.stderr and "4 computed (2 processes)" in done.stdout, done.stdout + done.stderr[-3000:]
    assert digests(project / "deltas") == reference
    assert len(list((tmp_path / "fresh-cache" / "stats").glob("*.safetensors"))) == 1  # computed once, by rank 0


def test_a_rank_that_dies_before_joining_fails_the_run_with_one_line(project, tmp_path):
    """A script that calls romeflow without a `__main__` guard: the spawned rank re-runs it while starting and
    dies; rank 0 says so (exit 1, its last line) instead of waiting for it, and writes nothing."""
    script = tmp_path / "no_guard.py"
    script.write_text("from romeflow.cli import main\n"
                      f"main(['--params', 'params.yaml', '--cache', {str(tmp_path / 'cache')!r}, '--threads', '1', "
                      "'apply-all', '--processes', '2'])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    last = [l for l in done.stderr.splitlines() if l.strip()][-1]
    assert done.returncode == 1 and last.startswith("Error: apply-all process rank 1 failed (exit code 1); the deltas "
                                                    "written so far are kept"), done.stderr[-3000:]
    assert digests(project / "deltas") == {}
