"""The stack stage's weights as an artifact, ``reports/stack.safetensors``: what `romeflow export` with no
``--delta`` rebuilds the pipeline's stack from, exactly as the stack stage scored it.

Tensors (float32): ``updates.<j>.u`` (d_out, r_j) and ``updates.<j>.v`` (d_in, r_j), the composed linear
update of one module, ΔW_j = U_j V_jᵀ on its (d_out, d_in) view, in the order they were added. Under
``stack.method: joint`` with linear deltas they are the joint solve's, one per edited module, r_j = the
edits on it (calibration shares included). Under ``sum``, or with gated deltas, nothing was solved:
the file holds no tensors and the weights are the deltas' own (recorded by sha256, in order), with the
gates' thresholds of ``stack.gate_text`` in the metadata when it raised them, and ``gates.<j>.a`` (d_model,)
for each gate whose direction ``stack.gate_refit`` refitted (its entry says ``refit: true``).

Metadata (safetensors header key ``romeflow``, schemas/stackfile.schema.json): format, romeflow_version,
base_model (name, fingerprint), composition (method, settings: params.yaml ``stack:``'s
``joint_settings``), deltas (manifest, file sha256, tensors_sha256; in composition order), stats (layer,
sha256 of the statistics the joint solve read), updates (module, layer, d_out, d_in, rank per tensor
pair), shares (each edit's share, when calibrated), gates (each gated edit's thresholds, when
``stack.gate_text`` raised them), dtype (the model's), weights_sha256
(``workflow.edited_weights_sha256`` of the composed model the stage scored) and tensors_sha256 (over
the tensors; checked on load).

Checked on load, before any model is loaded: metadata size and schema, exactly the tensors the metadata
lists, each float32 of the shape it declares, finite, with ‖U‖·‖V‖ ≤ deltas.MAX_FACTOR_NORM, and the
tensors' sha256. ``stale`` says why a file is not the stack the project would compose now.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..engine.models import sha256_file
from ..engine.rome import RankOneUpdate
from ..io import atomic_path, check_input
from ..params import Params
from ..schemas import validate
from .compose import EditedModel, composed_by
from .deltas import MAX_FACTOR_NORM, MAX_METADATA_BYTES, Delta

STACKFILE_FORMAT = "romeflow.stackfile/1"


class StackFileError(ValueError):
    """An unusable or stale stack file; str(error) is the one-line message for the user."""


@dataclass
class StackFile:
    updates: list[RankOneUpdate]  # the solved updates (joint, linear deltas); [] when nothing was solved
    meta: dict
    path: str | None = None
    gates: list[dict] | None = None  # each gated edit's {low, high, beta[, a]} as composed (stack.gate_text)

    def linear(self, deltas: list[Delta]) -> list[RankOneUpdate]:
        """The linear updates that rebuild the stack on the base model: the solved ones (joint), else the
        deltas' own factors, in order (sum). Gated deltas' units come from the deltas either way."""
        if self.meta["composition"]["method"] == "joint":
            return self.updates
        return [up for d in deltas for up in d.updates if isinstance(up, RankOneUpdate)]


def _tensors(updates: list[RankOneUpdate], gates: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """updates.<j>.u (d_out, r), updates.<j>.v (d_in, r), gates.<j>.a (d_model,) of refitted gates: float32,
    contiguous, on the host."""
    out = {}
    for j, up in enumerate(updates):
        u = up.u if up.u.dim() == 2 else up.u[:, None]  # (d_out, r)
        v = up.v if up.v.dim() == 2 else up.v[:, None]  # (d_in, r)
        out[f"updates.{j}.u"] = u.detach().float().cpu().contiguous()
        out[f"updates.{j}.v"] = v.detach().float().cpu().contiguous()
    for j, g in enumerate(gates or []):
        if "a" in g:
            out[f"gates.{j}.a"] = g["a"].detach().float().cpu().contiguous()
    return out


def tensor_names(meta: dict) -> list[str]:
    """The tensors a stack file holds, in the order of its sha256: updates.0.u, updates.0.v, updates.1.u, ...,
    then gates.<j>.a of each refitted gate."""
    return [f"updates.{j}.{p}" for j in range(len(meta["updates"])) for p in ("u", "v")] + \
        [f"gates.{j}.a" for j, g in enumerate(meta.get("gates") or []) if g.get("refit")]


def tensors_sha256(tensors: dict[str, torch.Tensor], names: list[str]) -> str:
    """sha256 over the ``names`` (``tensor_names``): 'NAME|DTYPE|SHAPE|' then the bytes of each."""
    h = hashlib.sha256()
    for name in names:
        t = tensors[name].contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def stack_file(edited: EditedModel, weights_sha256: str) -> StackFile:
    """The stack file of ``edited`` as it is composed now (``edited.compose(deltas)`` just ran, deltas saved
    to files): its solved updates under joint, and the provenance (module docstring)."""
    lm, deltas, joint = edited.lm, edited.deltas, edited.joint
    solved = joint is not None and bool(edited.updates)
    updates = edited.updates if solved else []
    for d in deltas:
        if d.path is None:
            raise StackFileError(f"delta of {d.name}: not saved to a file; a stack file refers to delta files")
    meta = {
        "format": STACKFILE_FORMAT,
        "romeflow_version": __version__,
        "base_model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "composition": edited.composed_by(),
        "deltas": [{"manifest": d.name, "sha256": sha256_file(Path(d.path)), "tensors_sha256": d.meta["tensors_sha256"]}
                   for d in deltas],
        "stats": [] if joint is None else [{"layer": layer, "sha256": sha}
                                           for layer, sha in sorted(joint.stats_sha256.items())
                                           if any(up.layer == layer for up in updates)],
        "updates": [{"module": up.module, "layer": up.layer, "d_out": up.u.shape[0], "d_in": up.v.shape[0],
                     "rank": 1 if up.u.dim() == 1 else up.u.shape[1]} for up in updates],
        "dtype": str(lm.dtype).removeprefix("torch."),
        "weights_sha256": weights_sha256,
    }
    if edited.scales is not None:
        meta["shares"] = [round(float(s), 6) for s in edited.scales]
    if edited.gates is not None:  # exact: JSON keeps a float's every bit; a refitted direction is a tensor
        meta["gates"] = [{"low": g["low"], "high": g["high"], "beta": g["beta"], **({"refit": True} if "a" in g else {})}
                         for g in edited.gates]
    return StackFile(list(updates), meta, gates=edited.gates)


def save_stack_file(path: str | os.PathLike, sf: StackFile) -> None:
    """Write ``sf`` atomically, with its tensors' sha256 in the metadata (sf.meta too)."""
    tensors = _tensors(sf.updates, sf.gates)
    meta = {**sf.meta, "tensors_sha256": tensors_sha256(tensors, tensor_names(sf.meta))}
    errors = validate("stackfile", meta)
    if errors:
        raise StackFileError(f"{path}: stack file metadata {errors[0][0]}: {errors[0][1]}")
    _check_tensors(str(path), meta, tensors)
    sf.meta = meta
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"romeflow": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def load_stack_file(path: str | os.PathLike) -> StackFile:
    """Read and check a stack file (module docstring); every problem is a StackFileError, one line."""
    path = check_input(path, "stack file", StackFileError)
    if not path.is_file():
        raise StackFileError(f"{path}: stack file not found; the stack stage writes it (`dvc repro`, or "
                             f"`romeflow stack`)")
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("romeflow")
            if text is None:
                raise StackFileError(f"{path}: not a romeflow stack file (no 'romeflow' metadata)")
            if len(text) > MAX_METADATA_BYTES:
                raise StackFileError(f"{path}: metadata: larger than {MAX_METADATA_BYTES} bytes")
            meta = json.loads(text)
            errors = validate("stackfile", meta)
            if errors:
                raise StackFileError(f"{path}: metadata {errors[0][0]}: {errors[0][1]}")
            want = tensor_names(meta)
            extra, missing = sorted(set(f.keys()) - set(want)), [k for k in want if k not in set(f.keys())]
            if extra or missing:
                raise StackFileError(f"{path}: {(extra or missing)[0]}: " + ("a tensor the metadata does not list"
                                                                              if extra else "missing"))
            for j, e in enumerate(meta["updates"]):  # shapes before reading: a huge tensor is never loaded
                for p, d in (("u", e["d_out"]), ("v", e["d_in"])):
                    shape = tuple(f.get_slice(f"updates.{j}.{p}").get_shape())
                    if shape != (d, e["rank"]):
                        raise StackFileError(f"{path}: updates.{j}.{p}: shape {shape}, the metadata says "
                                             f"{(d, e['rank'])}")
            for name in want[2 * len(meta["updates"]):]:
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) != 1 or not 1 <= shape[0] <= 1048576:
                    raise StackFileError(f"{path}: {name}: shape {shape}, not a gate direction (d_model,)")
            tensors = {k: f.get_tensor(k) for k in want}
    except StackFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a stack file"
        first = str(e).splitlines()[0] if str(e) else ""
        raise StackFileError(f"{path}: not a romeflow stack file ({type(e).__name__}: {first})") from e
    _check_tensors(str(path), meta, tensors)
    digest = tensors_sha256(tensors, want)
    if digest != meta["tensors_sha256"]:
        raise StackFileError(f"{path}: tensors_sha256: the tensors' sha256 is {digest[:12]}..., the metadata says "
                             f"{meta['tensors_sha256'][:12]}... (the file was changed after it was written)")
    updates = [RankOneUpdate(e["module"], e["layer"], tensors[f"updates.{j}.u"], tensors[f"updates.{j}.v"])
               for j, e in enumerate(meta["updates"])]
    gates = None if "gates" not in meta else [
        {"low": g["low"], "high": g["high"], "beta": g["beta"], **({"a": tensors[f"gates.{j}.a"]} if g.get("refit") else {})}
        for j, g in enumerate(meta["gates"])]
    return StackFile(updates, meta, str(path), gates)


def _check_tensors(where: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """float32, finite and of bounded norm; solved updates only under stack.method joint."""
    if meta["updates"] and meta["composition"]["method"] != "joint":
        raise StackFileError(f"{where}: updates: solved updates in a stack composed by "
                             f"{meta['composition']['method']!r}; only a joint solve stores them")
    for name in tensor_names(meta)[2 * len(meta["updates"]):]:
        t = tensors[name]
        if t.dtype != torch.float32 or not torch.isfinite(t).all():
            raise StackFileError(f"{where}: {name}: not a finite float32 gate direction")
    for j in range(len(meta["updates"])):
        u, v = tensors[f"updates.{j}.u"], tensors[f"updates.{j}.v"]
        for part, t in (("u", u), ("v", v)):
            if t.dtype != torch.float32:
                raise StackFileError(f"{where}: updates.{j}.{part}: dtype {str(t.dtype).removeprefix('torch.')}, "
                                     f"not float32")
            if not torch.isfinite(t).all():
                raise StackFileError(f"{where}: updates.{j}.{part}: holds NaN or infinite values")
        norm = u.double().norm().item() * v.double().norm().item()
        if not norm <= MAX_FACTOR_NORM:
            raise StackFileError(f"{where}: updates.{j}: ‖U‖·‖V‖ = {norm:.3g} is above the plausible bound "
                                 f"{MAX_FACTOR_NORM:g}")


def stale(sf: StackFile, settings: Params, deltas: list[Delta], model_fingerprint: str,
          stats_sha256: dict[int, str]) -> str | None:
    """Why ``sf`` is not the stack the project would compose now (one line naming the file and the field,
    ending with what to run), or None: params.yaml's composition (``stack:``) and active manifests, the
    delta files (by sha256; ``deltas``: the active ones, loaded from their files), the base model and
    the statistics files present now (layer -> sha256) against what the file records."""
    where, meta, again = sf.path or "stack file", sf.meta, "; run `dvc repro` (or `romeflow stack`)"
    now = composed_by(settings.stack)
    if meta["composition"] != now:
        return (f"{where}: composition: composed with {_said(meta['composition'])}, {settings.path} stack: says "
                f"{_said(now)}{again}")
    names = [d["manifest"] for d in meta["deltas"]]
    if names != list(settings.manifests):
        return f"{where}: deltas: composed {names}, {settings.path} manifests: lists {list(settings.manifests)}{again}"
    for i, (rec, d) in enumerate(zip(meta["deltas"], deltas)):
        if d.path is None or sha256_file(Path(d.path)) != rec["sha256"]:
            return f"{where}: deltas[{i}]: {d.path or d.name} changed since the stack was composed{again}"
    if meta["base_model"]["fingerprint"] != model_fingerprint:
        return (f"{where}: base_model: composed on {meta['base_model']['name']} "
                f"({meta['base_model']['fingerprint'][:12]}), the model now is {model_fingerprint[:12]}{again}")
    for s in meta["stats"]:
        if s["layer"] in stats_sha256 and stats_sha256[s["layer"]] != s["sha256"]:
            return (f"{where}: stats: solved with other statistics of layer {s['layer']} ({s['sha256'][:12]}, "
                    f"now {stats_sha256[s['layer']][:12]}){again}")
    return None


def _said(composition: dict) -> str:
    """'joint (ridge 0.05, ...)' or 'sum'."""
    settings = composition.get("settings") or {}
    return composition["method"] + (f" ({', '.join(f'{k} {v}' for k, v in settings.items())})" if settings else "")
