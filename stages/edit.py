"""DVC stage `edit`: every active manifest's delta, edits/NAME.yaml -> deltas/NAME.safetensors, each computed
on the base model alone.

`romeflow apply-all` -> batch.run / deltas.compute_delta: the model loaded once per process, over params.yaml
`processes:` processes (or, under `torchrun` / `accelerate launch`, the launcher's); only the deltas whose
inputs changed are computed. Usage: python stages/edit.py (from the project root).
"""

from romeflow.cli import main
from romeflow.params import stage_params
from romeflow.pipeline.workflow import Layout

if __name__ == "__main__":  # (the processes apply-all spawns import this file again: they must not run it)
    settings = stage_params("params.yaml")  # rome.layer: default / auto -> the model's layer / the traced one
    main(["apply-all", "--stats", str(Layout().stats(settings.rome.layer))], prog_name="romeflow")
