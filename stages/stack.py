"""DVC stage `stack`: all active deltas composed -> reports/stack.json, reports/stack.md, reports/plots/.

`romeflow stack` -> workflow.eval_stack; fails after writing if outside params.yaml gate.stack.
"""

from romeflow.cli import main
from romeflow.pipeline.workflow import Layout

paths = Layout()
main(["stack", "--out", str(paths.stack_report), "--md", str(paths.stack_markdown), "--plots", str(paths.plots),
      "--gate"], prog_name="romeflow")
