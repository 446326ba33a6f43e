"""The Table-4 benchmark: edit each record alone, score it, restore the weights, aggregate with CIs.

A run lives in one folder: ``run.json`` (what is being measured: model, dataset, settings), one
``<method>.jsonl`` of raw per-record results per method (appended and flushed record by record, so an
interrupted run continues where it stopped), and the reports ``report.json`` / ``report.md``
aggregated from the JSONL files. Raw results keep NLLs, accuracies and generated texts, so every metric
is recomputed from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from .datasets import CounterfactRecord, ZsreRecord
from ..engine.editors import Editor, timed_edit
from .scoring import sample_continuations, target_scores, text_predictions
from ..io import atomic_path
from .metrics import TfidfSimilarity, generation_entropy, magnitude, mean_ci, score_ci, success
from ..engine.models import LoadedModel
from ..engine.prompts import fill
from ..schemas import validate

UNEDITED = "unedited"
METHOD_TITLES = {UNEDITED: "Unedited", "rome": "ROME", "rome-r1": "ROME, rank-one (no protected keys)", "ft": "FT",
                 "ftl": "FT+L", "kn": "KN"}


class BenchError(ValueError):
    """A run folder that does not match the requested run; one line for the user."""


@dataclass(frozen=True)
class GenerationParams:
    """Text generated after each edit for GE and RS (the ``bench.generation`` section of params.yaml)."""

    templates: tuple[str, ...] = ("{}", "{} is", "{} was known for")  # used when a record has none
    new_tokens: int = 50
    top_k: int = 5
    records: int = 25  # generate for the first this many records of a run (generation is the slow part)
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "templates": list(self.templates)}


# --------------------------------------------------------------------------------------------------
# One record: raw scores (and texts) on the model as it is now
# --------------------------------------------------------------------------------------------------


def generation_prompts(rec: CounterfactRecord, gen: GenerationParams) -> tuple[list[str], str]:
    """The record's own generation prompts (paper schema), else prompts built from its subject."""
    if rec.generation:
        return list(rec.generation), "dataset"
    return [rec.prompt] + [fill(t, rec.subject) for t in gen.templates if fill(t, rec.subject) != rec.prompt], \
        "built from the subject"


def score_counterfact(lm: LoadedModel, rec: CounterfactRecord, gen: GenerationParams | None,
                      seed: int) -> dict:
    """Raw results of one record: per prompt group [NLL new, NLL true, acc new, acc true]; texts.

    For the token-sharing neighbours (``neighborhood_tok``) "true" is each neighbour's own answer."""
    groups = {"rewrite": [rec.prompt], "paraphrase": list(rec.paraphrases), "neighborhood": list(rec.neighborhood),
              "neighborhood_tok": [n.prompt for n in rec.token_neighbors]}
    prompts = [p for ps in groups.values() for p in ps]
    olds = [rec.target_true] * (len(prompts) - len(rec.token_neighbors)) + [n.answer for n in rec.token_neighbors]
    nll, acc = target_scores(lm, prompts * 2, [rec.target_new] * len(prompts) + olds)
    rows = torch.stack([nll[:len(prompts)], nll[len(prompts):], acc[:len(prompts)], acc[len(prompts):]], 1).tolist()
    out, i = {"scores": {}}, 0
    for name, ps in groups.items():
        out["scores"][name] = rows[i:i + len(ps)]
        i += len(ps)
    out["token_neighbors"] = [n.subject for n in rec.token_neighbors]
    if gen is not None:
        gen_prompts, _ = generation_prompts(rec, gen)
        generator = torch.Generator().manual_seed(gen.seed * 1_000_003 + seed)
        texts = sample_continuations(lm, gen_prompts, gen.new_tokens, gen.top_k, generator)
        out["generations"] = [p + t for p, t in zip(gen_prompts, texts)]
    return out


def score_zsre(lm: LoadedModel, rec: ZsreRecord) -> dict:
    """Token accuracies (teacher-forced argmax) of the new answer on the question and its rephrasing,
    and of the unrelated question's answer; NLLs of the same."""
    nll, acc = target_scores(lm, [rec.question, rec.rephrase, rec.loc], [rec.target_new, rec.target_new, rec.loc_answer])
    return {"scores": {"efficacy": [nll[0].item(), acc[0].item()], "paraphrase": [nll[1].item(), acc[1].item()],
                       "specificity": [nll[2].item(), acc[2].item()]}}


# --------------------------------------------------------------------------------------------------
# A run folder: settings, resumable JSONL per method
# --------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Run:
    folder: Path
    settings: dict  # what the numbers depend on: model fingerprint, dataset, per-method params, generation
    shard: tuple[int, int] | None = None  # (k, n): this process runs the records with index % n == k - 1

    def open(self, write: bool = True) -> None:
        """Create the folder, or check that an existing one was started with the same settings."""
        path = self.folder / "run.json"
        if write:
            self.folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            old = json.loads(path.read_text())
            for key in ("kind", "model", "dataset", "generation", "token_neighbors", "others", "heldout"):
                if old.get(key) != self.settings.get(key):
                    raise BenchError(f"{path}: this folder holds a run with a different '{key}'; use another --out")
            merged = {**old.get("methods", {}), **self.settings["methods"]}
            for name, params in self.settings["methods"].items():
                if name in old.get("methods", {}) and old["methods"][name] != params:
                    raise BenchError(f"{path}: method '{name}' was run with other hyper-parameters; use another --out")
            self.settings = {**old, "methods": merged}
        if not write:
            return
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def results_path(self, method: str) -> Path:
        """This process's results file: METHOD.jsonl, or METHOD.shardKofN.jsonl when sharded."""
        if self.shard is None:
            return self.folder / f"{method}.jsonl"
        k, n = self.shard
        return self.folder / f"{method}.shard{k}of{n}.jsonl"

    def done(self, method: str) -> dict[int, dict]:
        """The records already scored for a method (in any of its files), by case_id.

        A torn last line (a crash) is dropped, and cut from this process's own file."""
        out = {}
        for path in sorted(self.folder.glob(f"{method}.jsonl")) + sorted(self.folder.glob(f"{method}.shard*.jsonl")):
            good_bytes = 0
            with open(path, "rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    out.setdefault(row["case_id"], row)
                    good_bytes += len(line)
            if path == self.results_path(method) and good_bytes != path.stat().st_size:
                os.truncate(path, good_bytes)
        return out

    def append(self, method: str, row: dict) -> None:
        with open(self.results_path(method), "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


class ValueStore:
    """The (k*, v*, NLL trace) of each edit, kept in the run folder (``values/``) for the ROME variants.

    v* is ~95% of an edit's cost and does not depend on the insert, so every variant of the insert
    (protected keys or not) run now or later in the same folder computes each v* once. Keys are the
    tuples ``Rome`` builds (model fingerprint, layer, edit, v* hyper-parameters); files are named by
    their sha256 and written atomically, so sharded processes can share the folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key: tuple) -> Path:
        return self.folder / f"{sha256_bytes(repr(key).encode())}.safetensors"

    def get(self, key: tuple):
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(path)
        return t["k_star"], t["v_star"], t["trace"].tolist()

    def __setitem__(self, key: tuple, value) -> None:
        from safetensors.torch import save_file

        k_star, v_star, trace = value
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(key)) as tmp:
            save_file({"k_star": k_star.cpu().contiguous(), "v_star": v_star.cpu().contiguous(),
                       "trace": torch.tensor(trace, dtype=torch.float64)}, tmp, metadata={"key": repr(key)})


@dataclass(frozen=True)
class DamageText:
    """Per-edit damage: the held-out text whose perplexity is measured after each edit (its first
    ``tokens`` tokens, in windows of ``window``)."""

    text: str
    tokens: int
    window: int


def run_method(run: Run, method: str, editor: Editor | None, lm: LoadedModel, records: list,
               score: Callable[[LoadedModel, object, int], dict],
               progress: Callable[[int, int], Callable[[], None]] | None = None) -> None:
    """Edit, score and restore each record not yet done; append its raw result."""
    done = run.done(method)
    mine = (lambda i: True) if run.shard is None else (lambda i: i % run.shard[1] == run.shard[0] - 1)
    todo = [(i, rec) for i, rec in enumerate(records) if rec.case_id not in done and mine(i)]
    tick = progress(len(records), len(records) - len(todo)) if progress else (lambda: None)
    for i, rec in todo:
        row = {"case_id": rec.case_id, "index": i, "seconds": 0.0}
        if editor is not None:
            edit, seconds = timed_edit(editor, rec.request)
            row["seconds"], row["edit"] = seconds, edit.info
            try:
                row.update(score(lm, rec, i))
            finally:
                edit.restore(lm.model)
        else:
            row.update(score(lm, rec, i))
        run.append(method, row)
        tick()


# --------------------------------------------------------------------------------------------------
# Aggregation: per-record values -> means with CIs
# --------------------------------------------------------------------------------------------------


def _pairs(rows):  # [[nll_new, nll_true, acc_new, acc_true], ...] -> [(nll_new, nll_true)]
    return [(r[0], r[1]) for r in rows]


def counterfact_record_values(row: dict) -> dict[str, float]:
    """The per-record values the Table-4 metrics average (all in %)."""
    s = row["scores"]
    out = {
        "ES": success(_pairs(s["rewrite"]), True), "EM": magnitude(_pairs(s["rewrite"]), True),
        "PS": success(_pairs(s["paraphrase"]), True), "PM": magnitude(_pairs(s["paraphrase"]), True),
        "NS": success(_pairs(s["neighborhood"]), False), "NM": magnitude(_pairs(s["neighborhood"]), False),
        # argmax variants: share of the target's tokens that are the top-1 prediction (teacher-forced)
        "ES_acc": 100 * sum(r[2] for r in s["rewrite"]) / len(s["rewrite"]),
        "PS_acc": 100 * sum(r[2] for r in s["paraphrase"]) / len(s["paraphrase"]),
        "NS_acc": 100 * sum(r[3] for r in s["neighborhood"]) / len(s["neighborhood"]),
    }
    tok = s.get("neighborhood_tok") or []
    if tok:  # records without token-sharing neighbours have no NS_tok (never counted as a success)
        out["NS_tok"], out["NM_tok"] = success(_pairs(tok), False), magnitude(_pairs(tok), False)
        protected = set((row.get("edit") or {}).get("protected") or [])
        free = [r for r, subject in zip(tok, row.get("token_neighbors") or [None] * len(tok)) if subject not in protected]
        if free:
            out["NS_tok_unprotected"] = success(_pairs(free), False)
    if row.get("generations"):
        out["GE"] = 100 * sum(map(generation_entropy, row["generations"])) / len(row["generations"])
    return out


def reference_texts(records: list[CounterfactRecord], references: dict[str, list[str]] | None
                    ) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """Texts about subjects, grouped by their object: object -> [(subject, text)].

    From a reference file ({object: [text, ...]}) when given, else from the dataset's own records:
    each record's prompt completed with its true object ("The mother tongue of X is French.").
    """
    if references is not None:
        return {obj: [("", t) for t in texts] for obj, texts in references.items()}, "reference file"
    out: dict[str, list[tuple[str, str]]] = {}
    for rec in records:
        out.setdefault(rec.target_true, []).append((rec.subject, f"{rec.prompt} {rec.target_true}."))
    return out, "the dataset's records (prompts completed with their true objects)"


def consistency(row_generations: list[str], subject: str, target_new: str,
                refs: dict[str, list[tuple[str, str]]], tfidf: TfidfSimilarity, max_texts: int = 50) -> float | None:
    """RS of one record: TF-IDF cosine (%) of its generations with texts about *other* subjects whose
    object is the new target; None when there are none."""
    texts = [t for s, t in refs.get(target_new, []) if s != subject][:max_texts]
    if not texts:
        return None
    return 100 * tfidf(" ".join(row_generations), " ".join(texts))


def aggregate_counterfact(rows: list[dict], records_by_id: dict[int, CounterfactRecord],
                          refs: dict[str, list[tuple[str, str]]], tfidf: TfidfSimilarity | None,
                          resamples: int = 1000, base_nll: float | None = None) -> dict:
    """Means with 95% intervals. base_nll: the unedited model's mean NLL of the held-out text; with it,
    PPL+ = the held-out perplexity's change after each edit, in % (rows that measured it)."""
    values = [counterfact_record_values(r) for r in rows]
    metrics = {}
    for key in ("ES", "EM", "PS", "PM", "NS", "NM", "ES_acc", "PS_acc", "NS_acc"):
        metrics[key] = mean_ci(v[key] for v in values).to_dict()
    metrics["S"] = score_ci([v["ES"] for v in values], [v["PS"] for v in values], [v["NS"] for v in values],
                            resamples).to_dict()
    for key in ("NS_tok", "NM_tok", "NS_tok_unprotected"):
        have = [v[key] for v in values if key in v]
        metrics[key] = mean_ci(have).to_dict() if have else None
    if metrics["NS_tok"] is not None:  # S+: NS_tok's mean over the records that have token-sharing neighbours
        nan = float("nan")
        metrics["S+"] = score_ci([v["ES"] for v in values], [v["PS"] for v in values], [v["NS"] for v in values],
                                 resamples, extra=[[v.get("NS_tok", nan) for v in values]]).to_dict()
    else:
        metrics["S+"] = None
    ge = [v["GE"] for v in values if "GE" in v]
    metrics["GE"] = mean_ci(ge).to_dict() if ge else None
    ppl = [100 * math.expm1(r["heldout_nll"] - base_nll) for r in rows if "heldout_nll" in r] \
        if base_nll is not None else []
    metrics["PPL+"] = mean_ci(ppl).to_dict() if ppl else None
    rs = []
    if tfidf is not None:
        for r in rows:
            if r.get("generations"):
                rec = records_by_id[r["case_id"]]
                value = consistency(r["generations"], rec.subject, rec.target_new, refs, tfidf)
                if value is not None:
                    rs.append(value)
    metrics["RS"] = mean_ci(rs).to_dict() if rs else None
    return metrics


def aggregate_zsre(rows: list[dict]) -> dict:
    metrics = {}
    for key, name in (("efficacy", "Efficacy"), ("paraphrase", "Paraphrase"), ("specificity", "Specificity")):
        metrics[name] = mean_ci(100 * r["scores"][key][1] for r in rows).to_dict()
    return metrics


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    kind: str  # counterfact | zsre
    settings: dict
    methods: dict[str, dict] = field(default_factory=dict)  # name -> {n, seconds_per_edit, metrics}
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def to_dict(self) -> dict:
        return {"format": "romeflow.bench/1", "romeflow_version": __version__, "kind": self.kind,
                "command": self.command, "settings": self.settings, "methods": self.methods, "notes": self.notes}


def build_report(run: Run, kind: str, methods: list[str], records: list, command: str,
                 reference_records: list | None = None, references: dict[str, list[str]] | None = None,
                 resamples: int = 1000, partial: bool = False) -> Report:
    """Aggregate every method's rows over the records of this run (only methods with all rows done).

    partial: aggregate over the records that every method has finished so far instead (a look at a
    run in progress); the report says how many.
    RS references come from ``references`` ({object: [text]}) when given, else from ``reference_records``
    (the whole dataset file, not just the records run)."""
    ids = [r.case_id for r in records]
    report = Report(kind, run.settings, command=command)
    if partial:
        done_by = [run.done(m) for m in methods]
        ids = [i for i in ids if all(i in d for d in done_by)]
        if not ids:
            raise BenchError(f"{run.folder}: no record is finished by every method yet")
        report.notes.append(f"Partial report: the {len(ids)} records (of {len(records)}) that every method had "
                            "finished when it was written.")
    refs, tfidf = {}, None
    if kind == "counterfact":
        refs, source = reference_texts(reference_records or records, references)
        corpus = [" ".join(t for _, t in texts) for texts in refs.values()]
        tfidf = TfidfSimilarity(corpus) if corpus else None
        gen = run.settings["generation"]
        report.notes.append(f"GE and RS: {gen['new_tokens']} sampled tokens (top-{gen['top_k']}) per generation "
                            f"prompt, on the first {gen['records']} records of the run; generation prompts: "
                            f"{run.settings['dataset']['generation_prompts']}.")
        report.notes.append(f"RS reference texts: {source}; TF-IDF fitted on one document per object.")
        tok = run.settings.get("token_neighbors")
        if tok:
            report.notes.append(
                f"NS_tok / NM_tok: up to {tok['k']} other subjects sharing the edited subject's last token, from the "
                f"dataset{' and ' + tok['facts'] if tok.get('facts') else ''}, asked the record's relation, scored "
                f"P[their answer] > P[new target]; {tok['records_with']} of {len(records)} records have such neighbours "
                f"({tok['neighbors']} in all); the others are left out of NS_tok and of its term in S+ "
                "(S+ = harmonic mean of ES, PS, NS, NS_tok).")
    report.notes.append("95% intervals: mean ± 1.96·sd/√n over records; S: percentile bootstrap over records "
                        f"({resamples} resamples, seed 0).")
    by_id = {r.case_id: r for r in records}
    base_rows = [r for r in run.done(UNEDITED).values() if "heldout_nll" in r] if UNEDITED in methods else []
    base_nll = base_rows[0]["heldout_nll"] if base_rows else None
    damage = run.settings.get("damage")
    if damage:
        report.notes.append(f"PPL+: held-out perplexity after each edit vs the unedited model, in % (first "
                            f"{damage['tokens']} tokens of {damage['text']}, windows of {damage['window']}).")
    for method in methods:
        done = run.done(method)
        rows = [done[i] for i in ids if i in done]
        if len(rows) < len(ids):
            report.notes.append(f"{METHOD_TITLES.get(method, method)}: {len(rows)} of {len(ids)} records done; "
                                "left out of the table.")
            continue
        metrics = aggregate_counterfact(rows, by_id, refs, tfidf, resamples, base_nll) if kind == "counterfact" \
            else aggregate_zsre(rows)
        seconds = [r["seconds"] for r in rows]
        report.methods[method] = {"n": len(rows), "metrics": metrics,
                                  "seconds_per_edit": sum(seconds) / len(seconds) if method != UNEDITED else None}
    return report


def _cell(m: dict | None, digits: int = 1) -> str:
    if m is None:
        return "–"
    half = (m["ci95"][1] - m["ci95"][0]) / 2
    return f"{m['value']:.{digits}f} ± {half:.{digits}f}"


def render_markdown(report: Report) -> str:
    if report.kind == "counterfact":
        cols = ["S", "S+", "ES", "EM", "PS", "PM", "NS", "NM", "NS_tok", "NM_tok", "GE", "RS", "PPL+"]
        title = "COUNTERFACT (Table 4 layout)"
    else:
        cols = ["Efficacy", "Paraphrase", "Specificity"]
        title = "zsRE (Table 1 layout)"
    s = report.settings
    lines = [f"# {title}: {s['model']['name']}", "",
             f"Records: {s['dataset']['n']} from `{s['dataset']['path']}` (sha256 {s['dataset']['sha256'][:12]}…).",
             "", f"Command: `{report.command}`", "",
             "| Method | " + " | ".join(cols) + " | s/edit |", "|---" * (len(cols) + 2) + "|"]
    for name, m in report.methods.items():
        secs = "–" if m["seconds_per_edit"] is None else f"{m['seconds_per_edit']:.2f}"
        lines.append(f"| {METHOD_TITLES.get(name, name)} | " + " | ".join(_cell(m["metrics"].get(c)) for c in cols)
                     + f" | {secs} |")
    if report.kind == "counterfact":
        lines += ["", "Argmax variants (share of target tokens that are the top-1 prediction, teacher-forced):", "",
                  "| Method | ES_acc | PS_acc | NS_acc |", "|---|---|---|---|"]
        for name, m in report.methods.items():
            lines.append(f"| {METHOD_TITLES.get(name, name)} | "
                         + " | ".join(_cell(m["metrics"][c]) for c in ("ES_acc", "PS_acc", "NS_acc")) + " |")
        lines += ["", "NS_tok on the token-sharing neighbours that were not among the edit's protected subjects:", "",
                  "| Method | NS_tok (unprotected) |", "|---|---|"]
        for name, m in report.methods.items():
            lines.append(f"| {METHOD_TITLES.get(name, name)} | {_cell(m['metrics'].get('NS_tok_unprotected'))} |")
    lines += ["", "Hyper-parameters:", ""]
    for name, params in s["methods"].items():
        if name in report.methods:
            lines.append(f"- {METHOD_TITLES.get(name, name)}: `{json.dumps(params, sort_keys=True)}`")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_report(report: Report, folder: Path, stem: str = "report") -> tuple[Path, Path]:
    data = report.to_dict()
    errors = validate("bench", data)
    if errors:
        raise BenchError(f"bench report {errors[0][0]}: {errors[0][1]}")
    out_json, out_md = folder / f"{stem}.json", folder / f"{stem}.md"
    with atomic_path(out_json) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(render_markdown(report))
    return out_json, out_md


# --------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------


def benchmark(lm: LoadedModel, kind: str, records: list, editors: dict[str, Editor | None], folder: Path,
              settings: dict, command: str, gen: GenerationParams | None = None,
              reference_records: list | None = None, references: dict[str, list[str]] | None = None,
              progress: Callable[[str, int, int], Callable[[], None]] | None = None,
              shard: tuple[int, int] | None = None, damage: DamageText | None = None) -> Report:
    """Run (or resume) every method over the records, then aggregate whatever is complete.

    editors: method name -> editor (None for the unedited model), run in this order.
    shard (k, n): run only every n-th record, starting at the k-th, so that n processes share a run.
    damage: a held-out text whose mean NLL is measured after every edit (COUNTERFACT runs).
    """
    run = Run(Path(folder), settings, shard)
    run.open()
    if kind == "counterfact":
        def score(lm_, rec, i):
            out = score_counterfact(lm_, rec, gen if gen is not None and i < gen.records else None, rec.case_id)
            if damage is not None:
                out["heldout_nll"] = float(text_predictions(lm_, damage.text, damage.window, damage.tokens)[0].mean())
            return out
    else:
        def score(lm_, rec, i):
            return score_zsre(lm_, rec)
    for name, editor in editors.items():
        run_method(run, name, editor, lm, records, score,
                   (lambda total, done, _n=name: progress(_n, total, done)) if progress else None)
    report = build_report(run, kind, list(editors), records, command, reference_records, references)
    write_report(report, run.folder)
    return report


def run_settings(kind: str, model: dict, dataset_path: Path, records: list, method_params: dict[str, dict],
                 gen: GenerationParams | None, generation_source: str | None, token_neighbors: dict | None = None,
                 damage: dict | None = None) -> dict:
    """What a run's numbers depend on; a resumed run must match it (run.json)."""
    dataset = {"path": str(dataset_path), "sha256": sha256_bytes(Path(dataset_path).read_bytes()),
               "n": len(records), "case_ids_sha256": sha256_bytes(json.dumps([r.case_id for r in records]).encode())}
    if generation_source:
        dataset["generation_prompts"] = generation_source
    out = {"kind": kind, "model": model, "dataset": dataset,
           "generation": gen.to_dict() if gen else None, "methods": method_params}
    if damage is not None:
        out["damage"] = damage
    if token_neighbors is not None:
        with_tok = [r for r in records if r.token_neighbors]
        out["token_neighbors"] = {**token_neighbors, "records_with": len(with_tok),
                                  "neighbors": sum(len(r.token_neighbors) for r in with_tok),
                                  "sha256": sha256_bytes(json.dumps([[r.case_id] + [list(map(str, (n.subject, n.prompt, n.answer)))
                                                                     for n in r.token_neighbors] for r in records]).encode())}
    return out


def partial_report(kind: str, records: list, methods: list[str], folder: Path, settings: dict, command: str,
                   reference_records: list | None = None, references: dict[str, list[str]] | None = None) -> Report:
    """Aggregate a run in progress (nothing is run): report-partial.json / .md in the run folder."""
    run = Run(Path(folder), settings)
    if not (run.folder / "run.json").exists():
        raise BenchError(f"{run.folder}: no run here (run.json is missing)")
    run.open(write=False)
    report = build_report(run, kind, methods, records, command, reference_records, references, partial=True)
    write_report(report, run.folder, "report-partial")
    return report
