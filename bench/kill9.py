"""kill -9 `romeflow apply` and `romeflow export` at many moments; check what is left.

For each command: one uninterrupted run gives the reference output; then, at each moment, a fresh run
is killed with SIGKILL and the script checks that the target is either absent or complete (byte-equal
to the reference) — never partial — and that the next uninterrupted run removes every leftover
``.romeflow-tmp-*`` and writes output byte-identical to the reference. Half of the moments are spread
over the run's wall time, the other half are taken just after the first temporary file appears (so
the kill lands while the file or folder is being written).

    python bench/kill9.py --moments 10            # 10 moments of apply and 10 of export (a few minutes)

A tiny random GPT-2 (tests/conftest.py) is the model: nothing is downloaded, Gemma is never loaded.
Prints one line per kill and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TMP = ".romeflow-tmp"
MANIFEST = """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    target_true: physics
"""


def make_project(root: Path) -> None:
    import yaml

    from conftest import _train_tokenizer, build_model, corpus_text

    tok = _train_tokenizer(prepend_bos=False)
    model = build_model("gpt2", tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data").mkdir()
    for i in range(2):
        (root / "data" / f"c{i}.txt").write_text(corpus_text(seed=i, n_paragraphs=30))
    (root / "edits").mkdir()
    (root / "edits" / "curie.yaml").write_text(MANIFEST)
    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": str(root / "model"),
        "stats": {"corpus": ["data/c0.txt", "data/c1.txt"], "tokens": 3000, "seq_len": 64},
        "rome": {"layer": 1, "prefix_lengths": [3], "prefixes_per_length": 2, "steps": 5}}))


def romeflow(root: Path, *args) -> list[str]:
    return [sys.executable, "-m", "romeflow.cli", "--params", "params.yaml", "--cache", "cache", "--threads", "1", *args]


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (relative name -> sha256)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{TMP}*")) if folder.is_dir() else []


def run(root: Path, argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def kill_at(root: Path, argv: list[str], folder: Path, delay: float, after_tmp: bool) -> str:
    """Start the command, SIGKILL it ``delay`` s after its start (or after the first temporary appears)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.perf_counter()
    if after_tmp:
        while proc.poll() is None and not leftovers(folder):
            time.sleep(0.0005)
        time.sleep(delay)
    else:
        while proc.poll() is None and time.perf_counter() - t0 < delay:
            time.sleep(0.001)
    state = "finished before the kill" if proc.poll() is not None else "killed"
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return state


def check(name: str, root: Path, argv: list[str], target: Path, moments: int) -> list[str]:
    failures = []
    folder = target.parent
    wall = run(root, argv)
    reference = digest(target)
    clean = lambda: subprocess.run(["rm", "-rf", str(target)], check=True)  # noqa: E731
    clean()
    plan = [(wall * (i + 1) / (moments // 2 + 1), False) for i in range(moments // 2)]
    plan += [(d, True) for d in (0.0, 0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5)[:moments - len(plan)]]
    for delay, after_tmp in plan:
        state = kill_at(root, argv, folder, delay, after_tmp)
        when = f"{delay * 1000:.0f} ms after the first temporary" if after_tmp else f"at {delay:.2f} s"
        found = "absent" if not target.exists() else "complete" if digest(target) == reference else "PARTIAL"
        left = leftovers(folder)
        clean()  # (a complete one too: export refuses an existing folder)
        run(root, argv)
        again_left = leftovers(folder)
        same = target.exists() and digest(target) == reference
        ok = found != "PARTIAL" and not again_left and same
        print(f"{name}: kill {when} ({state}): target {found} after the kill, {len(left)} leftover(s) -> "
              f"{len(again_left)} after the re-run, re-run {'byte-identical' if same else 'DIFFERENT'}", flush=True)
        if not ok:
            failures.append(f"{name} {when}")
        clean()
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moments", type=int, default=10, help="kill moments per command")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_project(root)
        subprocess.run(romeflow(root, "stats", "--out", "stats/layer1.safetensors"), cwd=root, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        apply = romeflow(root, "apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors",
                         "--out", "deltas/curie.safetensors")
        failures = check("apply", root, apply, root / "deltas" / "curie.safetensors", args.moments)
        run(root, apply)
        export = romeflow(root, "export", "exported/model", "--delta", "deltas/curie.safetensors")
        failures += check("export", root, export, root / "exported" / "model", args.moments)
    print("all kills left no partial target and no leftover after the next run" if not failures else
          f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
