"""The DVC workflow's library: project layout, per-manifest reports, the stack of all deltas, gates,
and the provenance checks behind ``romeflow status`` and ``romeflow verify`` (``verify.py``).

Stages (dvc.yaml) and what they call here:

    eval@NAME   eval_manifest: NAME's edits on base, and on base + deltas/NAME  -> reports/NAME.json
    stack       eval_stack: every active manifest on base + all active deltas   -> reports/stack.json,
                                                                       reports/stack.safetensors

Deltas are composed by params.yaml ``stack:`` everywhere (compose.EditedModel with compose.composition).

A stage whose report falls below params.yaml ``gate:`` still writes it, then fails with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .deltas import Delta, DeltaError, load_delta
from .compose import EditedModel
from ..evaluation.bystanders import Bystanders, TokenSharing
from ..evaluation.scoring import base_references, evaluate_manifest, score_manifest, text_predictions
from ..io import write_json_atomic, write_text_atomic
from .manifests import Manifest, ManifestError, load_manifest
from ..engine.models import EMBEDDED, LoadedModel, read_weight, resolve, sha256_file
from .names import check_name
from .stackfile import StackFile, StackFileError, load_stack_file, save_stack_file, stack_file, stale
from ..params import METRICS, Gate, Params  # noqa: F401 - METRICS, Gate re-exported
from ..engine.rome import RomeParams
from ..schemas import validate

REPORT_FORMAT = "romeflow.report/1"
DETAILS_FORMAT = "romeflow.details/1"
STACK_FORMAT = "romeflow.stack/1"
SHOWN = ("ES", "PS", "NS", "S", "NS_tok", "S+")  # the scores in tables and plots


class GateError(ValueError):
    """A report fell below a gate of params.yaml; str(error) is the one-line reason."""


# --------------------------------------------------------------------------------------------------
# Layout and parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the pipeline keeps each artifact, relative to the project root (the folder of params.yaml).

    Every manifest name goes through names.check_name here, so no name reaches a path unchecked.
    """

    root: Path = Path(".")

    def manifest(self, name: str) -> Path:
        return self.root / "edits" / f"{check_name(name)}.yaml"

    def delta(self, name: str) -> Path:
        return self.root / "deltas" / f"{check_name(name)}.safetensors"

    def report(self, name: str) -> Path:
        return self.root / "reports" / f"{check_name(name)}.json"

    def details(self, name: str) -> Path:
        return self.root / "reports" / f"{check_name(name)}.details.json"

    def stats(self, layer: int) -> Path:
        return self.root / "stats" / f"layer{layer}.safetensors"

    @property
    def stack_report(self) -> Path:
        return self.root / "reports" / "stack.json"

    @property
    def stack_file(self) -> Path:
        return self.root / "reports" / "stack.safetensors"

    @property
    def stack_markdown(self) -> Path:
        return self.root / "reports" / "stack.md"

    @property
    def plots(self) -> Path:
        return self.root / "reports" / "plots"


def write_artifact(path: str | os.PathLike, schema: str, obj) -> None:
    """Validate ``obj`` against schemas/<schema>.schema.json, then write it atomically as JSON."""
    errors = validate(schema, obj)
    if errors:
        raise ValueError(f"{path}: {errors[0][0]}: {errors[0][1]} (schemas/{schema}.schema.json)")
    write_json_atomic(path, obj)


def _check_not_stale(manifest: Manifest, deltas: list[Delta]) -> None:
    for d in deltas:
        if d.name == manifest.name and d.meta["manifest"]["sha256"] != manifest.sha256:
            raise DeltaError(f"{d.path}: computed from another version of {manifest.path} (re-run `dvc repro`)")


def _delta_entry(d: Delta) -> dict:
    if d.path is None:
        raise DeltaError(f"delta of {d.name}: not saved to a file; reports refer to delta files")
    return {"path": str(d.path), "manifest": d.name, "sha256": sha256_file(Path(d.path))}


# --------------------------------------------------------------------------------------------------
# eval@NAME: one manifest alone
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    report: dict  # the small metrics file: pre and post scores, manifest and delta hashes
    details: dict  # per edit and prompt: probabilities, successes, top-1 tokens
    failures: list[str]  # gate failures, one line each

    def write(self, report_path: str | os.PathLike, details_path: str | os.PathLike | None = None) -> None:
        write_artifact(report_path, "report", self.report)
        if details_path is not None:
            write_artifact(details_path, "details", self.details)


def eval_manifest(edited: EditedModel, manifest: Manifest, deltas: list[Delta], gate: Gate | None = None,
                  sharing: TokenSharing | None = None) -> EvalResult:
    """A manifest's edits before (base) and after (base + ``deltas``), checked against ``gate.eval``.

    ``sharing``: where the token-sharing subjects that every edit is also asked about come from
    (params.yaml eval.token_neighbors and rome.protect_sources; None: none are mined)."""
    _check_not_stale(manifest, deltas)
    r = evaluate_manifest(edited, manifest, deltas, sharing)
    head = {"name": manifest.name, "sha256": manifest.sha256}
    report = {"format": REPORT_FORMAT, "manifest": head, "deltas": [_delta_entry(d) for d in deltas],
              "composition": edited.composed_by(), "pre": r["pre"], "post": r["post"],
              "other_subjects": r["other_subjects"]}
    details = {"format": DETAILS_FORMAT, "manifest": head, "edits": r["edits"]}
    return EvalResult(report, details, eval_gate(report, gate or Gate()))


def eval_gate(report: dict, gate: Gate) -> list[str]:
    name = report["manifest"]["name"]
    return [f"manifest {name}: post {k} = {report['post'][k]:.1f} is below the gate (gate.eval.{k} = {v:g})"
            for k, v in gate.eval.items() if k in report["post"] and report["post"][k] < v]


def gate_error(where: str | os.PathLike, failures: list[str]) -> GateError:
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return GateError(f"{where}: {failures[0]}{more}")


# --------------------------------------------------------------------------------------------------
# stack: every active delta composed
# --------------------------------------------------------------------------------------------------


@dataclass
class StackResult:
    report: dict  # reports/stack.json
    plots: dict[str, list[dict]]  # file name in reports/plots/ -> rows
    failures: list[str]
    weights: StackFile | None = None  # reports/stack.safetensors: what rebuilds the composed weights

    def write(self, report_path, markdown_path=None, plots_dir=None, weights_path=None) -> None:
        if weights_path is not None and self.weights is not None:
            save_stack_file(weights_path, self.weights)
        write_artifact(report_path, "stack", self.report)
        if markdown_path is not None:
            write_text_atomic(markdown_path, stack_markdown(self.report))
        if plots_dir is not None:
            for fname, rows in self.plots.items():
                write_artifact(Path(plots_dir) / fname, f"plot-{Path(fname).stem}", rows)


def edited_weights_sha256(lm: LoadedModel, deltas: list[Delta]) -> str:
    """sha256 over every module the deltas touch, as it is now: equal hashes = equal edited models."""
    h = hashlib.sha256()
    for name in sorted({up.module for d in deltas for up in d.updates}):
        module = lm.model.get_submodule(name)
        if hasattr(module, "weight"):  # a linear edit's projection
            tensors = {"": read_weight(lm.model, name)}
        else:  # a gated edit's MLP: every projection, widened by its units
            tensors = dict(sorted(module.state_dict().items()))
        for part, w in tensors.items():
            w = w.cpu().contiguous()
            h.update(f"{name}{'.' + part if part else ''}|{tuple(w.shape)}|".encode())
            h.update(w.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a if k in b}


def eval_stack(edited: EditedModel, manifests: list[Manifest], deltas: list[Delta], heldout: Path,
               window: int = 256, gate: Gate | None = None, sharing: TokenSharing | None = None) -> StackResult:
    """Base + all ``deltas`` (one per manifest, in order): each manifest's scores alone and in the stack,
    and the damage to the base model (held-out perplexity, neighbour top-1 agreement).

    Deltas are composed as ``edited`` composes them (its ``joint``: the sum of the deltas, or the update
    re-solved from all their (k*, v*) pairs, stack.method: joint); "alone" is the manifest's own delta
    composed the same way, as `romeflow eval` composes it.

    "Alone" is computed here exactly as eval@NAME computes "post" (same function, same inputs: with the
    same ``sharing``), so it equals reports/NAME.json's post without the stack stage depending on those
    files. Neighbours that mention a subject a manifest's delta held fixed are not scored (nor counted
    in the damage's neighbour top-1); the report lists those subjects per manifest (``held``).
    ``edited`` is left at the base model.
    """
    if len(manifests) != len(deltas) or any(m.name != d.name for m, d in zip(manifests, deltas)):
        raise DeltaError("the stack needs one delta per manifest, in the same order")
    for m, d in zip(manifests, deltas):
        _check_not_stale(m, [d])
    lm = edited.lm
    heldout = Path(heldout)
    if not heldout.is_file():
        raise FileNotFoundError(f"{heldout}: held-out text not found (params.yaml stack.heldout)")
    text = heldout.read_text(encoding="utf-8")

    edited.compose([])
    others = {m.name: Bystanders.of(m, [d], sharing, lm.tokenizer) for m, d in zip(manifests, deltas)}
    refs = {m.name: base_references(lm, m, others[m.name]) for m in manifests}
    score = lambda m: score_manifest(lm, m, *refs[m.name], others[m.name])  # noqa: E731
    pre = {m.name: score(m) for m in manifests}
    nll_base, top1_base = text_predictions(lm, text, window)
    alone = {}
    for m, d in zip(manifests, deltas):
        edited.compose([d])
        alone[m.name] = score(m)
    edited.compose(deltas)
    scales = None if edited.scales is None else [round(float(x), 6) for x in edited.scales]  # stack.margin
    try:
        stacked = {m.name: score(m) for m in manifests}
        nll_stack, top1_stack = text_predictions(lm, text, window)
        weights = edited_weights_sha256(lm, deltas)
        solved = stack_file(edited, weights) if all(d.path is not None for d in deltas) else None
    finally:
        edited.compose([])

    neighbors = [n for m in manifests for e in stacked[m.name]["edits"] for n in e["neighbors"]]
    kept = [n["top1_kept"] for n in neighbors if not n["held"]]
    ppl_base, ppl_stack = math.exp(nll_base.mean().item()), math.exp(nll_stack.mean().item())
    damage = {"heldout": {"path": str(heldout), "sha256": sha256_file(heldout), "tokens": int(nll_base.numel()),
                          "window": window, "perplexity_base": ppl_base, "perplexity_stack": ppl_stack,
                          "perplexity_increase_pct": 100.0 * (ppl_stack / ppl_base - 1.0),
                          "top1_agreement_pct": 100.0 * (top1_base == top1_stack).float().mean().item()},
              "neighbors": {"prompts": len(kept), "held": len(neighbors) - len(kept)}}
    if kept:
        damage["neighbors"]["top1_kept_pct"] = 100.0 * sum(kept) / len(kept)
    per, first = {}, 0
    for m, d in zip(manifests, deltas):
        a, s = alone[m.name]["metrics"], stacked[m.name]["metrics"]
        per[m.name] = {"manifest_sha256": m.sha256, "delta_sha256": _delta_entry(d)["sha256"],
                       "edits": len(m.edits), "pre": pre[m.name]["metrics"], "alone": a, "stack": s,
                       "interference": _diff(a, s),
                       "held": list(dict.fromkeys(x for h in others[m.name].held for x in h))}  # over its edits
        if scales is not None:
            per[m.name]["shares"] = scales[first:first + len(d.updates)]
        first += len(d.updates)
    report = {"format": STACK_FORMAT, "base_model": {"name": lm.name, "fingerprint": lm.fingerprint},
              "composed": {"manifests": [m.name for m in manifests], "edits": sum(len(m.edits) for m in manifests),
                           "weights_sha256": weights, "method": edited.method,
                           **({"settings": edited.joint.settings()} if edited.joint is not None else {})},
              "manifests": per, "damage": damage}
    failures = stack_gate(report, gate or Gate())
    report["gate"] = {"passed": not failures, "failures": failures}
    return StackResult(report, _stack_plots(manifests, pre, alone, stacked), failures, solved)


def stack_gate(report: dict, gate: Gate) -> list[str]:
    out = []
    if gate.max_interference is not None:
        for name, r in report["manifests"].items():
            drop = -r["interference"].get("S", 0.0)
            if drop > gate.max_interference:
                out.append(f"manifest {name}: S drops by {drop:.1f} points in the stack "
                           f"({r['alone']['S']:.1f} alone -> {r['stack']['S']:.1f}), above the gate "
                           f"(gate.stack.max_interference = {gate.max_interference:g})")
    h, n = report["damage"]["heldout"], report["damage"]["neighbors"]
    if gate.max_perplexity_increase is not None and h["perplexity_increase_pct"] > gate.max_perplexity_increase:
        out.append(f"stack: perplexity increase on {h['path']} = {h['perplexity_increase_pct']:.2f}% is above the "
                   f"gate (gate.stack.max_perplexity_increase = {gate.max_perplexity_increase:g})")
    if gate.min_neighbor_kept is not None and n.get("top1_kept_pct", 100.0) < gate.min_neighbor_kept:
        out.append(f"stack: neighbour top-1 kept = {n['top1_kept_pct']:.1f}% is below the gate "
                   f"(gate.stack.min_neighbor_kept = {gate.min_neighbor_kept:g})")
    return out


def _stack_plots(manifests, pre, alone, stacked) -> dict[str, list[dict]]:
    scores, probs = [], []
    for m in manifests:
        a, s, p = alone[m.name], stacked[m.name], pre[m.name]
        for k in SHOWN:
            if k in s["metrics"]:
                scores.append({"manifest": m.name, "metric": k, "label": f"{m.name} {k}", "pre": p["metrics"][k],
                               "alone": a["metrics"][k], "stack": s["metrics"][k]})
        for i, (ep, ea, es) in enumerate(zip(p["edits"], a["edits"], s["edits"])):
            rows = zip([ep["rewrite"]] + ep["paraphrases"], [ea["rewrite"]] + ea["paraphrases"],
                       [es["rewrite"]] + es["paraphrases"])
            for j, (rp, ra, rs) in enumerate(rows):
                kind = "rewrite" if j == 0 else f"paraphrase {j}"
                probs.append({"manifest": m.name, "edit": i, "label": f"{m.name}#{i} {kind}", "prompt": rp["prompt"],
                              "p_target_pre": rp["p_target"], "p_target_alone": ra["p_target"],
                              "p_target_stack": rs["p_target"], "p_old_pre": rp["p_old"], "p_old_stack": rs["p_old"]})
    return {"scores.json": scores, "probabilities.json": probs}


def stack_markdown(report: dict) -> str:
    """reports/stack.md: the stack report as readable tables."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    names = report["composed"]["manifests"]
    lines = [f"# Stack: {len(names)} manifest(s), {report['composed']['edits']} edit(s)"
             + (", joint solve" if report["composed"].get("method") == "joint" else ""), "",
             f"Base model `{report['base_model']['name']}` ({report['base_model']['fingerprint'][:12]}); "
             f"scores in %, *alone* = base + that manifest's delta, *stack* = base + all deltas.", ""]
    head = ["manifest", "edits"] + [f"{k} {w}" for k in SHOWN for w in ("alone", "stack")] + ["ΔS"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        r = report["manifests"][name]
        cells = [name, str(r["edits"])] + [fmt(r[w].get(k)) for k in SHOWN for w in ("alone", "stack")]
        d = r["interference"].get("S")
        lines.append("| " + " | ".join(cells + ["–" if d is None else f"{d:+.1f}"]) + " |")
    held = [f"{name}: {', '.join(report['manifests'][name]['held'])}" for name in names
            if report["manifests"][name].get("held")]
    if held:
        lines += ["", "Held by construction (their keys fixed by the edit; neighbours naming them are not scored): "
                  + "; ".join(held) + "."]
    h, n = report["damage"]["heldout"], report["damage"]["neighbors"]
    not_counted = f"; {n['held']} held by construction, not counted" if n.get("held") else ""
    lines += ["", "## Damage vs the base model", "", "| measure | base | stack | change |", "|---|---:|---:|---:|",
              f"| perplexity of `{h['path']}` ({h['tokens']} tokens) | {h['perplexity_base']:.3f} | "
              f"{h['perplexity_stack']:.3f} | {h['perplexity_increase_pct']:+.2f}% |",
              f"| held-out top-1 agreement | 100% | {h['top1_agreement_pct']:.1f}% | |",
              f"| neighbour top-1 kept ({n['prompts']} prompts{not_counted}) | 100% | "
              f"{fmt(n.get('top1_kept_pct'))}{'%' if 'top1_kept_pct' in n else ''} | |", ""]
    g = report["gate"]
    lines.append("**Gate: passed.**" if g["passed"] else "**Gate: failed.**")
    lines += [f"- {f}" for f in g["failures"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Provenance: status and verify
# --------------------------------------------------------------------------------------------------


def model_fingerprint(spec: str, cache: str | os.PathLike | None = None) -> str:
    """The fingerprint a model would load with, without loading (or converting) it."""
    from ..engine.models import cache_dir

    return EMBEDDED[spec].sha256 if spec in EMBEDDED else resolve(spec, cache_dir(cache))[2]


def provenance_issues(delta: Delta, manifest: Manifest | None, model_fp: str, stats_sha: dict[int, str],
                      rome: RomeParams) -> list[str]:
    """Why ``delta`` is not what the pipeline would compute now ([] when its provenance matches).

    ``stats_sha`` maps layer -> sha256 of the current statistics file (layers without one are not checked).
    """
    out = []
    if manifest is not None and delta.meta["manifest"]["sha256"] != manifest.sha256:
        out.append(f"{manifest.path} changed since the delta was computed")
    if delta.base_fingerprint != model_fp:
        out.append(f"computed on another base model ({delta.meta['base_model']['name']}, {delta.base_fingerprint[:12]})")
    for s in delta.meta["stats"]:
        if s["layer"] in stats_sha and stats_sha[s["layer"]] != s["sha256"]:
            out.append(f"statistics of layer {s['layer']} changed ({s['sha256'][:12]} -> {stats_sha[s['layer']][:12]})")
    now, then = rome.to_dict(), delta.meta["hyperparameters"]
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        out.append(f"hyper-parameters differ from params.yaml: {', '.join(changed)}")
    return out


def stats_hashes(layout: Layout) -> dict[int, str]:
    """layer -> sha256 of the pipeline's statistics files (stats/layerL.safetensors) present now."""
    out = {}
    for f in sorted(layout.stats(0).parent.glob("layer*.safetensors")):
        if f.stem[len("layer"):].isdigit():
            out[int(f.stem[len("layer"):])] = sha256_file(f)
    return out


def _report_state(path: Path, delta_sha: str | None) -> str:
    if not path.is_file():
        return "missing"
    try:
        shas = [d["sha256"] for d in json.loads(path.read_text())["deltas"]]
    except (ValueError, KeyError, TypeError):
        return "invalid"
    return "ok" if delta_sha is not None and shas == [delta_sha] else "stale"


def status(layout: Layout, settings: Params, cache=None) -> dict:
    """Active manifests, their deltas and reports, and each delta's provenance vs the current inputs."""
    model_fp = model_fingerprint(settings.model, cache)
    stats = stats_hashes(layout)
    entries = []
    for name in settings.manifests:
        e = {"name": name, "manifest": "ok", "delta": "missing", "report": "missing", "issues": []}
        try:
            manifest = load_manifest(layout.manifest(name))
        except ManifestError as err:
            manifest, e["manifest"] = None, "missing" if not layout.manifest(name).exists() else "invalid"
            e["issues"].append(str(err))
        delta_sha = None
        if layout.delta(name).is_file():
            try:
                delta = load_delta(layout.delta(name))
                delta_sha = sha256_file(layout.delta(name))
                e["delta"] = "present"
                e["issues"] += provenance_issues(delta, manifest, model_fp, stats, settings.rome)
            except DeltaError as err:
                e["delta"] = "invalid"
                e["issues"].append(str(err))
        e["report"] = _report_state(layout.report(name), delta_sha)
        e["state"] = ("ok" if e["delta"] == "present" and not e["issues"] else
                      "missing" if e["delta"] == "missing" else "stale")
        entries.append(e)
    return {"model": {"spec": settings.model, "fingerprint": model_fp},
            "stats": {str(k): v for k, v in stats.items()}, "manifests": entries,
            "stack": _stack_state(layout, settings.manifests),
            "stack_file": _stack_file_state(layout, settings, model_fp, stats)}


def _stack_file_state(layout: Layout, settings: Params, model_fp: str, stats: dict[int, str]) -> str:
    """reports/stack.safetensors: missing, invalid, stale (stackfile.stale: what `romeflow export` refuses) or ok."""
    if not layout.stack_file.is_file():
        return "missing"
    try:
        sf = load_stack_file(layout.stack_file)
    except StackFileError:
        return "invalid"
    try:
        deltas = [load_delta(layout.delta(n)) for n in settings.manifests]
    except DeltaError:
        return "stale"
    return "stale" if stale(sf, settings, deltas, model_fp, stats) else "ok"


def _stack_state(layout: Layout, manifests: tuple[str, ...]) -> str:
    if not layout.stack_report.is_file():
        return "missing"
    try:
        r = json.loads(layout.stack_report.read_text())
        shas = {n: v["delta_sha256"] for n, v in r["manifests"].items()}
        listed = r["composed"]["manifests"]
    except (ValueError, KeyError, TypeError):
        return "invalid"
    if listed != list(manifests):
        return "stale"
    for name in manifests:
        p = layout.delta(name)
        if not p.is_file() or sha256_file(p) != shas.get(name):
            return "stale"
    return "ok"
