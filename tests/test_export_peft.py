"""`romeflow export --format peft`: a LoRA adapter that peft loads and that equals the merged export."""

from __future__ import annotations

import json

import pytest
import torch

from romeflow.engine import models
from romeflow.pipeline.deltas import Delta
from romeflow.pipeline.compose import EditedModel
from romeflow.pipeline.export import PEFT_CONFIG, lora_factors, write_peft
from romeflow.engine.rome import EditRequest, RankOneUpdate, Rome, RomeParams

from conftest import EDIT_LAYER

peft = pytest.importorskip("peft")

X = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def fake_delta(lm, name: str, updates: list[RankOneUpdate]) -> Delta:
    return Delta(updates, {"manifest": {"name": name, "sha256": name * 64}, "tensors_sha256": (name * 64)[:64],
                           "base_model": {"name": lm.name, "fingerprint": lm.fingerprint}})


def random_update(lm, layer: int, rank: int | None, seed: int) -> RankOneUpdate:
    g = torch.Generator().manual_seed(seed)
    name = models.edited_module_name(lm.model, layer)
    d_out, d_in = models.weight_shape(lm.model, name)
    shape = (lambda d: (d,)) if rank is None else (lambda d: (d, rank))
    return RankOneUpdate(name, layer, 0.3 * torch.randn(shape(d_out), generator=g),
                         0.3 * torch.randn(shape(d_in), generator=g))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text", "gpt_neox"])
def test_peft_adapter_equals_the_merged_model(tmp_path, tiny_lm, second_moment, model_type):
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    edit = Rome(lm, RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=3),
                   lambda layer: stats[layer]).compute(EditRequest("Pierre Curie", "{} worked in the field of", "medicine"))
    deltas = [fake_delta(lm, "a", [edit.update, random_update(lm, EDIT_LAYER, None, 1)]),  # two edits, one module
              fake_delta(lm, "b", [random_update(lm, EDIT_LAYER, 2, 2), random_update(lm, 0, None, 3)])]  # rank 2; layer 0
    out = tmp_path / "adapter"
    config = write_peft(out, lm, deltas, "base")

    name1, name0 = (models.edited_module_name(lm.model, l) for l in (EDIT_LAYER, 0))
    assert config["lora_alpha"] == config["r"] == 4 and config["rank_pattern"] == config["alpha_pattern"] == {name0: 1}
    assert config["fan_in_fan_out"] == (model_type == "gpt2")
    assert json.loads((out / PEFT_CONFIG).read_text()) == config

    adapted = peft.PeftModel.from_pretrained(tiny_lm(model_type).model, out)
    merged = tiny_lm(model_type)
    EditedModel(merged).compose(deltas)  # what --format hf writes
    base = tiny_lm(model_type).model
    with torch.no_grad():
        got, want, before = adapted(input_ids=X).logits, merged.model(input_ids=X).logits, base(input_ids=X).logits
    assert (want - before).abs().max() > 1e-2  # the deltas do change the model
    # x Wᵀ + (x Aᵀ) Bᵀ vs x (W + BA)ᵀ: float32 rounding, measured ≤ 1.4e-6 on logits up to 2.5; a logit near 0
    # carries the rounding of its O(1) terms, hence a floor of 1e-5 of the logits' scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for module in (name1, name0):  # scaling exactly 1
        assert adapted.base_model.model.get_submodule(module).scaling["default"] == 1.0
    # merging the adapter gives the merged weights
    merged_by_peft = adapted.merge_and_unload()
    for module in (name1, name0):  # W + BA vs W + Σ u vᵀ in float32: measured 1 ulp (1.2e-7 on weights ≤ 1.2)
        torch.testing.assert_close(models.weight_out_in(merged_by_peft, module),
                                   models.weight_out_in(merged.model, module), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_the_adapter_of_a_joint_stack_is_its_solved_update(tmp_path, tiny_lm, second_moment, model_type):
    """A joint stack is one update U Vᵀ per module, rank = its edits: the adapter holds B = U, A = Vᵀ and
    equals the merged joint model."""
    from test_joint import PARAMS, one_edit_manifest

    from romeflow.engine.statistics import Stats
    from romeflow.pipeline.compose import JointSolve
    from romeflow.pipeline.deltas import compute_delta

    lm = tiny_lm(model_type)
    c = second_moment(model_type)[EDIT_LAYER]
    stats = {EDIT_LAYER: Stats(c, {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 4000}, "1" * 64)}
    deltas = [compute_delta(lm, one_edit_manifest(n, s, "Paris"), PARAMS, stats)
              for n, s in (("a", "Anna Brandt"), ("b", "Felix Dorn"), ("c", "Hugo Falk"))]
    for d in deltas:
        d.meta["tensors_sha256"] = d.name * 64  # (never saved: the export's provenance names each by this)
    merged = EditedModel(lm, JointSolve(lambda layer: c, ridge=0.05))
    merged.compose(deltas)
    (up,) = merged.updates
    config = write_peft(tmp_path / "adapter", lm, deltas, "base", updates=merged.updates)
    assert config["r"] == config["lora_alpha"] == 3 and config["target_modules"] == [up.module]
    (b, a), = lora_factors(merged.updates).values()
    assert torch.equal(b, up.u) and torch.equal(a, up.v.T)  # B = U, A = Vᵀ: nothing summed or rescaled
    adapted = peft.PeftModel.from_pretrained(tiny_lm(model_type).model, tmp_path / "adapter")
    with torch.no_grad():
        got, want = adapted(input_ids=X).logits, lm.model(input_ids=X).logits
        before = tiny_lm(model_type).model(input_ids=X).logits
    assert (want - before).abs().max() > 1e-3  # the stack does change the model
    # the same float32 rounding as test_peft_adapter_equals_the_merged_model: x Wᵀ + (x Aᵀ) Bᵀ vs x (W + BA)ᵀ
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_lora_factors_stack_every_update_of_a_module(tiny_lm):
    lm = tiny_lm("llama")
    ups = [random_update(lm, 1, None, 1), random_update(lm, 1, 3, 2)]
    (b, a), = lora_factors(ups).values()
    assert b.shape == (ups[0].u.shape[0], 4) and a.shape == (4, ups[0].v.shape[0])
    want = torch.outer(ups[0].u, ups[0].v) + ups[1].u @ ups[1].v.T
    torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-6)


def test_cli_peft_export_loads_and_matches_the_hf_export(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    from test_workflow import cli, make_project

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    r = cli(root, "apply", "edits/a.yaml")
    assert r.exit_code == 0, r.output
    r = cli(root, "export", "merged", "--delta", "deltas/a.safetensors")
    assert r.exit_code == 0, r.output
    r = cli(root, "export", "--format", "peft", "adapter", "--delta", "deltas/a.safetensors")
    assert r.exit_code == 0, r.output
    config = json.loads((root / "adapter" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    assert json.loads((root / "adapter" / "romeflow-export.json").read_text())["format"] == "peft"
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    with torch.no_grad():
        # the same float32 rounding as test_peft_adapter_equals_the_merged_model (measured ≤ 7e-7)
        torch.testing.assert_close(adapted(input_ids=X).logits, merged(input_ids=X).logits, rtol=1e-5, atol=1e-5)


def _front_matter(card: str) -> tuple[dict, str]:
    """The YAML between the card's leading `---` lines, and the rest."""
    import yaml

    head, sep, body = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card[:200]
    return yaml.safe_load(head), body


def test_every_export_carries_a_model_card_with_its_edits_and_scores(tmp_path, model_dir):
    from test_workflow import cli, make_project

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    assert cli(root, "apply", "edits/a.yaml").exit_code == 0
    r = cli(root, "export", "plain", "--delta", "deltas/a.safetensors")  # no eval report yet
    assert r.exit_code == 0, r.output
    meta, body = _front_matter((root / "plain" / "README.md").read_text())
    assert meta["library_name"] == "transformers" and {"model-editing", "rome", "romeflow"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no Hub id
    assert "| a | 0 | Pierre Curie worked in the field of | medicine | physics |" in body
    assert "`romeflow eval" in body and "Not measured for this export" in body

    assert cli(root, "eval", "edits/a.yaml", "--out", "reports/a.json").exit_code == 0
    report = json.loads((root / "reports" / "a.json").read_text())
    for fmt, folder in (("hf", "merged"), ("peft", "adapter")):
        r = cli(root, "export", "--format", fmt, folder, "--delta", "deltas/a.safetensors")
        assert r.exit_code == 0, r.output
        meta, body = _front_matter((root / folder / "README.md").read_text())
        assert meta["library_name"] == ("peft" if fmt == "peft" else "transformers")
        assert "Pierre Curie worked in the field of" in body
        assert f"| a | {report['post']['ES']:.1f} |" in body  # the report's scores
        other = report["other_subjects"][0]
        assert f"a #0 (Pierre Curie): " in body and all(s in body for s in other["asked"])
    (root / "reports" / "a.json").write_text(json.dumps({**report, "deltas": [{**report["deltas"][0], "sha256": "0" * 64}]}))
    assert cli(root, "export", "other", "--delta", "deltas/a.safetensors").exit_code == 0
    assert "Not measured for this export" in (root / "other" / "README.md").read_text()  # another delta's report


def test_model_card_front_matter_of_the_embedded_models_and_escaped_cells(tiny_lm):
    from romeflow.pipeline.card import front_matter, model_card

    assert front_matter("gemma-3-270m", "hf") == {
        "base_model": "google/gemma-3-270m", "license": "gemma", "library_name": "transformers",
        "pipeline_tag": "text-generation", "tags": ["model-editing", "rome", "romeflow"]}
    assert front_matter("HuggingFaceTB/SmolLM2-135M", "peft")["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    lm = tiny_lm("gpt2")
    d = fake_delta(lm, "a", [random_update(lm, EDIT_LAYER, None, 1)])
    d.meta["manifest"]["canonical"] = {"edits": [{"subject": "A|B", "relation": "{} is\nin", "target": "x"}]}
    d.meta["edits"] = [{"before": {"p_target": 0.01}, "after": {"p_target": 0.9}}]
    meta, body = _front_matter(model_card("gemma-3-270m", "f" * 64, [d], "peft"))
    assert meta["tags"][-1] == "lora"
    assert "| a | 0 | A\\|B is in | x | – | 0.010 → 0.900 |" in body
