"""The DVC workflow: the manifest registry, eval and stack reports with their gates, status, verify,
diff across git revisions, and (marker ``workflow``) real `dvc repro` runs in a temporary git repo."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from romeflow.cli import main
from romeflow.params import ConfigError, load_params
from romeflow.pipeline.deltas import DeltaError, load_delta
from romeflow.pipeline.compose import EditedModel, JointSolve
from romeflow.evaluation.scoring import evaluate_manifest, text_predictions
from romeflow.pipeline.history import diff_reports, metric_rows, read_reports
from romeflow.pipeline.manifests import load_manifest
from romeflow.engine.models import load_model
from romeflow.pipeline.registry import edit_manifest_list, read_manifests, register, unregister
from romeflow.schemas import validate
from romeflow.engine.statistics import load_stats
from romeflow.pipeline.workflow import Gate, Layout, edited_weights_sha256, eval_manifest, eval_stack, stack_gate

from conftest import EDIT_LAYER, corpus_text

REPO = Path(__file__).resolve().parent.parent

MANIFESTS = {
    "a": """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    target_true: physics
    paraphrases: ["Pierre Curie was a French"]
    neighbors: ["Albert Einstein worked in the field of", {prompt: "Marie Curie won the Nobel", answer: Prize}]
""",
    "b": """edits:
  - subject: The Space Needle
    relation: "{} is located in"
    target: Paris
    target_true: Seattle
    paraphrases: ["The Space Needle was built for a"]
    neighbors: ["The Eiffel Tower is located in"]
""",
    "c": """edits:
  - subject: Isaac Newton
    relation: "{} was born in"
    target: Italy
    target_true: England
    neighbors: ["Albert Einstein was born in"]
""",
    # tuned to fail the gate: its neighbour is its own rewrite prompt, still expected to say the old answer
    "bad": """edits:
  - subject: Danielle Darrieux
    relation: "The mother tongue of {} is"
    target: Italian
    target_true: French
    neighbors: [{prompt: "The mother tongue of Danielle Darrieux is", answer: French}]
""",
}

# reference names for `rome.protect_sources: [data/names.txt]`: eval asks those sharing an edited
# subject's last token
NAMES = "Marie Curie\nEve Curie\nJacques Curie\nIrene Curie\nAlbert Einstein\nThe Eiffel Tower\nIsaac Newton\n"

PARAMS = """# tiny project for the workflow tests
model: {model}               # a Hugging Face folder

stats:
  corpus: [data/corpus0.txt, data/corpus1.txt]
  tokens: 3000
  seq_len: 64

rome:
  layer: {layer}
  prefix_lengths: [3, 5]
  prefixes_per_length: 2
  steps: 6
  lr: 0.1
  weight_decay: 0.0
  kl_factor: 0.0

eval:                        # token-sharing subjects from rome.protect_sources (default: the Wikipedia names)
  token_neighbors: 3

manifests:                   # the active edits
  - a
  - b

stack:
  heldout: data/heldout.txt
  window: 64

gate:
  eval:
    ES: 100
    NS: 50
  stack:
    max_perplexity_increase: 50
    min_neighbor_kept: 0
    max_interference: 100
"""


def make_project(root: Path, model_dir: Path, manifests=("a", "b", "c", "bad"), active=("a", "b")) -> Path:
    """A romeflow project folder: params.yaml, edits/, data/ (corpus and held-out text)."""
    (root / "edits").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    for name in manifests:
        (root / "edits" / f"{name}.yaml").write_text(MANIFESTS[name])
    for i in range(2):
        (root / "data" / f"corpus{i}.txt").write_text(corpus_text(seed=i, n_paragraphs=30))
    (root / "data" / "heldout.txt").write_text(corpus_text(seed=99, n_paragraphs=4))
    (root / "data" / "names.txt").write_text(NAMES)
    params = PARAMS.format(model=model_dir, layer=EDIT_LAYER)
    params = params.replace("  - a\n  - b\n", "".join(f"  - {n}\n" for n in active))
    (root / "params.yaml").write_text(params)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir):
    """A project with deltas/a, deltas/b and deltas/bad computed by `romeflow apply` (read-only: copy to edit)."""
    root = make_project(tmp_path_factory.mktemp("project"), model_dir)
    for name in ("a", "b", "bad"):
        r = cli(root, "apply", str(root / "edits" / f"{name}.yaml"), "--out", str(root / "deltas" / f"{name}.safetensors"))
        assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def project(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "p", ignore=shutil.ignore_patterns("cache")))


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir))


def cli(root: Path, *args):
    """`romeflow --params root/params.yaml ...` run from the project root, as dvc runs stages."""
    with contextlib.chdir(root):
        return CliRunner().invoke(main, ["--params", str(root / "params.yaml"), "--cache", str(root.parent / "cache"),
                                         *args])


def one_line(result) -> str:
    """The error: one line, the last on stderr (progress lines such as "loaded ..." may precede it)."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


# --------------------------------------------------------------------------------------------------
# The registry: params.yaml manifests:, edited as text
# --------------------------------------------------------------------------------------------------


def test_register_adds_one_line_and_unregister_restores_the_file_exactly(tmp_path):
    p = tmp_path / "params.yaml"
    original = ("# top comment\nrome:\n  lr: 0.1   # tuned\n\nmanifests:     # active\n  - curie\n  # a comment\n"
                "  - sports  # two edits\n\ngate:\n  eval: {ES: 80}\n")
    p.write_text(original)
    register(p, "space_needle")
    text = p.read_text()
    assert text == original.replace("  - sports  # two edits\n", "  - sports  # two edits\n  - space_needle\n")
    assert read_manifests(p) == ["curie", "sports", "space_needle"]
    unregister(p, "space_needle")
    assert p.read_text() == original
    unregister(p, "curie")
    assert "# a comment" in p.read_text() and read_manifests(p) == ["sports"]


def test_flow_lists_empty_lists_and_a_missing_key():
    assert edit_manifest_list("model: x\nmanifests: [a, b]  # hi\n", add="c") == "model: x\nmanifests: [a, b, c]  # hi\n"
    assert edit_manifest_list("manifests: [a, b]  # hi\n", remove="a") == "manifests: [b]  # hi\n"
    assert edit_manifest_list("manifests: []\n", add="123") == "manifests: ['123']\n"  # stays a string
    assert edit_manifest_list("model: x\n", add="a") == "model: x\nmanifests:\n  - a\n"
    # removing the last item leaves an empty list, not a null (DVC's foreach needs a list)
    assert edit_manifest_list("manifests:  # on\n  - a\nrome: {}\n", remove="a") == "manifests: []  # on\nrome: {}\n"


def test_registry_refuses_duplicates_unknown_names_and_unsafe_edits(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("manifests:\n  - a\n")
    with pytest.raises(ConfigError, match=r"params.yaml: manifests: 'a' is already registered"):
        register(p, "a")
    with pytest.raises(ConfigError, match="'zz' is not registered"):
        unregister(p, "zz")
    with pytest.raises(ConfigError, match="reserved"):
        register(p, "stack")
    with pytest.raises(ConfigError, match="letters, digits"):
        register(p, "a.details")
    odd = "manifests:\n  - name: a\n"  # not a list of names: refused, file untouched
    p.write_text(odd)
    with pytest.raises(ConfigError, match=r"manifests\[0\]: must be a string"):
        register(p, "b")
    assert p.read_text() == odd


def test_add_validates_the_manifest_and_where_it_lives(project):
    before = (project / "params.yaml").read_text()
    r = cli(project, "add", str(project / "edits" / "c.yaml"))
    assert r.exit_code == 0, r.output
    assert read_manifests(project / "params.yaml") == ["a", "b", "c"]
    again = cli(project, "add", str(project / "edits" / "c.yaml"))
    assert again.exit_code != 0 and "'c' is already registered" in one_line(again)
    bad = project / "edits" / "broken.yaml"
    bad.write_text("edits:\n  - {subject: X, relation: '{} is', target: ''}\n")
    r = cli(project, "add", str(bad))
    assert r.exit_code != 0 and f"{bad}: edits[0].target: must not be empty" in one_line(r)
    outside = project / "c.yaml"
    outside.write_text(MANIFESTS["c"])
    r = cli(project, "add", str(outside))
    assert r.exit_code != 0 and "reads manifests from" in one_line(r)
    assert read_manifests(project / "params.yaml") == ["a", "b", "c"]
    assert (project / "params.yaml").read_text().startswith(before.split("manifests:")[0])


def test_revert_unregisters_and_deletes_only_that_manifests_artifacts(project):
    for name in ("a", "b"):
        r = cli(project, "eval", str(project / "edits" / f"{name}.yaml"), "--out", str(project / "reports" / f"{name}.json"),
                "--details", str(project / "reports" / f"{name}.details.json"))
        assert r.exit_code == 0, r.output
    r = cli(project, "revert", "b")
    assert r.exit_code == 0, r.output
    assert read_manifests(project / "params.yaml") == ["a"]
    assert not any((project / p).exists() for p in ("deltas/b.safetensors", "reports/b.json", "reports/b.details.json"))
    assert all((project / p).exists() for p in ("edits/b.yaml", "deltas/a.safetensors", "reports/a.json"))
    r = cli(project, "revert", "b")
    assert r.exit_code != 0 and "'b' is not registered" in one_line(r)


def test_params_errors_name_the_field(tmp_path):
    p = tmp_path / "params.yaml"
    for body, where in [("gate:\n  eval: {XS: 3}\n", "gate.eval.XS: unknown field"),
                        ("gate:\n  stack: {max_ppl: 3}\n", "gate.stack.max_ppl: unknown field"),
                        ("gate:\n  eval: {ES: high}\n", "gate.eval.ES: must be a number"),
                        ("stack:\n  window: 1\n", "stack.window: must be >= 2, got 1"),
                        ("gate:\n  eval: [ES]\n", "gate.eval: must be a mapping"),
                        ("manifests: [a.b]\n", "manifests[0]: manifest name 'a.b' may only contain"),
                        ("manifests: curie\n", "manifests: must be a list")]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=re.escape(f"{p}: {where}")):
            load_params(p)
    p.write_text(PARAMS.format(model="m", layer=1))
    params = load_params(p)
    assert params.manifests == ("a", "b") and params.gate.eval == {"ES": 100.0, "NS": 50.0}
    assert params.stack.window == 64 and params.gate.max_interference == 100.0


# --------------------------------------------------------------------------------------------------
# eval@NAME and stack: reports, gates, plots
# --------------------------------------------------------------------------------------------------


def test_eval_report_is_small_schema_valid_and_equals_evaluate_manifest(built, lm):
    m = load_manifest(built / "edits" / "a.yaml")
    d = load_delta(built / "deltas" / "a.safetensors")
    result = eval_manifest(EditedModel(lm), m, [d])
    report = result.report
    assert validate("report", report) == [] and validate("details", json.loads(json.dumps(result.details))) == []
    assert set(report) == {"format", "manifest", "deltas", "composition", "pre", "post", "other_subjects"}
    assert report["manifest"] == {"name": "a", "sha256": m.sha256} and report["composition"] == {"method": "sum"}
    assert report["deltas"][0]["sha256"] == hashlib.sha256(Path(d.path).read_bytes()).hexdigest()
    plain = evaluate_manifest(EditedModel(lm), m, [d])
    assert report["pre"] == plain["pre"] and report["post"] == plain["post"]
    assert report["post"]["ES"] == 100.0 and report["pre"]["ES"] == 0.0  # the edit works on the tiny model
    assert len(result.details["edits"]) == 1 and result.failures == []


def test_eval_refuses_a_delta_of_another_version_of_the_manifest(project, lm):
    (project / "edits" / "a.yaml").write_text(MANIFESTS["a"].replace("medicine", "music"))
    with pytest.raises(DeltaError, match="computed from another version of"):
        eval_manifest(EditedModel(lm), load_manifest(project / "edits" / "a.yaml"),
                      [load_delta(project / "deltas" / "a.safetensors")])


def test_eval_gate_failure_writes_the_report_then_fails_with_one_line(project):
    out, details = project / "reports" / "bad.json", project / "reports" / "bad.details.json"
    r = cli(project, "eval", str(project / "edits" / "bad.yaml"), "--out", str(out), "--details", str(details), "--gate")
    assert r.exit_code == 1
    assert one_line(r) == f"Error: {out}: manifest bad: post NS = 0.0 is below the gate (gate.eval.NS = 50)"
    report = json.loads(out.read_text())
    assert validate("report", report) == [] and report["post"]["NS"] == 0.0 and details.exists()
    ok = cli(project, "eval", str(project / "edits" / "bad.yaml"), "--out", str(out))  # no --gate: no failure
    assert ok.exit_code == 0, ok.output


def test_eval_shows_what_else_moved_and_gates_on_ns_tok(project):
    """`romeflow eval` asks eval.token_neighbors reference subjects sharing the subject's last token
    (here from data/names.txt), prints which moved, and gate.eval.NS_tok gates on them."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  kl_factor: 0.0\n", "  kl_factor: 0.0\n  protect_sources: [data/names.txt]\n"))
    out = project / "reports" / "a.json"
    r = cli(project, "eval", str(project / "edits" / "a.yaml"), "--out", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    other = report["other_subjects"][0]
    assert other["subject"] == "Pierre Curie" and other["held"] == [] and len(other["asked"]) == 3  # k = 3
    assert set(other["asked"]) <= {"Marie Curie", "Eve Curie", "Jacques Curie", "Irene Curie"}
    assert "other subjects" in r.stdout and f"{3 - len(other['moved'])} of 3" in r.stdout
    line = f"edit 0 (Pierre Curie) also moved {', '.join(x['subject'] for x in other['moved'])}"
    assert (line in r.stdout) == bool(other["moved"])
    ns = report["post"]["NS_tok"]
    params.write_text(params.read_text().replace("    NS: 50\n", f"    NS: 0\n    NS_tok: {ns + 1}\n"))
    r = cli(project, "eval", str(project / "edits" / "a.yaml"), "--out", str(out), "--gate")
    assert r.exit_code == 1
    assert one_line(r) == (f"Error: {out}: manifest a: post NS_tok = {ns:.1f} is below the gate "
                           f"(gate.eval.NS_tok = {ns + 1:g})")


@pytest.fixture(scope="module")
def stacked(built, lm):
    names = ["a", "b"]
    manifests = [load_manifest(built / "edits" / f"{n}.yaml") for n in names]
    deltas = [load_delta(built / "deltas" / f"{n}.safetensors") for n in names]
    return manifests, deltas, eval_stack(EditedModel(lm), manifests, deltas, built / "data" / "heldout.txt", 64)


def test_stack_alone_equals_eval_post_and_interference_is_stack_minus_alone(stacked, lm):
    manifests, deltas, result = stacked
    report = result.report
    assert validate("stack", report) == [] and report["composed"]["manifests"] == ["a", "b"]
    for m, d in zip(manifests, deltas):
        alone = eval_manifest(EditedModel(lm), m, [d]).report
        r = report["manifests"][m.name]
        assert r["alone"] == alone["post"] and r["pre"] == alone["pre"]  # bit for bit: same function, same inputs
        assert r["interference"] == {k: r["stack"][k] - r["alone"][k] for k in r["alone"]}
        assert r["delta_sha256"] == alone["deltas"][0]["sha256"]
    h = report["damage"]["heldout"]
    assert h["perplexity_increase_pct"] == pytest.approx(100 * (h["perplexity_stack"] / h["perplexity_base"] - 1))
    assert report["damage"]["neighbors"]["prompts"] == 3  # a has two neighbours, b one


def test_stack_weights_hash_is_base_plus_the_deltas_and_the_model_is_left_at_base(stacked, lm):
    _, deltas, result = stacked
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base_sha = edited_weights_sha256(lm, deltas)
    edited = EditedModel(lm)
    edited.compose(deltas)
    assert edited_weights_sha256(lm, deltas) == result.report["composed"]["weights_sha256"] != base_sha
    edited.compose(deltas[:1])
    assert edited_weights_sha256(lm, deltas) != result.report["composed"]["weights_sha256"]
    edited.reset()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_a_stack_of_one_manifest_has_no_interference_and_no_damage_without_deltas(built, lm):
    m, d = load_manifest(built / "edits" / "a.yaml"), load_delta(built / "deltas" / "a.safetensors")
    one = eval_stack(EditedModel(lm), [m], [d], built / "data" / "heldout.txt", 64).report
    assert one["manifests"]["a"]["stack"] == one["manifests"]["a"]["alone"]
    assert set(one["manifests"]["a"]["interference"].values()) == {0.0}
    none = eval_stack(EditedModel(lm), [], [], built / "data" / "heldout.txt", 64).report
    assert none["damage"]["heldout"]["perplexity_increase_pct"] == 0.0
    assert none["damage"]["heldout"]["top1_agreement_pct"] == 100.0 and none["gate"]["passed"]


def test_text_predictions_match_the_models_own_loss(lm):
    text = " ".join(corpus_text(seed=5, n_paragraphs=1).split()[:25])
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    assert 20 < len(ids) <= 64
    nll, top1 = text_predictions(lm, text, window=64)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = lm.model(input_ids=x, labels=x)  # GPT-2: no <bos>, so the first token is context only
    assert nll.numel() == len(ids) - 1
    assert nll.mean().item() == pytest.approx(out.loss.item(), rel=1e-5)  # other reductions: rounding (7e-8 measured)
    assert top1.tolist() == out.logits[0, :-1].argmax(-1).tolist()
    short, _ = text_predictions(lm, text, window=10)  # each window's first token is context only
    assert short.numel() == sum(max(len(ids[i:i + 10]) - 1, 0) for i in range(0, len(ids), 10))
    # the first window sees the same context; a shorter sequence: rounding only (rtol 1e-5 by default, 7e-8 measured)
    assert torch.allclose(short[:9], nll[:9], atol=1e-5)


def test_stack_gate_failures_are_one_line_each(stacked):
    report = stacked[2].report
    h = report["damage"]["heldout"]
    strict = Gate(max_perplexity_increase=h["perplexity_increase_pct"] - 1, min_neighbor_kept=101,
                  max_interference=-1)
    failures = stack_gate(report, strict)
    assert len(failures) == 4 and all("\n" not in f for f in failures)
    assert failures[0].startswith("manifest a: S drops by") and "gate.stack.max_interference = -1" in failures[0]
    assert failures[2].startswith("stack: perplexity increase on") and "max_perplexity_increase" in failures[2]
    assert "gate.stack.min_neighbor_kept = 101" in failures[3]
    assert stack_gate(report, Gate()) == []


def test_stack_command_writes_report_markdown_and_plots_then_applies_the_gate(project):
    r = cli(project, "stack", "--gate")
    assert r.exit_code == 0, r.output
    layout = Layout(project)
    report = json.loads(layout.stack_report.read_text())
    assert validate("stack", report) == [] and report["gate"] == {"passed": True, "failures": []}
    md = layout.stack_markdown.read_text()
    assert "| a | 1 |" in md and "| b | 1 |" in md and "perplexity of" in md and "Gate: passed" in md
    scores = json.loads((layout.plots / "scores.json").read_text())
    probs = json.loads((layout.plots / "probabilities.json").read_text())
    assert validate("plot-scores", scores) == [] and validate("plot-probabilities", probs) == []
    assert {(s["manifest"], s["metric"]) for s in scores} >= {("a", "S"), ("b", "ES")}
    assert [p["label"] for p in probs] == ["a#0 rewrite", "a#0 paraphrase 1", "b#0 rewrite", "b#0 paraphrase 1"]

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("min_neighbor_kept: 0", "min_neighbor_kept: 101"))
    layout.stack_report.unlink()
    r = cli(project, "stack", "--gate")
    assert r.exit_code == 1 and "neighbour top-1 kept" in one_line(r) and "min_neighbor_kept = 101" in one_line(r)
    assert json.loads(layout.stack_report.read_text())["gate"]["passed"] is False  # written before failing


def test_stack_joint_solve_then_revert_equals_a_fresh_solve_without_the_manifest(project, tmp_path):
    """stack.method: joint from the CLI: the report says so and differs from the sum; after `romeflow revert b`
    the re-solved stack is bit for bit the stack of a project that never had b."""
    plain = Path(shutil.copytree(project, tmp_path / "plain"))  # stack.method: sum (the default)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  window: 64\n", "  window: 64\n  method: joint\n"))
    fresh = Path(shutil.copytree(project, tmp_path / "fresh"))
    (fresh / "params.yaml").write_text((fresh / "params.yaml").read_text().replace("  - b\n", ""))
    layout = Layout(project)
    r = cli(project, "stack")
    assert r.exit_code == 0, r.output
    joint = json.loads(layout.stack_report.read_text())
    assert validate("stack", joint) == [] and joint["composed"]["method"] == "joint"
    assert "joint solve" in layout.stack_markdown.read_text().splitlines()[0]
    assert cli(plain, "stack").exit_code == 0
    summed = json.loads(Layout(plain).stack_report.read_text())
    assert summed["composed"]["method"] == "sum"
    assert summed["composed"]["weights_sha256"] != joint["composed"]["weights_sha256"]
    r = cli(project, "revert", "b")
    assert r.exit_code == 0, r.output
    r = cli(project, "stack")
    assert r.exit_code == 0, r.output
    after = json.loads(layout.stack_report.read_text())
    r = cli(fresh, "stack")
    assert r.exit_code == 0, r.output
    never = json.loads(Layout(fresh).stack_report.read_text())
    assert after["composed"] == never["composed"] and after["composed"]["manifests"] == ["a"]
    assert after["composed"]["weights_sha256"] != joint["composed"]["weights_sha256"]
    assert after["manifests"]["a"]["stack"] == never["manifests"]["a"]["stack"]


# --------------------------------------------------------------------------------------------------
# status, verify, diff
# --------------------------------------------------------------------------------------------------


def status_of(project) -> dict:
    r = cli(project, "status", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_status_follows_manifests_deltas_reports_and_hyperparameters(project):
    st = status_of(project)
    assert [(e["name"], e["state"], e["report"]) for e in st["manifests"]] == [("a", "ok", "missing"), ("b", "ok", "missing")]
    assert st["stack"] == st["stack_file"] == "missing" and st["model"]["fingerprint"] == load_delta(project / "deltas" / "a.safetensors").base_fingerprint
    (project / "edits" / "a.yaml").write_text(MANIFESTS["a"] + "description: changed\n")
    (project / "deltas" / "b.safetensors").unlink()
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.1", "lr: 0.2"))
    st = status_of(project)
    a, b = st["manifests"]
    assert a["state"] == "stale" and any("a.yaml changed since the delta was computed" in i for i in a["issues"])
    assert any(i == "hyper-parameters differ from params.yaml: lr" for i in a["issues"])
    assert b["state"] == "missing" and b["delta"] == "missing"


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def test_diff_reads_reports_at_git_revisions(tmp_path):
    (tmp_path / "reports").mkdir()
    report = lambda es: {"format": "romeflow.report/1", "manifest": {"name": "a", "sha256": "0" * 64},  # noqa: E731
                         "deltas": [], "pre": {"ES": 0.0}, "post": {"ES": es, "S": 50.0}}
    stack = {"format": "romeflow.stack/1", "manifests": {"a": {"stack": {"ES": 90.0}, "interference": {"ES": -10.0}}},
             "damage": {"heldout": {"perplexity_increase_pct": 1.5, "tokens": 9}}}
    (tmp_path / "reports" / "a.json").write_text(json.dumps(report(100.0)))
    (tmp_path / "reports" / "a.details.json").write_text("{}")
    (tmp_path / "reports" / "stack.json").write_text(json.dumps(stack))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "one")
    (tmp_path / "reports" / "a.json").write_text(json.dumps(report(50.0)))
    assert set(read_reports(tmp_path, "HEAD")) == {"a.json", "stack.json"}
    rows = metric_rows(read_reports(tmp_path, "HEAD"))
    assert rows[("a", "post.ES")] == 100.0 and rows[("a", "stack.ES")] == 90.0
    assert rows[("(stack)", "heldout.perplexity_increase_pct")] == 1.5 and ("(stack)", "heldout.tokens") not in rows
    assert diff_reports(tmp_path) == [{"manifest": "a", "metric": "post.ES", "a": 100.0, "b": 50.0, "change": -50.0}]
    git(tmp_path, "commit", "-qam", "two")
    assert diff_reports(tmp_path, "HEAD~1", "HEAD") == diff_reports(tmp_path, "HEAD~1")
    assert len(diff_reports(tmp_path, "HEAD~1", "HEAD", all_rows=True)) == 6  # pre, post x2, stack, interference, damage

    (tmp_path / "params.yaml").write_text("manifests: [a]\n")
    r = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "diff", "HEAD~1", "--md"])
    assert r.exit_code == 0 and "| a | post.ES | 100 | 50 | -50 |" in r.stdout
    r = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "diff", "nope"])
    assert r.exit_code == 1 and one_line(r) == f"Error: {tmp_path.resolve()}: unknown git revision 'nope'"


# --------------------------------------------------------------------------------------------------
# `dvc repro` end to end in a temporary git repository (python -m pytest -m workflow)
# --------------------------------------------------------------------------------------------------


def add_trace_inputs(repo: Path, lm) -> None:
    """The trace stage's inputs for the tiny model: facts it gets right (its own greedy next token) and a
    `trace:` section asking for two of them."""
    from romeflow.tracing.causal import next_token_probs

    facts = []
    for i, (subject, prompt) in enumerate([("Pierre Curie", "Pierre Curie was born in"),
                                           ("The Space Needle", "The Space Needle is located in"),
                                           ("Paris", "Paris is the capital of"), ("Rome", "Rome is the capital of"),
                                           ("Marie Curie", "Marie Curie won the"), ("The river", "The river flows through")]):
        top = int(next_token_probs(lm, torch.tensor([lm.tokenizer(prompt).input_ids]))[0].argmax())
        facts.append({"known_id": i, "subject": subject, "prompt": prompt,
                      "attribute": lm.tokenizer.decode([top]).strip() or "x"})
    (repo / "data" / "facts.json").write_text(json.dumps(facts))
    (repo / "data" / "known_1000.json").write_text(json.dumps(facts))  # dvc.yaml's edit dep (protect_sources)
    with open(repo / "params.yaml", "a") as f:
        f.write("\ntrace:\n  facts: data/facts.json\n  n: 2\n  samples: 1\n  window: 2\n  batch_rows: 64\n"
                "  out: reports/trace\n")


@pytest.mark.workflow
def test_dvc_repro_runs_exactly_the_stages_that_changed(tmp_path, model_dir, lm):
    repo = make_project(tmp_path / "repo", model_dir, active=("a", "b", "c"))
    add_trace_inputs(repo, lm)
    shutil.copy(REPO / "dvc.yaml", repo)
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "romeflow", repo / "romeflow", ignore=shutil.ignore_patterns("__pycache__"))  # stage deps
    shutil.copy(REPO / ".gitignore", repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "ROMEFLOW_CACHE": str(tmp_path / "cache"), "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd, ok=True):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert r.returncode == 0 or not ok, r.stdout + r.stderr
        return r

    def repro(ok=True):
        r = sh("dvc", "repro", ok=ok)
        return set(re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr)), r

    def computed(r) -> list[str]:
        """The deltas the edit stage computed (one line each, from every rank)."""
        return sorted(re.findall(r"computed (\S+) in [0-9.]+ s \(rank", r.stdout + r.stderr))

    def romeflow(*args):
        r = CliRunner().invoke(main, ["--params", str(repo / "params.yaml"), *args])
        assert r.exit_code == 0, r.output
        return r

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.analytics", "false")
    sh("dvc", "config", "core.check_update", "false")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "project")

    params = repo / "params.yaml"
    params.write_text(params.read_text() + "\nprocesses: 2\n")  # the edit stage over 2 processes (not a dependency)
    ran, r = repro()
    assert ran == {"stats", "edit", "eval@a", "eval@b", "eval@c", "stack", "trace"}
    assert computed(r) == ["a", "b", "c"] and "3 computed (2 processes)" in r.stdout + r.stderr
    assert "(rank 1 of 2)" in r.stdout + r.stderr
    assert validate("trace-layer", json.loads((repo / "reports" / "trace" / "layer.json").read_text())) == []
    for name in ("a", "b", "c"):
        assert validate("report", json.loads((repo / "reports" / f"{name}.json").read_text())) == []
    plots = json.loads(sh("dvc", "plots", "show", "--json").stdout)["data"]
    assert {k: bool(v) for k, v in plots.items()} == dict.fromkeys(
        ["stack_scores", "alone_vs_stack", "target_probability", "target_probability_pre_post"], True)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "first repro")
    assert repro()[0] == set()

    # one manifest changes: the edit stage computes only its delta; only its eval and the stack run again
    (repo / "edits" / "a.yaml").write_text(MANIFESTS["a"].replace("target: medicine", "target: music"))
    ran, r = repro()
    assert ran == {"edit", "eval@a", "stack"} and computed(r) == ["a"]
    assert "1 computed (1 process), 0 from the cache, 2 up to date" in r.stdout + r.stderr  # no process for nothing
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "a: medicine -> music")
    rows = json.loads(romeflow("diff", "HEAD~1", "--json").stdout)["rows"]
    changed = {(r["manifest"], r["metric"]) for r in rows}
    assert ("a", "post.EM") in changed and ("a", "pre.EM") in changed
    assert not any(m in ("b", "c") and metric.startswith(("pre.", "post.")) for m, metric in changed)

    # revert: no delta is computed (the edit stage re-runs on the list of manifests, finds every delta up to
    # date and loads no model); the stack is base + the remaining deltas exactly
    stack_before = json.loads((repo / "reports" / "stack.json").read_text())
    romeflow("revert", "b")
    ran, r = repro()
    assert ran == {"edit", "stack"} and computed(r) == []
    assert "0 computed (1 process), 0 from the cache, 2 up to date" in r.stdout + r.stderr
    assert r.stdout.count("loaded ") + r.stderr.count("loaded ") == 1  # the stack's model only
    stack = json.loads((repo / "reports" / "stack.json").read_text())
    assert stack["composed"]["manifests"] == ["a", "c"]
    assert stack["manifests"]["a"]["alone"] == stack_before["manifests"]["a"]["alone"]
    remaining = [load_delta(repo / "deltas" / f"{n}.safetensors") for n in ("a", "c")]
    edited = EditedModel(lm)
    edited.compose(remaining)
    try:
        assert edited_weights_sha256(lm, remaining) == stack["composed"]["weights_sha256"]
    finally:
        edited.reset()
    assert stack["composed"]["weights_sha256"] != stack_before["composed"]["weights_sha256"]
    assert repro()[0] == set()

    # stack.method: joint: the stack and the per-manifest evals re-run (every command composes by stack:), not
    # the edits; the exported stack is the stack stage's weights; after a revert the export is refused until
    # the stack is re-solved, and then it is the joint solve of the remaining deltas exactly (a fresh solve
    # without the reverted manifest)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  window: 64\n", "  window: 64\n  method: joint\n  margin: 0.5\n"
                                                 "  rounds: 3\n", 1))  # calibrated (docs/method.md)
    assert repro()[0] == {"stack", "eval@a", "eval@c"}
    stack = json.loads((repo / "reports" / "stack.json").read_text())
    assert stack["composed"]["method"] == "joint"
    assert json.loads((repo / "reports" / "a.json").read_text())["composition"]["method"] == "joint"
    romeflow("export", str(tmp_path / "exported"))
    exported = load_model(str(tmp_path / "exported"))  # the same U Vᵀ added to the same base: the same bits
    assert edited_weights_sha256(exported, [load_delta(repo / "deltas" / f"{n}.safetensors") for n in ("a", "c")]) \
        == stack["composed"]["weights_sha256"]
    romeflow("revert", "c")
    r = CliRunner().invoke(main, ["--params", str(repo / "params.yaml"), "export", str(tmp_path / "stale")])
    assert r.exit_code == 1 and "reports/stack.safetensors: deltas: composed ['a', 'c']" in r.stderr
    ran, r = repro()
    assert ran == {"edit", "stack"} and computed(r) == []
    stack = json.loads((repo / "reports" / "stack.json").read_text())
    assert stack["composed"]["manifests"] == ["a"] and stack["composed"]["method"] == "joint"
    fresh = JointSolve(lambda layer: load_stats(repo / "stats" / f"layer{layer}.safetensors").second_moment,
                       margin=0.5, rounds=3)
    remaining = [load_delta(repo / "deltas" / "a.safetensors")]
    edited.compose(remaining, fresh)
    try:
        assert edited_weights_sha256(lm, remaining) == stack["composed"]["weights_sha256"]
    finally:
        edited.reset()
    assert repro()[0] == set()
    params.write_text(params.read_text().replace("  method: joint\n  margin: 0.5\n  rounds: 3\n", "", 1))  # (sum again)

    # a manifest tuned to fail the gate: the repro fails with one line, and its report is written
    romeflow("add", str(repo / "edits" / "bad.yaml"))
    ran, r = repro(ok=False)
    assert r.returncode != 0 and {"edit", "eval@bad"} <= ran <= {"edit", "eval@bad", "eval@a", "stack"}  # eval@a:
    # stack: is back to sum
    assert computed(r) == ["bad"]
    reason = "Error: reports/bad.json: manifest bad: post NS = 0.0 is below the gate (gate.eval.NS = 50)"
    assert reason in (r.stdout + r.stderr).splitlines()
    assert json.loads((repo / "reports" / "bad.json").read_text())["post"]["NS"] == 0.0
