"""Where a stack of gated edits touches generic text: for each edit of a `romeflow bench stack` run folder,
the tokens of a held-out text at which its units are open (activation ≠ 0), and the size of what they add.

The units of every gated edit sit in one layer's MLP and read that MLP's input x, which the units themselves do
not change, so each edit's activations on the base model's x are exactly those it has in the composed stack.
A diagnostic before a lever for the stack's perplexity at scale (docs/scale.md, "Gated edits at scale"):
does the damage come from a few gates that open often, or from many that open rarely?

    python bench/gate_leak.py reports/bench/stack-dev300-gated --k 100 300 [--text data/heldout.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from romeflow.engine.gated import NeuronUpdate, _mlp_parts, text_inputs  # noqa: E402
from romeflow.engine.models import load_model  # noqa: E402
from romeflow.evaluation.datasets import load_counterfact  # noqa: E402
from romeflow.pipeline.deltas import load_delta  # noqa: E402


def rows_of(tokenizer, text: str, window: int) -> list[list[int]]:
    """The text's tokens in rows of ``window``, each after the model's <bos> (text_inputs drops it)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else ids[:1]
    return [bos + ids[i:i + window] for i in range(0, len(ids), window)]


def unit_outputs(model, up: NeuronUpdate, x: torch.Tensor) -> torch.Tensor:
    """What one edit's units add to the MLP's output at each token: (N, d_model)."""
    act = _mlp_parts(model, up.layer)[3]
    pre = x @ up.gate.T if up.bias is None else x @ up.gate.T + up.bias  # (N, r)
    h = act(pre) * (x @ up.up.T) if up.up is not None else act(pre)  # (N, r)
    return h @ up.down.T  # (N, d_model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--k", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "heldout.txt")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    run = json.loads((args.folder / "run.json").read_text())
    records = load_counterfact(ROOT / run["dataset"]["path"])[:max(args.k)]
    lm = load_model(run["model"]["name"])
    edits = []  # (case id, subject, NeuronUpdate)
    for rec in records:
        delta = load_delta(args.folder / "deltas" / f"{rec.case_id}.safetensors")
        edits += [(rec.case_id, rec.subject, up) for up in delta.updates if isinstance(up, NeuronUpdate)]
    layer = edits[0][2].layer
    with torch.no_grad():
        x = text_inputs(lm, layer, rows_of(lm.tokenizer, args.text.read_text(encoding="utf-8"), args.window))  # (N, d)
        per_edit = []
        for case_id, subject, up in edits:
            add = unit_outputs(lm.model, up, x)  # (N, d)
            norms = add.norm(dim=-1)  # (N,)
            per_edit.append({"case_id": case_id, "subject": subject, "open_tokens": int((norms > 0).sum()),
                             "added_norm_sum": float(norms.sum()), "mask": norms > 0})
    n = x.shape[0]
    result = {"folder": str(args.folder), "text": str(args.text), "tokens": n, "layer": layer, "by_k": {}}
    for k in args.k:
        rows = per_edit[:k]
        opened = sorted(rows, key=lambda r: -r["open_tokens"])
        total = sum(r["open_tokens"] for r in rows)
        union = torch.stack([r["mask"] for r in rows]).any(0)  # (N,): some edit's units open at the token
        result["by_k"][k] = {
            "edits": len(rows),
            "edits_open_somewhere": sum(r["open_tokens"] > 0 for r in rows),
            "open_edit_tokens": total,  # (edit, token) pairs with the edit's units open
            "tokens_with_some_edit_open": int(union.sum()),
            "share_of_pairs_from_top10": (sum(r["open_tokens"] for r in opened[:10]) / total) if total else 0.0,
            "top": [{key: v for key, v in r.items() if key != "mask"} for r in opened[:10]],
        }
        b = result["by_k"][k]
        print(f"k={k}: {b['edits_open_somewhere']} of {k} edits open on some of the {n} tokens; "
              f"{int(union.sum())} tokens with some edit open; {total} (edit, token) pairs; the 10 most open edits give {100 * b['share_of_pairs_from_top10']:.0f}%")
        for r in opened[:10]:
            print(f"   {r['open_tokens']:5d} tokens  case {r['case_id']:>6}  {r['subject']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
