"""One composition everywhere: every command that puts deltas on a model (export in both formats, generate,
eval, stack) composes them by params.yaml ``stack:``; the stack stage writes reports/stack.safetensors and
`romeflow export` with no --delta rebuilds exactly the weights the stack stage scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from romeflow.engine import models
from romeflow.engine.models import load_model
from romeflow.engine.statistics import load_stats
from romeflow.params import load_params
from romeflow.pipeline import compose as compose_module
from romeflow.pipeline.compose import EditedModel, JointSolve, composed_by
from romeflow.pipeline.deltas import load_delta
from romeflow.pipeline.export import PEFT_CONFIG, PEFT_WEIGHTS
from romeflow.pipeline.stackfile import StackFileError, load_stack_file, stale
from romeflow.pipeline.workflow import Layout, edited_weights_sha256, stats_hashes
from romeflow.schemas import validate

from conftest import EDIT_LAYER
from test_workflow import cli, make_project

X = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
JOINT = "  window: 64\n  method: joint\n  margin: 0.5\n  rounds: 3\n"  # calibrated (docs/method.md)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir):
    """deltas/a, b, c by `romeflow apply`, stats/layer1 by `romeflow stats`; params.yaml composes joint, calibrated
    (read-only: copy to change)."""
    root = make_project(tmp_path_factory.mktemp("compose"), model_dir, manifests=("a", "b", "c"), active=("a", "b"))
    r = cli(root, "stats", "--out", f"stats/layer{EDIT_LAYER}.safetensors")
    assert r.exit_code == 0, r.output
    for name in ("a", "b", "c"):
        r = cli(root, "apply", f"edits/{name}.yaml")
        assert r.exit_code == 0, r.output
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("  window: 64\n", JOINT))
    r = cli(root, "stack")
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def project(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "p", ignore=shutil.ignore_patterns("cache")))


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir))


def joint_of(root: Path) -> JointSolve:
    """params.yaml's joint solve over the project's statistics file."""
    settings = load_params(root / "params.yaml")
    c = load_stats(root / "stats" / f"layer{EDIT_LAYER}.safetensors").second_moment
    return JointSolve.from_params(lambda layer: c, settings.stack)


def composed(lm, deltas: list, joint: JointSolve | None) -> tuple[str, torch.Tensor]:
    """(edited_weights_sha256, ΔW of the edited module) of base + deltas composed with ``joint``; lm left at base."""
    module = models.edited_module_name(lm.model, EDIT_LAYER)
    base = models.read_weight(lm.model, module)
    edited = EditedModel(lm, joint)
    edited.compose(deltas)
    try:
        return edited_weights_sha256(lm, deltas), models.read_weight(lm.model, module) - base
    finally:
        edited.reset()


def deltas_of(root: Path, *names: str) -> list:
    return [load_delta(root / "deltas" / f"{n}.safetensors") for n in names]


@pytest.fixture
def hashes(monkeypatch, lm):
    """Every composition a command makes, as the sha256 of the edited weights right after it (the deltas
    composed, the method): the commands run in this process (CliRunner), so their EditedModel is patched."""
    seen: list[tuple[str, str]] = []
    original = compose_module.EditedModel.compose

    def recording(self, deltas, joint=None):
        original(self, deltas, joint)
        if deltas:
            seen.append((self.method, edited_weights_sha256(self.lm, deltas)))

    monkeypatch.setattr(compose_module.EditedModel, "compose", recording)
    return seen


def test_the_stack_stage_writes_a_stack_file_that_names_what_it_composed(built, lm):
    report = json.loads((built / "reports" / "stack.json").read_text())
    sf = load_stack_file(Layout(built).stack_file)
    meta = sf.meta
    assert validate("stackfile", meta) == [] and meta["format"] == "romeflow.stackfile/1"
    assert report["composed"]["method"] == "joint" and report["composed"]["settings"] == meta["composition"]["settings"]
    assert meta["composition"] == composed_by(load_params(built / "params.yaml").stack)
    assert [d["manifest"] for d in meta["deltas"]] == ["a", "b"]
    assert [d["tensors_sha256"] for d in meta["deltas"]] == [d.meta["tensors_sha256"] for d in deltas_of(built, "a", "b")]
    assert meta["weights_sha256"] == report["composed"]["weights_sha256"]
    assert meta["stats"] == [{"layer": EDIT_LAYER, "sha256": stats_hashes(Layout(built))[EDIT_LAYER]}]
    assert meta["shares"] == report["manifests"]["a"]["shares"] + report["manifests"]["b"]["shares"]
    # one solved update on the one edited module, of rank = the number of edits on it (a and b: one each)
    (up,) = sf.updates
    assert up.module == models.edited_module_name(lm.model, EDIT_LAYER) and up.u.shape[1] == up.v.shape[1] == 2
    assert stale(sf, load_params(built / "params.yaml"), deltas_of(built, "a", "b"), lm.fingerprint,
                 stats_hashes(Layout(built))) is None


def test_export_with_no_delta_is_the_stack_stages_weights(project, lm, hashes):
    r = cli(project, "export", "merged")
    assert r.exit_code == 0, r.output
    assert "the stack stage's" in r.stderr and "composed by joint" in r.stdout
    report = json.loads((project / "reports" / "stack.json").read_text())
    deltas = deltas_of(project, "a", "b")
    merged = load_model(str(project / "merged"))
    # the export adds the stack file's U Vᵀ to the same base weight as the stack stage did (the same float
    # operations on the same inputs, one thread), so the hashes are equal
    assert edited_weights_sha256(merged, deltas) == report["composed"]["weights_sha256"]
    assert hashes == []  # rebuilt from the stack file: nothing was composed (or solved) again
    # and against the stack's function run here (a re-solve: the same function on the same inputs)
    edited = EditedModel(lm, joint_of(project))
    edited.compose(deltas)
    try:
        module = models.edited_module_name(lm.model, EDIT_LAYER)
        want = models.weight_out_in(lm.model, module)
        got = models.weight_out_in(merged.model, module)
        assert rel_err(got, want) <= 1e-6  # measured 0: the same float operations on the same inputs
        assert edited_weights_sha256(lm, deltas) == report["composed"]["weights_sha256"]
    finally:
        edited.reset()
    provenance = json.loads((project / "merged" / "romeflow-export.json").read_text())
    assert provenance["composition"]["method"] == "joint"
    assert provenance["composition"]["stack_file"]["path"].endswith("reports/stack.safetensors")
    assert "Composed by `stack.method: joint`" in (project / "merged" / "README.md").read_text()


def test_the_peft_adapter_of_a_joint_stack_is_its_solved_update_and_equals_the_merged_export(project):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    for fmt, folder in (("hf", "merged"), ("peft", "adapter")):
        r = cli(project, "export", "--format", fmt, folder)
        assert r.exit_code == 0, r.output
    (up,) = load_stack_file(Layout(project).stack_file).updates
    config = json.loads((project / "adapter" / PEFT_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["target_modules"] == [up.module]  # rank = edits
    with safe_open(project / "adapter" / PEFT_WEIGHTS, framework="pt") as f:
        assert torch.equal(f.get_tensor(f"base_model.model.{up.module}.lora_B.weight"), up.u)  # B = U
        assert torch.equal(f.get_tensor(f"base_model.model.{up.module}.lora_A.weight"), up.v.T)  # A = Vᵀ
    base = load_params(project / "params.yaml").model
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), project / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(project / "merged")
    plain = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        got, want, before = adapted(input_ids=X).logits, merged(input_ids=X).logits, plain(input_ids=X).logits
    assert (want - before).abs().max() > 1e-3  # the stack does change the model
    # x Wᵀ + (x Aᵀ) Bᵀ (scaling 1) against x (W + B A)ᵀ: B A is the stored U Vᵀ exactly, so the two differ only
    # in the float32 rounding of the two orders, a few ulps of the logits' scale (measured 2.7e-7 of max|logit|,
    # 2% of this bound); a logit near 0 carries the rounding of its O(1) terms, hence the floor of 1e-5 of the scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_export_generate_and_eval_of_several_deltas_compose_by_stack_method(project, lm, hashes):
    """Equal hashes of the edited weights: the same function (EditedModel.compose with params.yaml's joint
    solve) on the same inputs and one thread, so the same bits as the stack stage's."""
    report = json.loads((project / "reports" / "stack.json").read_text())
    joint = report["composed"]["weights_sha256"]
    two = ("--delta", "deltas/a.safetensors", "--delta", "deltas/b.safetensors")
    r = cli(project, "export", "exported", *two)
    assert r.exit_code == 0, r.output
    assert hashes == [("joint", joint)]  # the stack stage's weights: the same function, the same inputs
    assert edited_weights_sha256(load_model(str(project / "exported")), deltas_of(project, "a", "b")) == joint
    r = cli(project, "generate", "Pierre Curie worked in the field of", *two, "--json", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["composition"]["method"] == "joint"
    assert hashes[-1] == ("joint", joint)
    r = cli(project, "eval", "edits/a.yaml", *two, "--out", "reports/ab.json")
    assert r.exit_code == 0, r.output
    assert hashes[-1] == ("joint", joint)
    assert json.loads((project / "reports" / "ab.json").read_text())["composition"]["method"] == "joint"
    # the sum of the same deltas is another model: the commands did not sum
    summed, delta_sum = composed(lm, deltas_of(project, "a", "b"), None)
    assert rel_err(composed(lm, deltas_of(project, "a", "b"), joint_of(project))[1], delta_sum) > 0.1
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(JOINT, "  window: 64\n"))  # stack.method: sum
    r = cli(project, "generate", "Pierre Curie worked in the field of", *two, "--max-new-tokens", "1")
    assert r.exit_code == 0, r.output
    assert hashes[-1] == ("sum", summed)


def test_one_delta_under_joint_is_the_joint_solve_of_that_delta_everywhere(project, lm, hashes):
    """The rule: the same function for any number of deltas, so `export --delta B` of one delta under joint is
    the joint solve of {B} (re-solved, calibrated), and eval@NAME (its delta alone) scores that model too,
    as the stack report's "alone" does."""
    (b,) = deltas_of(project, "b")  # b holds its margin with a share of its change (a needs all of it)
    joint_b, delta_joint = composed(lm, [b], joint_of(project))
    _, delta_sum = composed(lm, [b], None)
    assert rel_err(delta_joint, delta_sum) > 0.1  # calibrated: a share of the delta's change, not the delta
    hashes.clear()
    r = cli(project, "export", "one", "--delta", "deltas/b.safetensors")
    assert r.exit_code == 0, r.output
    assert hashes == [("joint", joint_b)]
    r = cli(project, "eval", "edits/b.yaml", "--out", "reports/b.json")
    assert r.exit_code == 0, r.output
    stack = json.loads((project / "reports" / "stack.json").read_text())
    alone = json.loads((project / "reports" / "b.json").read_text())
    assert stack["manifests"]["b"]["alone"] == alone["post"]  # bit for bit: the same function, same inputs


def test_export_refuses_a_stack_file_older_than_the_deltas_or_params(project, lm):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  - b\n", "  - c\n"))
    r = cli(project, "export", "x")
    assert r.exit_code == 1 and not (project / "x").exists()
    assert "reports/stack.safetensors: deltas: composed ['a', 'b'], " in r.stderr and "run `dvc repro`" in r.stderr
    assert json.loads(cli(project, "status", "--json").stdout)["stack_file"] == "stale"
    params.write_text(params.read_text().replace("  - c\n", "  - b\n").replace("margin: 0.5", "margin: 0.25"))
    r = cli(project, "export", "x")
    assert r.exit_code == 1 and "reports/stack.safetensors: composition: composed with joint (" in r.stderr
    params.write_text(params.read_text().replace("margin: 0.25", "margin: 0.5"))
    assert json.loads(cli(project, "status", "--json").stdout)["stack_file"] == "ok"
    assert cli(project, "export", "x").exit_code == 0
    sf = load_stack_file(Layout(project).stack_file)
    settings = load_params(params)
    assert "deltas[1]: " in stale(sf, settings, deltas_of(project, "a", "c"), lm.fingerprint, {})
    assert "base_model: " in stale(sf, settings, deltas_of(project, "a", "b"), "0" * 64, {})
    assert "stats: solved with other statistics of layer 1" in stale(sf, settings, deltas_of(project, "a", "b"),
                                                                     lm.fingerprint, {EDIT_LAYER: "f" * 64})


def test_a_tampered_stack_file_is_refused_on_load(project):
    path = Layout(project).stack_file
    with safe_open(path, framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["updates.0.u"] = tensors["updates.0.u"] * 1.001
    save_file(tensors, path, metadata=header)
    with pytest.raises(StackFileError, match=r"stack.safetensors: tensors_sha256: the tensors' sha256 is"):
        load_stack_file(path)
    r = cli(project, "export", "x")
    assert r.exit_code == 1 and "reports/stack.safetensors: tensors_sha256:" in r.stderr and not (project / "x").exists()


def test_a_sum_stack_file_holds_no_tensors_and_rebuilds_from_the_deltas(project, lm):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(JOINT, "  window: 64\n"))
    r = cli(project, "stack")
    assert r.exit_code == 0, r.output
    sf = load_stack_file(Layout(project).stack_file)
    assert sf.updates == [] and sf.meta["composition"] == {"method": "sum"} and sf.meta["stats"] == []
    r = cli(project, "export", "merged")
    assert r.exit_code == 0, r.output
    report = json.loads((project / "reports" / "stack.json").read_text())
    # the deltas' own factors added in order, as the stack stage added them
    assert edited_weights_sha256(load_model(str(project / "merged")), deltas_of(project, "a", "b")) == \
        report["composed"]["weights_sha256"]
