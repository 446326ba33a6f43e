"""The ``romeflow`` command line: one command per workflow step, each a thin call into the library.

This module holds the `main` group, its global options and the helpers every command shares; the
commands live by group in `workflow` (apply, eval, stack, generate, stats), `export`, `batch`
(apply-all), `project` (add, revert, diff, status, verify), `bench` and `trace` (trace, trace-average),
imported at the end to register them."""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console

from .. import __version__
from ..engine.models import (DEVICE_MAP_STRATEGIES, DEVICE_PATTERN, DTYPES, EMBEDDED, LoadedModel, ModelError, Placement,
                             cache_dir, layer_count, load_model, resolve, sha256_file)
from ..engine.statistics import Stats, get_stats, load_stats
from ..io import check_outputs
from ..params import ConfigError, Params, check_layers, load_params
from ..pipeline.compose import EditedModel, JointSolve, composition
from ..pipeline.deltas import DeltaError, is_gated
from ..pipeline.history import RevisionError
from ..pipeline.manifests import Manifest, ManifestError
from ..pipeline.workflow import GateError, Layout

# DatasetError, BenchError, YamlError, BadName and OutputError are ValueErrors; OSError: a full disk, ...
USER_ERRORS = (ManifestError, ModelError, DeltaError, ConfigError, GateError, RevisionError, OSError, ValueError)
DELTAS_MODEL = "Model [default: the deltas' base model if it is an embedded one, else params.yaml's]."
err = Console(stderr=True)
console = Console()


class _Group(click.Group):
    """Turns the library's user-facing errors into one line on stderr and exit status 1."""

    @staticmethod
    def _one_line(e: click.UsageError) -> click.ClickException:
        """A usage error as one line, as every other bad input (no usage banner)."""
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        return click.ClickException(e.format_message().splitlines()[0] + hint)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:  # the global options (--threads 0, ...)
            if type(e).__name__ == "NoArgsIsHelpError":
                raise
            raise self._one_line(e) from e

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # SIGINT: the writers have removed their temporaries on the way out
            click.echo("Error: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a group without its command: show its help
                raise
            raise self._one_line(e) from e
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="romeflow")
@click.option("--params", "params_path", type=click.Path(dir_okay=False), default=None,
              help="Hyper-parameter file [default: ./params.yaml if present, else built-in defaults].")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Cache folder for converted models and statistics [default: $ROMEFLOW_CACHE or ~/.cache/romeflow].")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Torch CPU threads [default: torch's choice].")
@click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N|mps",
              help="Where the model runs [default: params.yaml model.device, else auto].")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="The weights' dtype [default: params.yaml model.dtype, else float32].")
@click.option("--device-map", type=click.Choice(DEVICE_MAP_STRATEGIES), default=None,
              help="Spread the model over the devices with accelerate [default: params.yaml model.device_map].")
@click.pass_context
def main(ctx, params_path, cache, threads, device, dtype, device_map):
    """romeflow: factual edits of language models (ROME) as versioned, reproducible artifacts."""
    import torch

    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit a write fails (EFBIG), one line
    if threads:
        torch.set_num_threads(threads)
    if device is not None and not re.fullmatch(DEVICE_PATTERN, device):
        raise click.BadParameter(f"{device!r} is not auto, cpu, mps, cuda or cuda:N", param_hint="'--device'")
    placement = {k: v for k, v in (("device", device), ("dtype", dtype), ("device_map", device_map)) if v is not None}
    ctx.obj = {"params": params_path, "cache": cache, "placement_options": placement, "threads": threads}


def _settings(ctx, resolve_auto: bool = True) -> Params:
    """params.yaml, with the global --device/--dtype/--device-map options over its model: placement."""
    settings = load_params(ctx.obj["params"], resolve_auto)
    options = ctx.obj.get("placement_options") or {}
    placement = replace(settings.placement, **options)
    names = {f: (f"--{f.replace('_', '-')}" if f in options else f"{settings.path}: model.{f}")
             for f in ("device", "dtype", "device_map", "max_memory", "offload_folder")}
    if options.get("device") not in (None, "auto") and "device_map" not in options:
        placement = replace(placement, device_map=None, max_memory=None, offload_folder=None)  # --device wins
    if "device_map" in options and "device" not in options:
        placement = replace(placement, device="auto")
    placement.check(names, machine=False)
    ctx.obj["placement"], ctx.obj["placement_names"] = placement, names
    return settings


def _model_spec(ctx, settings: Params, given: str | None, deltas: list = ()) -> str:
    """--model, else the deltas' base model if it is an embedded name, else params.yaml's model.

    A delta's metadata is never used as a path: a delta made on a folder model is loaded onto the
    params file's model (or --model) and refused there if the fingerprints differ."""
    if given:
        return given
    name = deltas[0].meta["base_model"]["name"] if deltas else None
    return name if name in EMBEDDED else settings.model


def _layer_uses(m: Manifest, settings: Params) -> list[tuple[str, int]]:
    """(where it was set, layer) of each edit: the edit's layer, the manifest's, else rome.layer."""
    out = []
    for i, e in enumerate(m.edits):
        where = (f"{m.path}: edits[{i}].layer" if e.layer is not None else
                 f"{m.path}: layer" if m.layer is not None else f"{settings.path}: rome.layer")
        out.append((where, m.layer_of(e, settings.rome.layer)))
    return out


def _check_layers(ctx, spec: str, uses: list[tuple[str, int]]) -> None:
    """Layers vs the model's config.json, before its weights are loaded (when the folder is known)."""
    check_layers(layer_count(spec, ctx.obj["cache"]), uses)


def _load(ctx, spec: str) -> LoadedModel:
    placement = ctx.obj.get("placement") or Placement()
    placement.check(ctx.obj.get("placement_names"))  # this machine's devices, before any weight loads
    t = time.perf_counter()
    with err.status(f"loading {spec}"):
        lm = load_model(spec, ctx.obj["cache"], log=lambda s: err.print(f"[dim]{s}[/dim]"), placement=placement)
    where = placement.device_map and f"device_map {placement.device_map if isinstance(placement.device_map, str) else '{...}'}"
    err.print(f"[dim]loaded {lm.name} ({lm.fingerprint[:12]}, {placement.dtype} on {where or lm.device}) "
              f"in {time.perf_counter() - t:.1f} s[/dim]")
    return lm


def _stats_for(ctx, lm: LoadedModel, settings: Params, layers: list[int], files) -> dict[int, Stats]:
    """Statistics from the given files or Stats (checked against the model), the rest from the cache or
    computed."""
    found: dict[int, Stats] = {}
    for f in files:
        s = f if isinstance(f, Stats) else load_stats(f)
        if s.meta["model_fingerprint"] != lm.fingerprint:
            raise ValueError(f"{f}: statistics of another model ({s.meta['model']}), not {lm.name}")
        found[s.layer] = s
    missing = sorted(set(layers) - set(found))
    if missing:
        found.update(get_stats(lm, missing, settings.stats.corpus_source(), settings.stats.tokens,
                               cache_dir(ctx.obj["cache"]), settings.stats.seq_len))
    return found


def _check_composable(ctx, settings: Params, deltas: list) -> None:
    """What params.yaml's stack.method asks of the deltas, before any model loads: under joint, every linear
    delta's k*/v* pairs, no mix of gated and linear deltas, and the statistics it was computed with where
    the project's stats/ file of its layer is there (one line naming a delta)."""
    if settings.stack.method != "joint":
        return
    JointSolve.check(deltas)
    layout, now = _layout(ctx), {}
    for d in deltas:
        for s in d.meta["stats"] if not is_gated(d) else []:
            path = layout.stats(s["layer"])
            if s["layer"] not in now and path.is_file():
                now[s["layer"]] = sha256_file(path)
            _check_stats_of(d, s, now)


def _check_stats_of(delta, s: dict, now: dict[int, str]) -> None:
    """Refuse ``delta`` if its statistics record ``s`` (layer, sha256) is not the layer's now (layer -> sha256)."""
    if s["layer"] in now and now[s["layer"]] != s["sha256"]:
        raise DeltaError(f"{delta.path}: stats: computed with other statistics of layer {s['layer']} "
                         f"({s['sha256'][:12]}, now {now[s['layer']][:12]}); recompute it")


def _edited(ctx, lm: LoadedModel, settings: Params, deltas: list) -> EditedModel:
    """The model that every command puts deltas on: it composes them by params.yaml's ``stack:``
    (compose.composition). For joint, with the statistics the linear deltas were computed with: the
    project's stats/ files where present, else the cache; a delta computed with other statistics is
    refused (one line)."""
    if settings.stack.method == "sum":
        return EditedModel(lm)
    layers = sorted({up.layer for d in deltas if not is_gated(d) for up in d.updates})
    layout = _layout(ctx)
    files = tuple(str(layout.stats(l)) for l in layers if layout.stats(l).is_file())
    stats = _stats_for(ctx, lm, settings, layers, files) if layers else {}
    for d in deltas:
        for s in d.meta["stats"] if not is_gated(d) else []:
            _check_stats_of(d, s, {layer: st.sha256 for layer, st in stats.items()})
    return EditedModel(lm, composition(settings.stack, lambda layer: stats[layer].second_moment,
                                       {layer: s.sha256 for layer, s in stats.items()}, settings.stats.corpus_source(),
                                       _params_path(ctx).parent))


def _tokenizer(ctx, spec: str):
    """The model's tokenizer alone (no weights loaded): for what must be known before the model is."""
    from transformers import AutoTokenizer

    folder, _name, _fp = resolve(spec, cache_dir(ctx.obj["cache"]), log=lambda s: err.print(f"[dim]{s}[/dim]"))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _check_outputs(ctx, outputs, inputs=()) -> None:
    """io.check_outputs, with the params file among the inputs: no output may replace what is read."""
    params = _params_path(ctx)
    extra = [(params, f"the params file {params}")] if params.is_file() else []
    check_outputs(outputs, [*inputs, *extra])


def _check_text(value: str | None, name: str, limit: int) -> None:
    """A text given on the command line (a prompt, a subject), at most ``limit`` characters."""
    if value is not None and len(value) > limit:
        raise ValueError(f"{name}: is {len(value)} characters long, more than the {limit} allowed")


def _params_path(ctx) -> Path:
    return Path(ctx.obj["params"] or "params.yaml")


def _layout(ctx) -> Layout:
    """The project root is the folder of the params file."""
    return Layout(_params_path(ctx).parent)



from . import batch, bench, export, project, trace, workflow  # noqa: E402,F401  registers the commands on `main`
