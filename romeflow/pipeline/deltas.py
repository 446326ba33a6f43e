"""Delta files: a manifest's rank-one updates plus their provenance, and models composed from them.

A delta file is safetensors: tensors ``edits.<i>.u`` (d_out,) and ``edits.<i>.v`` (d_in,), and the
provenance as JSON under the header key ``romeflow`` (schema: schemas/delta.schema.json). Deltas
written with ``key_values: true`` in their metadata also hold each edit's ``edits.<i>.k_star`` (d_in,)
and ``edits.<i>.v_star`` (d_out,) — computed as the edit was, against the base model (plus the
earlier edits of its manifest) — and, when the edit held ``protected_keys: m`` keys fixed,
``edits.<i>.protected`` (m, d_in): what ``stack.method: joint`` re-solves the stack from. Older
deltas without them still load (their factors alone); the joint solve refuses them.
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

from .. import __version__
from ..evaluation.scoring import edit_probabilities
from ..io import atomic_path, check_input
from .manifests import Manifest, ManifestError
from ..engine.models import LoadedModel, ModelError, edited_module_name, read_weight, weight_shape, write_weight
from ..engine.prompts import fill
from ..engine.joint import joint_insert, null_space_basis, projected_solver
from ..engine.margins import margins, next_token
from ..engine.gated import NeuronUpdate, add_neurons, cut_neurons, hidden_width
from ..engine.rome import EditResult, InsertError, RankOneUpdate, Rome, RomeParams, Solver, add_rank_one
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


class EditedModel:
    """A base model with deltas on top: W = W_base + Σ_deltas Σ_edits u vᵀ, in the order given.

    Base weights of every module a delta touched are kept (one (d_out, d_in) copy each), and every
    composition starts again from them.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.deltas: list[Delta] = []
        self.scales: torch.Tensor | None = None  # each edit's share of its change, when the stack is calibrated
        self._base: dict[str, torch.Tensor] = {}
        self._widths: dict[int, int] = {}  # layer -> its MLP's hidden units in the base model (gated edits)

    def compose(self, deltas: list[Delta], joint: "JointSolve | None" = None) -> None:
        """base + deltas: the sum of their factors (default), or with ``joint`` the one update that the
        joint solve recomputes from all their (k*, v*) pairs (stack.method: joint)."""
        check_distinct(deltas)
        for d in deltas:
            check_applicable(d, self.lm)
        if joint is not None:
            joint.check(deltas)
        for d in deltas:
            for up in d.updates:
                if isinstance(up, NeuronUpdate):
                    if up.layer not in self._widths:  # untouched so far, so still the base model's width
                        self._widths[up.layer] = hidden_width(self.lm.model, up.layer)
                elif up.module not in self._base:  # untouched so far, so still the base weight
                    self._base[up.module] = read_weight(self.lm.model, up.module)
        self.scales = None
        if joint is None:
            updates = [up for d in deltas for up in d.updates]
        elif joint.margin > 0 and deltas and not any(is_gated(d) for d in deltas):
            self.scales = self.calibrate(deltas, joint)
            updates = joint.updates(deltas, self._base, self.scales)
        else:
            updates = joint.updates(deltas, self._base)
        self._write(updates, deltas)
        self.deltas = list(deltas)

    def reset(self) -> None:
        self.compose([])

    def _write(self, updates: list, deltas: list[Delta] = ()) -> None:
        """Base weights and widths, then the rank-one ``updates`` added and the neurons of ``deltas`` appended
        in the canonical order (``neurons.canonical``: the same weights whatever the deltas' order)."""
        for layer, width in self._widths.items():
            cut_neurons(self.lm.model, layer, width)
        for name, w in self._base.items():
            write_weight(self.lm.model, name, w)
        for up in updates:
            if isinstance(up, RankOneUpdate):
                add_rank_one(self.lm.model, up.module, up.u, up.v)
        for up in neurons.canonical(deltas):
            add_neurons(self.lm.model, up)

    def calibrate(self, deltas: list[Delta], joint: "JointSolve") -> torch.Tensor:
        """Each edit's share s_j of its change (stack.margin): the least, to 2^-rounds, at which its
        rewrite prompt prefers the new object over the old one by ``joint.margin`` on the composed
        model itself (mean per-token log-probability, as ES; with ``joint.prefixes``, the mean margin
        of the prompt alone and after that many of v*'s context prefixes). All edits bisect at once: each round
        solves the stack with the midpoints, scores every rewrite prompt in one batched pass, and
        halves each edit's interval. An edit that does not hold even whole keeps s_j = 1.

        v* overshoots (a median margin of ~9 nats on its own prompt), and the excess is damage
        that adds up over a stack; in the stack, cross-talk and the ridge also move each edit's
        margin, which is why the shares are found there and not per delta (docs/scale.md)."""
        pairs = edits(deltas)
        canon = [d.meta["manifest"]["canonical"]["edits"][i] for d, i in pairs]
        rewrites = [fill(e["relation"], e["subject"]) for e in canon]
        self._write([])  # the base model: the old object of an edit that names none is its answer
        olds = [e.get("target_true") or next_token(self.lm, p) for e, p in zip(canon, rewrites)]
        asked = [calibration_prompts(d, p, joint.prefixes) for (d, _), p in zip(pairs, rewrites)]  # per edit
        prompts = [q for qs in asked for q in qs]
        targets = [e["target"] for e, qs in zip(canon, asked) for _ in qs]
        old_of = [o for o, qs in zip(olds, asked) for _ in qs]
        owner = torch.tensor([j for j, qs in enumerate(asked) for _ in qs])  # (prompts,) the edit of each prompt
        count = torch.bincount(owner, minlength=len(pairs)).double()  # (n,)
        lo, hi = torch.zeros(len(pairs), dtype=torch.float64), torch.ones(len(pairs), dtype=torch.float64)
        for _ in range(joint.rounds):
            mid = (lo + hi) / 2
            self._write(joint.updates(deltas, self._base, mid))
            m = margins(self.lm, prompts, targets, old_of).double()  # (prompts,)
            mean = torch.zeros(len(pairs), dtype=torch.float64).index_add(0, owner, m) / count  # (n,)
            held = mean >= joint.margin
            hi, lo = torch.where(held, mid, hi), torch.where(held, lo, mid)
        return hi


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
# The joint solve of a stack (stack.method: joint)
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


def calibration_prompts(delta: Delta, rewrite: str, prefixes: int) -> list[str]:
    """The prompts whose mean margin calibrates an edit: its rewrite prompt, and after ``prefixes`` of
    the delta's own context prefixes (those v* was optimised over), evenly spaced over the list."""
    own = [p for p in delta.meta.get("context_prefixes", []) if p]
    if prefixes <= 0 or not own:
        return [rewrite]
    n = min(prefixes, len(own))
    picks = sorted({round(i * (len(own) - 1) / max(n - 1, 1)) for i in range(n)})
    return [rewrite] + [own[i] + rewrite for i in picks]


def is_gated(delta: Delta) -> bool:
    """A delta of the gated insert: hidden units added to an MLP, not a linear update."""
    return any(isinstance(up, NeuronUpdate) for up in delta.updates)


def edits(deltas: list[Delta]) -> list[tuple[Delta, int]]:
    """Every edit of a stack, in order: (delta, index of the edit in it)."""
    return [(d, i) for d in deltas for i in range(len(d.updates))]


class JointSolve:
    """The composed update of a stack, recomputed from all its deltas' (k*, v*) pairs in one call of
    ``joint.joint_insert`` per edited module (docs/method.md, "The joint stack solve").

    second_moment: layer -> C (the statistics the deltas were computed with); ridge, null_space
    (the threshold of ``null_space_basis``) and protect (hold each edit's protected keys fixed) are
    params.yaml's ``stack.ridge``, ``stack.null_space`` and ``stack.protect``. Factorisations are cached
    per layer, so re-solving after dropping a delta costs one solve.
    """

    def __init__(self, second_moment: Callable[[int], torch.Tensor], ridge: float = 0.0, null_space: float = 0.0,
                 protect: bool = True, margin: float = 0.0, rounds: int = 7, prefixes: int = 0):
        self.second_moment, self.ridge, self.null_space, self.protect = second_moment, ridge, null_space, protect
        # the calibration (EditedModel.calibrate); margin 0: off
        self.margin, self.rounds, self.prefixes = margin, rounds, prefixes
        self._solvers: dict[int, tuple[Solver, torch.Tensor | None]] = {}

    @classmethod
    def from_params(cls, second_moment: Callable[[int], torch.Tensor], p) -> "JointSolve":
        """From params.yaml's ``stack:`` (a ``params.StackParams``)."""
        return cls(second_moment, p.ridge, p.null_space, p.protect, p.margin, p.rounds, p.prefixes)

    def solver(self, layer: int) -> tuple[Solver, torch.Tensor | None]:
        if layer not in self._solvers:
            c = self.second_moment(layer)
            basis = null_space_basis(c, self.null_space)
            self._solvers[layer] = (Solver(c) if basis is None else projected_solver(c, basis), basis)
        return self._solvers[layer]

    def check(self, deltas: list[Delta]) -> None:
        """Linear deltas need their k*/v* pairs; gated ones (neurons) are composed as they are, so a stack of
        gated deltas passes, and a stack that mixes both is refused (one line naming one of each)."""
        gated = [d for d in deltas if is_gated(d)]
        if gated and len(gated) < len(deltas):
            linear = next(d for d in deltas if not is_gated(d))
            raise DeltaError(f"stack.method: joint: {gated[0].path or gated[0].name} is a gated edit and "
                             f"{linear.path or linear.name} a linear one; the joint solve re-solves linear edits "
                             f"only: recompute them with one rome.insert, or use stack.method: sum")
        for d in deltas:
            if not is_gated(d):
                require_pairs(d)

    @staticmethod
    def protected_rows(d: Delta, i: int, kv: KeyValue, edited: set[str]) -> torch.Tensor | None:
        """Edit i's protected keys, less those of subjects that an edit of the stack rewrites (two rows a
        subject, in the order of ``edits[i].protected``; then, with ``edits[i].centroid``, the family's
        mean key, always kept): an edit wins over another's protection."""
        if kv.protected is None:
            return None
        names = d.meta["edits"][i].get("protected", [])
        centroid = 1 if d.meta["edits"][i].get("centroid") else 0
        if len(names) * 2 + centroid != kv.protected.shape[0]:
            return kv.protected
        keep = [r for r in range(kv.protected.shape[0]) if r >= 2 * len(names) or names[r // 2] not in edited]
        return kv.protected[keep] if keep else None

    def updates(self, deltas: list[Delta], base: dict[str, torch.Tensor],
                scales: torch.Tensor | None = None) -> list[RankOneUpdate]:
        """One rank-≤n update per module, from the base weights (module -> (d_out, d_in)).

        scales: one per edit of the stack, in the order of ``edits(deltas)``: edit j asks for
        W k_j + s_j (v_j − W k_j) (the calibration of ``EditedModel.compose``); None: all 1. A stack of
        gated deltas has no linear update to solve ([]): its neurons are appended as they are."""
        self.check(deltas)
        if any(is_gated(d) for d in deltas):
            return []
        by_module: dict[str, list[tuple[Delta, int, KeyValue]]] = {}
        share: dict[str, list[float]] = {}
        for j, (d, i) in enumerate(edits(deltas)):
            kv = d.pairs[i]
            by_module.setdefault(kv.module, []).append((d, i, kv))
            share.setdefault(kv.module, []).append(1.0 if scales is None else float(scales[j]))
        out = []
        for module, items in by_module.items():
            layer = items[0][2].layer
            solve, basis = self.solver(layer)
            keys = torch.stack([kv.k_star for _, _, kv in items])  # (n, d_in)
            values = torch.stack([kv.v_star for _, _, kv in items])  # (n, d_out)
            edited = {d.meta["manifest"]["canonical"]["edits"][i]["subject"] for d, i, _ in items}
            held = [self.protected_rows(d, i, kv, edited) for d, i, kv in items] if self.protect else []
            held = [h for h in held if h is not None]
            protected = torch.cat(held) if held else None
            try:
                u, v = joint_insert(solve, base[module], keys, values, protected, self.ridge, basis,
                                    scales=None if scales is None else torch.tensor(share[module], dtype=torch.float64))
            except InsertError as e:
                if e.index is None or e.index >= len(items):
                    raise DeltaError(f"stack.method: joint: {module}: {e}; set stack.ridge > 0 for a "
                                     f"least-squares solve") from None
                d, i, _ = items[e.index]
                raise DeltaError(f"{d.path or d.name}: edits[{i}]: the joint solve cannot separate its key from "
                                 f"the other edits' ({e}); set stack.ridge > 0 for a least-squares solve") from None
            out.append(RankOneUpdate(module, layer, u, v))
        return out
