"""The ``romeflow`` command line: one command per workflow step, each a thin call into the library."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import ConfigError, Settings, load_settings
from .deltas import DeltaError, EditedModel, compute_delta, load_delta, save_delta
from .evaluation import evaluate_manifest, greedy_continuation, next_token_top
from .io import write_json_atomic
from .manifests import ManifestError, load_manifest
from .models import LoadedModel, ModelError, cache_dir, load_model
from .statistics import Stats, get_stats, load_stats, save_stats, text_files_corpus

USER_ERRORS = (ManifestError, ModelError, DeltaError, ConfigError, FileNotFoundError, ValueError)
err = Console(stderr=True)
console = Console()


class _Group(click.Group):
    """Turns the library's user-facing errors into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="romeflow")
@click.option("--params", "params_path", type=click.Path(dir_okay=False), default=None,
              help="Hyper-parameter file [default: ./params.yaml if present, else built-in defaults].")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Cache folder for converted models and statistics [default: $ROMEFLOW_CACHE or ~/.cache/romeflow].")
@click.option("--threads", type=int, default=None, help="Torch CPU threads [default: torch's choice].")
@click.pass_context
def main(ctx, params_path, cache, threads):
    """romeflow: factual edits of language models (ROME) as versioned, reproducible artifacts."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    ctx.obj = {"params": params_path, "cache": cache}


def _settings(ctx) -> Settings:
    return load_settings(ctx.obj["params"])


def _load(ctx, spec: str) -> LoadedModel:
    t = time.perf_counter()
    with err.status(f"loading {spec}"):
        lm = load_model(spec, ctx.obj["cache"], log=lambda s: err.print(f"[dim]{s}[/dim]"))
    err.print(f"[dim]loaded {lm.name} ({lm.fingerprint[:12]}) in {time.perf_counter() - t:.1f} s[/dim]")
    return lm


def _stats_for(ctx, lm: LoadedModel, settings: Settings, layers: list[int], files: tuple[str, ...]) -> dict[int, Stats]:
    """Statistics from the given files (checked against the model), the rest from the cache or computed."""
    found: dict[int, Stats] = {}
    for f in files:
        s = load_stats(f)
        if s.meta["model_fingerprint"] != lm.fingerprint:
            raise ValueError(f"{f}: statistics of another model ({s.meta['model']}), not {lm.name}")
        found[s.layer] = s
    missing = sorted(set(layers) - set(found))
    if missing:
        found.update(get_stats(lm, missing, settings.stats.corpus_source(), settings.stats.tokens,
                               cache_dir(ctx.obj["cache"]), settings.stats.seq_len))
    return found


def _load_deltas(paths) -> list:
    return [load_delta(p) for p in paths]


# --------------------------------------------------------------------------------------------------


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Delta file to write [default: deltas/<manifest name>.safetensors].")
@click.option("--model", "model_spec", default=None, help="Model [default: the manifest's, else params.yaml's].")
@click.option("--stats", "stats_files", multiple=True, type=click.Path(dir_okay=False),
              help="Precomputed statistics files (else cached/computed per params.yaml).")
@click.pass_context
def apply(ctx, manifest, out, model_spec, stats_files):
    """Compute a manifest's edits with ROME and write them as one delta file."""
    settings = _settings(ctx)
    m = load_manifest(manifest)
    lm = _load(ctx, model_spec or m.model or settings.model)
    layers = sorted({m.layer_of(e, settings.rome.layer) for e in m.edits})
    stats = _stats_for(ctx, lm, settings, layers, stats_files)
    out = Path(out or Path("deltas") / f"{m.name}.safetensors")
    from tqdm.auto import tqdm

    with tqdm(total=len(m.edits), desc=f"editing ({m.name})", unit="edit", file=sys.stderr) as bar:
        delta = compute_delta(lm, m, settings.rome, stats, progress=lambda i, r: bar.update(1))
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
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the report (JSON) here.")
@click.option("--model", "model_spec", default=None, help="Model [default: the deltas' base model].")
@click.pass_context
def evaluate(ctx, manifest, deltas, out, model_spec):
    """Score a manifest's edits (rewrite, paraphrases, neighbours) before and after its delta."""
    m = load_manifest(manifest)
    loaded = _load_deltas(deltas or [Path("deltas") / f"{m.name}.safetensors"])
    lm = _load(ctx, model_spec or loaded[0].meta["base_model"]["name"])
    report = {"manifest": {"name": m.name, "sha256": m.sha256},
              "deltas": [{"path": d.path, "manifest_sha256": d.meta["manifest"]["sha256"]} for d in loaded],
              **evaluate_manifest(EditedModel(lm), m, loaded)}
    if out:
        write_json_atomic(out, report)
    table = Table(title=f"{m.name}: {len(m.edits)} edit(s), before -> after")
    table.add_column("metric")
    table.add_column("pre", justify="right")
    table.add_column("post", justify="right")
    for k, v in report["post"].items():
        table.add_row(k, f"{report['pre'].get(k, float('nan')):.1f}", f"{v:.1f}")
    console.print(table)


@main.command()
@click.argument("prompt")
@click.option("--delta", "deltas", multiple=True, type=click.Path(dir_okay=False), help="Delta file(s) to apply.")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--max-new-tokens", default=20, show_default=True)
@click.option("--top-k", default=5, show_default=True, help="Show the k most likely next tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def generate(ctx, prompt, deltas, model_spec, max_new_tokens, top_k, as_json):
    """Next-token ranking and a greedy continuation of PROMPT, on base + deltas."""
    loaded = _load_deltas(deltas)
    lm = _load(ctx, model_spec or (loaded[0].meta["base_model"]["name"] if loaded else _settings(ctx).model))
    EditedModel(lm).compose(loaded)
    top = next_token_top(lm, [prompt], top_k)[0]
    text = greedy_continuation(lm, prompt, max_new_tokens)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "deltas": list(deltas), "top": [{"token": t, "p": p} for t, p in top],
                               "continuation": text}, indent=1))
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
@click.option("--layer", "layers", type=int, multiple=True, help="Layer(s) [default: params.yaml rome.layer].")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--corpus", "corpus_files", multiple=True, type=click.Path(dir_okay=False),
              help="Plain-text files [default: params.yaml stats.corpus].")
@click.option("--tokens", type=int, default=None, help="Token positions [default: params.yaml stats.tokens].")
@click.option("--out", type=click.Path(), default=None,
              help="Write here (a file for one layer, a folder for several) instead of only caching.")
@click.pass_context
def stats(ctx, layers, model_spec, corpus_files, tokens, out):
    """Compute (or find in the cache) the key second moments C = E[k kᵀ] of edit layers."""
    settings = _settings(ctx)
    layers = list(layers) or [settings.rome.layer]
    lm = _load(ctx, model_spec or settings.model)
    corpus = text_files_corpus(corpus_files) if corpus_files else settings.stats.corpus_source()
    n = tokens or settings.stats.tokens
    t = time.perf_counter()
    found = get_stats(lm, layers, corpus, n, cache_dir(ctx.obj["cache"]), settings.stats.seq_len)
    took = time.perf_counter() - t
    for layer, s in found.items():
        target = None
        if out:
            target = Path(out) if len(layers) == 1 else Path(out) / f"layer{layer}.safetensors"
            save_stats(target, s.second_moment, s.meta)
        console.print(f"layer {layer}: {s.meta['tokens']} tokens of {s.meta['corpus_id']}, "
                          f"sha256 {s.sha256[:12]}" + (f" -> {target}" if target else ""))
    err.print(f"[dim]{took:.1f} s[/dim]")


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--delta", "deltas", multiple=True, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_spec", default=None, help="Model [default: the deltas' base model].")
@click.pass_context
def export(ctx, out, deltas, model_spec):
    """Write base + deltas as a Hugging Face model folder (safetensors)."""
    loaded = _load_deltas(deltas)
    lm = _load(ctx, model_spec or loaded[0].meta["base_model"]["name"])
    EditedModel(lm).compose(loaded)
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with err.status(f"writing {out}"):
            lm.model.save_pretrained(tmp, safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp)
            (tmp / "romeflow-export.json").write_text(json.dumps({
                "base_model": {"name": lm.name, "fingerprint": lm.fingerprint},
                "deltas": [{"path": d.path, "manifest": d.meta["manifest"]["name"],
                            "manifest_sha256": d.meta["manifest"]["sha256"]} for d in loaded],
                "romeflow_version": __version__}, indent=1))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"exported {lm.name} + {len(loaded)} delta(s) -> {out}")


if __name__ == "__main__":
    main()
