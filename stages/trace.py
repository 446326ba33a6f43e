"""DVC stage `trace`: causal tracing averaged over known facts -> reports/trace/ (what `layer: auto` reads).

`romeflow trace-average` -> tracing.trace_average. The per-fact rows (reports/trace/rows.jsonl) persist
between runs, so a run only traces the facts not there yet; delete the file to recompute from scratch.
"""

from romeflow.cli import main
from romeflow.params import stage_params

out = stage_params("params.yaml", resolve_auto=False).trace.out
main(["trace-average", "--out", out, "--rows", f"{out}/rows.jsonl"], prog_name="romeflow")
