"""Delta files: a manifest's rank-one updates plus their provenance (models composed from them: compose.py).

A delta file is safetensors: tensors ``edits.<i>.u`` (d_out,) and ``edits.<i>.v`` (d_in,), and the
provenance as JSON under the header key ``romeflow`` (schema: schemas/delta.schema.json). Deltas
written with ``key_values: true`` in their metadata also hold each edit's ``edits.<i>.k_star`` (d_in,)
and ``edits.<i>.v_star`` (d_out,) — computed as the edit was, against the base model (plus the
earlier edits of its manifest) — and, when the edit held ``protected_keys: m`` keys fixed,
``edits.<i>.protected`` (m, d_in): what ``stack.method: joint`` re-solves the stack from. Older
deltas without them still load (their factors alone); the joint solve refuses them.

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

from .. import __version__
from ..evaluation.scoring import edit_probabilities
from ..io import atomic_path, check_input
from .manifests import Manifest, ManifestError
from ..engine.models import LoadedModel, ModelError, edited_module_name, read_weight, weight_shape, write_weight
from ..engine.gated import NeuronUpdate, cut_neurons, hidden_width
from ..engine.rome import EditResult, RankOneUpdate, Rome, RomeParams, add_rank_one
from . import neurons
from ..schemas import validate
from ..engine.statistics import Stats

DELTA_FORMAT = "romeflow.delta/1"
MAX_METADATA_BYTES = 1 << 20
MAX_FACTOR_NORM = 1e6  # ‖u‖·‖v‖ ≥ ‖u vᵀ‖₂; a ROME edit is far below (docs/limits.md)


class DeltaError(ValueError):
    """An unusable delta file; str(error) is the one-line message for the user."""


@dataclass
class KeyValue:
    """One edit's constraint for the joint solve: Ŵ k* = v* on ``module``, and the keys it held fixed."""

    module: str
    layer: int
    k_star: torch.Tensor  # (d_in,)
    v_star: torch.Tensor  # (d_out,)
    protected: torch.Tensor | None = None  # (m, d_in)


@dataclass
class Delta:
    updates: list  # RankOneUpdate (linear inserts) or gated.NeuronUpdate (the gated insert; pipeline/neurons.py)
    meta: dict
    path: str | None = None
    pairs: list[KeyValue] | None = None  # one per edit; None: a delta written before they were stored

    @property
    def name(self) -> str:
        return self.meta["manifest"]["name"]

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_model"]["fingerprint"]


TENSOR_PARTS = ("u", "v", "k_star", "v_star", "protected")  # per edit, in the order they are hashed


def tensors_sha256(tensors: dict[str, torch.Tensor], n_edits: int) -> str:
    """sha256 of a delta's tensors in a fixed order (edits.0.u, edits.0.v, edits.0.k_star, edits.0.v_star,
    edits.0.protected, edits.1.u, ...; the parts a delta has): name, dtype and shape, then the bytes of
    each. A delta with factors only hashes as it did before k*/v* were stored."""
    h = hashlib.sha256()
    for i in range(n_edits):
        for part in TENSOR_PARTS[:2] + neurons.NEURON_PARTS + TENSOR_PARTS[2:]:
            name = f"edits.{i}.{part}"
            if name not in tensors:  # (the parts a delta has: u and v, or a neuron edit's)
                continue
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


def check_pair(where: str, i: int, tensors: dict[str, torch.Tensor], d_out: int, d_in: int, m: int) -> None:
    """One edit's k* (d_in,), v* (d_out,) and protected keys (m, d_in): float32, finite, bounded norm."""
    shapes = {"k_star": (d_in,), "v_star": (d_out,), "protected": (m, d_in)}
    for part, shape in shapes.items():
        name = f"edits.{i}.{part}"
        if part == "protected" and m == 0:
            continue
        t = tensors[name]
        if t.dtype != torch.float32:
            raise DeltaError(f"{where}: {name}: dtype {str(t.dtype).removeprefix('torch.')}, not float32")
        if tuple(t.shape) != shape:
            raise DeltaError(f"{where}: {name}: shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise DeltaError(f"{where}: {name}: holds NaN or infinite values")
        norm = t.double().norm().item()
        if not norm <= MAX_FACTOR_NORM:
            raise DeltaError(f"{where}: {name}: norm {norm:.3g} is above the plausible bound {MAX_FACTOR_NORM:g}")


def delta_tensors(delta: Delta) -> dict[str, torch.Tensor]:
    """The tensors of a delta file, by name (float32, contiguous, on the host)."""
    tensors = {}
    for i, up in enumerate(delta.updates):
        if isinstance(up, NeuronUpdate):
            tensors.update(neurons.tensors_of(i, up))
            continue
        tensors[f"edits.{i}.u"] = up.u.detach().float().cpu().contiguous()
        tensors[f"edits.{i}.v"] = up.v.detach().float().cpu().contiguous()
        if delta.pairs is not None:
            kv = delta.pairs[i]
            tensors[f"edits.{i}.k_star"] = kv.k_star.detach().float().cpu().contiguous()
            tensors[f"edits.{i}.v_star"] = kv.v_star.detach().float().cpu().contiguous()
            if kv.protected is not None and kv.protected.numel():
                tensors[f"edits.{i}.protected"] = kv.protected.detach().float().cpu().contiguous()
    return tensors


def save_delta(path: str | os.PathLike, delta: Delta) -> None:
    """Write ``delta`` (atomically), recording its tensors' sha256 in the metadata (delta.meta too)."""
    tensors = delta_tensors(delta)
    meta = {**delta.meta, "tensors_sha256": tensors_sha256(tensors, len(delta.updates))}
    if delta.pairs is not None:
        meta["key_values"] = True
        for i, e in enumerate(meta["edits"]):
            m = tensors.get(f"edits.{i}.protected")
            if m is not None:
                e["protected_keys"] = m.shape[0]
    errors = validate("delta", meta)
    if errors:
        raise DeltaError(f"{path}: delta metadata {errors[0][0]}: {errors[0][1]}")
    for i, e in enumerate(meta["edits"]):
        if neurons.is_neurons(e):
            _check_neurons(str(path), i, tensors, e)
            continue
        check_factors(str(path), i, tensors[f"edits.{i}.u"], tensors[f"edits.{i}.v"], e["d_out"], e["d_in"],
                      e.get("rank"))
        if meta.get("key_values"):
            check_pair(str(path), i, tensors, e["d_out"], e["d_in"], e.get("protected_keys", 0))
    delta.meta = meta
    header = {"romeflow": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_delta(path: str | os.PathLike) -> Delta:
    """Read and check a delta file (module docstring); every problem is a DeltaError, one line."""
    path = check_input(path, "delta file", DeltaError)  # a FIFO, a link loop: said, never opened
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
            want = [f"edits.{i}.{p}" for i, e in enumerate(meta["edits"]) for p in _parts(meta, e)]
            extra = sorted(set(f.keys()) - set(want))
            missing = [k for k in want if k not in set(f.keys())]
            if extra or missing:
                raise DeltaError(f"{path}: {(extra or missing)[0]}: " + ("a tensor the metadata does not list"
                                                                          if extra else "missing"))
            for i, e in enumerate(meta["edits"]):  # shapes before reading: a huge tensor is never loaded
                if neurons.is_neurons(e):
                    for p in neurons.parts(e):
                        shape = tuple(f.get_slice(f"edits.{i}.{p}").get_shape())
                        if shape != neurons.shapes(e)[p]:
                            raise DeltaError(f"{path}: edits.{i}.{p}: shape {shape}, expected {neurons.shapes(e)[p]}")
                    continue
                for p, d in (("u", e["d_out"]), ("v", e["d_in"])):
                    shape = f.get_slice(f"edits.{i}.{p}").get_shape()
                    if not shape or shape[0] != d or len(shape) > 2 or (len(shape) == 2 and shape[1] > 4096):
                        raise DeltaError(f"{path}: edits.{i}.{p}: shape {tuple(shape)} does not fit "
                                         f"{'d_out' if p == 'u' else 'd_in'} {d} (and a rank <= 4096)")
                for p in _parts(meta, e)[2:]:  # k*, v*, protected keys: the shapes the metadata implies
                    want_shape = {"k_star": [e["d_in"]], "v_star": [e["d_out"]],
                                  "protected": [e.get("protected_keys", 0), e["d_in"]]}[p]
                    shape = list(f.get_slice(f"edits.{i}.{p}").get_shape())
                    if shape != want_shape:
                        raise DeltaError(f"{path}: edits.{i}.{p}: shape {tuple(shape)}, expected {tuple(want_shape)}")
            tensors = {k: f.get_tensor(k) for k in want}
    except DeltaError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a delta"
        first = str(e).splitlines()[0] if str(e) else ""
        raise DeltaError(f"{path}: not a romeflow delta file ({type(e).__name__}: {first})") from e
    updates, pairs = [], [] if meta.get("key_values") else None
    for i, e in enumerate(meta["edits"]):
        if neurons.is_neurons(e):
            _check_neurons(str(path), i, tensors, e)
            updates.append(neurons.update_of(e, i, tensors))
            continue
        u, v = tensors[f"edits.{i}.u"], tensors[f"edits.{i}.v"]
        check_factors(str(path), i, u, v, e["d_out"], e["d_in"], e.get("rank"))
        updates.append(RankOneUpdate(e["module"], e["layer"], u, v))
        if pairs is not None:
            check_pair(str(path), i, tensors, e["d_out"], e["d_in"], e.get("protected_keys", 0))
            pairs.append(KeyValue(e["module"], e["layer"], tensors[f"edits.{i}.k_star"], tensors[f"edits.{i}.v_star"],
                                  tensors.get(f"edits.{i}.protected")))
    digest = tensors_sha256(tensors, len(meta["edits"]))
    if digest != meta["tensors_sha256"]:
        raise DeltaError(f"{path}: tensors_sha256: the factors' sha256 is {digest[:12]}..., the metadata says "
                         f"{meta['tensors_sha256'][:12]}... (the file was changed after it was written)")
    return Delta(updates, meta, str(path), pairs)


def _check_neurons(where: str, i: int, tensors: dict, edit: dict) -> None:
    try:
        neurons.check(where, i, tensors, edit, MAX_FACTOR_NORM)
    except ValueError as e:
        raise DeltaError(str(e)) from None


def _parts(meta: dict, edit: dict) -> tuple[str, ...]:
    """The tensors the metadata announces for one edit."""
    if neurons.is_neurons(edit):
        return neurons.parts(edit)
    if not meta.get("key_values"):
        return ("u", "v")
    return ("u", "v", "k_star", "v_star") + (("protected",) if edit.get("protected_keys") else ())


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
        if isinstance(up, NeuronUpdate):
            try:
                neurons.check_fits(where, i, up, lm)
            except ValueError as e:
                raise DeltaError(str(e)) from None
            continue
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


def compute_delta(lm: LoadedModel, manifest: Manifest, params: RomeParams, stats: dict[int, Stats],
                  progress: Callable[[int, EditResult], None] | None = None, root: Path = Path("."),
                  onto: list[Delta] = (), corpus=None) -> Delta:
    """Apply a manifest's edits one after another with ROME and return them as a delta.

    The model is left as it was (the base): the delta alone carries the edits. ``root``: the folder
    that ``rome.protect_sources`` paths are relative to (the project's). Each edit's insert holds the
    keys of the manifest's earlier edits fixed (``Rome.apply``).

    ``onto``: deltas of an existing stack (with k*/v* pairs) to apply onto: the edits are computed on
    base + their sum, every insert also holds their edits' keys fixed, and the new delta is meant to be
    added to them (its metadata lists them under ``onto``). ``corpus``: the statistics' text (the gated
    insert fits its gate against its first tokens; default the Wikipedia excerpt).
    """
    layers = [manifest.layer_of(e, params.layer) for e in manifest.edits]
    for d in onto:
        require_pairs(d, "--onto")
        check_applicable(d, lm)
    modules = {edited_module_name(lm.model, l) for l in layers} | {up.module for d in onto for up in d.updates}
    saved = {m: read_weight(lm.model, m) for m in modules}
    widths = {l: hidden_width(lm.model, l) for l in layers}  # the gated insert appends units: cut back after
    editor = Rome(lm, params, lambda layer: stats[layer].second_moment, root, corpus=corpus)
    probe = lambda e: edit_probabilities(lm, e.prompt, e.target, e.target_true)  # noqa: E731
    hold: dict[int, list[torch.Tensor]] = {}
    for d in onto:
        for up, kv in zip(d.updates, d.pairs):
            add_rank_one(lm.model, up.module, up.u, up.v)
            hold.setdefault(kv.layer, []).append(kv.k_star)
    try:
        before = [probe(e) for e in manifest.edits]
        results = editor.apply([e.request for e in manifest.edits], layers, progress,
                               {layer: torch.stack(keys) for layer, keys in hold.items()})
        after = [probe(e) for e in manifest.edits]
    finally:
        for layer, width in widths.items():
            cut_neurons(lm.model, layer, width)
        for m, w in saved.items():
            write_weight(lm.model, m, w)
    gated = any(isinstance(r.update, NeuronUpdate) for r in results)
    meta = {
        "format": neurons.NEURON_FORMAT if gated else DELTA_FORMAT,
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
        # where and with how many CPU threads: the order of float operations, so the last bits (romeflow verify)
        "threads": torch.get_num_threads(),
        "device": lm.device.type,
        "context_prefixes": editor.prefixes,
        "edits": [{"index": i, "module": r.update.module, "layer": r.update.layer, **_shape_meta(r),
                   "steps": len(r.nll_trace) - 1,
                   "final_nll": r.nll_trace[-1], "before": b, "after": a, "protected": list(r.protected),
                   **({"held": r.held} if r.held else {}), **({"scale": r.scale} if r.scale != 1.0 else {}),
                   **({"centroid": True} if r.family.get("centroid") else {})}
                  for i, (r, b, a) in enumerate(zip(results, before, after))],
    }
    if onto:
        meta["onto"] = [{"manifest": d.name, "tensors_sha256": d.meta.get("tensors_sha256")
                     or tensors_sha256(delta_tensors(d), len(d.updates))} for d in onto]
    pairs = None if gated else [KeyValue(r.update.module, r.update.layer, r.k_star, r.v_star, r.protected_keys)
                                for r in results]
    return Delta([r.update for r in results], meta, pairs=pairs)


def _shape_meta(r: EditResult) -> dict:
    """An edit's shape fields: d_in, d_out (and rank) of its factors, or of its units (and their gate)."""
    up = r.update
    if isinstance(up, NeuronUpdate):
        return {"d_in": up.gate.shape[1], "d_out": up.down.shape[0], "neurons": up.width,
                "mlp": "gated" if up.up is not None else "bias", "gate": r.family["gate"]}
    return {"d_in": up.v.shape[0], "d_out": up.u.shape[0], **({"rank": up.u.shape[1]} if up.u.dim() == 2 else {})}


# --------------------------------------------------------------------------------------------------
# What composing deltas asks of them (the composition itself: compose.py)
# --------------------------------------------------------------------------------------------------


def require_pairs(delta: Delta, why: str = "stack.method: joint") -> None:
    """Refuse a delta without k*/v* pairs (written before romeflow stored them): one line naming it."""
    if delta.pairs is None:
        raise DeltaError(f"{delta.path or delta.name}: key_values: the delta holds no k*/v* pairs (written before "
                         f"romeflow stored them); {why} needs them: recompute it with `romeflow apply` or `dvc repro`")


def check_onto(manifest: Manifest, onto: list[Delta]) -> None:
    """Refuse to apply a manifest onto deltas that already edit one of its facts (the same subject and
    relation): that edit's key is held by the stack, so there is nothing left to write. One line naming
    the manifest's edit and the delta (ManifestError), before any model is loaded."""
    for d in onto:
        theirs = {(e["subject"], e["relation"]): j for j, e in enumerate(d.meta["manifest"]["canonical"]["edits"])}
        for i, e in enumerate(manifest.edits):
            j = theirs.get((e.subject, e.relation))
            if j is not None:
                raise ManifestError(f"{manifest.path}: edits[{i}]: '{e.subject}' with relation '{e.relation}' is "
                                    f"already edited by {d.path or d.name} (edits[{j}]); apply onto the stack without "
                                    f"that delta, or revert it first")


def is_gated(delta: Delta) -> bool:
    """A delta of the gated insert: hidden units added to an MLP, not a linear update."""
    return any(isinstance(up, NeuronUpdate) for up in delta.updates)


def edits(deltas: list[Delta]) -> list[tuple[Delta, int]]:
    """Every edit of a stack, in order: (delta, index of the edit in it)."""
    return [(d, i) for d in deltas for i in range(len(d.updates))]


def __getattr__(name: str):
    """EditedModel, JointSolve and calibration_prompts moved to compose.py; old imports still find them."""
    if name in ("EditedModel", "JointSolve", "calibration_prompts"):
        from . import compose

        return getattr(compose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
