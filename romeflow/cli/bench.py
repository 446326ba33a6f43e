"""`romeflow bench`: COUNTERFACT, zsRE and edits at scale (stack), ROME against the baselines."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from ..engine.models import sha256_file
from ..engine.protect import check_sources
from ..engine.rome import RomeParams
from ..io import check_input
from ..params import ConfigError, check_layers
from ..pipeline.compose import JointSolve
from . import _check_layers, _check_outputs, _load, _params_path, _settings, _stats_for, _tokenizer, console, err, main


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

    from ..evaluation.bench import DamageText, ValueStore, benchmark, generation_prompts, partial_report, run_settings
    from ..evaluation.datasets import load_counterfact, load_known_facts, load_zsre, mine_token_neighbors
    from ..engine.editors import make_editor

    shard = _parse_shard(shard)
    settings = _settings(ctx)
    settings = settings.for_model(model_spec or settings.model)  # without rome.layer: the model's default layer
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
    _check_outputs(ctx, [(out, "--out", True)], [(records_path, f"--records {records_path}"),
                                                 (references_path, f"--references {references_path}")])
    if references_path:
        check_input(references_path, "--references file")  # a FIFO would block the read
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
@click.option("--skip", type=int, default=0, show_default=True,
              help="Leave out the first SKIP records (e.g. those a setting was chosen on): edit the N after them.")
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
              help="An extra joint solve with other stack settings (ridge, null_space, protect, margin, rounds, prefixes, "
                   "gate_text), e.g. "
                   "ns:null_space=0.01 (repeatable).")
@click.option("--compose-only", is_flag=True,
              help="Compute no delta: compose and score only what the deltas already in the folder allow (e.g. the "
                   "small k while other processes still edit).")
@click.pass_context
def bench_stack(ctx, records_path, n, skip, ks, methods, others, out, model_spec, shard, variants, compose_only):
    """Edits at scale: one delta per record, the first k composed with each stack method, scored.

    ES/PS/NS/NS_tok of the k edited records on the composed model, neighbourhood success and kept
    rewrites of held-out records, perplexity of params.yaml stack.heldout; report.json, report.md and
    report.png once every composition is done (any shard that finds them done writes them)."""
    from tqdm.auto import tqdm

    from ..evaluation.datasets import load_counterfact, load_known_facts, mine_token_neighbors
    from ..evaluation.stackbench import METHODS, StackBench, ks_up_to

    shard = _parse_shard(shard)
    settings = _settings(ctx)
    settings = settings.for_model(model_spec or settings.model)  # without rome.layer: the model's default layer
    records_path = records_path or settings.bench.records("counterfact")
    if not records_path:
        raise click.UsageError("--records is required (or set bench.counterfact.records in params.yaml)")
    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    if others < 0:
        raise click.BadParameter("must be at least 0", param_hint="--others")
    if skip < 0:
        raise click.BadParameter("must be at least 0", param_hint="--skip")
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
    _check_outputs(ctx, [(out, "--out", True)], [(records_path, f"--records {records_path}")])
    root = _params_path(ctx).parent
    check_sources(settings.rome.protect_sources, root, str(_params_path(ctx)))
    heldout = root / settings.stack.heldout
    if not heldout.is_file():
        raise ConfigError(f"{settings.path}: stack.heldout: {heldout} not found")
    spec = model_spec or settings.model
    all_records = load_counterfact(records_path)
    if len(all_records) < skip + n:
        raise click.BadParameter(f"{records_path} has {len(all_records)} records, fewer than {skip + n}"
                                 + (f" (--skip {skip} + --n {n})" if skip else ""), param_hint="--n")
    facts = settings.bench.token_neighbors_facts
    known = load_known_facts(facts) if facts else []
    all_records = mine_token_neighbors(all_records, _tokenizer(ctx, spec), settings.bench.token_neighbors_k, known)
    records, held = all_records[skip:skip + n], all_records[skip + n:skip + n + others]
    k_list = ks_up_to(k_list, n)
    _check_layers(ctx, spec, [(f"{settings.path}: rome.layer", settings.rome.layer)])
    lm = _load(ctx, spec)
    stats = _stats_for(ctx, lm, settings, [settings.rome.layer], ())
    joint = {m: p.joint_settings() for m, p in joints.items()}
    corpus = settings.stats.corpus_source()  # stack.gate_text's calibration tokens
    solvers = {m: (JointSolve.from_params(lambda layer: stats[layer].second_moment, joints[m], corpus=corpus, root=root)
                   if m in joints else None) for m in names}
    from ..evaluation.bench import run_settings

    run_cfg = run_settings("stack", {"name": lm.name, "fingerprint": lm.fingerprint}, Path(records_path), records,
                           {"rome": settings.rome.to_dict(), **{m: joint.get(m, {}) for m in names}},
                           None, None, {"k": settings.bench.token_neighbors_k, "facts": facts})
    run_cfg["others"] = [r.case_id for r in held]
    run_cfg["heldout"] = {"path": str(settings.stack.heldout), "sha256": sha256_file(heldout),
                          "window": settings.stack.window}
    sb = StackBench(lm, out, run_cfg, records, held, k_list, solvers, heldout.read_text(encoding="utf-8"),
                    settings.stack.window, shard)
    if compose_only:
        sb.run.open()  # the folder's settings are checked, as an editing run checks them
    else:
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

