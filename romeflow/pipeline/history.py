"""Reports across git revisions: the metric table behind ``romeflow diff``.

Reports (reports/NAME.json and reports/stack.json) are DVC metrics with ``cache: false``, so git
tracks them: a revision's reports are read with ``git show REV:./reports/...``; the working tree's
from disk. Each report becomes rows of (manifest, metric) -> value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

STACK_ROW = "(stack)"  # the manifest column of stack-wide measures


class RevisionError(ValueError):
    """A revision or report that cannot be read; str(error) is one line."""


def _git(args: list[str], cwd: Path) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RevisionError("git: not found on PATH") from e
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise RevisionError(f"git {' '.join(args[:2])}: {msg}")
    return r.stdout


def read_reports(root: Path, rev: str | None = None) -> dict[str, dict]:
    """{file name: report} of reports/*.json (not *.details.json) at ``rev`` (None: the working tree)."""
    folder = Path(root) / "reports"
    if rev is None:
        files = sorted(folder.glob("*.json"))
        texts = {p.name: p.read_text() for p in files}
    else:
        try:
            _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root)
        except RevisionError as e:
            if not str(e).endswith(": failed"):  # e.g. not a git repository
                raise
            raise RevisionError(f"{Path(root).resolve()}: unknown git revision '{rev}'") from e
        listed = _git(["ls-tree", "--name-only", rev, "reports/"], root).split()
        texts = {Path(p).name: _git(["show", f"{rev}:./{p}"], root) for p in listed if p.endswith(".json")}
    out = {}
    for name, text in texts.items():
        if name.endswith(".details.json"):
            continue
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise RevisionError(f"reports/{name} at {rev or 'the working tree'}: invalid JSON ({e.msg})") from e
    return out


def _leaves(prefix: str, value) -> dict[str, float]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(f"{prefix}.{k}" if prefix else k, v))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def metric_rows(reports: dict[str, dict]) -> dict[tuple[str, str], float]:
    """(manifest, metric) -> value: eval reports give pre.X and post.X; the stack report gives
    stack.X and interference.X per manifest, and its damage measures under (stack)."""
    rows = {}
    for fname, r in reports.items():
        if not isinstance(r, dict):
            continue
        if r.get("format", "").startswith("romeflow.stack"):
            for name, m in (r.get("manifests") or {}).items():
                for part in ("stack", "interference"):
                    rows.update({(name, k): v for k, v in _leaves(part, m.get(part, {})).items()})
            rows.update({(STACK_ROW, k): v for k, v in _leaves("", r.get("damage", {})).items()
                         if not k.endswith((".window", ".tokens"))})
        elif r.get("format", "").startswith("romeflow.report"):
            name = (r.get("manifest") or {}).get("name", Path(fname).stem)
            for part in ("pre", "post"):
                rows.update({(name, k): v for k, v in _leaves(part, r.get(part, {})).items()})
    return rows


def diff_reports(root: Path, rev_a: str = "HEAD", rev_b: str | None = None, all_rows: bool = False) -> list[dict]:
    """Rows {manifest, metric, a, b, change} between two revisions (``rev_b`` None: the working tree).

    Only rows whose value differs (or exists on one side only), unless ``all_rows``.
    """
    a, b = metric_rows(read_reports(root, rev_a)), metric_rows(read_reports(root, rev_b))
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (k[0] == STACK_ROW, k)):
        va, vb = a.get(key), b.get(key)
        if va == vb and not all_rows:
            continue
        change = vb - va if va is not None and vb is not None else None
        out.append({"manifest": key[0], "metric": key[1], "a": va, "b": vb, "change": change})
    return out


def markdown_table(rows: list[dict], rev_a: str, rev_b: str) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"| manifest | metric | {rev_a} | {rev_b} | change |", "|---|---|---:|---:|---:|"]
    for r in rows:
        change = "–" if r["change"] is None else f"{r['change']:+.4g}"
        lines.append(f"| {r['manifest']} | {r['metric']} | {fmt(r['a'])} | {fmt(r['b'])} | {change} |")
    return "\n".join(lines) + "\n"
