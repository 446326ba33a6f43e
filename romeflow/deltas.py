"""Delta files: a manifest's rank-one updates plus their provenance, and models composed from them.

A delta file is safetensors: tensors ``edits.<i>.u`` (d_out,) and ``edits.<i>.v`` (d_in,), and the
provenance as JSON under the header key ``romeflow`` (schema: schemas/delta.schema.json).
The edited model is base + deltas, always recomputed from the base weights in a fixed order, so
dropping a delta gives exactly (bit for bit) base + the remaining ones.

Checked on load, before any model is loaded: the metadata against the schema (at most
MAX_METADATA_BYTES), exactly the tensors the metadata announces, each float32, of shape (d,) or
(d, r) with the same r for u and v, finite, with ‖u‖·‖v‖ ≤ MAX_FACTOR_NORM, and the tensors' sha256
(``tensors_sha256``, written on save) equal to the metadata's. ``load_deltas`` also refuses the same
delta (by that hash) given twice.
"""

from __future__ import annotations

import hashlib
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
from .models import LoadedModel, ModelError, edited_module_name, read_weight, weight_shape, write_weight
from .rome import EditResult, RankOneUpdate, Rome, RomeParams, add_rank_one
from .schemas import validate
from .statistics import Stats

DELTA_FORMAT = "romeflow.delta/1"
MAX_METADATA_BYTES = 1 << 20
MAX_FACTOR_NORM = 1e6  # ‖u‖·‖v‖ ≥ ‖u vᵀ‖₂; a ROME edit is far below (docs/limits.md)


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


def tensors_sha256(tensors: dict[str, torch.Tensor], n_edits: int) -> str:
    """sha256 of a delta's factors in a fixed order (edits.0.u, edits.0.v, edits.1.u, ...): name, dtype
    and shape, then the bytes of each."""
    h = hashlib.sha256()
    for i in range(n_edits):
        for part in ("u", "v"):
            name = f"edits.{i}.{part}"
            t = tensors[name].detach().contiguous()
            h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_factors(where: str, i: int, u: torch.Tensor, v: torch.Tensor, d_out: int, d_in: int,
                  rank: int | None = None) -> None:
    """One edit's factors: float32, (d_out,)/(d_in,) or (d_out, r)/(d_in, r), finite, bounded norm."""
    at = f"{where}: edits.{i}"
    for part, t in (("u", u), ("v", v)):
        if t.dtype != torch.float32:
            raise DeltaError(f"{at}.{part}: dtype {str(t.dtype).removeprefix('torch.')}, not float32")
    if u.dim() != v.dim() or u.dim() not in (1, 2):
        raise DeltaError(f"{at}: factors of shapes {tuple(u.shape)} and {tuple(v.shape)}; "
                         f"expected ({d_out},) and ({d_in},), or ({d_out}, r) and ({d_in}, r)")
    r = 1 if u.dim() == 1 else u.shape[1]
    if u.shape[0] != d_out or v.shape[0] != d_in or (u.dim() == 2 and (v.shape[1] != r or r < 1)):
        raise DeltaError(f"{at}: factors of shapes {tuple(u.shape)} and {tuple(v.shape)} do not match "
                         f"d_out {d_out}, d_in {d_in}" + ("" if u.dim() == 1 else " and one rank r"))
    if rank is not None and rank != r:
        raise DeltaError(f"{at}: rank {rank} in the metadata, {r} in the factors")
    for part, t in (("u", u), ("v", v)):
        if not torch.isfinite(t).all():
            raise DeltaError(f"{at}.{part}: holds NaN or infinite values")
    norm = u.double().norm().item() * v.double().norm().item()
    if not norm <= MAX_FACTOR_NORM:
        raise DeltaError(f"{at}: ‖u‖·‖v‖ = {norm:.3g} is above the plausible bound {MAX_FACTOR_NORM:g}")


def save_delta(path: str | os.PathLike, delta: Delta) -> None:
    """Write ``delta`` (atomically), recording its tensors' sha256 in the metadata (delta.meta too)."""
    tensors = {}
    for i, up in enumerate(delta.updates):
        tensors[f"edits.{i}.u"] = up.u.detach().float().contiguous()
        tensors[f"edits.{i}.v"] = up.v.detach().float().contiguous()
    meta = {**delta.meta, "tensors_sha256": tensors_sha256(tensors, len(delta.updates))}
    errors = validate("delta", meta)
    if errors:
        raise DeltaError(f"{path}: delta metadata {errors[0][0]}: {errors[0][1]}")
    for i, e in enumerate(meta["edits"]):
        check_factors(str(path), i, tensors[f"edits.{i}.u"], tensors[f"edits.{i}.v"], e["d_out"], e["d_in"],
                      e.get("rank"))
    delta.meta = meta
    header = {"romeflow": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_delta(path: str | os.PathLike) -> Delta:
    """Read and check a delta file (module docstring); every problem is a DeltaError, one line."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: delta file not found")
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("romeflow")
            if text is None:
                raise DeltaError(f"{path}: not a romeflow delta file (no 'romeflow' metadata)")
            if len(text) > MAX_METADATA_BYTES:
                raise DeltaError(f"{path}: metadata: larger than {MAX_METADATA_BYTES} bytes")
            meta = json.loads(text)
            if isinstance(meta, dict) and "tensors_sha256" not in meta:
                raise DeltaError(f"{path}: tensors_sha256: missing (a delta written before romeflow checked "
                                 f"contents, or altered); recompute it with `romeflow apply` or `dvc repro`")
            errors = validate("delta", meta)
            if errors:
                raise DeltaError(f"{path}: metadata {errors[0][0]}: {errors[0][1]}")
            want = [f"edits.{i}.{p}" for i in range(len(meta["edits"])) for p in ("u", "v")]
            extra = sorted(set(f.keys()) - set(want))
            missing = [k for k in want if k not in set(f.keys())]
            if extra or missing:
                raise DeltaError(f"{path}: {(extra or missing)[0]}: " + ("a tensor the metadata does not list"
                                                                          if extra else "missing"))
            for i, e in enumerate(meta["edits"]):  # shapes before reading: a huge tensor is never loaded
                for p, d in (("u", e["d_out"]), ("v", e["d_in"])):
                    shape = f.get_slice(f"edits.{i}.{p}").get_shape()
                    if not shape or shape[0] != d or len(shape) > 2 or (len(shape) == 2 and shape[1] > 4096):
                        raise DeltaError(f"{path}: edits.{i}.{p}: shape {tuple(shape)} does not fit "
                                         f"{'d_out' if p == 'u' else 'd_in'} {d} (and a rank <= 4096)")
            tensors = {k: f.get_tensor(k) for k in want}
    except DeltaError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a delta"
        first = str(e).splitlines()[0] if str(e) else ""
        raise DeltaError(f"{path}: not a romeflow delta file ({type(e).__name__}: {first})") from e
    updates = []
    for i, e in enumerate(meta["edits"]):
        u, v = tensors[f"edits.{i}.u"], tensors[f"edits.{i}.v"]
        check_factors(str(path), i, u, v, e["d_out"], e["d_in"], e.get("rank"))
        updates.append(RankOneUpdate(e["module"], e["layer"], u, v))
    digest = tensors_sha256(tensors, len(meta["edits"]))
    if digest != meta["tensors_sha256"]:
        raise DeltaError(f"{path}: tensors_sha256: the factors' sha256 is {digest[:12]}..., the metadata says "
                         f"{meta['tensors_sha256'][:12]}... (the file was changed after it was written)")
    return Delta(updates, meta, str(path))


def check_distinct(deltas: list[Delta]) -> None:
    """Refuse the same delta (by its tensors' sha256) given twice: it would be added twice."""
    seen: dict[str, Delta] = {}
    for d in deltas:
        h = d.meta.get("tensors_sha256")
        if h is not None and h in seen:
            raise DeltaError(f"{d.path or d.name}: the same delta as {seen[h].path or seen[h].name} "
                             f"(tensors sha256 {h[:12]}...); give each delta once")
        if h is not None:
            seen[h] = d


def load_deltas(paths) -> list[Delta]:
    """load_delta of each path, then check_distinct: what every command that composes deltas reads."""
    deltas = [load_delta(p) for p in paths]
    check_distinct(deltas)
    return deltas


def check_applicable(delta: Delta, lm: LoadedModel) -> None:
    """Refuse a delta computed on another base model, or one whose modules do not fit."""
    where = delta.path or delta.name
    if delta.base_fingerprint != lm.fingerprint:
        raise DeltaError(f"{where}: computed on base model {delta.meta['base_model']['name']} "
                         f"({delta.base_fingerprint[:12]}), not on {lm.name} ({lm.fingerprint[:12]})")
    for i, up in enumerate(delta.updates):
        try:
            expected = edited_module_name(lm.model, up.layer)
        except (ValueError, ModelError) as e:
            raise DeltaError(f"{where}: edits[{i}].layer: {e}") from None
        if up.module != expected:  # a delta may only touch the edit module of its layer
            raise DeltaError(f"{where}: edits[{i}].module: {up.module} is not layer {up.layer}'s edit module "
                             f"({expected})")
        try:
            shape = weight_shape(lm.model, up.module)
        except AttributeError as e:
            raise DeltaError(f"{where}: edits[{i}]: module {up.module} not in the model") from e
        if shape != (up.u.shape[0], up.v.shape[0]):
            raise DeltaError(f"{where}: edits[{i}]: factors {up.u.shape[0]}x{up.v.shape[0]} do not fit "
                             f"{up.module} ({tuple(shape)})")


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
        check_distinct(deltas)
        for d in deltas:
            check_applicable(d, self.lm)
        for d in deltas:
            for up in d.updates:
                if up.module not in self._base:  # untouched so far, so still the base weight
                    self._base[up.module] = read_weight(self.lm.model, up.module)
        for name, w in self._base.items():
            write_weight(self.lm.model, name, w)
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
    saved = {m: read_weight(lm.model, m) for m in {edited_module_name(lm.model, l) for l in layers}}
    editor = Rome(lm, params, lambda layer: stats[layer].second_moment, root)
    probe = lambda e: edit_probabilities(lm, e.prompt, e.target, e.target_true)  # noqa: E731
    try:
        before = [probe(e) for e in manifest.edits]
        results = editor.apply([e.request for e in manifest.edits], layers, progress)
        after = [probe(e) for e in manifest.edits]
    finally:
        for m, w in saved.items():
            write_weight(lm.model, m, w)
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
        **({} if lm.dtype == torch.float32 else {"dtype": str(lm.dtype).removeprefix("torch.")}),
        "context_prefixes": editor.prefixes,
        "edits": [{"index": i, "module": r.update.module, "layer": r.update.layer,
                   "d_in": r.update.v.shape[0], "d_out": r.update.u.shape[0],
                   **({"rank": r.update.u.shape[1]} if r.update.u.dim() == 2 else {}), "steps": len(r.nll_trace) - 1,
                   "final_nll": r.nll_trace[-1], "before": b, "after": a, "protected": list(r.protected)}
                  for i, (r, b, a) in enumerate(zip(results, before, after))],
    }
    return Delta([r.update for r in results], meta)
