"""The adapter table and the model helpers, on a tiny random model of every supported architecture."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from romeflow.engine import models
from romeflow.engine.models import ModelError
from romeflow.engine.prompts import encode

from conftest import ARCHS, BOS_ARCHS, EXPECTED_MODULE, HIDDEN, INTERMEDIATE, LAYERS

TEXTS = ["Pierre Curie was born in Paris.", "The Space Needle is in Seattle", "Rome"]


def manual_key(model_type: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of W_proj computed by hand from the MLP's input x, per architecture."""
    if model_type == "gpt2":
        return mlp.act(mlp.c_fc(x))
    if model_type == "gptj":
        return mlp.act(mlp.fc_in(x))
    if model_type == "gpt_neox":
        return mlp.act(mlp.dense_h_to_4h(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # gated MLPs (Llama, Mistral, Qwen2, Gemma 3)


@pytest.mark.parametrize("model_type", ARCHS)
def test_adapter_table_resolves_the_edited_module(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    assert lm.model.config.model_type == model_type
    assert lm.num_layers == LAYERS
    for layer in range(LAYERS):
        name = models.edited_module_name(lm.model, layer)
        assert name == EXPECTED_MODULE[model_type].format(layer)
        module = models.edited_module(lm.model, layer)
        assert module is lm.model.get_submodule(name)
        assert module is models.block_submodule(lm.model, layer, "mlp_out")
        assert models.block_submodule(lm.model, layer, "mlp") is lm.model.get_submodule(name.rsplit(".", 1)[0])
        # The attention module exists where the table says.
        assert isinstance(models.block_submodule(lm.model, layer, "attn"), nn.Module)
    assert lm.model.get_submodule(lm.arch.embed) is lm.model.get_input_embeddings()
    if lm.arch.post_mlp_norm:
        assert isinstance(models.blocks(lm.model)[0].get_submodule(lm.arch.post_mlp_norm), nn.Module)
    assert lm.adds_bos == (model_type in BOS_ARCHS)


@pytest.mark.parametrize("model_type", ARCHS)
def test_weight_out_in_is_a_writable_out_in_view(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    name = models.edited_module_name(lm.model, 1)
    module = lm.model.get_submodule(name)
    w = models.weight_out_in(lm.model, name)
    assert w.shape == (HIDDEN, INTERMEDIATE)
    assert w.data_ptr() == module.weight.data_ptr()  # a view, not a copy

    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, INTERMEDIATE, generator=g)
    with torch.no_grad():
        before = module(k)
        # Orientation: module(k) - bias == k @ Wᵀ for the (d_out, d_in) view (addmm vs matmul: float32 rounding).
        bias = module(torch.zeros(1, INTERMEDIATE))[0]
        torch.testing.assert_close(before - bias, k @ w.T, rtol=1e-5, atol=1e-6)
        u = torch.randn(HIDDEN, generator=g)
        v = torch.randn(INTERMEDIATE, generator=g)
        w += torch.outer(u, v)
        after = module(k)
    expected = before + (k @ v)[:, None] * u[None, :]  # module(k) changes by u (v·k)
    # two float32 orders of (W + u vᵀ)k: measured 1.1e-5 on outputs up to 60 (2e-7 relative): an 18x margin
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("model_type", ARCHS)
def test_keys_at_returns_the_true_input_of_the_edited_module(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    batch = encode(lm.tokenizer, TEXTS)
    assert batch.attention_mask.min() == 0  # padding is exercised

    # Reference 1: a plain forward hook on the edited module during a full forward pass.
    # Reference 2: the MLP's input during the same pass, pushed through the MLP by hand.
    seen, mlp_in = {}, {}
    handles = []
    for layer in range(LAYERS):
        module = lm.model.get_submodule(EXPECTED_MODULE[model_type].format(layer))
        mlp = lm.model.get_submodule(EXPECTED_MODULE[model_type].format(layer).rsplit(".", 1)[0])
        handles.append(module.register_forward_hook(
            lambda _m, inputs, _out, layer=layer: seen.__setitem__(layer, inputs[0].detach().clone())))
        handles.append(mlp.register_forward_pre_hook(
            lambda _m, inputs, layer=layer: mlp_in.__setitem__(layer, inputs[0].detach().clone())))
    with torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()

    keys = models.keys_at(lm.model, [0, 1], batch.input_ids, batch.attention_mask)
    assert sorted(keys) == [0, 1]
    for layer in (0, 1):
        assert keys[layer].shape == (len(TEXTS), batch.input_ids.shape[1], INTERMEDIATE)
        torch.testing.assert_close(keys[layer], seen[layer], rtol=0, atol=0)  # the same forward: bit for bit
        mlp = lm.model.get_submodule(EXPECTED_MODULE[model_type].format(layer).rsplit(".", 1)[0])
        with torch.no_grad():
            by_hand = manual_key(model_type, mlp, mlp_in[layer])
        torch.testing.assert_close(keys[layer], by_hand, rtol=1e-5, atol=1e-6)  # re-derived: float32 rounding only
    # No hooks are left behind.
    for layer in range(LAYERS):
        module = models.edited_module(lm.model, layer)
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not models.blocks(lm.model)[layer]._forward_hooks


@pytest.mark.parametrize("model_type", ARCHS)
def test_keys_at_stops_after_the_highest_layer(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    batch = encode(lm.tokenizer, TEXTS)
    calls = {"next_block": 0, "head": 0}
    h1 = models.blocks(lm.model)[2].register_forward_pre_hook(
        lambda *_: calls.__setitem__("next_block", calls["next_block"] + 1))
    h2 = lm.model.get_output_embeddings().register_forward_pre_hook(
        lambda *_: calls.__setitem__("head", calls["head"] + 1))
    try:
        keys = models.keys_at(lm.model, [1], batch.input_ids, batch.attention_mask)
        assert list(keys) == [1]
        assert calls == {"next_block": 0, "head": 0}
        keys = models.keys_at(lm.model, [LAYERS - 1], batch.input_ids, batch.attention_mask)
        assert calls == {"next_block": 1, "head": 0}  # the last block runs; the output head never does
    finally:
        h1.remove()
        h2.remove()


@pytest.mark.parametrize("model_type", ARCHS)
def test_logits_at_final_hidden_equals_the_models_logits(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    batch = encode(lm.tokenizer, TEXTS)
    with torch.no_grad():
        expected = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hidden = models.final_hidden(lm.model, batch.input_ids, batch.attention_mask)
        got = models.logits_at(lm.model, hidden)
        # Also on a gathered subset of positions, the way the engine uses it.
        rows, cols = torch.tensor([0, 1, 2]), batch.lengths - 1
        got_last = models.logits_at(lm.model, hidden[rows, cols])
    assert hidden.shape == (len(TEXTS), batch.input_ids.shape[1], HIDDEN)
    assert got.shape == expected.shape == (len(TEXTS), batch.input_ids.shape[1], len(lm.tokenizer))
    # the head applied by hand (gathered rows, too): float32 rounding only; atol is ~5e-6 of the O(2) logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_last, expected[rows, cols], rtol=1e-5, atol=1e-5)
    if model_type == "gemma3_text":  # softcapping is on in the tiny config and must be applied
        cap = lm.model.config.final_logit_softcapping
        assert cap and got.abs().max() < cap
        raw = lm.model.get_output_embeddings()(hidden)
        assert not torch.allclose(raw, got)


@pytest.mark.parametrize("model_type", ARCHS)
def test_edited_module_name_rejects_out_of_range_layers(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    for bad in (LAYERS, LAYERS + 5, -1):
        with pytest.raises(ModelError, match=f"layer {bad} is out of range"):
            models.edited_module_name(lm.model, bad)
        with pytest.raises(ModelError):
            models.edited_module(lm.model, bad)
    assert models.edited_module_name(lm.model, LAYERS - 1).startswith(lm.arch.layers + f".{LAYERS - 1}.")


def test_unsupported_model_type_raises_model_error(tiny_tokenizers):
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="bert")
            self.lin = nn.Linear(2, 2)

    stub = Stub()
    with pytest.raises(ModelError, match="'bert' is not supported"):
        models.arch_of(stub)
    with pytest.raises(ModelError, match="supported: .*gpt2"):
        models.num_layers(stub)
    with pytest.raises(ModelError):
        models.prepare(stub, tiny_tokenizers["plain"], "stub")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prepare_puts_the_model_in_engine_state(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "right"
    assert lm.tokenizer.pad_token_id is not None
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


@pytest.mark.parametrize("model_type", ARCHS)
def test_fingerprint_changes_when_one_weight_changes(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    fp = models.fingerprint_state_dict(lm.model)
    assert fp == lm.fingerprint  # prepare() fingerprints the same way
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert models.fingerprint_state_dict(tiny_lm(model_type).model) == fp  # deterministic, copy-independent

    w = models.weight_out_in(lm.model, models.edited_module_name(lm.model, 1))
    old = w[3, 7].item()
    w[3, 7] = old + 1e-3
    changed = models.fingerprint_state_dict(lm.model)
    assert changed != fp
    w[3, 7] = old
    assert models.fingerprint_state_dict(lm.model) == fp
