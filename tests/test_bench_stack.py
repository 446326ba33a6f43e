"""`romeflow bench stack` end to end on a tiny GPT-2 with tiny synthetic records: one delta per record,
compositions with sum and joint, the report (JSON, Markdown, plot), resuming and sharding."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from romeflow.cli import main
from romeflow.pipeline.deltas import load_delta
from romeflow.schemas import validate

from conftest import EDIT_LAYER, corpus_text

FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
CITIES = ["Paris", "Seattle", "Rome", "London", "Berlin"]


def records(n: int) -> list[dict]:
    """Flat-schema COUNTERFACT records: 'X Brandt lives in' city -> another city. Two subjects share each
    last name, so NS_tok has neighbours."""
    out = []
    for i in range(n):
        subject = f"{FIRST[i % len(FIRST)]} {['Brandt', 'Castell'][i % 2]}"
        true, new = CITIES[i % 5], CITIES[(i + 2) % 5]
        out.append({"case_id": 100 + i, "prompt": f"{subject} lives in", "subject": subject, "target_new": new,
                    "ground_truth": true, "rephrase_prompt": f"{subject} has a home in",
                    "locality_prompt": f"The museum in {true} is", "locality_ground_truth": true})
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_lm, corpus_files):
    root = tmp_path_factory.mktemp("bench-stack")
    lm = tiny_lm("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "heldout.txt").write_text(corpus_text(seed=99, n_paragraphs=2))
    params = {"model": str(root / "model"),
              "stats": {"corpus": [str(p) for p in corpus_files], "tokens": 3000, "seq_len": 64},
              "rome": {"layer": EDIT_LAYER, "prefix_lengths": [3], "prefixes_per_length": 2, "steps": 4, "lr": 0.1,
                       "weight_decay": 0.0, "kl_factor": 0.0},
              "stack": {"heldout": "data/heldout.txt", "window": 64, "ridge": 0.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "cf.json").write_text(json.dumps(records(8)))
    return root


def run(project, *args):
    return CliRunner().invoke(main, ["--params", str(project / "params.yaml"), "--cache", str(project / "cache"), *args])


def test_bench_stack_end_to_end_resumes_and_shards(project):
    out = project / "run"
    args = ("bench", "stack", "--records", str(project / "cf.json"), "--n", "6", "--k", "1,3,10", "--others", "2",
            "--out", str(out))
    # two shards: each edits half the records; the first cannot compose what needs the other's deltas yet
    r1 = run(project, *args, "--shard", "1/2")
    assert r1.exit_code == 0, r1.output
    assert sorted(p.name for p in (out / "deltas").iterdir()) == ["100.safetensors", "102.safetensors",
                                                                  "104.safetensors"]
    assert not (out / "report.json").exists()
    r2 = run(project, *args, "--shard", "2/2")
    assert r2.exit_code == 0, r2.output
    assert len(list((out / "deltas").iterdir())) == 6
    r3 = run(project, *args)  # the rest, then the report
    assert r3.exit_code == 0, r3.output
    report = json.loads((out / "report.json").read_text())
    assert validate("bench-stack", report) == []
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| joint | 6 |" in md and "| sum | 6 |" in md
    rows = {(r["method"], r["k"]): r for r in report["rows"]}
    assert set(rows) == {(m, k) for m in ("unedited", "sum", "joint") for k in (1, 3, 6)}  # 10 capped at N = 6
    for key, r in rows.items():
        assert "error" not in r, (key, r)
        assert r["ES"]["n"] == key[1] and r["other_NS"]["n"] == 2
        assert r["perplexity"] > 0
    # one delta: joint = sum. ES is a share of discrete wins (P[new] > P[true]): exact unless a win is a near-tie
    assert rows[("joint", 1)]["ES"] == rows[("sum", 1)]["ES"]
    # the same ΔW by two float paths (joint solve vs rank-one u vᵀ): relative rounding ~1e-7 reaches the perplexity
    # as ~5e-7 relative (measured); 1e-5 leaves a 20x margin and is still 100x below an edit's effect (~2e-3)
    assert math.isclose(rows[("joint", 1)]["perplexity"], rows[("sum", 1)]["perplexity"], rel_tol=1e-5)
    # (a tiny random model barely moves under an edit: no claim on ES itself here; test_joint checks Ŵk_i = v_i)
    # the composed model is another, and the methods differ: by more than the rounding above (measured ~1e-2
    # relative), not merely != (which two float paths to the same model would also pass)
    assert not math.isclose(rows[("sum", 6)]["perplexity"], report["unedited"]["perplexity"], rel_tol=1e-5)
    assert not math.isclose(rows[("joint", 6)]["perplexity"], rows[("sum", 6)]["perplexity"], rel_tol=1e-5)
    assert report["unedited"]["ES"]["n"] == 6  # the unedited model is scored on the records of the largest k
    assert report["rows"] and set(report["limits"]) == {"sum", "joint"}
    assert report["unedited"]["NS_tok"] is not None  # the records share last names
    # the deltas are real delta files with k*, v*
    d = load_delta(out / "deltas" / "100.safetensors")
    assert d.pairs is not None and d.name == "cf100"
    # resuming runs nothing new: the cached rows and deltas are kept byte for byte
    before = {p.name: p.read_bytes() for p in (out / "rows").iterdir()}
    r4 = run(project, *args)
    assert r4.exit_code == 0, r4.output
    assert {p.name: p.read_bytes() for p in (out / "rows").iterdir()} == before


def test_bench_stack_refuses_other_settings_in_the_same_folder(project):
    out = project / "run2"
    base = ("bench", "stack", "--records", str(project / "cf.json"), "--n", "2", "--k", "1", "--others", "1",
            "--methods", "sum", "--out", str(out))
    assert run(project, *base).exit_code == 0
    r = run(project, *base[:-4], "--others", "2", "--methods", "sum", "--out", str(out))
    assert r.exit_code != 0 and "different 'others'" in r.output


def test_bench_stack_compose_only_computes_no_delta_and_scores_what_the_deltas_allow(project):
    out = project / "run4"
    base = ("bench", "stack", "--records", str(project / "cf.json"), "--n", "2", "--k", "1,2", "--others", "1",
            "--methods", "sum", "--out", str(out))
    r = run(project, *base, "--compose-only")  # no delta yet: only the unedited model can be scored
    assert r.exit_code == 0, r.output
    assert not list(out.glob("deltas/*.safetensors"))
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["unedited.json"]
    assert "2 composition(s) left" in r.output and not (out / "report.json").exists()
    unedited = (out / "rows" / "unedited.json").read_bytes()
    r = run(project, *base)  # an editing run computes the deltas and the rest, and keeps the cached row
    assert r.exit_code == 0, r.output
    assert (out / "report.json").exists() and (out / "rows" / "unedited.json").read_bytes() == unedited


def test_bench_stack_variant_is_a_joint_solve_with_other_stack_settings(project):
    out = project / "run3"
    r = run(project, "bench", "stack", "--records", str(project / "cf.json"), "--n", "3", "--k", "1,3", "--others", "1",
            "--methods", "joint", "--variant", "ns:null_space=0.01", "--variant", "open:protect=false", "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["methods"]["ns"] == {"ridge": 0.0, "null_space": 0.01, "protect": True}
    assert report["settings"]["methods"]["open"]["protect"] is False
    rows = {(x["method"], x["k"]): x for x in report["rows"]}
    assert set(report["limits"]) == {"joint", "ns", "open"}
    assert all("error" not in rows[(m, 3)] for m in ("joint", "ns", "open"))
    # the projection changes the composed model; the same solve without it is the plain joint row
    # (by more than rounding: a no-op projection would still pass != by ~1e-7 relative; measured gap 8e-3)
    assert not math.isclose(rows[("ns", 3)]["perplexity"], rows[("joint", 3)]["perplexity"], rel_tol=1e-5)


@pytest.mark.parametrize("args, message", [
    (("--k", "a,b"), "--k"), (("--methods", "sum,product"), "unknown stack method 'product'"),
    (("--n", "0"), "--n"), (("--n", "50"), "fewer than 50"), (("--others", "-1"), "--others")])
def test_bench_stack_bad_options_are_one_line(project, tmp_path, args, message):
    base = {"--n": "2", "--k": "1", "--methods": "sum", "--others": "1"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["bench", "stack", "--records", str(project / "cf.json"), "--out", str(tmp_path / "r")]
    for flag, value in base.items():
        argv += [flag, value]
    r = run(project, *argv)
    assert r.exit_code != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_bench_stack_a_refused_edit_is_recorded_and_scored_unedited(project, monkeypatch):
    import romeflow.evaluation.stackbench as sb

    real = sb.compute_delta

    def refuse_one(lm, manifest, *args, **kwargs):
        if manifest.name == "cf101":
            raise ValueError("the gate of 'Boris Castell' does not separate its own prompt\nsecond line")
        return real(lm, manifest, *args, **kwargs)

    monkeypatch.setattr(sb, "compute_delta", refuse_one)
    out = project / "run5"
    r = run(project, "bench", "stack", "--records", str(project / "cf.json"), "--n", "3", "--k", "1,3",
            "--others", "1", "--methods", "sum", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "deltas").iterdir()) == ["100.safetensors", "101.refused.json",
                                                                  "102.safetensors"]
    refusal = json.loads((out / "deltas" / "101.refused.json").read_text())
    assert refusal == {"case_id": 101, "subject": "Boris Castell",
                       "error": "the gate of 'Boris Castell' does not separate its own prompt"}
    report = json.loads((out / "report.json").read_text())
    assert validate("bench-stack", report) == []
    rows = {(r["method"], r["k"]): r for r in report["rows"]}
    assert rows[("sum", 1)]["refused"] == 0 and rows[("sum", 3)]["refused"] == 1
    assert rows[("sum", 3)]["ES"]["n"] == 3  # the refused record is still scored: a refusal counts against ES
    cached = json.loads((out / "rows" / "sum-k3.json").read_text())
    assert cached["refused"] == [101] and [e["case_id"] for e in cached["edited"]] == [100, 101, 102]
    assert "sum k = 3: 1 edit(s) refused by the engine, scored unedited" in (out / "report.md").read_text()
    # a rerun does not retry the refused record
    monkeypatch.setattr(sb, "compute_delta", lambda *a, **k: pytest.fail("edited again"))
    r = run(project, "bench", "stack", "--records", str(project / "cf.json"), "--n", "3", "--k", "1,3",
            "--others", "1", "--methods", "sum", "--out", str(out))
    assert r.exit_code == 0, r.output
