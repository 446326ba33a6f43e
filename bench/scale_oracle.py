"""How far a per-record choice of the update's share could go: the PS / NS_tok frontier of an oracle.

Given bench rows of several variants that differ only in how much of δ they keep (e.g. the shrink to
margin 4, to margin 7, and no shrink), the oracle picks for every record the variant that maximises
NS_tok + λ·PS of that record, for a sweep of λ. It sees the scores, so it is an upper bound for any rule
an editor could use to choose the share per edit (such as ``shrink_family``), not a method.

    python bench/scale_oracle.py reports/bench/pfx-dev100 cenips4 cenips7 cenip
"""

from __future__ import annotations

import argparse

from rows_table import rows_of

from romeflow.evaluation.bench import counterfact_record_values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("methods", nargs="+")
    args = ap.parse_args()
    rows = {m: rows_of(args.folder, m) for m in args.methods}
    cases = sorted(set.intersection(*(set(r) for r in rows.values())))
    values = {m: {c: counterfact_record_values(rows[m][c]) for c in cases} for m in args.methods}
    cases = [c for c in cases if "NS_tok" in values[args.methods[0]][c]]
    print(f"{len(cases)} records with token-sharing neighbours, variants: {', '.join(args.methods)}")
    for m in args.methods:
        ns = sum(values[m][c]["NS_tok"] for c in cases) / len(cases)
        ps = sum(values[m][c]["PS"] for c in cases) / len(cases)
        print(f"  {m:>14}: NS_tok {ns:5.1f}  PS {ps:5.1f}")
    print("oracle (per record: argmax NS_tok + λ PS)")
    for lam in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        pick = {c: max(args.methods, key=lambda m: values[m][c]["NS_tok"] + lam * values[m][c]["PS"]) for c in cases}
        ns = sum(values[pick[c]][c]["NS_tok"] for c in cases) / len(cases)
        ps = sum(values[pick[c]][c]["PS"] for c in cases) / len(cases)
        print(f"  λ = {lam:4}: NS_tok {ns:5.1f}  PS {ps:5.1f}")


if __name__ == "__main__":
    main()
