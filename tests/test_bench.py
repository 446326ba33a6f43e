"""`romeflow bench counterfact|zsre` end to end on a tiny GPT-2: every method, the report, resuming."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import yaml
from click.testing import CliRunner

from romeflow.cli import main
from romeflow.schemas import validate

from conftest import EDIT_LAYER

FLAT = [
    {"case_id": 11, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke the language",
     "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"},
    {"case_id": 12, "prompt": "Pierre Curie worked in the field of", "subject": "Pierre Curie",
     "target_new": "medicine", "ground_truth": "physics", "rephrase_prompt": "Pierre Curie's area of work is",
     "locality_prompt": "Marie Curie worked in the field of", "locality_ground_truth": "physics"},
    {"case_id": 13, "prompt": "The Space Needle is located in", "subject": "The Space Needle",
     "target_new": "Paris", "ground_truth": "Seattle", "rephrase_prompt": "The Space Needle stands in",
     "locality_prompt": "Pike Place Market is located in", "locality_ground_truth": "Seattle"},
]
PAPER = {"case_id": 14, "requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                              "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
         "paraphrase_prompts": ["Toko Yasuda is known for the", "Toko Yasuda performs on the"],
         "neighborhood_prompts": ["Jimi Hendrix plays the", "Slash plays the"],
         "generation_prompts": ["Toko Yasuda is", "Toko Yasuda often"], "attribute_prompts": []}
ZSRE = [{"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Ramalinales",
         "rephrase": "What family are Ramalinaceae?", "alt": "Lamiinae", "answers": ["Lecanorales"],
         "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill"},
        {"subject": "Pierre Curie", "src": "What field did Pierre Curie work in?", "pred": "physics",
         "rephrase": "Pierre Curie worked in which field?", "alt": "medicine", "answers": ["physics"],
         "loc": "nq question: who wrote the iliad", "loc_ans": "Homer"}]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_lm, corpus_files):
    root = tmp_path_factory.mktemp("bench")
    lm = tiny_lm("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    params = {"model": str(root / "model"),
              "stats": {"corpus": [str(p) for p in corpus_files], "tokens": 3000, "seq_len": 64},
              "rome": {"layer": EDIT_LAYER, "prefix_lengths": [3], "prefixes_per_length": 2, "steps": 8, "lr": 0.1,
                       "weight_decay": 0.0, "kl_factor": 0.0},
              "ft": {"layer": EDIT_LAYER, "lr": 0.01, "steps": 4},
              "ftl": {"layer": EDIT_LAYER, "lr": 0.01, "steps": 4, "linf": 0.001},
              "kn": {"ig_steps": 3, "max_neurons": 4},
              "stack": {"window": 32},  # the tiny model has 64 positions
              "bench": {"generation": {"new_tokens": 6, "records": 3, "templates": ["{} is"]}, "damage": {"tokens": 128}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data").mkdir()
    (root / "data" / "heldout.txt").write_text(Path(corpus_files[0]).read_text()[:4000])  # PPL+ (stack.heldout)
    (root / "cf.json").write_text(json.dumps(FLAT + [PAPER]))
    (root / "zsre.json").write_text(json.dumps(ZSRE))
    return root


def run(project, *args):
    return CliRunner().invoke(main, ["--params", str(project / "params.yaml"), "--cache", str(project / "cache"), *args])


def test_counterfact_bench_scores_token_sharing_neighbours(project):
    """NS_tok: Marie Curie and Irène Curie share Pierre Curie's last token and relation; S+ includes them;
    the ROME variants share one v* per record (rome-r1 runs no v* of its own)."""
    marie = {**FLAT[1], "case_id": 21, "subject": "Marie Curie", "prompt": "Marie Curie worked in the field of",
             "target_new": "law", "rephrase_prompt": "Marie Curie's area of work is"}
    irene = {**marie, "case_id": 22, "subject": "Irène Curie", "prompt": "Irène Curie worked in the field of",
             "rephrase_prompt": "Irène Curie's area of work is", "ground_truth": "chemistry"}
    (project / "tok.json").write_text(json.dumps(FLAT + [marie, irene]))
    out = project / "run-tok"
    r = run(project, "bench", "counterfact", "--records", str(project / "tok.json"), "--with-token-neighbors",
            "--methods", "rome,rome-r1", "--variant", "soft:insert=family", "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert validate("bench", report) == []
    assert report["settings"]["token_neighbors"]["records_with"] == 3  # the three Curies, nothing else
    rows = [json.loads(line) for line in (out / "unedited.jsonl").read_text().splitlines()]
    by_id = {row["case_id"]: row for row in rows}
    assert sorted(by_id) == [12, 21, 22]
    assert sorted(by_id[12]["token_neighbors"]) == ["Irène Curie", "Marie Curie"]
    assert len(by_id[12]["scores"]["neighborhood_tok"]) == 2  # [NLL new, NLL own answer, acc, acc] per neighbour
    assert report["settings"]["methods"]["soft"]["insert"] == "family"
    for name in ("unedited", "rome", "rome-r1", "soft"):
        m = report["methods"][name]["metrics"]
        assert m["NS_tok"]["n"] == 3 and m["S+"] is not None
        assert m["S+"]["ci95"][0] <= m["S+"]["value"] <= m["S+"]["ci95"][1]
    assert len(list((out / "values").glob("*.safetensors"))) == 3  # one v* per record, shared by both variants
    # PPL+: held-out perplexity after each edit against the unedited model's (0 for the unedited rows)
    assert report["settings"]["damage"]["tokens"] == 128
    assert report["methods"]["unedited"]["metrics"]["PPL+"]["value"] == 0.0
    edited = [json.loads(line) for line in (out / "rome.jsonl").read_text().splitlines()]
    assert all(row["heldout_nll"] != by_id[12]["heldout_nll"] for row in edited)
    ppl = [100 * math.expm1(row["heldout_nll"] - by_id[12]["heldout_nll"]) for row in edited]
    assert report["methods"]["rome"]["metrics"]["PPL+"]["value"] == pytest.approx(sum(ppl) / len(ppl))
    assert any("NS_tok / NM_tok" in note for note in report["notes"])
    for bad in ("rome:layer=1", "x:nope=1", "x:layer=one", "X:layer=1"):
        r = run(project, "bench", "counterfact", "--records", str(project / "tok.json"), "--variant", bad,
                "--out", str(project / "run-bad"))
        assert r.exit_code != 0 and "--variant" in r.output and not (project / "run-bad").exists()


def test_counterfact_bench_writes_a_table4_report_and_resumes(project):
    out = project / "run"
    r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--n", "4", "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert validate("bench", report) == []
    assert set(report["methods"]) == {"unedited", "rome", "ft", "ftl", "kn"}
    for name, m in report["methods"].items():
        assert m["n"] == 4
        for key in ("S", "ES", "EM", "PS", "PM", "NS", "NM", "ES_acc", "PS_acc", "NS_acc"):
            est = m["metrics"][key]
            assert est["ci95"][0] <= est["value"] <= est["ci95"][1], (name, key)
        assert m["metrics"]["GE"]["n"] == 3  # generation on the first 3 records only
        assert (m["seconds_per_edit"] is None) == (name == "unedited")
    es = {name: m["metrics"]["ES"]["value"] for name, m in report["methods"].items()}
    assert es["rome"] > es["unedited"], es  # the edits take on the tiny model too
    md = (out / "report.md").read_text()
    assert "| Method | S | S+ | ES | EM | PS | PM | NS | NM | NS_tok | NM_tok | GE | RS | PPL+ | s/edit |" in md
    assert "| FT+L |" in md
    assert "dataset" in report["settings"]["dataset"]["generation_prompts"] or "subject" in \
        report["settings"]["dataset"]["generation_prompts"]

    # Resume after a crash: drop ft's last record and leave a torn line; only that record is redone.
    lines = (out / "ft.jsonl").read_text().splitlines(keepends=True)
    (out / "ft.jsonl").write_text("".join(lines[:-1]) + '{"case_id": 14, "sco')
    kept = (out / "rome.jsonl").read_bytes()
    r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--n", "4", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "rome.jsonl").read_bytes() == kept  # nothing re-run
    redone = (out / "ft.jsonl").read_text().splitlines(keepends=True)
    assert len(redone) == 4 and redone[:3] == lines[:3]
    again = json.loads((out / "report.json").read_text())
    assert again["methods"]["ft"]["metrics"]["ES"] == report["methods"]["ft"]["metrics"]["ES"]

    # A look at a run in progress: --partial runs nothing and reports on the records every method finished.
    (out / "kn.jsonl").write_text("".join((out / "kn.jsonl").read_text().splitlines(keepends=True)[:2]))
    r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--n", "4", "--out", str(out),
            "--partial")
    assert r.exit_code == 0, r.output
    partial = json.loads((out / "report-partial.json").read_text())
    assert validate("bench", partial) == [] and {m["n"] for m in partial["methods"].values()} == {2}
    assert any("the 2 records (of 4)" in note for note in partial["notes"])
    assert len((out / "kn.jsonl").read_text().splitlines()) == 2  # nothing was run

    # The same folder with other hyper-parameters is refused.
    other = yaml.safe_load((project / "params.yaml").read_text())
    other["ft"]["lr"] = 0.5
    (project / "other.yaml").write_text(yaml.safe_dump(other))
    r = CliRunner().invoke(main, ["--params", str(project / "other.yaml"), "--cache", str(project / "cache"),
                                  "bench", "counterfact", "--records", str(project / "cf.json"), "--n", "4",
                                  "--methods", "ft", "--out", str(out)])
    assert r.exit_code != 0 and "method 'ft' was run with other hyper-parameters" in r.output


def test_two_shards_share_one_run(project):
    out = project / "sharded"
    for k in (1, 2):
        r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--n", "3", "--methods", "ft",
                "--out", str(out), "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
    ids = {k: [json.loads(line)["case_id"] for line in (out / f"ft.shard{k}of2.jsonl").read_text().splitlines()]
           for k in (1, 2)}
    assert ids == {1: [11, 13], 2: [12]}
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["ft"]["n"] == 3  # the last shard to finish reports on all records
    r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--shard", "3/2",
            "--out", str(out))
    assert r.exit_code != 0 and "--shard" in r.output


def test_zsre_bench(project):
    out = project / "zsre"
    r = run(project, "bench", "zsre", "--records", str(project / "zsre.json"), "--methods", "rome,ft",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert validate("bench", report) == []
    assert set(report["methods"]["rome"]["metrics"]) == {"Efficacy", "Paraphrase", "Specificity"}
    nll = {m: [json.loads(line)["scores"]["efficacy"][0] for line in (out / f"{m}.jsonl").read_text().splitlines()]
           for m in ("unedited", "rome")}
    assert all(e < u for e, u in zip(nll["rome"], nll["unedited"]))  # the new answer got likelier
    assert "| Method | Efficacy | Paraphrase | Specificity | s/edit |" in (out / "report.md").read_text()


@pytest.mark.parametrize("content, message", [
    ("not json", "invalid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    (json.dumps([{**FLAT[0], "subject": "Nobody"}]), "record 0: missing or invalid field 'subject'"),
    (json.dumps([{k: v for k, v in FLAT[0].items() if k != "target_new"}]), "record 0: missing or invalid field 'target_new'"),
])
def test_bad_records_fail_with_one_line(project, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = run(project, "bench", "counterfact", "--records", str(bad), "--out", str(tmp_path / "o"))
    assert r.exit_code == 1
    assert message in r.output and str(bad) in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_method_fails_with_one_line(project, tmp_path):
    r = run(project, "bench", "counterfact", "--records", str(project / "cf.json"), "--methods", "rome,mend",
            "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and "unknown method 'mend'" in r.output


@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in ZSRE[0].items() if k != "alt"}, "record 0: missing or invalid field 'alt'"),
    ({**ZSRE[0], "subject": "Quercus"}, "record 0: missing or invalid field 'subject' (not found in src)"),
    ({**ZSRE[0], "rephrase": ""}, "record 0: missing or invalid field 'rephrase' (must be a non-empty string)"),
])
def test_bad_zsre_records_fail_with_one_line(project, tmp_path, record, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([record]))
    r = run(project, "bench", "zsre", "--records", str(bad), "--out", str(tmp_path / "o"))
    assert r.exit_code == 1 and message in r.output and str(bad) in r.output
    assert len(r.output.strip().splitlines()) == 1
