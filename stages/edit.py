"""DVC stage `edit@NAME`: edits/NAME.yaml -> deltas/NAME.safetensors, computed on the base model alone.

`romeflow apply` -> deltas.compute_delta. Usage: python stages/edit.py NAME (from the project root).
"""

import sys

from romeflow.cli import main
from romeflow.params import stage_params
from romeflow.pipeline.names import stage_name
from romeflow.pipeline.workflow import Layout

name, paths = stage_name(sys.argv[1]), Layout()  # a plain name, or one line and exit 1
settings = stage_params("params.yaml")  # rome.layer: default / auto -> the model's layer / the traced one
main(["apply", str(paths.manifest(name)), "--stats", str(paths.stats(settings.rome.layer)), "--out", str(paths.delta(name))],
     prog_name="romeflow")
