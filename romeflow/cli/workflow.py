"""The workflow commands: apply, eval, stack, generate, stats (export: export.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from ..engine.models import Placement, cache_dir, resolve
from ..engine.protect import check_sources, reference_names
from ..engine.statistics import get_stats, load_stats, save_stats
from ..evaluation.bystanders import TokenSharing
from ..evaluation.scoring import greedy_continuation, next_token_top
from ..engine.prompts import MAX_PROMPT_CHARS
from ..params import ConfigError, Params, check_layers
from ..pipeline.deltas import check_onto, compute_delta, load_deltas, require_pairs, save_delta
from ..pipeline.batch import inputs_sha256, protect_hashes
from ..pipeline.manifests import Manifest, ManifestError, check_conflicts, load_manifest
from ..pipeline.names import BadName
from ..pipeline.workflow import Layout, eval_manifest, eval_stack, gate_error
from . import (DELTAS_MODEL, _check_composable, _check_layers, _check_outputs, _check_text, _edited, _layer_uses,
               _layout, _load, _model_spec, _params_path, _settings, _stats_for, console, err, main)


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Delta file to write [default: deltas/<manifest name>.safetensors].")
@click.option("--model", "model_spec", default=None, help="Model [default: the manifest's, else params.yaml's].")
@click.option("--stats", "stats_files", multiple=True, type=click.Path(dir_okay=False),
              help="Precomputed statistics files (else cached/computed per params.yaml).")
@click.option("--onto", "onto_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Delta(s) of an existing stack to apply onto (repeatable): the edits are computed on base + "
                   "their sum and hold their edits' keys fixed, so adding the new delta keeps them.")
@click.pass_context
def apply(ctx, manifest, out, model_spec, stats_files, onto_paths):
    """Compute a manifest's edits with ROME and write them as one delta file.

    Edits are applied one after another; each edit's insert holds the earlier edits' keys fixed."""
    settings = _settings(ctx)
    m = settings.resolve_manifest(load_manifest(manifest))  # `layer: auto` -> the traced layer
    try:
        out = Path(out) if out else Layout().delta(m.name)
    except BadName as e:
        raise ManifestError(f"{manifest}: {e}; pass --out") from None
    _check_outputs(ctx, [(out, "--out")], [(manifest, f"the manifest {manifest}"),
                                           *((f, f"--stats {f}") for f in stats_files),
                                           *((p, f"--onto {p}") for p in onto_paths)])
    onto = load_deltas(onto_paths)
    for d in onto:
        require_pairs(d, "--onto")
    check_onto(m, onto)
    check_sources(settings.rome.protect_sources, _params_path(ctx).parent, str(_params_path(ctx)))
    spec = model_spec or m.model or settings.model
    settings = settings.for_model(spec)  # without rome.layer: this model's default edit layer
    uses = _layer_uses(m, settings)
    _check_layers(ctx, spec, uses)
    given = [load_stats(f) for f in stats_files]  # checked before the model loads
    if {layer for _, layer in uses} - {g.layer for g in given}:
        settings.stats.corpus_source()  # statistics to compute: a missing corpus file fails now
    lm = _load(ctx, spec)
    check_layers(lm.num_layers, uses)
    layers = sorted({layer for _, layer in uses})
    stats = _stats_for(ctx, lm, settings, layers, given)
    from tqdm.auto import tqdm

    corpus = settings.stats.corpus_source()
    with tqdm(total=len(m.edits), desc=f"editing ({m.name})", unit="edit", file=sys.stderr) as bar:
        delta = compute_delta(lm, m, settings.rome, stats, progress=lambda i, r: bar.update(1),
                              root=_params_path(ctx).parent, onto=onto, corpus=corpus)
    delta.meta["inputs_sha256"] = inputs_sha256(  # what `romeflow apply-all` (the DVC stage) keeps a delta by
        m, settings.rome, [l for _, l in uses], lm.fingerprint, str(lm.dtype).removeprefix("torch."), stats,
        corpus.sha256, protect_hashes(settings.rome.protect_sources, _params_path(ctx).parent),
        [d.meta["tensors_sha256"] for d in onto])
    save_delta(out, delta)
    table = Table(title=f"{m.name}: {len(m.edits)} edit(s) -> {out}")
    for col in ("#", "prompt", "target", "P before", "P after", "true before", "true after"):
        table.add_column(col, justify="right" if col.startswith(("P", "true", "#")) else "left")
    for e, meta in zip(m.edits, delta.meta["edits"]):
        b, a = meta["before"], meta["after"]
        fmt = lambda d, k: f"{d[k]:.4f}" if k in d else "-"  # noqa: E731
        table.add_row(str(meta["index"]), e.prompt, e.target, fmt(b, "p_target"), fmt(a, "p_target"),
                      fmt(b, "p_true"), fmt(a, "p_true"))
    console.print(table)


@main.command("eval")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--delta", "deltas", multiple=True, type=click.Path(dir_okay=False),
              help="Delta file(s) [default: deltas/<manifest name>.safetensors].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the report here (JSON, schemas/report.schema.json: pre/post scores and hashes).")
@click.option("--details", type=click.Path(dir_okay=False), default=None,
              help="Write the per-edit details here (JSON, schemas/details.schema.json).")
@click.option("--gate", "use_gate", is_flag=True,
              help="After writing, fail (exit 1, one line) if a post score is below params.yaml gate.eval.")
@click.option("--model", "model_spec", default=None, help=DELTAS_MODEL)
@click.pass_context
def evaluate(ctx, manifest, deltas, out, details, use_gate, model_spec):
    """Score a manifest's edits (rewrite, paraphrases, neighbours) before and after its delta, and ask
    up to eval.token_neighbors reference subjects sharing each subject's last token what else moved.

    The delta(s) are composed by params.yaml stack: (stack.method), as every command composes them."""
    if details and not out:
        raise click.UsageError("--details needs --out")
    settings = _settings(ctx)
    m = load_manifest(manifest)
    try:
        paths = deltas or [_layout(ctx).delta(m.name)]
    except BadName as e:
        raise ManifestError(f"{manifest}: {e}; pass --delta") from None
    _check_outputs(ctx, [(out, "--out"), (details, "--details")],
                   [(manifest, f"the manifest {manifest}"), *((p, f"{'--delta' if deltas else 'the delta'} {p}") for p in paths)])
    loaded = load_deltas(paths)
    _check_composable(ctx, settings, loaded)
    _warn_if_not_its_delta(m, loaded)
    gate = settings.gate if use_gate else None
    sharing = _sharing(ctx, settings)  # the reference names, read before the model loads
    lm = _load(ctx, _model_spec(ctx, settings, model_spec, loaded))
    result = eval_manifest(_edited(ctx, lm, settings, loaded), m, loaded, gate, sharing)
    if out:
        result.write(out, details)
    report = result.report
    table = Table(title=f"{m.name}: {len(m.edits)} edit(s), before -> after")
    table.add_column("metric")
    table.add_column("pre", justify="right")
    table.add_column("post", justify="right")
    for k, v in report["post"].items():
        table.add_row(k, f"{report['pre'].get(k, float('nan')):.1f}", f"{v:.1f}")
    console.print(table)
    _print_other_subjects(report["other_subjects"], settings.eval.token_neighbors)
    if result.failures:
        raise gate_error(out or m.path, result.failures)


def _sharing(ctx, settings: Params) -> TokenSharing | None:
    """The token-sharing subjects' source (params.yaml eval.token_neighbors, rome.protect_sources);
    a missing or unreadable reference file is one line, before any model loads."""
    if settings.eval.token_neighbors == 0:
        return None
    root = _params_path(ctx).parent
    check_sources(settings.rome.protect_sources, root, str(_params_path(ctx)))
    return TokenSharing(reference_names(settings.rome.protect_sources, root), settings.eval.token_neighbors)


def _print_other_subjects(others: list[dict], k: int) -> None:
    """Per edit: what it holds by construction, and which token-sharing subjects it moved."""
    table = Table(title="other subjects: held by construction (not scored), and token-sharing ones asked")
    for col in ("#", "subject", "held fixed", "kept top-1", "also moved"):
        table.add_column(col, justify="right" if col in ("#", "kept top-1") else "left")
    for o in others:
        token = lambda t: repr(t.strip() or t)  # noqa: E731 - a newline token stays visible
        moved = ", ".join(f"{x['subject']} ({token(x['before'])} → {token(x['after'])})" for x in o["moved"])
        kept = f"{len(o['asked']) - len(o['moved'])} of {len(o['asked'])}" if o["asked"] else "–"
        table.add_row(str(o["index"]), o["subject"], ", ".join(o["held"]) or "–", kept, moved or "–")
    console.print(table)
    for o in others:
        if o["moved"]:
            console.print(f"edit {o['index']} ({o['subject']}) also moved {', '.join(x['subject'] for x in o['moved'])}",
                          highlight=False)
        elif not o["asked"]:
            console.print(f"edit {o['index']} ({o['subject']}): no reference subject shares its last token"
                          + ("" if k else " (eval.token_neighbors: 0)"), highlight=False)


def _warn_if_not_its_delta(m: Manifest, deltas: list) -> None:
    """One line on stderr when none of the deltas was computed from this manifest: the scores would be
    of its prompts on another edit (legitimate, e.g. to see what an edit does to other facts)."""
    if deltas and not any(d.name == m.name for d in deltas):
        names = ", ".join(repr(d.name) for d in deltas)
        click.echo(f"warning: {', '.join(str(d.path) for d in deltas)}: computed from the manifest"
                   f"{'s' if len(deltas) > 1 else ''} {names}, not from {m.path}; the scores are of {m.path}'s "
                   f"prompts on another edit", err=True)


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Stack report (JSON, schemas/stack.schema.json) [default: reports/stack.json].")
@click.option("--md", "markdown", type=click.Path(dir_okay=False), default=None,
              help="Readable tables [default: reports/stack.md].")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the DVC plot data [default: reports/plots].")
@click.option("--weights", "weights_path", type=click.Path(dir_okay=False), default=None,
              help="The composed stack's solved update and provenance (safetensors, schemas/stackfile.schema.json), "
                   "what `romeflow export` with no --delta rebuilds the weights from [default: reports/stack.safetensors].")
@click.option("--gate", "use_gate", is_flag=True,
              help="After writing, fail (exit 1, one line) if the stack is outside params.yaml gate.stack.")
@click.pass_context
def stack(ctx, out, markdown, plots_dir, weights_path, use_gate):
    """Compose every active delta (params.yaml manifests:) and measure interference and damage.

    Each manifest's edits are scored with its own delta alone and with all deltas, both composed by
    params.yaml stack:; the damage guard is the perplexity of a held-out text (params.yaml
    stack.heldout) and the neighbour prompts' top-1 agreement, both vs the base model. The composed
    update is written to --weights, from which `romeflow export` rebuilds these weights exactly.
    """
    settings = _settings(ctx)
    layout = _layout(ctx)
    out = Path(out or layout.stack_report)
    reads = [(p, f"the {what} {p}") for n in settings.manifests
             for p, what in ((layout.manifest(n), "manifest"), (layout.delta(n), "delta"))]
    weights_path = Path(weights_path or layout.stack_file)
    _check_outputs(ctx, [(out, "--out"), (markdown or layout.stack_markdown, "--md"),
                         (plots_dir or layout.plots, "--plots", True), (weights_path, "--weights")],
                   reads + [(layout.root / settings.stack.heldout, f"{settings.path}: stack.heldout")])
    manifests = [load_manifest(layout.manifest(n)) for n in settings.manifests]
    check_conflicts(manifests)
    deltas = load_deltas(layout.delta(n) for n in settings.manifests)
    _check_composable(ctx, settings, deltas)
    heldout = layout.root / settings.stack.heldout
    if not heldout.is_file():
        raise ConfigError(f"{settings.path}: stack.heldout: {heldout} not found")
    sharing = _sharing(ctx, settings)
    lm = _load(ctx, settings.model)
    result = eval_stack(_edited(ctx, lm, settings, deltas), manifests, deltas, heldout, settings.stack.window,
                        settings.gate if use_gate else None, sharing)
    result.write(out, markdown or layout.stack_markdown, plots_dir or layout.plots, weights_path)
    r = result.report
    table = Table(title=f"stack of {len(manifests)} manifest(s): S alone -> stack")
    for col in ("manifest", "S alone", "S stack", "ΔS"):
        table.add_column(col, justify="left" if col == "manifest" else "right")
    for name, m in r["manifests"].items():
        s_a, s_s = m["alone"].get("S"), m["stack"].get("S")
        table.add_row(name, *(("-" if v is None else f"{v:.1f}") for v in (s_a, s_s)),
                      "-" if "S" not in m["interference"] else f"{m['interference']['S']:+.1f}")
    console.print(table)
    h, n = r["damage"]["heldout"], r["damage"]["neighbors"]
    console.print(f"perplexity {h['perplexity_base']:.3f} -> {h['perplexity_stack']:.3f} "
                  f"({h['perplexity_increase_pct']:+.2f}%), neighbour top-1 kept "
                  f"{n.get('top1_kept_pct', float('nan')):.1f}% of {n['prompts']}", highlight=False)
    if result.failures:
        raise gate_error(out, result.failures)


@main.command()
@click.argument("prompt")
@click.option("--delta", "deltas", multiple=True, type=click.Path(dir_okay=False), help="Delta file(s) to apply.")
@click.option("--model", "model_spec", default=None, help=DELTAS_MODEL)
@click.option("--max-new-tokens", type=click.IntRange(0, 10000), default=20, show_default=True)
@click.option("--top-k", type=click.IntRange(1, 1_000_000), default=5, show_default=True,
              help="Show the k most likely next tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def generate(ctx, prompt, deltas, model_spec, max_new_tokens, top_k, as_json):
    """Next-token ranking and a greedy continuation of PROMPT, on base + deltas (composed by params.yaml
    stack:)."""
    _check_text(prompt, "PROMPT", MAX_PROMPT_CHARS)
    settings = _settings(ctx)
    loaded = load_deltas(deltas)
    _check_composable(ctx, settings, loaded)
    lm = _load(ctx, _model_spec(ctx, settings, model_spec, loaded))
    edited = _edited(ctx, lm, settings, loaded)
    edited.compose(loaded)
    top = next_token_top(lm, [prompt], top_k)[0]
    text = greedy_continuation(lm, prompt, max_new_tokens)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "deltas": list(deltas), "composition": edited.composed_by(),
                               "top": [{"token": t, "p": p} for t, p in top], "continuation": text}, indent=1))
        return
    table = Table(title=f"next token after {prompt!r}" + (f" (+{len(deltas)} delta)" if deltas else ""))
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("P", justify="right")
    for i, (t, p) in enumerate(top, 1):
        table.add_row(str(i), repr(t), f"{p:.4f}")
    console.print(table)
    console.print(f"[bold]{prompt}[/bold]{text}", highlight=False, markup=True)


@main.command()
@click.option("--layer", "layers", type=click.IntRange(0), multiple=True,
              help="Layer(s) [default: params.yaml rome.layer].")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--corpus", "corpus_files", multiple=True, type=click.Path(),
              help="Plain-text files, or one Hugging Face datasets folder [default: params.yaml stats.corpus].")
@click.option("--tokens", type=int, default=None, help="Token positions [default: params.yaml stats.tokens].")
@click.option("--out", type=click.Path(), default=None,
              help="Write here (a file for one layer, a folder for several) instead of only caching.")
@click.option("--processes", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Data-parallel: N processes share the token rows (gloo on the CPU, NCCL on GPUs); "
                   "under `accelerate launch`/`torchrun` the launcher's processes are used instead.")
@click.option("--checkpoint-seconds", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Save the partial sums in the cache this often; an interrupted run resumes from them.")
@click.pass_context
def stats(ctx, layers, model_spec, corpus_files, tokens, out, processes, checkpoint_seconds):
    """Compute (or find in the cache) the key second moments C = E[k kᵀ] of edit layers."""
    from ..engine.parallel import Spawned, launched_shard
    from ..engine.statistics import Shard, cached_stats_path, corpus_from

    settings = _settings(ctx)
    if tokens is not None and tokens < 1:
        raise click.BadParameter(f"must be at least 1, got {tokens}", param_hint="--tokens")
    spec = model_spec or settings.model
    if not layers:
        settings = settings.for_model(spec)  # without rome.layer: this model's default edit layer
    uses = ([("--layer", l) for l in layers] if layers else [(f"{settings.path}: rome.layer", settings.rome.layer)])
    layers = [l for _, l in uses]
    if out:
        targets = [Path(out)] if len(layers) == 1 else [Path(out) / f"layer{l}.safetensors" for l in layers]
        given = settings.stats.corpus if not corpus_files else ()
        corpus_inputs = [(f, f"--corpus {f}") for f in corpus_files] + \
            [(f, f"{settings.path}: stats.corpus {f}") for f in ((given,) if isinstance(given, str) else given)
             if f != "wikipedia"]
        _check_outputs(ctx, [(t, "--out") for t in targets], corpus_inputs)
    _check_layers(ctx, spec, uses)
    corpus_spec = tuple(corpus_files) if corpus_files else settings.stats.corpus
    corpus = corpus_from(corpus_spec)
    n = tokens or settings.stats.tokens
    launched = launched_shard(ctx.obj.get("placement") or Placement())
    if launched and processes > 1:
        raise click.UsageError("--processes: not under a launcher (accelerate launch / torchrun starts the processes)")
    if launched:
        ctx.obj["placement"] = launched[1]
    lm = _load(ctx, spec)
    check_layers(lm.num_layers, uses)
    t = time.perf_counter()
    cache = cache_dir(ctx.obj["cache"])
    if processes > 1 and all(cached_stats_path(cache, lm, l, corpus, n).exists() for l in layers):
        processes = 1  # nothing to compute: no processes to start
    if processes > 1:
        import torch

        resolve(spec, cache)  # converted once, here, before the workers look for it
        with Spawned(processes, spec, ctx.obj["cache"], ctx.obj.get("placement") or Placement(), layers,
                     corpus_spec, n, settings.stats.seq_len, torch.get_num_threads(), checkpoint_seconds) as run:
            found = get_stats(lm, layers, corpus, n, cache, settings.stats.seq_len, shard=run.shard,
                              checkpoint_seconds=checkpoint_seconds)
    else:
        shard = launched[0] if launched else Shard()
        found = get_stats(lm, layers, corpus, n, cache, settings.stats.seq_len, shard=shard,
                          checkpoint_seconds=checkpoint_seconds)
        if shard.rank != 0:
            return  # rank 0 writes and reports
    took = time.perf_counter() - t
    for layer, s in found.items():
        target = None
        if out:
            target = Path(out) if len(layers) == 1 else Path(out) / f"layer{layer}.safetensors"
            save_stats(target, s.second_moment, s.meta)
        console.print(f"layer {layer}: {s.meta['tokens']} tokens of {s.meta['corpus_id']}, "
                          f"sha256 {s.sha256[:12]}" + (f" -> {target}" if target else ""))
    err.print(f"[dim]{took:.1f} s" + (f" ({processes} processes)" if processes > 1 else "") + "[/dim]")
