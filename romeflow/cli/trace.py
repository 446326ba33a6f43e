"""Causal tracing (romeflow.tracing.causal): where a model stores a fact, and `layer: auto`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ..engine.models import cache_dir
from ..engine.prompts import MAX_PROMPT_CHARS
from . import _check_outputs, _check_text, _load, _params_path, _settings, console, err, main

MAX_ANSWER_CHARS = 200  # a subject or a target, as in a manifest (schemas/manifest.schema.json)


def _trace_params(ctx, **overrides):
    """params.yaml trace: with the options given on the command line (None = keep)."""

    settings = _settings(ctx, resolve_auto=False)  # tracing computes `auto`; never needs it
    options = {k: "--" + k.replace("_", "-") for k in overrides}
    settings = settings.with_trace(options, **overrides)
    return settings, settings.trace


@main.command()
@click.argument("prompt")
@click.option("--subject", required=True, help="The subject, as it appears in PROMPT (its tokens get the noise).")
@click.option("--target", default=None, help="The object whose first token is traced [default: the model's top-1 token].")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--samples", type=int, default=None, help="Noise samples [default: params.yaml trace.samples].")
@click.option("--window", type=int, default=None, help="Layers restored around each MLP/attention layer [default: trace.window].")
@click.option("--noise-scale", type=float, default=None, help="Noise std in units of the embeddings' std [default: trace.noise_scale].")
@click.option("--seed", type=int, default=None, help="Seed of the noise [default: trace.seed].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the grids here (JSON, schemas/trace.schema.json).")
@click.option("--plot", "plots", multiple=True, type=click.Path(dir_okay=False),
              help="Write the three heatmaps here (.png or .svg; repeatable).")
@click.pass_context
def trace(ctx, prompt, subject, target, model_spec, samples, window, noise_scale, seed, out, plots):
    """Causal tracing of one fact: P[object] after restoring each (token, layer) of a corrupted run.

    The subject's token embeddings get Gaussian noise (noise_scale x their empirical std); each hidden
    state, MLP output and attention output is then restored to its clean value at one (token, layer)
    at a time. Prints the peaks; --out/--plot write the grids and the heatmaps.
    """
    from tqdm.auto import tqdm

    from ..tracing.causal import write_trace, trace_prompt

    for text, name, limit in ((prompt, "PROMPT", MAX_PROMPT_CHARS), (subject, "--subject", MAX_ANSWER_CHARS),
                              (target, "--target", MAX_ANSWER_CHARS)):
        _check_text(text, name, limit)
    for p in plots:
        if Path(p).suffix not in (".png", ".svg"):
            raise click.BadParameter(f"{p}: must end in .png or .svg", param_hint="--plot")
    if subject not in prompt:
        raise ValueError(f"--subject: {subject!r} not found in the prompt {prompt!r}")
    settings, params = _trace_params(ctx, samples=samples, window=window, noise_scale=noise_scale, seed=seed)
    _check_outputs(ctx, [(out, "--out")] + [(p, "--plot") for p in plots])
    lm = _load(ctx, model_spec or settings.model)
    with tqdm(desc="restorations", unit="state", file=sys.stderr) as bar:
        result = trace_prompt(lm, prompt, subject, target, params, progress=bar.update,
                              total=lambda n: setattr(bar, "total", n))
    write_trace(result, out, list(plots))
    a, b = result["subject_range"]
    console.print(f"{prompt!r} -> {result['target']!r}: P clean {result['p_clean']:.4f}, corrupted "
                  f"{result['p_corrupted']:.4f} (subject tokens {a}..{b - 1}: "
                  f"{''.join(result['tokens'][a:b])!r})", highlight=False)
    table = Table(title="largest indirect effects")
    for col in ("state", "token", "layer", "IE"):
        table.add_column(col, justify="left" if col in ("state", "token") else "right")
    for kind, grid in result["indirect_effect"].items():
        t, l = max(((t, l) for t in range(len(grid)) for l in range(len(grid[0]))), key=lambda x: grid[x[0]][x[1]])
        table.add_row(kind, f"{t} {result['tokens'][t]!r}", str(l), f"{grid[t][l]:.4f}")
    console.print(table)
    for p in [out, *plots]:
        if p:
            err.print(f"[dim]wrote {p}[/dim]")


@main.command("trace-average")
@click.option("--facts", "facts_path", type=click.Path(dir_okay=False), default=None,
              help="Known facts (known_1000.json format) [default: params.yaml trace.facts].")
@click.option("--n", "n", type=int, default=None, help="Facts the model gets right to trace [default: trace.n].")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--samples", type=int, default=None, help="Noise samples per fact [default: trace.samples].")
@click.option("--window", type=int, default=None, help="Layers restored around each MLP/attention layer [default: trace.window].")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for average.json, layer.json and the figures [default: trace.out].")
@click.option("--rows", "rows_path", type=click.Path(dir_okay=False), default=None,
              help="Per-fact JSONL (resumable) [default: in the cache, keyed by model, method and facts].")
@click.pass_context
def trace_average_cmd(ctx, facts_path, n, model_spec, samples, window, out, rows_path):
    """Average indirect effects over known facts the model gets right (Figures 2 and 3) -> `layer: auto`.

    Facts are taken in file order; one counts as known when greedy decoding from its prompt yields
    exactly its attribute's tokens. Writes average.json (AIE curves with 95% CIs, ATE, peaks, severed
    paths), layer.json (the layer of peak MLP AIE at the last subject token) and the figures.
    """
    from tqdm.auto import tqdm

    from ..tracing.causal import embedding_std, load_facts, rows_file, trace_average

    settings, params = _trace_params(ctx, n=n, samples=samples, window=window)
    root = _params_path(ctx).parent  # params.yaml's paths are relative to its folder (the project root)
    facts_label = f"--facts {facts_path}" if facts_path else f"{settings.path}: trace.facts {root / params.facts}"
    facts_path = facts_path or root / params.facts
    load_facts(facts_path)  # fail on a bad file before loading the model
    _check_outputs(ctx, [(Path(out) if out else root / params.out, "--out", True), (rows_path, "--rows")],
                   [(facts_path, facts_label)])
    lm = _load(ctx, model_spec or settings.model)
    rows_path = rows_path or rows_file(cache_dir(ctx.obj["cache"]), lm, params, embedding_std(lm), facts_path)
    out = Path(out) if out else root / params.out
    with tqdm(total=params.n, desc="known facts traced", unit="fact", file=sys.stderr) as bar:
        avg = trace_average(lm, params, facts_path, out, rows_path,
                            progress=lambda row: bar.update(1) if row["correct"] else None)
    f, ate, peaks = avg["facts"], avg["ate"], avg["peaks"]
    console.print(f"{f['correct']} of {f['checked']} facts checked are known; ATE {ate['mean']:.4f} "
                  f"± {ate['ci95']:.4f}", highlight=False)
    table = Table(title="peak average indirect effects")
    for col in ("state", "position", "layer", "AIE", "95% CI ±"):
        table.add_column(col, justify="left" if col in ("state", "position") else "right")
    for key, pk in peaks.items():
        kind, pos = key.split(".")
        table.add_row(kind, pos, str(pk["layer"]), f"{pk['aie']:.4f}", f"{pk['ci95']:.4f}")
    console.print(table)
    s = avg["severed"]
    console.print(f"severed paths (hidden, last subject token): largest gap with MLP severed {s['max_gap_mlp']:.4f}, "
                  f"attention severed {s['max_gap_attn']:.4f}", highlight=False)
    console.print(f"layer: auto -> {peaks['mlp.last_subject']['layer']} (written to {out / 'layer.json'})",
                  highlight=False)

