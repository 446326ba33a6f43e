"""Causal tracing on tiny random models of every architecture, the CLI, and `layer: auto`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from romeflow.tracing import causal as tr
from romeflow.cli import main
from romeflow.params import ConfigError, load_params as load_settings, parse_params
from romeflow.pipeline.manifests import ManifestError, load_manifest
from romeflow.engine.models import blocks, num_layers
from romeflow.schemas import validate

from conftest import ARCHS, EDIT_LAYER

PROMPT = "The Space Needle is located in"
SUBJECT = "Space Needle"
FAST = tr.TraceParams(samples=2, window=2, batch_rows=64)


def _block_inputs(lm, ids, noise=None):
    """The input of block 0 at every position (B, T, d), with optional subject noise."""
    seen = {}

    def grab(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = blocks(lm.model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tr.run(lm, ids, 0, noise)
    finally:
        h.remove()
    return seen["x"]


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_subject_range_covers_exactly_the_subject_tokens(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    a, b = tr.subject_range(lm.tokenizer, PROMPT, SUBJECT)
    ids = lm.tokenizer(PROMPT).input_ids
    assert lm.tokenizer.decode(ids[a:b]).strip() == SUBJECT
    assert SUBJECT not in lm.tokenizer.decode(ids[a + 1:b]) and SUBJECT not in lm.tokenizer.decode(ids[a:b - 1])
    with pytest.raises(ValueError, match="not found"):
        tr.subject_range(lm.tokenizer, PROMPT, "Eiffel Tower")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_noise_is_zero_outside_the_subject_and_equal_to_the_sample_inside(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    p = tr.make_prompt(lm, PROMPT, SUBJECT)
    a, b = p.subject
    samples = tr.subject_noise(3, b - a, lm.model.config.hidden_size, 0.5, seed=7)
    ids = p.ids[None].expand(3, -1)
    clean = _block_inputs(lm, ids)
    noisy = _block_inputs(lm, ids, tr.Noise(p.subject, samples, torch.arange(3)))
    diff = noisy - clean  # (3, T, d)
    assert torch.equal(diff[:, :a], torch.zeros_like(diff[:, :a]))
    assert torch.equal(diff[:, b:], torch.zeros_like(diff[:, b:]))
    # (x + n) − x vs n: two float32 roundings of O(1) values, ≲ 3e-7 (1.2e-7 measured); atol 1e-5 on that scale
    torch.testing.assert_close(diff[:, a:b], samples, atol=1e-5, rtol=0)
    assert torch.equal(samples, tr.subject_noise(3, b - a, lm.model.config.hidden_size, 0.5, seed=7))  # seeded


def test_states_before_the_subject_are_untouched_by_the_noise(tiny_lm):
    lm = tiny_lm("gpt2")
    p = tr.make_prompt(lm, "Many people visit Paris every summer", "Paris")
    runs = tr.clean_and_corrupted(lm, p, tr.embedding_std(lm), FAST)
    a = p.subject[0]
    assert a > 0
    for (kind, layer), corrupted in runs.corrupted.items():
        for s in range(runs.samples):
            assert torch.equal(corrupted[s, :a], runs.clean[(kind, layer)][:a]), (kind, layer)
    assert not torch.equal(runs.corrupted[("hidden", 0)][0, a], runs.clean[("hidden", 0)][a])


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_restoring_every_state_gives_back_the_clean_probability_exactly(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    p = tr.make_prompt(lm, PROMPT, SUBJECT)
    runs = tr.clean_and_corrupted(lm, p, tr.embedding_std(lm), FAST)
    S, T, L = runs.samples, p.length, num_layers(lm.model)
    assert runs.p_corrupted.mean() != runs.p_clean
    rows, positions = torch.arange(S).repeat_interleave(T), torch.arange(T).repeat(S)  # every (sample, token)
    ids, noise = p.ids[None].expand(S, -1), tr.Noise(p.subject, runs.noise, torch.arange(S))
    everything = [tr.Patch(kind, l, rows, positions, runs.clean[(kind, l)][positions])
                  for kind in tr.KINDS for l in range(L)]
    first_layer = [tr.Patch("hidden", 0, rows, positions, runs.clean[("hidden", 0)][positions])]
    clean_batch, _ = tr.run(lm, ids, p.target_id)  # the clean run with the same batch shape
    assert clean_batch.tolist() == pytest.approx([runs.p_clean] * S, rel=1e-6)  # batch size: rounding only
    for patches in (everything, first_layer):
        probs, _ = tr.run(lm, ids, p.target_id, noise, patches)
        assert torch.equal(probs, clean_batch)  # bit for bit


@pytest.mark.parametrize("model_type", ARCHS)
def test_trace_grid_on_every_architecture(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    t = tr.trace_prompt(lm, PROMPT, SUBJECT, None, FAST)
    assert validate("trace", t) == []
    T, L = len(t["tokens"]), num_layers(lm.model)
    assert t["model"]["layers"] == L and T == len(lm.tokenizer(PROMPT).input_ids)
    for kind in tr.KINDS:
        grid = t["restored"][kind]
        assert len(grid) == T and all(len(r) == L for r in grid)
        assert all(0.0 <= v <= 1.0 for r in grid for v in r)
    te = t["p_clean"] - t["p_corrupted"]
    # The last token's hidden state in the last layer decides the output: restoring it restores everything
    # (up to batch-shape rounding of probabilities ≤ 1: ≤ 4e-9 measured; abs 1e-6 on that scale).
    assert t["indirect_effect"]["hidden"][T - 1][L - 1] == pytest.approx(te, abs=1e-6)
    # Tokens before the subject were never corrupted: restoring them changes nothing.
    a = t["subject_range"][0]
    for kind in tr.KINDS:
        for row in t["indirect_effect"][kind][:a]:
            assert row == pytest.approx([0.0] * L, abs=1e-6)
    # Seeded: the same trace twice.
    again = tr.trace_prompt(lm, PROMPT, SUBJECT, None, FAST)
    assert again["restored"] == t["restored"]


def test_severing_after_the_last_layer_changes_nothing_and_window_is_clipped(tiny_lm):
    lm = tiny_lm("llama")
    p = tr.make_prompt(lm, PROMPT, SUBJECT)
    runs = tr.clean_and_corrupted(lm, p, tr.embedding_std(lm), FAST)
    L, t = num_layers(lm.model), p.last_subject
    probs = tr.restored_probs(lm, runs, [tr.Restore("hidden", t, L - 1), tr.Restore("hidden", t, L - 1, "mlp"),
                                         tr.Restore("hidden", t, 0), tr.Restore("hidden", t, 0, "attn")], FAST)
    assert probs[0] == probs[1]
    assert probs[2] != probs[3]
    assert list(tr.window_layers(0, 10, 18)) == list(range(0, 5))
    assert list(tr.window_layers(9, 10, 18)) == list(range(4, 14))
    assert list(tr.window_layers(17, 10, 18)) == list(range(12, 18))
    assert list(tr.window_layers(1, 1, 3)) == [1]


def _known_facts(lm, path):
    """Facts the tiny model 'knows': their attribute is its own greedy next token."""
    prompts = [("Pierre Curie", "Pierre Curie was born in"), ("The Space Needle", "The Space Needle is located in"),
               ("Paris", "Paris is the capital of"), ("Rome", "Rome is the capital of"),
               ("Marie Curie", "Marie Curie won the"), ("The river", "The river flows through")]
    facts = []
    for i, (subject, prompt) in enumerate(prompts):
        top = int(tr.next_token_probs(lm, torch.tensor([lm.tokenizer(prompt).input_ids]))[0].argmax())
        facts.append({"known_id": i, "subject": subject, "prompt": prompt,
                      "attribute": lm.tokenizer.decode([top]).strip() or "x"})
    facts.insert(1, {"known_id": 99, "subject": "Paris", "prompt": "Paris is a", "attribute": "zzzz qqq"})
    path.write_text(json.dumps(facts))
    return facts


def test_average_over_facts_is_resumable_and_valid(tiny_lm, tmp_path):
    lm = tiny_lm("gpt2")
    facts_path = tmp_path / "facts.json"
    _known_facts(lm, facts_path)
    facts = tr.load_facts(facts_path)
    known = [f for f in facts if tr.greedy_matches(lm, f.prompt, f.attribute)]
    assert len(known) >= 3 and 99 not in [f.known_id for f in known]
    params = tr.TraceParams(n=3, samples=2, window=2)
    rows_path = tmp_path / "rows.jsonl"
    avg = tr.trace_average(lm, params, facts_path, tmp_path / "out", rows_path)
    assert avg["facts"]["correct"] == 3 and avg["facts"]["checked"] >= 4
    assert validate("trace-average", avg) == []
    layer = json.loads((tmp_path / "out" / "layer.json").read_text())
    assert validate("trace-layer", layer) == []
    assert layer["layer"] == max(range(num_layers(lm.model)), key=lambda l: avg["effects"]["mlp"]["last_subject"]["mean"][l])
    assert tr.read_layer(tmp_path / "out" / "layer.json") == layer["layer"]
    for name in ("average.png", "average.svg", "severed.png", "severed.svg"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    row = next(r for r in map(json.loads, rows_path.read_text().splitlines()) if r["correct"])
    L = num_layers(lm.model)
    assert row["effects"]["hidden"]["last"][L - 1] == pytest.approx(row["p_clean"] - row["p_corrupted"], abs=1e-6)
    # Resuming reuses every row: nothing is recomputed, the average is the same.
    before = rows_path.read_text()
    again = tr.trace_average(lm, params, facts_path, tmp_path / "out", rows_path)
    assert rows_path.read_text() == before
    assert again["effects"] == avg["effects"] and again["ate"] == avg["ate"]
    # Rows of another method are dropped, not mixed in.
    other = tr.TraceParams(n=1, samples=1, window=2)
    tr.trace_average(lm, other, facts_path, tmp_path / "out2", rows_path)
    header = tr.run_header(lm, other, tr.embedding_std(lm))
    assert all(json.loads(l)["header"] == header for l in rows_path.read_text().splitlines())


def test_average_ci_and_bad_inputs(tmp_path):
    assert tr.mean_ci([1.0, 1.0, 1.0]) == (1.0, 0.0)
    m, ci = tr.mean_ci([0.0, 2.0])
    assert m == 1.0 and ci == pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "X", "prompt": "Y is", "attribute": "Z"}]))
    with pytest.raises(ValueError, match=r"bad.json: \[0\].subject"):
        tr.load_facts(bad)
    with pytest.raises(FileNotFoundError, match="cannot read"):
        tr.read_layer(tmp_path / "missing.json")
    (tmp_path / "l.json").write_text('{"layer": -1}')
    with pytest.raises(ValueError, match="layer"):
        tr.read_layer(tmp_path / "l.json")
    with pytest.raises(ConfigError, match="trace.samples: must be >= 1, got 0"):
        parse_params({"trace": {"samples": 0}})
    with pytest.raises(ConfigError, match="trace.sample: unknown field"):
        parse_params({"trace": {"sample": 3}})


# --------------------------------------------------------------------------------------------------
# CLI and `layer: auto`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_lm, corpus_files):
    root = tmp_path_factory.mktemp("trace-project")
    lm = tiny_lm("gpt2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    _known_facts(lm, root / "facts.json")
    params = {"model": str(root / "model"),
              "stats": {"corpus": [str(p) for p in corpus_files], "tokens": 3000, "seq_len": 64},
              "rome": {"layer": "auto", "prefix_lengths": [3], "prefixes_per_length": 2, "steps": 3,
                       "lr": 0.1, "weight_decay": 0.0, "kl_factor": 0.0},
              "trace": {"facts": str(root / "facts.json"), "n": 2, "samples": 2, "window": 2, "out": "traced"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def cli(project, *args):
    return CliRunner().invoke(main, ["--params", str(project / "params.yaml"), "--cache", str(project / "cache"), *args])


def test_cli_trace_writes_json_and_heatmaps(project):
    out = project / "t" / "space.json"
    r = cli(project, "trace", PROMPT, "--subject", SUBJECT, "--target", "Seattle", "--samples", "2",
            "--out", str(out), "--plot", str(project / "t" / "space.png"), "--plot", str(project / "t" / "space.svg"))
    assert r.exit_code == 0, r.output
    t = json.loads(out.read_text())
    assert validate("trace", t) == [] and t["target_given"] == "Seattle" and t["params"]["samples"] == 2
    assert "largest indirect effects" in r.stdout
    assert (project / "t" / "space.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (project / "t" / "space.svg").read_bytes()[:500]


@pytest.mark.parametrize("args, message", [
    (["--subject", "Eiffel Tower"], "not found in the prompt"),
    (["--subject", SUBJECT, "--plot", "x.pdf"], "must end in .png or .svg"),
    (["--subject", SUBJECT, "--samples", "0"], "--samples: must be >= 1, got 0"),
])
def test_cli_trace_bad_input_is_one_line(project, args, message):
    r = cli(project, "trace", PROMPT, *args)
    assert r.exit_code != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("Error")]
    assert len(errors) == 1 and message in errors[0]


def test_layer_auto_before_and_after_trace_average(project):
    # Before the trace: anything that needs the layer fails with one line naming the file and field.
    with pytest.raises(ConfigError, match=r"params.yaml: rome.layer: auto: .*traced.*layer.json"):
        load_settings(project / "params.yaml")
    r = cli(project, "stats")
    assert r.exit_code != 0 and "rome.layer: auto" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # trace-average writes the layer; then `auto` means it.
    r = cli(project, "trace-average")
    assert r.exit_code == 0, r.output
    assert "layer: auto ->" in r.stdout
    chosen = tr.read_layer(project / "traced" / "layer.json")
    assert load_settings(project / "params.yaml").rome.layer == chosen
    # A manifest's `layer: auto` resolves to the same layer; romeflow apply edits it there.
    manifest = project / "auto.yaml"
    manifest.write_text("layer: auto\nedits:\n  - {subject: Pierre Curie, relation: '{} worked in the field of', "
                        "target: medicine}\n")
    m = load_manifest(manifest)
    with pytest.raises(ManifestError, match="auto"):
        m.layer_of(m.edits[0], 0)
    assert load_settings(project / "params.yaml").resolve_manifest(m).layer_of(m.edits[0], 0) == chosen
    r = cli(project, "apply", str(manifest), "--out", str(project / "auto.safetensors"))
    assert r.exit_code == 0, r.output
    from romeflow.pipeline.deltas import load_delta

    assert load_delta(project / "auto.safetensors").meta["edits"][0]["layer"] == chosen


def test_manifest_layer_must_be_an_index_or_auto(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("edits:\n  - {subject: A, relation: '{} is', target: b, layer: top}\n")
    with pytest.raises(ManifestError, match=r"edits\[0\].layer"):
        load_manifest(p)
    p.write_text(f"edits:\n  - {{subject: A, relation: '{{}} is', target: b, layer: {EDIT_LAYER}}}\n")
    assert load_manifest(p).edits[0].layer == EDIT_LAYER


# --------------------------------------------------------------------------------------------------
# The real default model (Gemma-3-270M): one fact, few samples
# --------------------------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.skipif(__import__("os").environ.get("ROMEFLOW_SKIP_REAL") == "1", reason="ROMEFLOW_SKIP_REAL=1")
def test_one_fact_on_gemma():
    from romeflow.engine.models import load_model

    lm = load_model("gemma-3-270m")
    assert tr.greedy_matches(lm, "The Space Needle is located in the city of", "Seattle")
    fact = tr.Fact(0, "The Space Needle", "The Space Needle is located in the city of", "Seattle")
    row = tr.fact_effects(lm, fact, tr.embedding_std(lm), tr.TraceParams(samples=2))
    L = lm.num_layers
    assert row["p_clean"] > 0.2 and row["p_corrupted"] < row["p_clean"] / 2  # the noise destroys the fact
    assert row["effects"]["hidden"]["last"][L - 1] == pytest.approx(row["p_clean"] - row["p_corrupted"], abs=1e-5)
    mlp = row["effects"]["mlp"]["last_subject"]
    assert max(mlp) > 0.05 and mlp.index(max(mlp)) < L // 2  # an early-to-middle MLP peak at the subject


def test_stage_scripts_stop_with_one_line_before_the_trace(tmp_path):
    from romeflow.params import stage_params as stage_settings

    (tmp_path / "params.yaml").write_text("rome: {layer: auto}\n")
    with pytest.raises(SystemExit, match=r"^Error: .*params.yaml: rome.layer: auto: .*layer.json: cannot read"):
        stage_settings(tmp_path / "params.yaml")
    assert stage_settings(tmp_path / "params.yaml", resolve_auto=False).layer_auto
