"""`romeflow apply-all`: the deltas of many manifests, the model loaded once per process (pipeline/batch.py)."""

from __future__ import annotations

from types import SimpleNamespace

import click
import torch

from ..engine.models import DTYPES, Placement, cache_dir, resolve
from ..engine.protect import check_sources
from ..engine.statistics import cached_stats_path, load_stats
from ..io import clean_temp
from ..pipeline import batch
from ..pipeline.manifests import ManifestError, load_manifest
from ..pipeline.names import BadName
from . import _check_layers, _check_outputs, _layer_uses, _layout, _load, _params_path, _settings, _stats_for, main


class BatchError(ValueError):
    """A rank of a distributed apply-all failed; str(error) is the one-line message."""


@main.command("apply-all")
@click.argument("names", nargs=-1)
@click.option("--stats", "stats_files", multiple=True, type=click.Path(dir_okay=False),
              help="Precomputed statistics files (else cached/computed per params.yaml).")
@click.option("--processes", type=click.IntRange(1, 1024), default=None,
              help="Share the deltas to compute over N processes (CPU processes, or one GPU each) "
                   "[default: params.yaml processes, else 1]; under `accelerate launch`/`torchrun` the "
                   "launcher's processes are used instead.")
@click.pass_context
def apply_all(ctx, names, stats_files, processes):
    """Compute the deltas of NAMES [default: params.yaml manifests:] into deltas/NAME.safetensors, each
    as `romeflow apply edits/NAME.yaml` would, loading the model once per process.

    A delta whose inputs are unchanged (the sha256 it records) is kept; one in the cache
    ($ROMEFLOW_CACHE/deltas) is copied; the rest are shared over the processes, sorted by name, each
    written as soon as it is computed (a killed run resumes where it stopped)."""
    import torch.distributed as dist

    from ..engine.parallel import TIMEOUT, RankFailed, launched, rank_placement

    settings = _settings(ctx)
    layout, root = _layout(ctx), _params_path(ctx).parent
    names = list(names) or list(settings.manifests)
    for i, n in enumerate(names):
        try:
            layout.manifest(n)
        except BadName as e:
            raise click.BadParameter(str(e), param_hint="NAMES") from None
        if n in names[:i]:
            raise click.BadParameter(f"'{n}' is given twice", param_hint="NAMES")
    manifests = [settings.resolve_manifest(load_manifest(layout.manifest(n))) for n in names]
    for m in manifests:
        if m.model is not None and m.model != settings.model:
            raise ManifestError(f"{m.path}: model: '{m.model}' is not {settings.path}'s model '{settings.model}'; "
                                f"apply-all edits that one model (use `romeflow apply --model`)")
    outs = [layout.delta(m.name) for m in manifests]
    _check_outputs(ctx, [(p, "delta") for p in outs], [(layout.manifest(m.name), f"the manifest {layout.manifest(m.name)}")
                                                       for m in manifests] + [(f, f"--stats {f}") for f in stats_files])
    check_sources(settings.rome.protect_sources, root, str(_params_path(ctx)))
    spec = settings.model
    settings = settings.for_model(spec)  # without rome.layer: this model's default edit layer
    uses = [u for m in manifests for u in _layer_uses(m, settings)]
    _check_layers(ctx, spec, uses)
    given = [load_stats(f) for f in stats_files]  # checked before the model loads
    corpus = settings.stats.corpus_source()  # the gated insert reads it; its sha256 is an input
    found = launched()
    if found and processes not in (None, 1):
        raise click.UsageError("--processes: not under a launcher (accelerate launch / torchrun starts the processes)")
    rank, world = (found[0], found[1]) if found else (0, processes or settings.processes)
    placement = ctx.obj["placement"] = rank_placement(ctx.obj.get("placement") or Placement(), found[2] if found else 0)
    if ctx.obj.get("threads") is None and world > 1 and placement.device_map is None \
            and placement.torch_device().type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))  # the cores shared, not oversubscribed
    device = placement.torch_device().type if placement.device_map is None else "device_map"
    cache = cache_dir(ctx.obj["cache"])
    fingerprint = resolve(spec, cache)[2]
    loaded = []

    def load():  # the model, loaded once, only when something is computed here
        if not loaded:
            loaded.append(_load(ctx, spec))
        return loaded[0]

    # the statistics: given, else in the cache (found without loading the model), else computed by rank 0
    for s, f in zip(given, stats_files):
        if s.meta["model_fingerprint"] != fingerprint:
            raise ValueError(f"{f}: statistics of another model ({s.meta['model']}), not {spec}")
    stats, files = {s.layer: s for s in given}, {s.layer: str(f) for s, f in zip(given, stats_files)}
    model_id = SimpleNamespace(fingerprint=fingerprint, dtype=DTYPES[placement.dtype])  # what the cache's name needs
    cached = lambda l: cached_stats_path(cache, model_id, l, corpus, settings.stats.tokens)  # noqa: E731
    missing = [l for l in sorted({l for _, l in uses}) if l not in stats and not cached(l).is_file()]
    if found:  # after every rank has seen what is missing: rank 0 may compute it now
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        if missing and rank == 0:
            _stats_for(ctx, load(), settings, missing, ())
        if missing and found:
            dist.barrier()
        for l in sorted({l for _, l in uses} - set(stats)):
            stats[l], files[l] = load_stats(cached(l)), str(cached(l))

        protect = batch.protect_hashes(settings.rome.protect_sources, root)
        jobs = [batch.Job(m, out, batch.inputs_sha256(m, settings.rome, [l for _, l in _layer_uses(m, settings)],
                                                       fingerprint, placement.dtype, stats, corpus.sha256, protect))
                for m, out in zip(manifests, outs)]
        for folder in {layout.root / "deltas", *(p.parent for p in outs), cache / "deltas"}:
            clean_temp(folder)  # what a killed run left
        (layout.root / "deltas").mkdir(parents=True, exist_ok=True)  # the DVC stage's output, even when empty
        todo, done, used = batch.run(jobs, rank, world, bool(found), load, settings.rome, stats, root, corpus,
                                     cache / "deltas", device,
                                     (spec, ctx.obj["cache"], placement, files, settings.stats.corpus))
    except RankFailed as e:
        raise BatchError(f"{e}; the deltas written so far are kept: run it again to compute the rest") from None
    finally:
        if found and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        click.echo(f"apply-all: {done} computed ({used} process{'es' if used > 1 else ''}), "
                   f"{len(todo.cached)} from the cache, {len(todo.fresh)} up to date -> {layout.root / 'deltas'}")
