"""A markdown table from a bench run folder's raw rows, for methods finished or not.

`romeflow bench` writes report.json only over the records every method has finished; this reads the
rows themselves (every shard file of each method), so a run that was stopped part-way can still be
quoted, over the records each method did. Columns: records, S and S+ (bootstrap intervals), ES, PS,
NS, NS_tok (mean ± 95% half-width), PPL+ (mean ± half-width, median, max: held-out perplexity after
each edit vs the unedited model, %), how many edits used the family term and their median energy ratio.

    python bench/rows_table.py reports/bench/nstok-energy-dev100 unedited rome-r1 rome e4 einf
    python bench/rows_table.py reports/bench/nstok-fkl-dev40 rome fkl1 --common   # records all have done
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics

from romeflow.evaluation.bench import counterfact_record_values
from romeflow.evaluation.metrics import mean_ci, score_ci


def rows_of(folder: str, method: str) -> dict[int, dict]:
    rows = {}
    for path in sorted(glob.glob(f"{folder}/{method}.jsonl") + glob.glob(f"{folder}/{method}.shard*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a stopped run
                    break
                rows[row["case_id"]] = row
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--common", action="store_true", help="only the records every method listed has done")
    args = ap.parse_args()
    rows = {m: rows_of(args.folder, m) for m in args.methods}
    base = next((r["heldout_nll"] for r in rows_of(args.folder, "unedited").values() if "heldout_nll" in r), None)
    keep = set.intersection(*(set(r) for r in rows.values())) if args.common else None
    cell = lambda e: f"{e.value:.1f} ± {e.half_width:.1f}"  # noqa: E731
    print("| method | n | S | S+ | ES | PS | NS | NS_tok | PPL+ | PPL+ median | PPL+ max | family term used | energy ratio (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        done = [r for cid, r in rows[m].items() if keep is None or cid in keep]
        if not done:
            print(f"| {m} | 0 | – |")
            continue
        vals = [counterfact_record_values(r) for r in done]
        col = lambda k: [v[k] for v in vals if k in v]  # noqa: E731
        s = score_ci(col("ES"), col("PS"), col("NS"), 1000)
        s_plus = score_ci(col("ES"), col("PS"), col("NS"), 1000, extra=[[v.get("NS_tok", math.nan) for v in vals]])
        ppl = [100 * math.expm1(r["heldout_nll"] - base) for r in done if "heldout_nll" in r] if base is not None else []
        family = [(r.get("edit") or {}).get("family") or {} for r in done]
        ratios = [f["energy_ratio"] for f in family if f.get("alpha", 0) > 0]
        ppl_cells = "– | – | –"
        if ppl:
            e = mean_ci(ppl)
            ppl_cells = f"{e.value:.2f} ± {e.half_width:.2f} | {statistics.median(ppl):.2f} | {max(ppl):.2f}"
        print(f"| {m} | {len(vals)} | {cell(s)} | {cell(s_plus)} | {cell(mean_ci(col('ES')))} | "
              f"{cell(mean_ci(col('PS')))} | {cell(mean_ci(col('NS')))} | {cell(mean_ci(col('NS_tok')))} | "
              f"{ppl_cells} | {len(ratios)} | {statistics.median(ratios) if ratios else math.nan:.2f} |")


if __name__ == "__main__":
    main()
