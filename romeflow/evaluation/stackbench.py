"""`romeflow bench stack`: edits at scale. One delta per COUNTERFACT record (one manifest each), the first
k composed with each stack method, and the composed model scored.

A run lives in one folder:

    run.json                  what the numbers depend on (model, records, ROME and stack settings)
    deltas/<case_id>.safetensors
                              one delta per edited record, computed on the base model (resumable:
                              a record whose delta exists is not edited again; --shard splits records)
    deltas/<case_id>.refused.json
                              a record the engine refused to edit (its one-line reason): it stays in
                              every composition's scores, unedited, so a refusal counts as a failure
    rows/<method>-k<k>.json   one composition: per-record raw scores of the k edited records and of
                              the held-out ones, and the held-out text's perplexity (resumable, sharded)
    rows/unedited.json        the same on the base model (k = 0)
    report.json, report.md, report.png
                              written once every composition is done

Scored for each (method, k): ES / PS / NS / NS_tok of the first k records on the composed model (the
Table-4 definitions of ``bench.counterfact_record_values``), the neighbourhood success (NS) and the
kept rewrite (P[true] > P[new] on its own prompt) of ``others`` held-out records that were never
edited (the records after the first N), and the perplexity of params.yaml ``stack.heldout``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

from .. import __version__
from .bench import Run, counterfact_record_values, score_counterfact
from .datasets import CounterfactRecord
from ..pipeline.deltas import Delta, compute_delta, load_delta, save_delta
from ..pipeline.compose import EditedModel, JointSolve
from .scoring import text_predictions
from ..io import atomic_path, write_json_atomic
from ..pipeline.manifests import Manifest, ManifestEdit
from .metrics import mean_ci, success
from ..engine.models import LoadedModel
from ..engine.rome import RomeParams
from ..schemas import validate

FORMAT = "romeflow.bench-stack/1"
DEFAULT_KS = (1, 10, 30, 100, 300)
METHODS = ("sum", "joint")
EDITED = ("ES", "PS", "NS", "NS_tok")  # of the first k records, on the composed model
HELD = ("other_NS", "other_kept")  # of the held-out records


def record_manifest(rec: CounterfactRecord, records_path: str) -> Manifest:
    """A record as a one-edit manifest (name cf<case_id>); its sha256 is that of the edit's fields."""
    edit = ManifestEdit(rec.subject, rec.relation, rec.target_new, rec.target_true)
    digest = hashlib.sha256(json.dumps([rec.case_id, rec.subject, rec.relation, rec.target_new, rec.target_true])
                            .encode()).hexdigest()
    return Manifest(f"{records_path}#{rec.case_id}", f"cf{rec.case_id}", digest, (edit,))


def ks_up_to(ks: tuple[int, ...], n: int) -> list[int]:
    """The k of the list, capped at n (n itself included when the list goes beyond it)."""
    out = sorted({min(k, n) for k in ks if k >= 1})
    return out


def _mine(shard: tuple[int, int] | None) -> Callable[[int], bool]:
    return (lambda i: True) if shard is None else (lambda i: i % shard[1] == shard[0] - 1)


def _perplexity(lm: LoadedModel, text: str, window: int) -> float:
    nll, _ = text_predictions(lm, text, window)
    return math.exp(nll.mean().item())


def score_rows(lm: LoadedModel, edited: list[CounterfactRecord], others: list[CounterfactRecord],
               text: str, window: int) -> dict:
    """Raw scores on the model as it is now: per edited record, per held-out record, and the perplexity."""
    return {"edited": [{"case_id": r.case_id, **score_counterfact(lm, r, None, r.case_id)} for r in edited],
            "others": [{"case_id": r.case_id, **score_counterfact(lm, r, None, r.case_id)} for r in others],
            "perplexity": _perplexity(lm, text, window)}


def summarise(rows: dict) -> dict:
    """Means with 95% CIs of a composition's raw rows (None where nothing was scored)."""
    out: dict = {}
    values = [counterfact_record_values(r) for r in rows["edited"]]
    for key in EDITED:
        have = [v[key] for v in values if key in v]
        out[key] = mean_ci(have).to_dict() if have else None
    ns = [success([(a[0], a[1]) for a in r["scores"]["neighborhood"]], False) for r in rows["others"]]
    kept = [success([(a[0], a[1]) for a in r["scores"]["rewrite"]], False) for r in rows["others"]]
    out["other_NS"] = mean_ci(ns).to_dict() if ns else None
    out["other_kept"] = mean_ci(kept).to_dict() if kept else None
    out["perplexity"] = rows["perplexity"]
    return out


class StackBench:
    """One run folder (module docstring). ``methods``: name -> None (sum) or a JointSolve."""

    def __init__(self, lm: LoadedModel, folder: Path, settings: dict, records: list[CounterfactRecord],
                 others: list[CounterfactRecord], ks: list[int], methods: dict[str, JointSolve | None],
                 heldout_text: str, window: int, shard: tuple[int, int] | None = None):
        self.lm, self.folder, self.records, self.others = lm, Path(folder), records, others
        self.ks, self.methods, self.text, self.window, self.shard = ks, methods, heldout_text, window, shard
        self.run = Run(self.folder, settings)

    def delta_path(self, rec: CounterfactRecord) -> Path:
        return self.folder / "deltas" / f"{int(rec.case_id)}.safetensors"

    def refusal_path(self, rec: CounterfactRecord) -> Path:
        return self.folder / "deltas" / f"{int(rec.case_id)}.refused.json"

    def done(self, rec: CounterfactRecord) -> bool:
        """The record's delta exists, or the engine refused it."""
        return self.delta_path(rec).is_file() or self.refusal_path(rec).is_file()

    def rows_path(self, method: str, k: int) -> Path:
        return self.folder / "rows" / (f"{method}-k{k}.json" if method != "unedited" else "unedited.json")

    def jobs(self) -> list[tuple[str, int]]:
        return [("unedited", 0)] + [(m, k) for k in self.ks for m in self.methods]

    def edit(self, params: RomeParams, stats: dict, root: Path, records_path: str,
             progress: Callable[[], None] = lambda: None) -> None:
        """Phase 1: a delta per record not done yet (this shard's)."""
        self.run.open()
        (self.folder / "deltas").mkdir(exist_ok=True)
        mine = _mine(self.shard)
        for i, rec in enumerate(self.records):
            if not mine(i) or self.done(rec):
                continue
            try:
                delta = compute_delta(self.lm, record_manifest(rec, records_path), params, stats, root=root)
            except ValueError as e:  # the engine refuses this edit (InsertError, a gate that cannot separate)
                write_json_atomic(self.refusal_path(rec), {"case_id": rec.case_id, "subject": rec.subject,
                                                           "error": str(e).splitlines()[0]})
            else:
                save_delta(self.delta_path(rec), delta)
            progress()

    def compose(self, progress: Callable[[str, int], None] = lambda m, k: None) -> list[tuple[str, int]]:
        """Phase 2: every composition whose deltas exist and whose rows are not cached (this shard's).
        Returns the jobs still missing afterwards."""
        (self.folder / "rows").mkdir(parents=True, exist_ok=True)
        mine = _mine(self.shard)
        edited = EditedModel(self.lm)
        loaded: dict[int, Delta] = {}
        missing = []
        for j, (method, k) in enumerate(self.jobs()):
            path = self.rows_path(method, k)
            if path.is_file():
                continue
            if not mine(j) or not all(self.done(r) for r in self.records[:k]):
                missing.append((method, k))
                continue
            scored = self.records[:k or max(self.ks)]  # unedited: the records of the largest stack
            refused = [r.case_id for r in self.records[:k] if not self.delta_path(r).is_file()]  # scored unedited
            edits = [r for r in self.records[:k] if r.case_id not in refused]
            for r in edits:
                if r.case_id not in loaded:
                    loaded[r.case_id] = load_delta(self.delta_path(r))
            deltas = [loaded[r.case_id] for r in edits]
            t = time.perf_counter()
            row: dict = {"method": method, "k": k}
            if refused:
                row["refused"] = refused
            try:
                edited.compose(deltas, self.methods.get(method))
                row.update(score_rows(self.lm, scored, self.others, self.text, self.window))
                if edited.scales is not None:  # a calibrated stack: each edit's share of its change
                    row["scales"] = [round(float(x), 6) for x in edited.scales]
            except ValueError as e:  # a joint solve that cannot separate the keys: recorded, not fatal
                row["error"] = str(e).splitlines()[0]
            finally:
                edited.reset()
            row["seconds"] = time.perf_counter() - t
            write_json_atomic(path, row)
            progress(method, k)
        return missing

    def report(self, command: str) -> dict | None:
        """report.json / .md / .png from the cached rows, once every composition is there (else None)."""
        rows = {}
        for method, k in self.jobs():
            path = self.rows_path(method, k)
            if not path.is_file():
                return None
            rows[(method, k)] = json.loads(path.read_text())
        unedited = rows[("unedited", 0)]
        base = summarise(unedited)
        table = []
        for k in self.ks:  # the unedited model on the same first k records, for each k
            s = summarise({**unedited, "edited": unedited["edited"][:k]})
            table.append({"method": "unedited", "k": k, "seconds": 0.0, **s, "perplexity_increase_pct": 0.0})
        for method in self.methods:
            for k in self.ks:
                r = rows[(method, k)]
                entry = {"method": method, "k": k, "seconds": r["seconds"], "refused": len(r.get("refused", []))}
                if "error" in r:
                    entry["error"] = r["error"]
                else:
                    s = summarise(r)
                    entry.update(s, perplexity_increase_pct=100.0 * (s["perplexity"] / base["perplexity"] - 1.0))
                table.append(entry)
        report = {"format": FORMAT, "romeflow_version": __version__, "command": command,
                  "settings": self.run.settings, "unedited": base, "rows": table,
                  "limits": limits(table), "notes": notes(self.records, self.others)}
        errors = validate("bench-stack", report)
        if errors:
            raise ValueError(f"bench stack report {errors[0][0]}: {errors[0][1]}")
        write_json_atomic(self.folder / "report.json", report)
        with atomic_path(self.folder / "report.md") as tmp:
            Path(tmp).write_text(markdown(report), encoding="utf-8")
        plot(report, self.folder / "report.png")
        return report


def limits(table: list[dict], max_ppl_pct: float = 5.0, min_es: float = 95.0) -> dict:
    """Per method: the first k at which perplexity rises above +5% or ES falls below 95 (None: never)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in table if r["method"] != "unedited"):
        first = None
        for r in (r for r in table if r["method"] == method):
            broken = "error" in r or r["perplexity_increase_pct"] > max_ppl_pct or \
                (r["ES"] is not None and r["ES"]["value"] < min_es)
            if broken:
                first = r["k"]
                break
        out[method] = {"first_k_broken": first, "max_perplexity_increase_pct": max_ppl_pct, "min_ES": min_es}
    return out


def notes(records: list, others: list) -> list[str]:
    return [f"{len(records)} edited records (one delta each, computed on the base model); the first k composed.",
            f"other_NS / other_kept: {len(others)} held-out records never edited: their neighbourhood prompts "
            "(P[true] > P[new]) and their own rewrite prompt still preferring the true object.",
            "NS_tok: only over edited records with token-sharing neighbours; 95% intervals: mean ± 1.96·sd/√n."]


def _cell(m: dict | None) -> str:
    if m is None:
        return "–"
    return f"{m['value']:.1f} ± {(m['ci95'][1] - m['ci95'][0]) / 2:.1f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    cols = list(EDITED) + list(HELD)
    lines = [f"# Edits at scale: {s['model']['name']}", "",
             f"Records: {s['dataset']['n']} edited from `{s['dataset']['path']}`; command: `{report['command']}`", "",
             "| method | k | " + " | ".join(cols) + " | perplexity | Δ ppl | s |", "|---" * (len(cols) + 5) + "|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['k']} | " + " | ".join("–" for _ in cols) + f" | – | – | "
                         f"{r['seconds']:.1f} |")
            continue
        lines.append(f"| {r['method']} | {r['k']} | " + " | ".join(_cell(r.get(c)) for c in cols)
                     + f" | {r['perplexity']:.3f} | {r['perplexity_increase_pct']:+.2f}% | {r['seconds']:.1f} |")
    lines += ["", "*unedited*: the base model on the same first k records. First k at which perplexity rises above "
              "+5% or ES falls below 95:", ""]
    for method, lim in report["limits"].items():
        lines.append(f"- {method}: {'never, up to k = ' + str(max(r['k'] for r in report['rows'])) if lim['first_k_broken'] is None else lim['first_k_broken']}")
    errors = [r for r in report["rows"] if "error" in r]
    lines += [f"- {r['method']} k = {r['k']}: {r['error']}" for r in errors]
    lines += [f"- {r['method']} k = {r['k']}: {r['refused']} edit(s) refused by the engine, scored unedited"
              for r in report["rows"] if r.get("refused")]
    lines += ["", "Settings: `" + json.dumps(s["methods"], sort_keys=True) + "`", "", "Notes:", ""]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """ES/PS/NS, NS_tok and held-out NS, and the perplexity increase against k, one line per method."""
    from . import plots  # noqa: F401 - selects the Agg backend
    import matplotlib.pyplot as plt

    panels = [("ES", "ES"), ("PS", "PS"), ("NS", "NS"), ("NS_tok", "NS_tok"), ("other_NS", "held-out NS"),
              ("perplexity_increase_pct", "perplexity increase (%)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    ks = sorted({r["k"] for r in report["rows"]})
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i % 2 == 0 and i != 14]  # no gray:
    colour = {m: palette[i % len(palette)] for i, m in enumerate(report["limits"])}  # that is the unedited model
    for ax, (key, title) in zip(axes.flat, panels):
        for method in ["unedited", *report["limits"]]:
            pts = [(r["k"], r[key] if key == "perplexity_increase_pct" else r[key]["value"])
                   for r in report["rows"] if r["method"] == method and "error" not in r and r.get(key) is not None]
            if pts:
                style = {"color": "gray", "linestyle": "--"} if method == "unedited" else {"color": colour[method]}
                ax.plot(*zip(*pts), marker="o", label=method, **style)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("manifests composed (k)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"Edits at scale: {report['settings']['model']['name']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
