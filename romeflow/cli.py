"""The ``romeflow`` command line: one command per workflow step, each a thin call into the library."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .pipeline.deltas import DeltaError, EditedModel, JointSolve, compute_delta, load_deltas, require_pairs, save_delta
from .evaluation.scoring import greedy_continuation, next_token_top
from .pipeline.history import RevisionError, diff_reports, markdown_table
from .io import check_writable
from .pipeline.manifests import Manifest, ManifestError, check_conflicts, load_manifest
from .engine.models import (DEVICE_MAP_STRATEGIES, DEVICE_PATTERN, DTYPES, EMBEDDED, LoadedModel, ModelError, Placement, cache_dir,
                     layer_count, load_model, resolve, sha256_file)
from .pipeline.names import BadName
from .params import ConfigError, Params, check_layers, load_params
from .pipeline.registry import check_name, register, unregister
from .engine.protect import check_sources
from .engine.rome import RomeParams
from .engine.statistics import Stats, get_stats, load_stats, save_stats
from .pipeline.workflow import (GateError, Layout, eval_manifest, eval_stack, gate_error, status as workflow_status,
                       verify_manifest)

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

    if threads:
        torch.set_num_threads(threads)
    if device is not None and not re.fullmatch(DEVICE_PATTERN, device):
        raise click.BadParameter(f"{device!r} is not auto, cpu, mps, cuda or cuda:N", param_hint="'--device'")
    placement = {k: v for k, v in (("device", device), ("dtype", dtype), ("device_map", device_map)) if v is not None}
    ctx.obj = {"params": params_path, "cache": cache, "placement_options": placement}


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


def _tokenizer(ctx, spec: str):
    """The model's tokenizer alone (no weights loaded): for what must be known before the model is."""
    from transformers import AutoTokenizer

    folder, _name, _fp = resolve(spec, cache_dir(ctx.obj["cache"]), log=lambda s: err.print(f"[dim]{s}[/dim]"))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _params_path(ctx) -> Path:
    return Path(ctx.obj["params"] or "params.yaml")


def _layout(ctx) -> Layout:
    """The project root is the folder of the params file."""
    return Layout(_params_path(ctx).parent)


# --------------------------------------------------------------------------------------------------


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
    onto = load_deltas(onto_paths)
    for d in onto:
        require_pairs(d, "--onto")
    try:
        out = Path(out) if out else Layout().delta(m.name)
    except BadName as e:
        raise ManifestError(f"{manifest}: {e}; pass --out") from None
    check_writable(out, "--out")
    check_sources(settings.rome.protect_sources, _params_path(ctx).parent, str(_params_path(ctx)))
    spec = model_spec or m.model or settings.model
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

    with tqdm(total=len(m.edits), desc=f"editing ({m.name})", unit="edit", file=sys.stderr) as bar:
        delta = compute_delta(lm, m, settings.rome, stats, progress=lambda i, r: bar.update(1),
                              root=_params_path(ctx).parent, onto=onto)
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
    """Score a manifest's edits (rewrite, paraphrases, neighbours) before and after its delta."""
    if details and not out:
        raise click.UsageError("--details needs --out")
    settings = _settings(ctx)
    for path, option in ((out, "--out"), (details, "--details")):
        if path:
            check_writable(path, option)
    m = load_manifest(manifest)
    try:
        paths = deltas or [_layout(ctx).delta(m.name)]
    except BadName as e:
        raise ManifestError(f"{manifest}: {e}; pass --delta") from None
    loaded = load_deltas(paths)
    gate = settings.gate if use_gate else None
    lm = _load(ctx, _model_spec(ctx, settings, model_spec, loaded))
    result = eval_manifest(EditedModel(lm), m, loaded, gate)
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
    if result.failures:
        raise gate_error(out or m.path, result.failures)


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Stack report (JSON, schemas/stack.schema.json) [default: reports/stack.json].")
@click.option("--md", "markdown", type=click.Path(dir_okay=False), default=None,
              help="Readable tables [default: reports/stack.md].")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the DVC plot data [default: reports/plots].")
@click.option("--gate", "use_gate", is_flag=True,
              help="After writing, fail (exit 1, one line) if the stack is outside params.yaml gate.stack.")
@click.pass_context
def stack(ctx, out, markdown, plots_dir, use_gate):
    """Compose every active delta (params.yaml manifests:) and measure interference and damage.

    Each manifest's edits are scored with its own delta alone and with all deltas; the damage
    guard is the perplexity of a held-out text (params.yaml stack.heldout) and the neighbour
    prompts' top-1 agreement, both vs the base model.
    """
    settings = _settings(ctx)
    layout = _layout(ctx)
    out = Path(out or layout.stack_report)
    for path, option, folder in ((out, "--out", False), (markdown or layout.stack_markdown, "--md", False),
                                 (plots_dir or layout.plots, "--plots", True)):
        check_writable(path, option, folder)
    manifests = [load_manifest(layout.manifest(n)) for n in settings.manifests]
    check_conflicts(manifests)
    deltas = load_deltas(layout.delta(n) for n in settings.manifests)
    joint = settings.stack.method == "joint"
    if joint:
        for d in deltas:
            require_pairs(d)
    heldout = layout.root / settings.stack.heldout
    if not heldout.is_file():
        raise ConfigError(f"{settings.path}: stack.heldout: {heldout} not found")
    lm = _load(ctx, settings.model)
    solve = _joint_solve(ctx, lm, settings, layout, deltas) if joint else None
    result = eval_stack(EditedModel(lm), manifests, deltas, heldout, settings.stack.window,
                        settings.gate if use_gate else None, solve)
    result.write(out, markdown or layout.stack_markdown, plots_dir or layout.plots)
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


def _joint_solve(ctx, lm: LoadedModel, settings: Params, layout: Layout, deltas: list) -> JointSolve:
    """stack.method: joint with the statistics the deltas were computed with (the pipeline's files where
    present, else the cache); a delta computed with other statistics is refused."""
    layers = sorted({up.layer for d in deltas for up in d.updates})
    files = tuple(str(layout.stats(l)) for l in layers if layout.stats(l).is_file())
    stats = _stats_for(ctx, lm, settings, layers, files)
    for d in deltas:
        for s in d.meta["stats"]:
            if s["layer"] in stats and stats[s["layer"]].sha256 != s["sha256"]:
                raise DeltaError(f"{d.path}: stats: computed with other statistics of layer {s['layer']} "
                                 f"({s['sha256'][:12]}, now {stats[s['layer']].sha256[:12]}); recompute it")
    return JointSolve.from_params(lambda layer: stats[layer].second_moment, settings.stack)


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
    """Next-token ranking and a greedy continuation of PROMPT, on base + deltas."""
    settings = _settings(ctx)
    loaded = load_deltas(deltas)
    lm = _load(ctx, _model_spec(ctx, settings, model_spec, loaded))
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


@main.group()
def bench():
    """Benchmarks: COUNTERFACT (Table 4) and zsRE (Table 1), ROME against FT, FT+L and KN."""


def _bench_options(default_methods: str):
    def wrap(f):
        f = click.option("--records", "records_path", type=click.Path(dir_okay=False), default=None,
                         help="Dataset file [default: params.yaml bench.<kind>.records].")(f)
        f = click.option("--n", "n", type=int, default=None, help="Use the first N records [default: all].")(f)
        f = click.option("--start", type=int, default=0, show_default=True,
                         help="Skip this many records first (a second sample: --start 100 --n 100).")(f)
        f = click.option("--methods", default=default_methods, show_default=True,
                         help="Comma-separated editors; the unedited model is always scored too.")(f)
        f = click.option("--out", type=click.Path(file_okay=False), default=None,
                         help="Run folder (resumable) [default: reports/bench/<kind>].")(f)
        f = click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")(f)
        f = click.option("--shard", default=None, metavar="K/N",
                         help="Run only records K, K+N, K+2N, … (1-based) so N processes share one run folder.")(f)
        f = click.option("--variant", "variants", multiple=True, metavar="NAME:key=value[:key=value]",
                         help="An extra ROME method with changed hyper-parameters, e.g. l4:layer=4 (repeatable).")(f)
        f = click.option("--partial", is_flag=True,
                         help="Run nothing: report on the records every method has finished so far "
                              "(report-partial.md), e.g. while a run is in progress.")(f)
        return click.pass_context(f)
    return wrap


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter("must be K/N, e.g. 1/2", param_hint="--shard") from None
    if not 1 <= k <= n:
        raise click.BadParameter("needs 1 <= K <= N", param_hint="--shard")
    return k, n


def _run_bench(ctx, kind: str, records_path, n, methods, out, model_spec, references_path=None, partial=False,
               shard=None, require_tok=False, variants=(), start=0):
    from tqdm.auto import tqdm

    from .evaluation.bench import DamageText, ValueStore, benchmark, generation_prompts, partial_report, run_settings
    from .evaluation.datasets import load_counterfact, load_known_facts, load_zsre, mine_token_neighbors
    from .engine.editors import make_editor

    shard = _parse_shard(shard)
    settings = _settings(ctx)
    records_path = records_path or settings.bench.records(kind)
    if not records_path:
        raise click.UsageError(f"--records is required (or set bench.{kind}.records in params.yaml)")
    if n is not None and n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    if start < 0:
        raise click.BadParameter("must be at least 0", param_hint="--start")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    params = {name: settings.method(name) for name in names}
    variant_params = dict(settings.rome_variant(v) for v in variants)  # checked by the rome section's rules
    names += list(variant_params)
    params.update(variant_params)
    out = Path(out or Path("reports") / "bench" / kind)
    check_writable(out, "--out", folder=True)
    for p in params.values():
        if isinstance(p, RomeParams):
            check_sources(p.protect_sources, _params_path(ctx).parent, str(_params_path(ctx)))
    all_records = load_counterfact(records_path) if kind == "counterfact" else load_zsre(records_path)
    tok_cfg = None
    if kind == "counterfact":  # NS_tok: token-sharing neighbours, mined with the model's tokenizer
        k_tok, facts_path = settings.bench.token_neighbors_k, settings.bench.token_neighbors_facts
        known = load_known_facts(facts_path) if facts_path else []
        all_records = mine_token_neighbors(all_records, _tokenizer(ctx, model_spec or settings.model), k_tok, known)
        if require_tok:
            all_records = [r for r in all_records if r.token_neighbors]
        tok_cfg = {"k": k_tok, "facts": facts_path,
                   "facts_sha256": sha256_file(Path(facts_path)) if facts_path else None,
                   "only_records_with_neighbors": bool(require_tok)}
    records = all_records[start:start + n] if n else all_records[start:]
    if not records:
        raise click.UsageError(f"{records_path}: no records to run")
    damage, damage_cfg = None, None
    if kind == "counterfact" and settings.bench.damage_tokens > 0:  # PPL+ after every edit
        where = "bench.damage.text" if settings.bench.damage_text else "stack.heldout"
        text_path = Path(settings.bench.damage_text or settings.stack.heldout)
        if not text_path.is_absolute():
            text_path = _params_path(ctx).parent / text_path
        if not text_path.is_file():
            raise click.UsageError(f"{_params_path(ctx)}: {where}: {text_path} is not a file")
        damage = DamageText(text_path.read_text(encoding="utf-8"), settings.bench.damage_tokens, settings.stack.window)
        damage_cfg = {"text": str(settings.bench.damage_text or settings.stack.heldout), "sha256": sha256_file(text_path),
                      "tokens": damage.tokens, "window": damage.window}
    references = None
    if references_path:
        try:
            references = json.loads(Path(references_path).read_text())
        except ValueError as e:
            raise click.BadParameter(f"{references_path}: not JSON ({e})", param_hint="--references") from None
        if not isinstance(references, dict) or not all(isinstance(v, list) for v in references.values()):
            raise click.BadParameter("must be a JSON object {object: [text, ...]}", param_hint="--references")
    gen, gen_source = None, None
    if kind == "counterfact":
        gen = settings.bench.generation
        gen_source = generation_prompts(records[0], gen)[1]
        if gen_source != "dataset":
            gen_source += f" ({', '.join(repr(t) for t in ('{rewrite prompt}',) + gen.templates)})"
    command = "romeflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    param_dicts = {"unedited": {}, **{name: p.to_dict() for name, p in params.items()}}
    if partial:  # aggregate only: the run's own settings must match (model fingerprint included)
        prior = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        model = prior.get("model", {"name": "?", "fingerprint": "?"})
        run_cfg = run_settings(kind, model, Path(records_path), records, param_dicts, gen, gen_source, tok_cfg,
                               damage_cfg)
        report = partial_report(kind, records, ["unedited"] + names, out, run_cfg, command,
                                all_records if kind == "counterfact" else None, references)
        _print_report(kind, report, out / "report-partial.md", len(records))
        return
    spec = model_spec or settings.model
    where = lambda name: (f"--variant {name}: layer" if name in variant_params else  # noqa: E731
                          f"{settings.path}: {'rome' if name == 'rome-r1' else name}.layer")
    uses = [(where(name), p.layer) for name, p in params.items() if hasattr(p, "layer")]
    uses += [(f"{settings.path}: kn.layers", layer) for layer in (settings.kn.layers or ()) if "kn" in names]
    _check_layers(ctx, spec, uses)
    lm = _load(ctx, spec)
    check_layers(lm.num_layers, uses)
    rome_layers = sorted({p.layer for p in params.values() if isinstance(p, RomeParams)})
    stats = _stats_for(ctx, lm, settings, rome_layers, ()) if rome_layers else {}
    values = ValueStore(out / "values")  # (k*, v*) shared by the ROME variants: they differ only in the insert
    editors = {"unedited": None}
    editors.update({name: make_editor(name, lm, params[name], lambda layer: stats[layer].second_moment, values,
                                      _params_path(ctx).parent) for name in names})
    run_cfg = run_settings(kind, {"name": lm.name, "fingerprint": lm.fingerprint}, Path(records_path), records,
                           param_dicts, gen, gen_source, tok_cfg, damage_cfg)
    bars = {}

    def progress(name, total, done):
        bars[name] = tqdm(total=total, initial=done, desc=f"{kind} {name}", unit="record", file=sys.stderr)
        return lambda: bars[name].update(1)

    report = benchmark(lm, kind, records, editors, out, run_cfg, command, gen,
                       all_records if kind == "counterfact" else None, references, progress, shard, damage)
    for bar in bars.values():
        bar.close()
    _print_report(kind, report, out / "report.md", len(records))


def _print_report(kind: str, report, path: Path, n: int) -> None:
    table = Table(title=f"{kind}: {n} records -> {path}")
    cols = ["S", "S+", "ES", "PS", "NS", "NS_tok", "GE", "RS", "PPL+"] if kind == "counterfact" else ["Efficacy", "Paraphrase", "Specificity"]
    for col in ["method"] + cols + ["s/edit"]:
        table.add_column(col)
    for name, m in report.methods.items():
        cells = [("-" if m["metrics"].get(c) is None else f"{m['metrics'][c]['value']:.1f}") for c in cols]
        secs = "-" if m["seconds_per_edit"] is None else f"{m['seconds_per_edit']:.2f}"
        table.add_row(name, *cells, secs)
    console.print(table)
    for note in report.notes:
        err.print(f"[dim]{note}[/dim]")


@bench.command("counterfact")
@_bench_options("rome,ft,ftl,kn")
@click.option("--references", "references_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="RS reference texts, JSON {object: [text, ...]} [default: built from the dataset's records].")
@click.option("--with-token-neighbors", "require_tok", is_flag=True,
              help="Only records that have token-sharing neighbours (NS_tok), before --n.")
def bench_counterfact(ctx, records_path, n, start, methods, out, model_spec, references_path, partial, shard,
                      require_tok, variants):
    """Edit each COUNTERFACT record alone, score ES/EM, PS/PM, NS/NM, NS_tok/NM_tok, S, S+, GE, RS with 95% CIs.

    NS_tok: other subjects that share the edited subject's last token (from the dataset and from
    params.yaml bench.token_neighbors.facts), asked the same relation, must keep their own answer.
    Resumable: re-running the same command continues where it stopped, then writes report.json and
    report.md in the run folder."""
    _run_bench(ctx, "counterfact", records_path, n, methods, out, model_spec, references_path, partial, shard,
               require_tok, variants, start)


@bench.command("stack")
@click.option("--records", "records_path", type=click.Path(dir_okay=False), default=None,
              help="COUNTERFACT records [default: params.yaml bench.counterfact.records].")
@click.option("--n", "n", type=int, required=True, help="Edit the first N records (one delta, one manifest each).")
@click.option("--k", "ks", default=",".join(map(str, (1, 10, 30, 100, 300))), show_default=True,
              help="Compose the first k deltas for each k (capped at N).")
@click.option("--methods", default="sum,joint", show_default=True, help="Stack methods (params.yaml stack: for joint).")
@click.option("--others", type=int, default=50, show_default=True,
              help="Held-out records (the ones after the first N), never edited, scored at every k.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder (resumable).")
@click.option("--model", "model_spec", default=None, help="Model [default: params.yaml's].")
@click.option("--shard", default=None, metavar="K/N",
              help="Do only records (and compositions) K, K+N, … (1-based) so N processes share one run folder.")
@click.option("--variant", "variants", multiple=True, metavar="NAME:key=value[:key=value]",
              help="An extra joint solve with other stack settings (ridge, null_space, protect, margin, rounds, prefixes), e.g. "
                   "ns:null_space=0.01 (repeatable).")
@click.pass_context
def bench_stack(ctx, records_path, n, ks, methods, others, out, model_spec, shard, variants):
    """Edits at scale: one delta per record, the first k composed with each stack method, scored.

    ES/PS/NS/NS_tok of the k edited records on the composed model, neighbourhood success and kept
    rewrites of held-out records, perplexity of params.yaml stack.heldout; report.json, report.md and
    report.png once every composition is done (any shard that finds them done writes them)."""
    from tqdm.auto import tqdm

    from .evaluation.datasets import load_counterfact, load_known_facts, mine_token_neighbors
    from .evaluation.stackbench import METHODS, StackBench, ks_up_to

    shard = _parse_shard(shard)
    settings = _settings(ctx)
    records_path = records_path or settings.bench.records("counterfact")
    if not records_path:
        raise click.UsageError("--records is required (or set bench.counterfact.records in params.yaml)")
    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    if others < 0:
        raise click.BadParameter("must be at least 0", param_hint="--others")
    try:
        k_list = tuple(int(x) for x in ks.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {ks!r}", param_hint="--k") from None
    if not k_list or min(k_list) < 1:
        raise click.BadParameter("needs at least one k, each >= 1", param_hint="--k")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for m in names:
        if m not in METHODS:
            raise click.BadParameter(f"unknown stack method '{m}' (known: {', '.join(METHODS)})", param_hint="--methods")
    joints = {"joint": settings.stack} if "joint" in names else {}
    for spec in variants:
        name, stack_params = settings.stack_variant(spec)
        if name in joints or name in names:
            raise click.BadParameter(f"'{name}' is given twice", param_hint="--variant")
        joints[name] = stack_params
        names.append(name)
    out = Path(out)
    check_writable(out, "--out", folder=True)
    root = _params_path(ctx).parent
    check_sources(settings.rome.protect_sources, root, str(_params_path(ctx)))
    heldout = root / settings.stack.heldout
    if not heldout.is_file():
        raise ConfigError(f"{settings.path}: stack.heldout: {heldout} not found")
    spec = model_spec or settings.model
    all_records = load_counterfact(records_path)
    if len(all_records) < n:
        raise click.BadParameter(f"{records_path} has {len(all_records)} records, fewer than {n}", param_hint="--n")
    facts = settings.bench.token_neighbors_facts
    known = load_known_facts(facts) if facts else []
    all_records = mine_token_neighbors(all_records, _tokenizer(ctx, spec), settings.bench.token_neighbors_k, known)
    records, held = all_records[:n], all_records[n:n + others]
    k_list = ks_up_to(k_list, n)
    _check_layers(ctx, spec, [(f"{settings.path}: rome.layer", settings.rome.layer)])
    lm = _load(ctx, spec)
    stats = _stats_for(ctx, lm, settings, [settings.rome.layer], ())
    joint = {m: p.joint_settings() for m, p in joints.items()}
    solvers = {m: (JointSolve.from_params(lambda layer: stats[layer].second_moment, joints[m]) if m in joints else None)
               for m in names}
    from .evaluation.bench import run_settings

    run_cfg = run_settings("stack", {"name": lm.name, "fingerprint": lm.fingerprint}, Path(records_path), records,
                           {"rome": settings.rome.to_dict(), **{m: joint.get(m, {}) for m in names}},
                           None, None, {"k": settings.bench.token_neighbors_k, "facts": facts})
    run_cfg["others"] = [r.case_id for r in held]
    run_cfg["heldout"] = {"path": str(settings.stack.heldout), "sha256": sha256_file(heldout),
                          "window": settings.stack.window}
    sb = StackBench(lm, out, run_cfg, records, held, k_list, solvers, heldout.read_text(encoding="utf-8"),
                    settings.stack.window, shard)
    with tqdm(total=len(records), desc="stack: one delta per record", unit="edit", file=sys.stderr) as bar:
        sb.edit(settings.rome, stats, root, str(records_path), progress=lambda: bar.update(1))
    with tqdm(total=len(sb.jobs()), desc="stack: compositions", unit="stack", file=sys.stderr) as bar:
        missing = sb.compose(progress=lambda m, k: bar.update(1))
    command = "romeflow " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = sb.report(command)
    if report is None:
        console.print(f"{len(missing)} composition(s) left to other shards or to deltas not computed yet: "
                      + ", ".join(f"{m} k={k}" for m, k in missing[:8]) + ("…" if len(missing) > 8 else ""))
        return
    table = Table(title=f"edits at scale: {n} records -> {out / 'report.md'}")
    for col in ("method", "k", "ES", "PS", "NS", "NS_tok", "held-out NS", "Δ ppl"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda m: "-" if m is None else f"{m['value']:.1f}"  # noqa: E731
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["method"], str(r["k"]), *["-"] * 5, "error")
            continue
        table.add_row(r["method"], str(r["k"]), *(fmt(r[c]) for c in ("ES", "PS", "NS", "NS_tok", "other_NS")),
                      f"{r['perplexity_increase_pct']:+.2f}%")
    console.print(table)


@bench.command("zsre")
@_bench_options("rome,ft,ftl,kn")
def bench_zsre(ctx, records_path, n, start, methods, out, model_spec, partial, shard, variants):
    """Edit each zsRE record alone, score efficacy, paraphrase and specificity accuracy with 95% CIs."""
    _run_bench(ctx, "zsre", records_path, n, methods, out, model_spec, partial=partial, shard=shard,
               variants=variants, start=start)


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
    from .engine.parallel import Spawned, launched_shard
    from .engine.statistics import Shard, cached_stats_path, corpus_from

    settings = _settings(ctx)
    if tokens is not None and tokens < 1:
        raise click.BadParameter(f"must be at least 1, got {tokens}", param_hint="--tokens")
    uses = ([("--layer", l) for l in layers] if layers else [(f"{settings.path}: rome.layer", settings.rome.layer)])
    layers = [l for _, l in uses]
    if out:
        targets = [Path(out)] if len(layers) == 1 else [Path(out) / f"layer{l}.safetensors" for l in layers]
        for t in targets:
            check_writable(t, "--out")
    spec = model_spec or settings.model
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


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--delta", "deltas", multiple=True, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_spec", default=None, help=DELTAS_MODEL)
@click.option("--format", "fmt", type=click.Choice(["hf", "peft"]), default="hf", show_default=True,
              help="hf: the merged model folder; peft: a LoRA adapter over the base model (the deltas' "
                   "factors stacked per module, scaling 1).")
@click.pass_context
def export(ctx, out, deltas, model_spec, fmt):
    """Write base + deltas as a Hugging Face model folder (safetensors), or as a PEFT LoRA adapter
    that `peft.PeftModel.from_pretrained(base, OUT)` loads (docs/serving.md)."""
    from .pipeline.export import write_merged, write_peft

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new folder")
    check_writable(out, "OUT", folder=True)
    settings = _settings(ctx)
    loaded = load_deltas(deltas)
    spec = _model_spec(ctx, settings, model_spec, loaded)
    lm = _load(ctx, spec)
    with err.status(f"writing {out}"):
        if fmt == "peft":
            folder = resolve(spec, cache_dir(ctx.obj["cache"]))[0]  # what base_model_name_or_path names
            config = write_peft(out, lm, loaded, str(folder))
            what = f"a LoRA adapter of {len(config['target_modules'])} module(s), rank {config['r']}"
        else:
            EditedModel(lm).compose(loaded)
            write_merged(out, lm, loaded)
            what = "a merged model"
    console.print(f"exported {lm.name} + {len(loaded)} delta(s) as {what} -> {out}", highlight=False)


# --------------------------------------------------------------------------------------------------
# The registry of active manifests and the state of the pipeline
# --------------------------------------------------------------------------------------------------


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.pass_context
def add(ctx, manifest):
    """Validate edits/NAME.yaml and register NAME in params.yaml manifests: (`dvc repro` then computes it)."""
    _settings(ctx, resolve_auto=False)  # a bad params file fails here, before anything else
    m = load_manifest(manifest)
    layout = _layout(ctx)
    try:
        expected = layout.manifest(m.name)
    except BadName as e:
        raise ManifestError(f"{manifest}: {e}") from None
    if Path(manifest).resolve() != expected.resolve():
        raise ValueError(f"{manifest}: the pipeline reads manifests from {expected}; move it there first")
    settings = _settings(ctx, resolve_auto=False)
    check_conflicts(_readable_manifests(layout, [n for n in settings.manifests if n != m.name]) + [m])
    register(_params_path(ctx), m.name)
    click.echo(f"registered {m.name} ({len(m.edits)} edit(s)) in {_params_path(ctx)}; "
               f"`dvc repro` computes {layout.delta(m.name)}")


def _readable_manifests(layout: Layout, names: list[str]) -> list[Manifest]:
    """The registered manifests that can be read (a broken one is `romeflow status`'s to report)."""
    out = []
    for n in names:
        try:
            out.append(load_manifest(layout.manifest(n)))
        except ManifestError:
            pass
    return out


@main.command()
@click.argument("name")
@click.pass_context
def revert(ctx, name):
    """Drop NAME from params.yaml manifests: and delete its delta and reports (the manifest stays).

    The next `dvc repro` re-runs only the stack, which then equals base + the remaining deltas.
    """
    layout, params = _layout(ctx), _params_path(ctx)
    check_name(name, f"{params}: manifests")  # before anything is read or deleted
    _settings(ctx, resolve_auto=False)
    removed = []

    def delete():  # under the registry's lock, after the name left params.yaml
        for p in (layout.delta(name), layout.report(name), layout.details(name)):
            if p.is_symlink() or p.is_file():  # a link itself, never what it points to
                p.unlink()
                removed.append(p)

    unregister(params, name, then=delete)
    click.echo(f"reverted {name}: removed from {_params_path(ctx)}" + "".join(f", deleted {p}" for p in removed))


@main.command()
@click.argument("rev_a", default="HEAD")
@click.argument("rev_b", required=False)
@click.option("--all", "all_rows", is_flag=True, help="Show unchanged metrics too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows.")
@click.option("--md", "as_md", is_flag=True, help="Print a Markdown table.")
@click.pass_context
def diff(ctx, rev_a, rev_b, all_rows, as_json, as_md):
    """Per-manifest metrics between git revisions REV_A [default: HEAD] and REV_B [default: the working tree].

    Reads reports/*.json (eval and stack reports, DVC metrics tracked by git) at each revision.
    """
    rows = diff_reports(_layout(ctx).root, rev_a, rev_b, all_rows)
    b = rev_b or "workspace"
    if as_json:
        click.echo(json.dumps({"a": rev_a, "b": b, "rows": rows}, indent=1))
        return
    if as_md:
        click.echo(markdown_table(rows, rev_a, b), nl=False)
        return
    table = Table(title=f"metrics: {rev_a} -> {b}" + ("" if all_rows else " (changed only)"))
    for col in ("manifest", "metric", rev_a, b, "change"):
        table.add_column(col, justify="left" if col in ("manifest", "metric") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        table.add_row(r["manifest"], r["metric"], fmt(r["a"]), fmt(r["b"]),
                      "-" if r["change"] is None else f"{r['change']:+.4g}")
    console.print(table if rows else f"no metric changes between {rev_a} and {b}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx, as_json):
    """Active manifests, their deltas and reports, and whether each is stale (manifest, base model,
    statistics or hyper-parameters changed since the delta was computed)."""
    settings = _settings(ctx)
    st = workflow_status(_layout(ctx), settings, ctx.obj["cache"])
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    console.print(f"base model {st['model']['spec']} ({st['model']['fingerprint'][:12]}); statistics: "
                  + (", ".join(f"layer {k} ({v[:12]})" for k, v in st["stats"].items()) or "none"), highlight=False)
    table = Table(title=f"{len(st['manifests'])} active manifest(s); stack report: {st['stack']}")
    for col in ("manifest", "state", "delta", "report", "why"):
        table.add_column(col)
    for e in st["manifests"]:
        table.add_row(e["name"], e["state"], e["delta"], e["report"], "; ".join(e["issues"]))
    console.print(table)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--atol", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Accept factors that differ by at most this much (0: byte-identical or equal factors).")
@click.pass_context
def verify(ctx, names, atol):
    """Recompute deltas from their manifests and compare with the stored files [default: every active one].

    Also checks each delta's provenance against the current manifest, base model, statistics and
    hyper-parameters. Exits 1 (one line) if any delta differs or is stale.
    """
    settings = _settings(ctx)
    layout = _layout(ctx)
    names = list(names) or list(settings.manifests)
    if not names:
        raise ConfigError(f"{_params_path(ctx)}: manifests: no active manifests to verify")
    uses = []
    for name in names:  # bad names, manifests, deltas and layers fail before the model loads
        check_name(name, "NAMES")
        uses += _layer_uses(settings.resolve_manifest(load_manifest(layout.manifest(name))), settings)
        load_deltas([layout.delta(name)])
    _check_layers(ctx, settings.model, uses)
    lm = _load(ctx, settings.model)

    def stats_for(layers: list[int]) -> dict[int, Stats]:  # the pipeline's files where present, else the cache
        files = tuple(str(layout.stats(l)) for l in layers if layout.stats(l).is_file())
        return _stats_for(ctx, lm, settings, layers, files)

    table = Table(title="verify: recomputed vs stored")
    for col in ("manifest", "result", "max |Δ| of the factors", "provenance"):
        table.add_column(col)
    problems = []
    for name in names:
        v = verify_manifest(lm, layout, settings, name, stats_for, atol)
        table.add_row(name, v["result"], f"{v['max_abs_diff']:.3g}", "; ".join(v["issues"]) or "ok")
        problems += v["problems"]
    console.print(table)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DeltaError(f"verify failed: {problems[0]}{more}")


# --------------------------------------------------------------------------------------------------
# Causal tracing (romeflow.tracing.causal): where a model stores a fact, and `layer: auto`
# --------------------------------------------------------------------------------------------------


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

    from .tracing.causal import write_trace, trace_prompt

    for p in plots:
        if Path(p).suffix not in (".png", ".svg"):
            raise click.BadParameter(f"{p}: must end in .png or .svg", param_hint="--plot")
    if subject not in prompt:
        raise ValueError(f"--subject: {subject!r} not found in the prompt {prompt!r}")
    settings, params = _trace_params(ctx, samples=samples, window=window, noise_scale=noise_scale, seed=seed)
    for path, option in [(out, "--out")] + [(p, "--plot") for p in plots]:
        if path:
            check_writable(path, option)
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

    from .tracing.causal import embedding_std, load_facts, rows_file, trace_average

    settings, params = _trace_params(ctx, n=n, samples=samples, window=window)
    root = _params_path(ctx).parent  # params.yaml's paths are relative to its folder (the project root)
    facts_path = facts_path or root / params.facts
    load_facts(facts_path)  # fail on a bad file before loading the model
    check_writable(Path(out) if out else root / params.out, "--out", folder=True)
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


if __name__ == "__main__":
    main()
