"""DVC stage `stats`: key statistics of the edit layer -> stats/layer<L>.safetensors.

`romeflow stats` -> statistics.get_stats. Run from the project root (dvc does).
"""

from romeflow.cli import main
from romeflow.params import stage_params
from romeflow.pipeline.workflow import Layout

settings = stage_params("params.yaml")  # rome.layer: auto -> the traced layer (reports/trace/layer.json)
name = "auto" if settings.layer_auto else settings.rome.layer  # dvc.yaml's stats/layer${rome.layer}
main(["stats", "--out", str(Layout().stats(name))], prog_name="romeflow")
