"""``romeflow verify``: recompute a delta from its manifest and compare it with the stored file.

A recomputation on the same machine, with the same torch build, dtype and number of CPU threads,
gives the same bytes. Anything else changes the order of float operations (CPU kernels split their
sums by thread; other CPUs and GPUs use other kernels), and the ROME solve amplifies those last-bit
differences: v* is the result of an optimisation, and the update divides by k*ᵀ C⁻¹ k*. So verify

- recomputes with the thread count recorded in the delta (``threads``, written since romeflow
  recorded it) and loads the model in the recorded dtype (the CLI does that);
- accepts factors that differ by at most ``rtol`` of the stored factor's largest entry, and says why
  they may differ: ``equal within 2.1e-06 (threads differ: 1 vs 2)``.

``DEFAULT_RTOL`` (docs/reproducibility.md): on Gemma-3-270M the factors computed with 1 and with 2
threads differ by at most 4.5e-5 of the factor's largest entry (curie and the 10 edits of
counterfact10); the bound is 11x that, and half of 1e-3, the smallest real change it must catch (a
factor scaled by 1.001). Changed inputs (manifest, statistics, hyper-parameters) are caught by the
provenance check, whatever their size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..engine.models import LoadedModel
from ..engine.rome import RomeParams
from ..params import Params
from .batch import inputs_sha256, protect_hashes
from .deltas import Delta, compute_delta, load_delta, save_delta
from .manifests import Manifest, load_manifest
from .workflow import Layout, provenance_issues, stats_hashes

DEFAULT_RTOL = 5e-4  # max |Δ| / max |factor|: 11x the thread noise measured, half a 1.001 scaling


@contextlib.contextmanager
def threads_as_recorded(recorded: int | None) -> Iterator[int]:
    """Run the block with torch's CPU thread count set to ``recorded`` (None: unchanged); yields the count
    actually in use (it may differ where torch cannot set it) and restores the previous one."""
    before = torch.get_num_threads()
    if recorded is not None and recorded != before:
        with contextlib.suppress(RuntimeError):
            torch.set_num_threads(recorded)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _factors(update) -> dict[str, torch.Tensor | None]:
    """An edit's tensors by name: u (d_out[, r]) and v (d_in[, r]) of a rank-one update, or gate, up,
    bias and down of a gated edit's units (engine/gated.NeuronUpdate)."""
    return {f.name: getattr(update, f.name) for f in dataclasses.fields(update) if f.name not in ("module", "layer")}


def factor_difference(fresh: Delta, stored: Delta) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |stored factor|) over every tensor of every edit, each relative to its own
    largest entry; (inf, inf) when the edits do not line up (count, kind, module or shapes)."""
    if len(fresh.updates) != len(stored.updates):
        return math.inf, math.inf
    worst_abs, worst_rel = 0.0, 0.0
    for a, b in zip(fresh.updates, stored.updates):
        fa, fb = _factors(a), _factors(b)
        if type(a) is not type(b) or a.module != b.module or any(
                (fa[k] is None) != (fb[k] is None) or (fa[k] is not None and fa[k].shape != fb[k].shape) for k in fa):
            return math.inf, math.inf
        for k in (k for k in fa if fa[k] is not None):
            d, scale = (fa[k] - fb[k]).abs().max().item(), fb[k].abs().max().item()
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
    return worst_abs, worst_rel


def compute_differences(stored: Delta, lm: LoadedModel, threads: int) -> list[str]:
    """What differs between how ``stored`` was computed and this recomputation: threads, dtype, device."""
    meta, out = stored.meta, []
    if meta.get("threads") is not None and meta["threads"] != threads:
        out.append(f"threads differ: {meta['threads']} vs {threads}")
    dtype = str(lm.dtype).removeprefix("torch.")
    if meta.get("dtype", "float32") != dtype:
        out.append(f"dtype differs: {meta.get('dtype', 'float32')} vs {dtype}")
    if meta.get("device") is not None and meta["device"] != lm.device.type:
        out.append(f"device differs: {meta['device']} vs {lm.device.type}")
    return out


def verify_delta(lm: LoadedModel, manifest: Manifest, params: RomeParams, stats: dict, stored: Delta,
                 root: Path = Path("."), corpus=None, inputs: str | None = None) -> dict:
    """Recompute ``stored`` from its manifest (with its recorded thread count) and compare: byte-identical
    files, else the factors' max |difference|, absolute and relative to the stored factor's max |entry|.
    ``corpus``: the statistics' corpus, as `apply` passes it (the gated insert scores against its text);
    ``inputs``: the recomputation's inputs_sha256 (batch.inputs_sha256), recorded as `apply` records it."""
    with threads_as_recorded(stored.meta.get("threads")) as threads:
        fresh = compute_delta(lm, manifest, params, stats, root=root, corpus=corpus)
    if inputs is not None:
        fresh.meta["inputs_sha256"] = inputs
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fresh.safetensors"
        save_delta(path, fresh)
        identical = path.read_bytes() == Path(stored.path).read_bytes()
    diff, rel = factor_difference(fresh, stored)
    return {"name": manifest.name, "path": str(stored.path), "identical": identical, "max_abs_diff": diff,
            "max_rel_diff": rel, "compute": compute_differences(stored, lm, threads),
            "metadata_equal": json.loads(json.dumps(fresh.meta)) == stored.meta}


def verify_manifest(lm: LoadedModel, layout: Layout, settings: Params, name: str,
                    stats_for: Callable[[list[int]], dict], atol: float = 0.0, rtol: float = DEFAULT_RTOL) -> dict:
    """``romeflow verify NAME``: provenance of deltas/NAME vs the current inputs, and a recomputation that
    must match within ``rtol`` (relative to the stored factors) or ``atol`` (absolute).

    ``stats_for(layers)`` gives the statistics to recompute with. ``problems`` lists one line per failure.
    """
    m = settings.resolve_manifest(load_manifest(layout.manifest(name)))  # `layer: auto` -> the traced layer
    stored = load_delta(layout.delta(name))
    issues = provenance_issues(stored, m, lm.fingerprint, stats_hashes(layout), settings.rome)
    layers = [m.layer_of(e, settings.rome.layer) for e in m.edits]
    stats, corpus = stats_for(sorted(set(layers))), settings.stats.corpus_source()
    inputs = inputs_sha256(m, settings.rome, layers, lm.fingerprint, str(lm.dtype).removeprefix("torch."), stats,
                           corpus.sha256, protect_hashes(settings.rome.protect_sources, layout.root))
    v = verify_delta(lm, m, settings.rome, stats, stored, layout.root, corpus, inputs)
    ok = v["identical"] or v["max_rel_diff"] <= rtol or v["max_abs_diff"] <= atol
    why = f" ({'; '.join(v['compute'])})" if v["compute"] else ""
    v["result"] = ("identical" if v["identical"] else f"equal factors{why}" if v["max_abs_diff"] == 0 else
                   f"equal within {v['max_rel_diff']:.2g}{why}" if ok else f"DIFFERENT{why}")
    v["issues"] = issues
    v["problems"] = [f"{stored.path}: {i}" for i in issues[:1]]
    if not ok:
        v["problems"].append(f"{stored.path}: differs from a recomputation (max |Δ| of the factors = "
                             f"{v['max_abs_diff']:.3g}, {v['max_rel_diff']:.3g} of the largest entry; --rtol "
                             f"{rtol:.3g}){why}")
    return v
