"""Pipeline time: a fresh `dvc repro` of the edit stage over N one-edit manifests, on 1 process and on 2,
against the sum of the per-edit compute; then one manifest changed.

The manifests are made from COUNTERFACT dev records (the first N that are valid manifests, from --start);
the project is the repository's dvc.yaml (its stats and edit stages), stages/ and romeflow/ with --params's settings (its data/ folder
copied), in a scratch folder with DVC and no git. Each run deletes deltas/ and the delta cache, then times
`dvc repro --force --single-item edit` from start to end (process start, imports, model loading on every
process, statistics, DVC's own work). The compute of an edit is the time `romeflow apply-all` logs for
its compute_delta ("computed NAME in S s"); its sum over the 1-process run is "the compute sum".

    python bench/pipeline_time.py --n 100 --processes 1 2                  # the default model (params.yaml)
    python bench/pipeline_time.py --n 100 --processes 1 2 --threads 16     # a budget of 16 CPU threads

--threads T gives the stage OMP_NUM_THREADS=T: one process uses T threads, two use T/2 each (apply-all
splits the cores). The statistics come from the usual cache ($ROMEFLOW_CACHE; its models/ and stats/ are
linked into a scratch cache, so its delta cache is never touched). Writes --out/result.json and
result.md. Goals (issue 22): 1 process <= 1.15 x the compute sum; 2 processes <= 0.6 x 1 process; after
one manifest changes, only its delta is computed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMPUTED = re.compile(r"computed (\S+) in ([0-9.]+) s \(rank (\d+) of (\d+)\)")
GOAL_ONE, GOAL_TWO = 1.15, 0.6


def manifests_from(records_path: Path, n: int, start: int, folder: Path) -> list[str]:
    """edits/cf<case_id>.yaml for the first n records from ``start`` that load as manifests."""
    from romeflow.evaluation.datasets import load_counterfact
    from romeflow.pipeline.manifests import ManifestError, load_manifest

    names = []
    for rec in load_counterfact(records_path)[start:]:
        if len(names) == n:
            break
        edit = {"subject": rec.subject, "relation": rec.relation, "target": rec.target_new,
                "target_true": rec.target_true, "paraphrases": list(rec.paraphrases[:2]),
                "neighbors": [{"prompt": p, "answer": rec.target_true} for p in rec.neighborhood[:2]]}
        name = f"cf{rec.case_id}"
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"description": f"COUNTERFACT case {rec.case_id}", "edits": [edit]},
                                       allow_unicode=True, sort_keys=False))
        try:
            load_manifest(path)
        except ManifestError:
            path.unlink()  # e.g. a paraphrase without the subject: not a valid manifest
            continue
        names.append(name)
    if len(names) < n:
        raise SystemExit(f"{records_path}: only {len(names)} valid records from {start}, not {n}")
    return names


def make_project(work: Path, base_params: Path, model: str | None, records: Path, n: int, start: int) -> tuple[Path, list[str]]:
    project = work / "project"
    (project / "edits").mkdir(parents=True)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())  # its stats and edit stages, as they are
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: pipeline["stages"][s] for s in ("stats", "edit")}},
                                                     sort_keys=False))
    for d in ("stages", "romeflow"):  # the stage's dependencies
        shutil.copytree(ROOT / d, project / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(base_params.parent / "data", project / "data")
    params = yaml.safe_load(base_params.read_text())
    if model:
        params["model"] = {**params["model"], "name": model} if isinstance(params.get("model"), dict) else model
    names = manifests_from(records, n, start, project / "edits")
    params["manifests"] = names
    params["processes"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project, names


def scratch_cache(work: Path, user_cache: Path) -> Path:
    """A cache whose models/ and stats/ are the user's (converted models and statistics are reused and kept);
    its deltas/ is the bench's own."""
    cache = work / "cache"
    cache.mkdir()
    for sub in ("models", "stats"):
        (user_cache / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to((user_cache / sub).resolve(), target_is_directory=True)
    return cache


def sh(cmd: list[str], cwd: Path, env: dict, what: str) -> tuple[str, float]:
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{what}: `{' '.join(cmd)}` failed ({done.returncode}):\n{out[-4000:]}")
    return out, took


def set_processes(project: Path, p: int) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["processes"] = p
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def timed_run(project: Path, cache: Path, env: dict, p: int, n: int) -> dict:
    set_processes(project, p)
    shutil.rmtree(project / "deltas", ignore_errors=True)
    shutil.rmtree(cache / "deltas", ignore_errors=True)
    out, wall = sh(["dvc", "repro", "--force", "--single-item", "edit"], project, env, f"{p} process(es)")
    times = {m[1]: float(m[2]) for m in COMPUTED.finditer(out)}
    if len(times) != n:
        raise SystemExit(f"{p} process(es): {len(times)} deltas computed, not {n}:\n{out[-4000:]}")
    compute = sum(times.values())
    print(f"{p} process(es): {wall:.1f} s for {n} deltas; compute {compute:.1f} s", flush=True)
    return {"processes": p, "wall_s": round(wall, 2), "computed": n, "compute_sum_s": round(compute, 2),
            "deltas": digests(project / "deltas")}


def change_one(project: Path, env: dict, name: str) -> dict:
    """Another target for one manifest, then a plain `dvc repro edit`: which deltas it computes."""
    path = project / "edits" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data["edits"][0]["target"] = "Antarctica" if data["edits"][0]["target"] != "Antarctica" else "Mars"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    out, wall = sh(["dvc", "repro", "edit"], project, env, "one manifest changed")
    computed = sorted(m[1] for m in COMPUTED.finditer(out))
    print(f"one manifest changed ({name}): computed {computed} in {wall:.1f} s", flush=True)
    return {"manifest": name, "computed": computed, "wall_s": round(wall, 2)}


def report(result: dict) -> str:
    runs = {r["processes"]: r for r in result["runs"]}
    lines = [f"# Pipeline time: {result['n']} one-edit manifests, `dvc repro` of the edit stage", "",
             f"Model {result['model']}, records {result['records']} (from {result['start']}), "
             f"threads {result['threads'] or 'torch default'}; {result['machine']['cpus']} CPUs, "
             f"torch {result['machine']['torch']}, {result['machine']['device']}.", "",
             "| processes | wall (s) | compute sum (s) | wall / compute sum of 1 process | wall / 1 process |",
             "|---:|---:|---:|---:|---:|"]
    base = runs.get(1)
    for p, r in sorted(runs.items()):
        vs_sum = f"{r['wall_s'] / base['compute_sum_s']:.3f}" if base else "–"
        vs_one = f"{r['wall_s'] / base['wall_s']:.3f}" if base else "–"
        lines.append(f"| {p} | {r['wall_s']:.1f} | {r['compute_sum_s']:.1f} | {vs_sum} | {vs_one} |")
    lines += ["", "Goals:"]
    for goal in result["goals"]:
        lines.append(f"- {goal['goal']}: {goal['value']:.3f} ({'met' if goal['met'] else 'NOT met'})")
    one = result.get("one_changed")
    if one:
        lines.append(f"- after changing {one['manifest']}: `dvc repro edit` computed {', '.join(one['computed']) or 'nothing'}"
                     f" in {one['wall_s']:.1f} s ({'met' if one['computed'] == [one['manifest']] else 'NOT met'})")
    if result.get("identical") is not None:
        lines.append(f"- deltas byte-identical across the runs: {result['identical']} (expected when every "
                     "process had the same thread count)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base settings (its data/ is copied)")
    ap.add_argument("--model", default=None, help="model [default: --params's]")
    ap.add_argument("--records", type=Path, default=ROOT.parent / "shared" / "data" / "counterfact-dev.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stage (the CPU budget)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("ROMEFLOW_CACHE", Path.home() / ".cache" / "romeflow")))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one, removed]")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "pipeline-time")
    args = ap.parse_args()

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="romeflow-pipeline-time-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        project, names = make_project(work, args.params.resolve(), args.model, args.records.resolve(), args.n, args.start)
        cache = scratch_cache(work, args.cache)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": str(ROOT), "ROMEFLOW_CACHE": str(cache), "DVC_NO_ANALYTICS": "1",
               "DVC_SITE_CACHE_DIR": str(work / "dvc-site")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        sh(["dvc", "init", "--no-scm", "-q"], project, env, "dvc init")
        sh(["dvc", "config", "core.analytics", "false"], project, env, "dvc config")
        sh(["dvc", "repro", "stats"], project, env, "the statistics (not timed)")
        runs = [timed_run(project, cache, env, p, len(names)) for p in args.processes]
        one = change_one(project, env, names[0])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["processes"]: r for r in runs}
    goals = []
    if 1 in by:
        goals.append({"goal": f"1 process <= {GOAL_ONE} x the compute sum",
                      "value": by[1]["wall_s"] / by[1]["compute_sum_s"], "met": by[1]["wall_s"] <= GOAL_ONE * by[1]["compute_sum_s"]})
    if 1 in by and 2 in by:
        goals.append({"goal": f"2 processes <= {GOAL_TWO} x 1 process",
                      "value": by[2]["wall_s"] / by[1]["wall_s"], "met": by[2]["wall_s"] <= GOAL_TWO * by[1]["wall_s"]})
    result = {"model": args.model or yaml.safe_load(args.params.read_text()).get("model"), "n": len(names),
              "records": str(args.records), "start": args.start, "threads": args.threads,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                          "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
              "runs": [{k: v for k, v in r.items() if k != "deltas"} for r in runs], "goals": goals,
              "one_changed": one,
              "identical": len({json.dumps(r["deltas"], sort_keys=True) for r in runs}) == 1 if len(runs) > 1 else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "result.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
