"""Delta files: a manifest's rank-one updates plus their provenance, and models composed from them.

A delta file is safetensors: tensors ``edits.<i>.u`` (d_out,) and ``edits.<i>.v`` (d_in,), and the
provenance as JSON under the header key ``romeflow`` (schema: schemas/delta.schema.json).
The edited model is base + deltas, always recomputed from the base weights in a fixed order, so
dropping a delta gives exactly (bit for bit) base + the remaining ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .evaluation import edit_probabilities
from .io import atomic_path
from .manifests import Manifest
from .models import LoadedModel, edited_module_name, weight_out_in
from .rome import EditResult, RankOneUpdate, Rome, RomeParams, add_rank_one
from .schemas import validate
from .statistics import Stats

DELTA_FORMAT = "romeflow.delta/1"


class DeltaError(ValueError):
    """An unusable delta file; str(error) is the one-line message for the user."""


@dataclass
class Delta:
    updates: list[RankOneUpdate]
    meta: dict
    path: str | None = None

    @property
    def name(self) -> str:
        return self.meta["manifest"]["name"]

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_model"]["fingerprint"]


def save_delta(path: str | os.PathLike, delta: Delta) -> None:
    errors = validate("delta", delta.meta)
    if errors:
        raise DeltaError(f"{path}: delta metadata {errors[0][0]}: {errors[0][1]}")
    tensors = {}
    for i, up in enumerate(delta.updates):
        tensors[f"edits.{i}.u"] = up.u.detach().float().contiguous()
        tensors[f"edits.{i}.v"] = up.v.detach().float().contiguous()
    header = {"romeflow": json.dumps(delta.meta, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_delta(path: str | os.PathLike) -> Delta:
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: delta file not found")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["romeflow"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a delta"
        raise DeltaError(f"{path}: not a romeflow delta file ({type(e).__name__}: {e})") from e
    errors = validate("delta", meta)
    if errors:
        raise DeltaError(f"{path}: metadata {errors[0][0]}: {errors[0][1]}")
    updates = []
    for i, e in enumerate(meta["edits"]):
        u, v = tensors.get(f"edits.{i}.u"), tensors.get(f"edits.{i}.v")
        if u is None or v is None or u.shape != (e["d_out"],) or v.shape != (e["d_in"],):
            raise DeltaError(f"{path}: edits[{i}]: factors missing or of the wrong shape")
        updates.append(RankOneUpdate(e["module"], e["layer"], u, v))
    return Delta(updates, meta, str(path))


def check_applicable(delta: Delta, lm: LoadedModel) -> None:
    """Refuse a delta computed on another base model, or one whose modules do not fit."""
    where = delta.path or delta.name
    if delta.base_fingerprint != lm.fingerprint:
        raise DeltaError(f"{where}: computed on base model {delta.meta['base_model']['name']} "
                         f"({delta.base_fingerprint[:12]}), not on {lm.name} ({lm.fingerprint[:12]})")
    for i, up in enumerate(delta.updates):
        try:
            w = weight_out_in(lm.model, up.module)
        except AttributeError as e:
            raise DeltaError(f"{where}: edits[{i}]: module {up.module} not in the model") from e
        if w.shape != (up.u.numel(), up.v.numel()):
            raise DeltaError(f"{where}: edits[{i}]: factors {up.u.numel()}x{up.v.numel()} do not fit "
                             f"{up.module} ({tuple(w.shape)})")


class EditedModel:
    """A base model with deltas on top: W = W_base + Σ_deltas Σ_edits u vᵀ, in the order given.

    Base weights of every module a delta touched are kept (one (d_out, d_in) copy each), and every
    composition starts again from them.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.deltas: list[Delta] = []
        self._base: dict[str, torch.Tensor] = {}

    def compose(self, deltas: list[Delta]) -> None:
        for d in deltas:
            check_applicable(d, self.lm)
        for d in deltas:
            for up in d.updates:
                if up.module not in self._base:  # untouched so far, so still the base weight
                    self._base[up.module] = weight_out_in(self.lm.model, up.module).clone()
        for name, w in self._base.items():
            weight_out_in(self.lm.model, name).copy_(w)
        for d in deltas:
            for up in d.updates:
                add_rank_one(self.lm.model, up.module, up.u, up.v)
        self.deltas = list(deltas)

    def reset(self) -> None:
        self.compose([])


def compute_delta(lm: LoadedModel, manifest: Manifest, params: RomeParams, stats: dict[int, Stats],
                  progress: Callable[[int, EditResult], None] | None = None, root: Path = Path(".")) -> Delta:
    """Apply a manifest's edits one after another with ROME and return them as a delta.

    The model is left as it was (the base): the delta alone carries the edits. ``root``: the folder
    that ``rome.protect_sources`` paths are relative to (the project's).
    """
    layers = [manifest.layer_of(e, params.layer) for e in manifest.edits]
    saved = {m: weight_out_in(lm.model, m).clone() for m in {edited_module_name(lm.model, l) for l in layers}}
    editor = Rome(lm, params, lambda layer: stats[layer].second_moment, root)
    probe = lambda e: edit_probabilities(lm, e.prompt, e.target, e.target_true)  # noqa: E731
    try:
        before = [probe(e) for e in manifest.edits]
        results = editor.apply([e.request for e in manifest.edits], layers, progress)
        after = [probe(e) for e in manifest.edits]
    finally:
        for m, w in saved.items():
            weight_out_in(lm.model, m).copy_(w)
    meta = {
        "format": DELTA_FORMAT,
        "romeflow_version": __version__,
        "method": editor.name,
        "manifest": {"name": manifest.name, "sha256": manifest.sha256, "canonical": manifest.canonical()},
        "base_model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "stats": [{"layer": l, "sha256": stats[l].sha256, "corpus_id": stats[l].meta["corpus_id"],
                   "corpus_sha256": stats[l].meta["corpus_sha256"], "tokens": stats[l].meta["tokens"]}
                  for l in sorted(set(layers))],
        "hyperparameters": params.to_dict(),
        "seed": params.seed,
        "context_prefixes": editor.prefixes,
        "edits": [{"index": i, "module": r.update.module, "layer": r.update.layer,
                   "d_in": r.update.v.numel(), "d_out": r.update.u.numel(), "steps": len(r.nll_trace) - 1,
                   "final_nll": r.nll_trace[-1], "before": b, "after": a, "protected": list(r.protected)}
                  for i, (r, b, a) in enumerate(zip(results, before, after))],
    }
    return Delta([r.update for r in results], meta)
