"""DVC stage `eval@NAME`: NAME's edits on base and on base + deltas/NAME -> reports/NAME.json (+ details).

`romeflow eval` -> workflow.eval_manifest; fails after writing if below params.yaml gate.eval.
Usage: python stages/eval.py NAME (from the project root).
"""

import sys

from romeflow.cli import main
from romeflow.pipeline.names import stage_name
from romeflow.pipeline.workflow import Layout

name, paths = stage_name(sys.argv[1]), Layout()  # a plain name, or one line and exit 1
main(["eval", str(paths.manifest(name)), "--delta", str(paths.delta(name)), "--out", str(paths.report(name)),
      "--details", str(paths.details(name)), "--gate"], prog_name="romeflow")
