"""Exports of base + deltas: a merged Hugging Face folder, or a PEFT LoRA adapter over the base model.

The deltas are composed by params.yaml ``stack:`` before either is written (``compose.EditedModel``), and
the composed model is a sum of low-rank updates ΔW = U Vᵀ on the (d_out, d_in) view of MLP
projections: the deltas' own under ``stack.method: sum``, one per module under ``joint`` (U (d_out, n),
V (d_in, n), n = the edits on that module). Stacking the factors of every update on one module gives one
LoRA module that is *exactly* that sum:

    Σ_i U_i V_iᵀ = B A    with  B = [U_1 U_2 ...]  (d_out, r),   A = [V_1 V_2 ...]ᵀ  (r, d_in)

and LoRA's forward is W x + (α / r) B A x, so ``lora_alpha = r`` (per module, ``alpha_pattern``) makes
the scaling exactly 1. r is the number of rank-one terms on that module (for a joint stack the edits on
it, B = U and A = Vᵀ; for a sum the edits, or more for the rank-r updates of a prompt key). LoRA's A and B act on the activations, whatever the storage
orientation of W, so they are the same for nn.Linear and for GPT-2's Conv1D; only merging needs
``fan_in_fan_out`` (set from the architecture table).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from .card import model_card
from .deltas import Delta, check_applicable, check_distinct, is_gated
from ..engine.gated import add_neurons, cut_neurons, hidden_width, zero_units
from ..engine.models import arch_of, num_layers
from ..engine.rome import RankOneUpdate
from ..io import atomic_folder
from ..engine.models import LoadedModel

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PROVENANCE = "romeflow-export.json"
CARD = "README.md"  # the model card (card.model_card)


def provenance(lm: LoadedModel, deltas: list[Delta], fmt: str, composition: dict | None = None) -> dict:
    """What an export folder was built from (romeflow-export.json); ``composition``: how the deltas were
    composed (``EditedModel.composed_by``, and the stack file it was rebuilt from)."""
    return {"format": fmt, "base_model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "deltas": [{"path": d.path, "manifest": d.meta["manifest"]["name"],
                        "manifest_sha256": d.meta["manifest"]["sha256"],
                        "tensors_sha256": d.meta["tensors_sha256"]} for d in deltas],
            **({"composition": composition} if composition else {}),
            "romeflow_version": __version__}


def write_merged(out: Path, lm: LoadedModel, deltas: list[Delta], reports: dict | None = None,
                 composition: dict | None = None) -> None:
    """``--format hf``: the model as it is now (base + deltas composed by the caller), tokenizer included,
    and its model card (``reports``: card.model_card's; ``composition``: provenance's).

    Gated edits widen their layer's MLP; a standard config has one MLP width for every layer, so the
    other layers get zero units up to the widest (φ(0)·0 = 0 and a zero column: they add exactly nothing)
    and the config's width field says the new width. The live model is put back as it was afterwards."""
    model = lm.model
    widths = [hidden_width(model, layer) for layer in range(num_layers(model))]
    field = arch_of(model).width
    saved_width = getattr(model.config, field)
    try:
        for layer, width in enumerate(widths):
            if width < max(widths):
                add_neurons(model, zero_units(model, layer, max(widths) - width))
        setattr(model.config, field, max(widths))
        with atomic_folder(out) as tmp:  # built under .romeflow-tmp-..., renamed
            model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
            (tmp / PROVENANCE).write_text(json.dumps(provenance(lm, deltas, "hf", composition), indent=1))
            (tmp / CARD).write_text(model_card(lm.name, lm.fingerprint, deltas, "hf", reports, composition),
                                    encoding="utf-8")
    finally:
        setattr(model.config, field, saved_width)
        for layer, width in enumerate(widths):
            cut_neurons(model, layer, width)


def lora_factors(updates: list[RankOneUpdate]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (B (d_out, r), A (r, d_in))} with B A = the sum of every update on that module, in the
    order given (float32): a joint stack's one update per module gives B = U, A = Vᵀ."""
    columns: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for up in updates:
        u = up.u if up.u.dim() == 2 else up.u[:, None]  # (d_out, r_i)
        v = up.v if up.v.dim() == 2 else up.v[:, None]  # (d_in, r_i)
        us, vs = columns.setdefault(up.module, ([], []))
        us.append(u.detach().float().cpu())
        vs.append(v.detach().float().cpu())
    return {m: (torch.cat(us, 1).contiguous(), torch.cat(vs, 1).T.contiguous()) for m, (us, vs) in columns.items()}


def peft_config(lm: LoadedModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str) -> dict:
    """adapter_config.json: one LoRA module per edited module, rank r and lora_alpha r each (scaling 1)."""
    ranks = {m: int(b.shape[1]) for m, (b, _a) in factors.items()}
    r = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "target_modules": sorted(factors),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": lm.arch.conv1d,  # GPT-2's Conv1D stores W as (d_in, d_out)
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def check_peft(deltas: list[Delta]) -> None:
    """What a LoRA adapter cannot hold, refused with one line (no model needed): gated edits, no delta."""
    for d in deltas:
        if is_gated(d):
            raise ValueError(f"{d.path or d.name}: --format peft: a gated edit adds hidden units to an MLP, which a "
                             f"LoRA adapter cannot express; export it with --format hf")
    if not deltas:
        raise ValueError("--format peft: needs at least one delta")


def write_peft(out: Path, lm: LoadedModel, deltas: list[Delta], base: str, reports: dict | None = None,
               updates: list[RankOneUpdate] | None = None, composition: dict | None = None) -> dict:
    """``--format peft``: a LoRA adapter that ``peft.PeftModel.from_pretrained(base_model, out)`` loads;
    the adapted model equals the merged export. ``updates``: the composed linear updates
    (``EditedModel.updates``; default the deltas' own, their sum); ``base``: what base_model_name_or_path
    says; ``reports``, ``composition``: card.model_card's and provenance's. Returns the config."""
    check_distinct(deltas)
    check_peft(deltas)
    for d in deltas:
        check_applicable(d, lm)
    factors = lora_factors([up for d in deltas for up in d.updates] if updates is None else updates)
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a  # (r, d_in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b  # (d_out, r)
    config = peft_config(lm, factors, base)
    with atomic_folder(out) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
        (tmp / PROVENANCE).write_text(json.dumps(provenance(lm, deltas, "peft", composition), indent=1))
        (tmp / CARD).write_text(model_card(lm.name, lm.fingerprint, deltas, "peft", reports, composition),
                                encoding="utf-8")
    return config
