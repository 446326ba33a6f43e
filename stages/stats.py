"""DVC stage `stats`: key statistics of the edit layer -> stats/layer<L>.safetensors (dvc.yaml: the folder stats/).

`romeflow stats` -> statistics.get_stats. Run from the project root (dvc does).
"""

from romeflow.cli import main
from romeflow.params import stage_params
from romeflow.pipeline.workflow import Layout

settings = stage_params("params.yaml")  # rome.layer: default / auto -> the model's layer / the traced one
main(["stats", "--out", str(Layout().stats(settings.rome.layer))], prog_name="romeflow")
