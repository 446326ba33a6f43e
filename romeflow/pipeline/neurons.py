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

from ..engine.gated import NeuronUpdate, mlp_name
from ..engine.models import LoadedModel, arch_of

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
