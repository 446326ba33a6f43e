"""The registry of active manifests and the state of the pipeline: add, revert, diff, status, verify."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
from rich.table import Table

from ..engine.statistics import Stats
from ..params import ConfigError
from ..pipeline.deltas import DeltaError, load_deltas
from ..pipeline.history import diff_reports, markdown_table
from ..pipeline.manifests import Manifest, ManifestError, check_conflicts, load_manifest
from ..pipeline.names import BadName
from ..pipeline.registry import WAIT, check_name, register, unregister
from ..pipeline.verify import DEFAULT_RTOL, verify_manifest
from ..pipeline.workflow import Layout, status as workflow_status
from . import _check_layers, _layer_uses, _layout, _load, _params_path, _settings, _stats_for, console, main


WAIT_OPTION = click.option("--wait", type=click.FloatRange(0), default=WAIT, show_default=True,
                           help="Seconds to wait while another add/revert holds the lock on params.yaml.")


def _waiting(params: Path, wait: float):
    """What add/revert say, once, when another one holds the lock: why nothing happens, and for how long."""
    return lambda lock: click.echo(f"waiting for the lock on {params} ({lock.name}), held by another romeflow "
                                   f"add/revert; giving up after {wait:g} s", err=True)


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@WAIT_OPTION
@click.pass_context
def add(ctx, manifest, wait):
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
    register(_params_path(ctx), m.name, wait, _waiting(_params_path(ctx), wait))
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
@WAIT_OPTION
@click.pass_context
def revert(ctx, name, wait):
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

    unregister(params, name, then=delete, wait=wait, on_wait=_waiting(params, wait))
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
    layout = _layout(ctx)
    uses = [(f"{settings.path}: rome.layer", settings.rome.layer)]  # as apply checks them, without the weights
    for m in _readable_manifests(layout, list(settings.manifests)):
        uses += _layer_uses(settings.resolve_manifest(m), settings)
    _check_layers(ctx, settings.model, uses)
    st = workflow_status(layout, settings, ctx.obj["cache"])
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    console.print(f"base model {st['model']['spec']} ({st['model']['fingerprint'][:12]}); statistics: "
                  + (", ".join(f"layer {k} ({v[:12]})" for k, v in st["stats"].items()) or "none"), highlight=False)
    table = Table(title=f"{len(st['manifests'])} active manifest(s); stack report: {st['stack']}, stack file: "
                        f"{st['stack_file']}")
    for col in ("manifest", "state", "delta", "report", "why"):
        table.add_column(col)
    for e in st["manifests"]:
        table.add_row(e["name"], e["state"], e["delta"], e["report"], "; ".join(e["issues"]))
    console.print(table)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--rtol", type=click.FloatRange(0.0), default=DEFAULT_RTOL, show_default=True,
              help="Accept factors whose max |Δ| is at most this fraction of the stored factor's largest entry "
                   "(other threads, CPUs or GPUs change the last bits; docs/reproducibility.md).")
@click.option("--atol", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Also accept factors that differ by at most this much, absolutely.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per delta) instead of a table.")
@click.pass_context
def verify(ctx, names, rtol, atol, as_json):
    """Recompute deltas from their manifests and compare with the stored files [default: every active one].

    Each delta is recomputed with the thread count and dtype it records. Also checks its provenance
    against the current manifest, base model, statistics and hyper-parameters. Exits 1 (one line) if any
    delta differs beyond --rtol/--atol or is stale.
    """
    settings = _settings(ctx)
    layout = _layout(ctx)
    names = list(names) or list(settings.manifests)
    if not names:
        raise ConfigError(f"{_params_path(ctx)}: manifests: no active manifests to verify")
    uses, dtypes = [], set()
    for name in names:  # bad names, manifests, deltas and layers fail before the model loads
        check_name(name, "NAMES")
        uses += _layer_uses(settings.resolve_manifest(load_manifest(layout.manifest(name))), settings)
        dtypes |= {d.meta.get("dtype", "float32") for d in load_deltas([layout.delta(name)])}
    _check_layers(ctx, settings.model, uses)
    if len(dtypes) == 1 and "dtype" not in ctx.obj["placement_options"]:  # the dtype they were computed in
        ctx.obj["placement"] = replace(ctx.obj["placement"], dtype=dtypes.pop())
    lm = _load(ctx, settings.model)

    def stats_for(layers: list[int]) -> dict[int, Stats]:  # the pipeline's files where present, else the cache
        files = tuple(str(layout.stats(l)) for l in layers if layout.stats(l).is_file())
        return _stats_for(ctx, lm, settings, layers, files)

    table = Table(title="verify: recomputed vs stored")
    for col in ("manifest", "result", "max |Δ| of the factors", "relative", "provenance"):
        table.add_column(col)
    problems, rows = [], []
    for name in names:
        v = verify_manifest(lm, layout, settings, name, stats_for, atol, rtol)
        table.add_row(name, v["result"], f"{v['max_abs_diff']:.3g}", f"{v['max_rel_diff']:.3g}",
                      "; ".join(v["issues"]) or "ok")
        rows.append({k: v[k] for k in ("name", "path", "result", "identical", "max_abs_diff", "max_rel_diff",
                                       "compute", "issues")})
        problems += v["problems"]
    if as_json:
        click.echo(json.dumps(rows, indent=1))  # inf (edits that do not line up) is written as Infinity
    else:
        console.print(table)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DeltaError(f"verify failed: {problems[0]}{more}")

