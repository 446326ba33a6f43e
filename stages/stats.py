"""DVC stage `stats`: key statistics of the edit layer -> stats/layer<L>.safetensors.

`romeflow stats` -> statistics.get_stats. Run from the project root (dvc does).
"""

from romeflow.cli import main
from romeflow.config import load_settings
from romeflow.workflow import Layout

layer = load_settings("params.yaml").rome.layer
main(["stats", "--out", str(Layout().stats(layer))], prog_name="romeflow")
