"""DVC stage `stack`: all active deltas composed -> reports/stack.json, reports/stack.md, reports/plots/,
reports/stack.safetensors (what `romeflow export` with no --delta rebuilds the stack's weights from).

`romeflow stack` -> workflow.eval_stack; fails after writing if outside params.yaml gate.stack.
"""

from romeflow.cli import main
from romeflow.pipeline.workflow import Layout

paths = Layout()
main(["stack", "--out", str(paths.stack_report), "--md", str(paths.stack_markdown), "--plots", str(paths.plots),
      "--weights", str(paths.stack_file), "--gate"], prog_name="romeflow")
