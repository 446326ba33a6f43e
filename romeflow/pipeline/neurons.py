"""Gated edits in delta files: the hidden units the gated insert adds to an MLP (engine/gated.py).

A delta edit with ``neurons: r`` in its metadata holds, instead of the factors u and v,

    edits.<i>.gate  (r, d_in)   the rows that compute each unit's pre-activation from the MLP's input x
    edits.<i>.up    (r, d_in)   a gated MLP's second factor: h = φ(gate·x) · (up·x)    (``mlp: gated``)
    edits.<i>.bias  (r,)        an MLP with biases: h = φ(gate·x + bias)               (``mlp: bias``)
    edits.<i>.down  (d_out, r)  the units' columns of the output projection

with d_in = d_out = the model's width, and ``module`` the MLP itself. Such a delta is written as format
``romeflow.delta/2``; rank-one deltas keep ``romeflow.delta/1`` (and so their bytes). Composition appends
every delta's units to their MLP in a canonical order (by the deltas' tensor hashes), so any order of the
same deltas gives the same weights bit for bit, and dropping a delta cuts its units out again.
"""

from __future__ import annotations

import torch

from ..engine.gated import (MAX_LOW, TEXT_TOKENS, Gate, NeuronUpdate, closing_low, mlp_name, slope,
                            text_inputs)
from ..engine.models import LoadedModel, arch_of
from ..engine.statistics import token_rows

NEURON_FORMAT = "romeflow.delta/2"
NEURON_PARTS = ("gate", "up", "bias", "down")  # hashed in this order, after u and v (absent here)
MAX_UNITS = 64  # hidden units one edit may add


def parts(edit: dict) -> tuple[str, ...]:
    """The tensors of one neuron edit, by its metadata."""
    return ("gate", "up" if edit["mlp"] == "gated" else "bias", "down")


def is_neurons(edit: dict) -> bool:
    return "neurons" in edit


def tensors_of(i: int, up: NeuronUpdate) -> dict[str, torch.Tensor]:
    out = {f"edits.{i}.gate": up.gate, f"edits.{i}.down": up.down}
    if up.up is not None:
        out[f"edits.{i}.up"] = up.up
    if up.bias is not None:
        out[f"edits.{i}.bias"] = up.bias
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def shapes(edit: dict) -> dict[str, tuple[int, ...]]:
    """part -> the shape the metadata implies."""
    r, d_in, d_out = edit["neurons"], edit["d_in"], edit["d_out"]
    return {"gate": (r, d_in), "up": (r, d_in), "bias": (r,), "down": (d_out, r)}


def check(where: str, i: int, tensors: dict[str, torch.Tensor], edit: dict, max_norm: float) -> None:
    """One neuron edit's tensors: float32, the shapes its metadata implies, finite, bounded norms. Raises
    ValueError (the caller's DeltaError) with one line."""
    want = shapes(edit)
    for p in parts(edit):
        name = f"edits.{i}.{p}"
        t = tensors[name]
        if t.dtype != torch.float32:
            raise ValueError(f"{where}: {name}: dtype {str(t.dtype).removeprefix('torch.')}, not float32")
        if tuple(t.shape) != want[p]:
            raise ValueError(f"{where}: {name}: shape {tuple(t.shape)}, expected {want[p]}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {name}: holds NaN or infinite values")
        norm = t.double().norm().item()
        if not norm <= max_norm:
            raise ValueError(f"{where}: {name}: norm {norm:.3g} is above the plausible bound {max_norm:g}")


def update_of(edit: dict, i: int, tensors: dict[str, torch.Tensor]) -> NeuronUpdate:
    return NeuronUpdate(edit["module"], edit["layer"], tensors[f"edits.{i}.gate"], tensors.get(f"edits.{i}.up"),
                        tensors.get(f"edits.{i}.bias"), tensors[f"edits.{i}.down"])


def check_fits(where: str, i: int, up: NeuronUpdate, lm: LoadedModel) -> None:
    """The units fit the model: the MLP of their layer, its width, and its kind (gated or with biases)."""
    expected = mlp_name(lm.model, up.layer)
    if up.module != expected:
        raise ValueError(f"{where}: edits[{i}].module: {up.module} is not layer {up.layer}'s MLP ({expected})")
    width = lm.model.get_input_embeddings().weight.shape[1]
    if up.gate.shape[1] != width or up.down.shape[0] != width:
        raise ValueError(f"{where}: edits[{i}]: units of width {up.gate.shape[1]} do not fit {lm.name} (width {width})")
    if (up.up is not None) != (arch_of(lm.model).mlp_gate is not None):
        kind = "gated" if up.up is not None else "with biases"
        raise ValueError(f"{where}: edits[{i}]: units for an MLP {kind}, but {lm.name}'s is not")


def canonical(deltas: list) -> list[NeuronUpdate]:
    """Every neuron update of the deltas, ordered by (delta tensors' sha256, edit index): the order
    composition appends them in, whatever order the deltas come in."""
    found = [(d.meta.get("tensors_sha256", ""), i, up) for d in deltas for i, up in enumerate(d.updates)
             if isinstance(up, NeuronUpdate)]
    return [up for _, _, up in sorted(found, key=lambda t: (t[0], t[1]))]


# --------------------------------------------------------------------------------------------------
# A threshold raised at composition (stack.gate_text; docs/scale.md, "A threshold raised at composition")
# --------------------------------------------------------------------------------------------------


def stored_gate(up: NeuronUpdate, thresholds: dict) -> Gate:
    """The gate whose two units ``up`` are, from the delta's thresholds {low, high, beta} (``edits[i].gate``):
    gate rows β(a − τ₀e), β(a − τ₁e) and up rows e (gated MLP), or rows βa and biases −βτ (MLP with biases)."""
    b, lo, hi = float(thresholds["beta"]), float(thresholds["low"]), float(thresholds["high"])
    gated_mlp = up.up is not None
    e = up.up[0].float() if gated_mlp else torch.zeros(up.gate.shape[1])  # (d_model,)
    a = up.gate[0].float() / b + lo * e  # (d_model,)
    return Gate(a, e, lo, hi, b, gated_mlp)


def calibration_inputs(lm: LoadedModel, layer: int, corpus, n_tokens: int) -> torch.Tensor:
    """x (n, d_model) at the statistics corpus's ``n_tokens`` text tokens that follow the gate's own
    ``gated.TEXT_TOKENS`` negatives (so the insert never saw them), in rows as the insert reads its own."""
    config = lm.model.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 257)
    seq_len = min(256, longest - 1)
    skip = -(-TEXT_TOKENS // seq_len)  # the insert's rows (its last one may be part of a row here: skipped whole)
    rows = list(token_rows(lm, corpus, skip * seq_len + n_tokens, seq_len))
    return text_inputs(lm, layer, rows[skip:])


def raise_gate(model, gate: Gate, layer: int, x: torch.Tensor, cap: float = MAX_LOW) -> Gate:
    """``gate`` with τ₀ raised to the least value at which every input x (n, d_model) is exactly closed, at
    most ``cap`` (never lowered), τ₁ by as much, and β for the new τ₁; ``gate`` itself when it already is."""
    need = closing_low(gate.a, gate.e.to(gate.a), gate.gated, x.to(gate.a))
    shift = max(0.0, min(need, cap) - gate.low)
    if shift == 0.0:
        return gate
    high = gate.high + shift
    return Gate(gate.a, gate.e, gate.low + shift, high, slope(model, layer, high), gate.gated)


def rethreshold(up: NeuronUpdate, old: Gate, new: Gate) -> NeuronUpdate:
    """The two units of ``new`` with the change δ that ``up`` (whose gate is ``old``) adds when fully open."""
    delta = up.down[:, 0] * old.beta * (old.high - old.low)  # (d_model,) δ: down = [δ, −δ] / (β(τ₁ − τ₀))
    return new.update(up.module, up.layer, delta)
