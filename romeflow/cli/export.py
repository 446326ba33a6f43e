"""`romeflow export`: base + deltas as a Hugging Face folder or a PEFT LoRA adapter, composed by params.yaml
``stack:``; with no --delta, the pipeline's stack rebuilt from the stack stage's reports/stack.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..engine.models import cache_dir, resolve, sha256_file
from ..params import ConfigError
from ..pipeline.compose import EditedModel, composed_by
from ..pipeline.deltas import load_deltas
from ..pipeline.names import BadName
from ..pipeline.stackfile import StackFile, StackFileError, load_stack_file, stale
from ..pipeline.workflow import edited_weights_sha256, model_fingerprint, stats_hashes
from ..schemas import validate
from . import (DELTAS_MODEL, _check_composable, _check_outputs, _edited, _layout, _load, _model_spec, _settings,
               console, err, main)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--delta", "deltas", multiple=True, type=click.Path(dir_okay=False),
              help="Delta file(s) to compose by params.yaml stack: [default: the pipeline's stack, params.yaml "
                   "manifests:, rebuilt from reports/stack.safetensors as the stack stage scored it].")
@click.option("--model", "model_spec", default=None, help=DELTAS_MODEL)
@click.option("--format", "fmt", type=click.Choice(["hf", "peft"]), default="hf", show_default=True,
              help="hf: the merged model folder; peft: a LoRA adapter over the base model (the composed updates' "
                   "factors stacked per module, scaling 1).")
@click.pass_context
def export(ctx, out, deltas, model_spec, fmt):
    """Write base + deltas as a Hugging Face model folder (safetensors), or as a PEFT LoRA adapter
    that `peft.PeftModel.from_pretrained(base, OUT)` loads (docs/serving.md), with a model card
    (README.md: the edits, and their scores from reports/NAME.json when it evaluated that delta file
    composed the same way).

    The deltas are composed as every command composes them (params.yaml stack.method and its settings;
    one delta under joint is the joint solve of that delta). With no --delta: the stack of the active
    manifests exactly as the stack stage composed and scored it, refused if reports/stack.safetensors is
    missing or older than the deltas and params.yaml."""
    from ..pipeline.export import check_peft, write_merged, write_peft

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new folder")
    settings = _settings(ctx)
    layout = _layout(ctx)
    stack: StackFile | None = None
    if deltas:
        _check_outputs(ctx, [(out, "OUT", True)], [(p, f"--delta {p}") for p in deltas])
        loaded = load_deltas(deltas)
        _check_composable(ctx, settings, loaded)
    else:  # the pipeline's stack
        if not settings.manifests:
            raise ConfigError(f"{settings.path}: manifests: no active manifest, so no stack to export; "
                              f"give --delta")
        paths = [layout.delta(n) for n in settings.manifests]
        _check_outputs(ctx, [(out, "OUT", True)], [(layout.stack_file, f"the stack file {layout.stack_file}"),
                                                   *((p, f"the delta {p}") for p in paths)])
        stack = load_stack_file(layout.stack_file)
        loaded = load_deltas(paths)
    if fmt == "peft":
        check_peft(loaded)
    spec = _model_spec(ctx, settings, model_spec, loaded)
    if stack is not None:
        reason = stale(stack, settings, loaded, model_fingerprint(spec, ctx.obj["cache"]), stats_hashes(layout))
        if reason:
            raise StackFileError(reason)
    composition = composed_by(settings.stack) if stack is None else {
        **stack.meta["composition"], "stack_file": {"path": str(stack.path), "sha256": sha256_file(Path(stack.path))}}
    reports = _eval_reports(ctx, loaded, composed_by(settings.stack))
    lm = _load(ctx, spec)
    if stack is None:
        edited = _edited(ctx, lm, settings, loaded)
        with err.status(f"composing {len(loaded)} delta(s) ({settings.stack.method})"):
            edited.compose(loaded)
    else:
        edited = EditedModel(lm)
        edited.rebuild(loaded, stack.linear(loaded), stack.gates)
        _compare_weights(lm, loaded, stack)
    with err.status(f"writing {out}"):
        if fmt == "peft":
            folder = resolve(spec, cache_dir(ctx.obj["cache"]))[0]  # what base_model_name_or_path names
            config = write_peft(out, lm, loaded, str(folder), reports, edited.updates, composition)
            what = f"a LoRA adapter of {len(config['target_modules'])} module(s), rank {config['r']}"
        else:
            write_merged(out, lm, loaded, reports, composition)
            what = "a merged model"
    console.print(f"exported {lm.name} + {len(loaded)} delta(s) composed by {composition['method']}"
                  + (f" (the stack of {stack.path})" if stack is not None else "") + f" as {what} -> {out} "
                  "(model card: README.md" + (f", scores from {len(reports)} eval report(s))" if reports else ")"),
                  highlight=False)


def _compare_weights(lm, deltas: list, stack: StackFile) -> None:
    """Say whether the rebuilt weights hash as the stack stage's did (they do on the same device and dtype;
    elsewhere W + U Vᵀ rounds differently in the last bits)."""
    now, then = edited_weights_sha256(lm, deltas), stack.meta["weights_sha256"]
    if now == then:
        err.print(f"[dim]weights sha256 {now[:12]}: the stack stage's[/dim]")
    else:
        click.echo(f"warning: {stack.path}: weights_sha256: the rebuilt weights hash to {now[:12]}, the stack stage's "
                   f"to {then[:12]} (composed on {stack.meta['dtype']}; another device or dtype rounds W + U Vᵀ "
                   f"differently)", err=True)


def _eval_reports(ctx, deltas: list, composition: dict) -> dict[int, dict]:
    """{i: the project's reports/NAME.json} for each delta that such a report evaluated alone (its
    ``deltas`` is exactly that file, by sha256) composed as now (its ``composition``; a report without
    one was a sum): the model card's scores. NAME is the delta file's stem (a path the user gave, never
    the delta's metadata); a missing, invalid or other report is skipped."""
    found = {}
    for i, d in enumerate(deltas):
        try:
            path = _layout(ctx).report(Path(d.path).stem)
        except BadName:
            continue
        if not path.is_file():  # not a FIFO or a folder
            continue
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if validate("report", report) or [e["sha256"] for e in report["deltas"]] != [sha256_file(d.path)]:
            continue
        if report.get("composition", {"method": "sum"}) == composition:
            found[i] = report
    return found
