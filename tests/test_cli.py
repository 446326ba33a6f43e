"""The romeflow CLI end to end on a tiny GPT-2 saved as a Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from romeflow.cli import main
from romeflow.pipeline.deltas import load_delta

from conftest import EDIT_LAYER

CURIE = """
edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    target_true: physics
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_lm, corpus_files):
    """A folder with a tiny model, a params file, a manifest and a cache."""
    root = tmp_path_factory.mktemp("project")
    lm = tiny_lm("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    params = {"model": str(root / "model"),
              "stats": {"corpus": [str(p) for p in corpus_files], "tokens": 3000, "seq_len": 64},
              "rome": {"layer": EDIT_LAYER, "prefix_lengths": [3, 5], "prefixes_per_length": 2, "steps": 6,
                       "lr": 0.1, "weight_decay": 0.0, "kl_factor": 0.0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "curie.yaml").write_text(CURIE)
    return root


def run(project, *args):
    runner = CliRunner()
    return runner.invoke(main, ["--params", str(project / "params.yaml"), "--cache", str(project / "cache"), *args])


def test_apply_writes_a_delta_and_a_table(project):
    r = run(project, "apply", str(project / "curie.yaml"), "--out", str(project / "d1.safetensors"))
    assert r.exit_code == 0, r.output
    assert "P before" in r.stdout and "medicine" in r.stdout
    delta = load_delta(project / "d1.safetensors")
    assert delta.meta["manifest"]["name"] == "curie"
    assert delta.meta["edits"][0]["layer"] == EDIT_LAYER


def test_apply_twice_is_byte_identical(project):
    for name in ("t1", "t2"):
        r = run(project, "apply", str(project / "curie.yaml"), "--out", str(project / f"{name}.safetensors"))
        assert r.exit_code == 0, r.output
    assert (project / "t1.safetensors").read_bytes() == (project / "t2.safetensors").read_bytes()


def test_bad_manifest_exits_non_zero_with_one_line_and_writes_nothing(project):
    bad = project / "bad.yaml"
    bad.write_text("edits:\n  - {subject: Pierre Curie, relation: '{} is', target: ''}\n")
    out = project / "bad.safetensors"
    r = run(project, "apply", str(bad), "--out", str(out))
    assert r.exit_code != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"{bad}: edits[0].target: must not be empty" in lines[0]
    assert not out.exists()


def test_generate_with_and_without_delta(project, tiny_lm):
    run(project, "apply", str(project / "curie.yaml"), "--out", str(project / "g.safetensors"))
    prompt = "Pierre Curie worked in the field of"
    tok = tiny_lm("gpt2").tokenizer
    first = tok.decode(tok(" medicine").input_ids[0])  # the target's first token
    args = [prompt, "--json", "--max-new-tokens", "3", "--top-k", str(len(tok))]
    base = run(project, "generate", *args)
    edited = run(project, "generate", *args, "--delta", str(project / "g.safetensors"))
    assert base.exit_code == 0 and edited.exit_code == 0, base.output + edited.output
    b, e = json.loads(base.stdout), json.loads(edited.stdout)
    assert len(b["top"]) == len(tok) and b["top"] != e["top"]
    p = lambda res: next(t["p"] for t in res["top"] if t["token"] == first)  # noqa: E731
    assert p(e) > p(b)


def test_export_writes_base_plus_delta(project):
    from transformers import AutoModelForCausalLM

    run(project, "apply", str(project / "curie.yaml"), "--out", str(project / "x.safetensors"))
    r = run(project, "export", str(project / "exported"), "--delta", str(project / "x.safetensors"))
    assert r.exit_code == 0, r.output
    base = AutoModelForCausalLM.from_pretrained(project / "model")
    exported = AutoModelForCausalLM.from_pretrained(project / "exported")
    delta = load_delta(project / "x.safetensors")
    up = delta.updates[0]
    want = base.get_submodule(up.module).weight.data.t() + torch.outer(up.u, up.v)  # Conv1D: (d_in, d_out) storage
    assert torch.equal(exported.get_submodule(up.module).weight.data.t(), want)
    assert json.loads((project / "exported" / "romeflow-export.json").read_text())["deltas"][0]["manifest"] == "curie"
    again = run(project, "export", str(project / "exported"), "--delta", str(project / "x.safetensors"))
    assert again.exit_code != 0 and "already exists" in again.stderr


def test_stats_writes_a_file(project):
    r = run(project, "stats", "--out", str(project / "s.safetensors"))
    assert r.exit_code == 0, r.output
    from romeflow.engine.statistics import load_stats

    s = load_stats(project / "s.safetensors")
    assert s.layer == EDIT_LAYER and s.meta["tokens"] == 3000


def test_delta_for_another_model_is_refused(project, tiny_lm, tmp_path):
    run(project, "apply", str(project / "curie.yaml"), "--out", str(project / "o.safetensors"))
    other = tiny_lm("gpt2")
    with torch.no_grad():
        other.model.transformer.wte.weight[0, 0] += 1
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    r = run(project, "generate", "x", "--model", str(tmp_path / "other"), "--delta", str(project / "o.safetensors"))
    assert r.exit_code != 0 and "computed on base model" in r.stderr


def test_bad_params_file_is_one_line(project, tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("rome:\n  learning_rate: 3\n")
    r = CliRunner().invoke(main, ["--params", str(p), "apply", str(project / "curie.yaml")])
    assert r.exit_code != 0 and f"{p}: rome.learning_rate: unknown field" in r.stderr
