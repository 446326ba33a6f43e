"""Device, dtype and device_map on tiny random models (CPU): low-precision edits, disk offload, the
rank-one identity within each dtype's tolerance, and no FutureWarning from the KV cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from romeflow.engine import models
from romeflow.evaluation.scoring import target_nll
from romeflow.engine.models import ModelError, Placement
from romeflow.engine.rome import EditRequest, Rome, RomeParams, module_output
from romeflow.engine.statistics import second_moments

from conftest import EDIT_LAYER

# Enough steps that the tiny models take the edit in every dtype.
PARAMS = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3, 5), prefixes_per_length=2, steps=30, seed=0, lr=0.5,
                    clamp_norm_factor=20.0, weight_decay=0.01, kl_factor=0.0,
                    early_stop_nll=0.01)
CURIE = EditRequest("Pierre Curie", "{} worked in the field of", "medicine", "physics")
# Relative tolerance of Ŵk* = v* per dtype: W k* is computed in the weight's dtype (≈ 2⁻⁸ and 2⁻¹¹ ulp,
# times the accumulated rounding of a d_in = 64 dot product and of W + u vᵀ).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def low_precision(lm: models.LoadedModel, dtype: torch.dtype) -> models.LoadedModel:
    lm.model.to(dtype)
    return lm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_low_precision_edit_takes_and_keeps_the_rank_one_identity(tiny_lm, corpus, model_type, dtype):
    lm = low_precision(tiny_lm(model_type), dtype)
    stats = second_moments(lm, [EDIT_LAYER], corpus, 4000, seq_len=64, progress=False)
    assert stats[EDIT_LAYER].dtype == torch.float32  # accumulated in float32 whatever the model's dtype
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    module = lm.model.get_submodule(name)
    before = target_nll(lm, [CURIE.prompt] * 2, [CURIE.target, CURIE.target_true])

    (result,) = Rome(lm, PARAMS, lambda layer: stats[layer]).apply([CURIE])

    assert module.weight.dtype == dtype  # the update went in in the weight's own dtype
    assert result.update.u.dtype == result.update.v.dtype == torch.float32  # factors stored float32
    assert result.v_star.dtype == result.k_star.dtype == torch.float32
    with torch.no_grad():
        mapped = module_output(module, result.k_star[None])[0]
    assert rel_err(mapped, result.v_star) < TOLERANCE[dtype]
    after = target_nll(lm, [CURIE.prompt] * 2, [CURIE.target, CURIE.target_true])
    assert after[0] < after[1], "ES: the new target must beat the old answer on the edited prompt"
    assert after[0] < before[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_edit_is_close_to_the_float32_one(tiny_lm, second_moment, dtype):
    """The same edit in float32 and in low precision: k* agrees to the dtype's precision, and so does the
    update's direction C⁻¹k* (a float64 solve of a float32 C); v* follows its own optimisation path."""
    stats = second_moment("llama")
    rome_ref = Rome(tiny_lm("llama"), PARAMS, lambda layer: stats[layer])
    rome_low = Rome(low_precision(tiny_lm("llama"), dtype), PARAMS, lambda layer: stats[layer])
    rome_low._prefixes = rome_ref.prefixes  # the same context texts (sampling them is precision-dependent)
    ref, low = rome_ref.compute(CURIE), rome_low.compute(CURIE)
    assert rel_err(low.k_star, ref.k_star) < TOLERANCE[dtype]
    cos = torch.nn.functional.cosine_similarity(low.update.v.double(), ref.update.v.double(), dim=0)
    assert cos > 1 - TOLERANCE[dtype]


# --------------------------------------------------------------------------------------------------
# device_map with layers offloaded to disk
# --------------------------------------------------------------------------------------------------

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture()
def llama_dir(tmp_path, tiny_lm):
    lm = tiny_lm("llama")
    folder = tmp_path / "llama"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _folder_digest(folder):
    return {p.name: models.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_disk_offloaded_model_edits_and_exports_like_the_in_memory_one(tmp_path, tiny_lm, second_moment, llama_dir):
    from transformers import AutoModelForCausalLM

    from romeflow.pipeline.compose import EditedModel
    from romeflow.pipeline.deltas import Delta

    stats = second_moment("llama")
    checkpoint = _folder_digest(llama_dir)
    offloaded = models.load_model(str(llama_dir), placement=Placement(
        device_map=DISK_MAP, offload_folder=str(tmp_path / "offload")))
    name = models.edited_module_name(offloaded.model, EDIT_LAYER)
    assert offloaded.model.get_submodule(name).weight.device.type == "meta"  # really offloaded
    reference = models.load_model(str(llama_dir))
    x = torch.tensor([[5, 6, 7, 8, 9]])

    (r_off,) = Rome(offloaded, PARAMS, lambda layer: stats[layer]).apply([CURIE])
    (r_ref,) = Rome(reference, PARAMS, lambda layer: stats[layer]).apply([CURIE])

    torch.testing.assert_close(r_off.update.u, r_ref.update.u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_off.update.v, r_ref.update.v, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        logits_off, logits_ref = offloaded.model(x).logits, reference.model(x).logits
        mapped = module_output(offloaded.model.get_submodule(name), r_off.k_star[None])[0]
    torch.testing.assert_close(logits_off, logits_ref, rtol=1e-4, atol=1e-5)
    assert rel_err(mapped, r_off.v_star) < 1e-5  # the offloaded module now maps k* to v*
    assert _folder_digest(llama_dir) == checkpoint  # the checkpoint on disk was never written

    # a delta composes onto a fresh offloaded model, and resets, through the weights map too
    fresh = models.load_model(str(llama_dir), placement=Placement(
        device_map=DISK_MAP, offload_folder=str(tmp_path / "offload2")))
    with torch.no_grad():
        base_logits = fresh.model(x).logits
    edited = EditedModel(fresh)
    edited.compose([Delta([r_off.update], {"base_model": {"fingerprint": fresh.fingerprint, "name": "x"},
                                                  "manifest": {"name": "curie"}})])
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x).logits, logits_off)
        edited.reset()
        torch.testing.assert_close(fresh.model(x).logits, base_logits, rtol=0, atol=0)
    assert not torch.allclose(base_logits, logits_off)

    # export: the saved folder holds the edited weight
    out = tmp_path / "exported"
    offloaded.model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, logits_ref, rtol=1e-4, atol=1e-5)


def test_placement_refuses_what_the_machine_cannot_do():
    for bad, field in ((Placement(device="gpu"), "model.device"), (Placement(dtype="float8"), "model.dtype"),
                       (Placement(device_map="everywhere"), "model.device_map"),
                       (Placement(device="cpu", device_map="auto"), "model.device"),
                       (Placement(device_map={"": "disk"}), "model.offload_folder")):
        with pytest.raises(ModelError, match=field):
            bad.check()
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            Placement(device="cuda:0").check()
    assert Placement().torch_device().type in ("cpu", "cuda", "mps")
    assert Placement(dtype="bfloat16").from_pretrained_kwargs() == {"dtype": torch.bfloat16}
    kw = Placement(device_map="auto", max_memory={"0": "1GiB", "cpu": "2GiB"}, offload_folder="off").from_pretrained_kwargs()
    assert kw["max_memory"] == {0: "1GiB", "cpu": "2GiB"} and kw["device_map"] == "auto"


# --------------------------------------------------------------------------------------------------
# The KV cache API
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_an_edit_emits_no_future_warning(tiny_lm, second_moment, model_type):
    from romeflow.evaluation.scoring import sample_continuations

    stats = second_moment(model_type)
    lm = tiny_lm(model_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Rome(lm, RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=2),
             lambda layer: stats[layer]).apply([CURIE])
        sample_continuations(lm, ["Pierre Curie is"], 3, 5, torch.Generator().manual_seed(0))
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, [str(w.message) for w in future]


# --------------------------------------------------------------------------------------------------
# The CLI: params.yaml's model: mapping and the global options
# --------------------------------------------------------------------------------------------------


def test_cli_edits_and_exports_in_bfloat16_from_the_model_mapping(tmp_path, model_dir):
    import json

    from transformers import AutoModelForCausalLM

    from romeflow.pipeline.deltas import load_delta
    from romeflow.params import load_params
    from romeflow.engine.statistics import load_stats

    from test_workflow import cli, make_project

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    params = root / "params.yaml"
    params.write_text(params.read_text().replace(f"model: {model_dir}", f"model:\n  name: {model_dir}\n  dtype: bfloat16\n  device: cpu"))
    settings = load_params(params)
    assert settings.model == str(model_dir) and settings.placement == Placement(device="cpu", dtype="bfloat16")

    r = cli(root, "stats", "--out", "stats/layer1.safetensors")
    assert r.exit_code == 0, r.output
    assert load_stats(root / "stats/layer1.safetensors").meta["dtype"] == "bfloat16"
    r = cli(root, "apply", "edits/a.yaml", "--stats", "stats/layer1.safetensors")
    assert r.exit_code == 0, r.output
    delta = load_delta(root / "deltas/a.safetensors")
    assert delta.meta["dtype"] == "bfloat16" and delta.updates[0].u.dtype == torch.float32
    r = cli(root, "export", "out", "--delta", "deltas/a.safetensors")
    assert r.exit_code == 0, r.output
    exported = AutoModelForCausalLM.from_pretrained(root / "out")
    assert exported.dtype == torch.bfloat16
    assert json.loads((root / "out" / "romeflow-export.json").read_text())["deltas"][0]["manifest"] == "a"

    # --dtype over params.yaml: a float32 delta (no dtype field), as before this option existed
    r = cli(root, "--dtype", "float32", "apply", "edits/a.yaml", "--stats", "stats/layer1.safetensors", "--out", "f32.safetensors")
    assert r.exit_code == 0, r.output
    assert "dtype" not in load_delta(root / "f32.safetensors").meta
