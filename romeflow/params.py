"""params.yaml as one typed tree, validated in one place; nothing else in romeflow parses the file.

    params = load_params("params.yaml")     # Params; every problem -> ConfigError, one line:
                                            #   params.yaml: rome.lr: must be > 0, got 0
    params.rome, params.ft, params.trace    # the sections, as the dataclasses their modules use

The file is read by romeflow.safeyaml (bounded; no aliases or duplicate keys), checked against
schemas/params.schema.json (types, ranges, unknown fields) and then semantically (finite numbers,
``rome.layer: auto``, FT vs FT+L, manifest names). Sections backed by a dataclass (stats, rome, trace,
eval, ft, ftl, kn, bench.generation) take their allowed fields from the dataclass: a new field needs only a
range rule in the schema (without one, its type annotation is the rule). Whether a layer exists in the
model is checked by ``check_layers`` from the model folder's config.json, before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path

import jsonschema

from . import safeyaml
from .evaluation.bench import GenerationParams
from .engine.editors import METHOD_TABLE, FtParams, KnParams
from .engine.inserts import INSERTS, spec_of
from .engine.models import DEFAULT_MODEL, ModelError, Placement, default_layer
from .pipeline.names import BadName, check_name
from .engine.rome import RomeParams
from .schemas import _schema_text, validate_with
from .engine.statistics import Corpus, corpus_from
from .tracing.causal import TraceParams, read_layer

METRICS = ("ES", "EM", "PS", "PM", "NS", "NM", "S", "NS_tok", "NM_tok", "NS_tok_low", "NS_tok_high", "S+",
           "rewrite_top1", "paraphrase_top1", "neighbor_top1_kept")  # what reports hold; gate.eval keys


class ConfigError(ValueError):
    """An invalid params file; str(error) is the one-line message for the user."""


# --------------------------------------------------------------------------------------------------
# The sections that have no home module of their own
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsParams:
    """``stats:``: the second moments C = E[k kᵀ] of the edited layer's keys."""

    corpus: str | tuple[str, ...] = "wikipedia"  # 'wikipedia' (the gensim excerpt), text files, or a datasets folder
    tokens: int = 100_000
    seq_len: int = 256

    def corpus_source(self) -> Corpus:
        return corpus_from(self.corpus)


@dataclass(frozen=True)
class StackParams:
    """``stack:``: every active delta composed; the damage guard's held-out text."""

    heldout: str = "data/heldout.txt"
    window: int = 256  # tokens per perplexity window
    method: str = "sum"  # sum: base + Σ deltas; joint: one update re-solved from every delta's (k*, v*) pairs
    # (the project's params.yaml ships joint with ridge 0.05 and margin 3, chosen at scale: docs/scale.md)
    ridge: float = 0.0  # joint: 0 exact; > 0 least squares (relative to the mean diagonal of Kᵀ C⁻¹ K)
    null_space: float = 0.0  # joint: preserve C's eigen-directions with eigenvalue >= this x the largest (0: off)
    protect: bool = True  # joint: hold each edit's protected keys fixed too
    margin: float = 0.0  # joint: each edit kept at the least share of its change that holds this margin (0: off)
    rounds: int = 7  # joint: bisection rounds for those shares (resolution 2⁻ⁿ)
    prefixes: int = 0  # joint: the margin is the mean over the rewrite prompt and after this many v* prefixes
    gate_text: int = 0  # joint, gated deltas: each gate's τ₀ raised until this many statistics-corpus tokens (after
    # the gate's own negatives) are exactly closed, at most gated.MAX_LOW (0: the thresholds as stored)
    gate_refit: bool = False  # joint, gate_text > 0: a gate that the cap leaves open on some of those tokens is
    # refitted against them first (compose.refit_gate; docs/scale.md)

    def joint_settings(self) -> dict:
        """What a joint solve depends on (a bench run's record of it); the calibration's fields only
        when it is on, and gate_text and gate_refit only when set, so that run folders written before them still
        match."""
        return {f: getattr(self, f) for f in JOINT_FIELDS
                if (self.margin > 0 or f not in CALIBRATION_FIELDS) and (f != "gate_text" or self.gate_text > 0)
                and (f != "gate_refit" or self.gate_refit)}


CALIBRATION_FIELDS = ("margin", "rounds", "prefixes")  # stack.margin's (EditedModel.calibrate)
JOINT_FIELDS = ("ridge", "null_space", "protect") + CALIBRATION_FIELDS + ("gate_text", "gate_refit")  # what a `bench stack --variant` may change


@dataclass(frozen=True)
class EvalParams:
    """``eval:``: what `romeflow eval` (and the stack) asks every edit besides its manifest's prompts."""

    token_neighbors: int = 8  # reference subjects sharing the edited subject's last token (evaluation.bystanders)


@dataclass(frozen=True)
class Gate:
    """``gate:`` thresholds; None means "not checked"."""

    eval: dict[str, float] = field(default_factory=dict)  # metric -> minimum post-edit score (%)
    max_perplexity_increase: float | None = None  # % on the held-out text, stack vs base
    min_neighbor_kept: float | None = None  # % of all neighbour prompts whose top-1 is unchanged
    max_interference: float | None = None  # points a manifest's S may lose in the stack vs alone


@dataclass(frozen=True)
class BenchParams:
    """``bench:``: default record files of `romeflow bench` and its text generation (GE / RS)."""

    counterfact_records: str | None = None
    zsre_records: str | None = None
    generation: GenerationParams = field(default_factory=GenerationParams)
    token_neighbors_k: int = 5  # NS_tok: at most k token-sharing neighbours per record
    token_neighbors_facts: str | None = None  # known facts to mine them from, besides the dataset
    damage_text: str | None = None  # PPL+: held-out text measured after every edit (None: stack.heldout)
    damage_tokens: int = 256  # its first tokens (0: no per-edit damage measure)

    def records(self, kind: str) -> str | None:
        return {"counterfact": self.counterfact_records, "zsre": self.zsre_records}[kind]


# --------------------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    path: str = "params.yaml"  # the file, as named in messages (defaults: the file that would be read)
    model: str = DEFAULT_MODEL  # `model: NAME`, or `model: {name: NAME, device: ..., dtype: ...}`
    placement: Placement = field(default_factory=Placement)  # the rest of that mapping
    stats: StatsParams = field(default_factory=StatsParams)
    rome: RomeParams = field(default_factory=RomeParams)  # rome.layer already resolved when layer_auto
    layer_auto: bool = False  # rome.layer is `auto`
    layer_default: bool = False  # rome.layer not set: the model's measured default (``for_model``)
    layer_model: str | None = None  # the model that default was taken for (``for_model``; None: ``model``)
    trace: TraceParams = field(default_factory=TraceParams)
    manifests: tuple[str, ...] = ()
    processes: int = 1  # the edit stage's processes (romeflow apply-all; not a hyper-parameter)
    stack: StackParams = field(default_factory=StackParams)
    eval: EvalParams = field(default_factory=EvalParams)
    gate: Gate = field(default_factory=Gate)
    ft: FtParams = field(default_factory=FtParams)
    ftl: FtParams = field(default_factory=FtParams)  # FT+L needs ftl.linf (checked when used)
    kn: KnParams = field(default_factory=KnParams)
    bench: BenchParams = field(default_factory=BenchParams)

    @property
    def root(self) -> Path:
        """The project root: params.yaml's folder; the file's relative paths start there."""
        return Path(self.path).parent

    @property
    def layer_file(self) -> Path:
        """The traced layer, what ``layer: auto`` means (trace.out/layer.json)."""
        return self.root / self.trace.out / "layer.json"

    def traced_layer(self) -> int:
        return read_layer(self.layer_file)

    def for_model(self, spec: str) -> "Params":
        """These parameters for the model ``spec``: without rome.layer in the file, the edit layer is that
        model's measured default for the insert (models.EMBEDDED); a model without one needs rome.layer
        (ConfigError)."""
        if not self.layer_default:
            return self
        layer = default_layer(spec, spec_of(self.rome.insert).gated)
        if layer is None:
            raise ConfigError(f"{self.path}: rome.layer: {spec} has no measured default edit layer: "
                              f"set one (a layer index, or auto for the traced layer)")
        return replace(self, rome=replace(self.rome, layer=layer), layer_model=spec)

    def _own_layer(self, p: RomeParams, changes: dict = ()) -> RomeParams:
        """A method's or variant's ROME parameters with the default layer of its own insert, when params.yaml
        sets none and the variant does not either (the gated insert's measured layer differs)."""
        if not self.layer_default or "layer" in changes:
            return p
        layer = default_layer(self.layer_model or self.model, spec_of(p.insert).gated)
        return p if layer is None else replace(p, layer=layer)

    def resolve_manifest(self, manifest):
        """The manifest with every ``layer: auto`` replaced by the traced layer."""
        return manifest.with_auto_layer(self.traced_layer()) if manifest.uses_auto else manifest

    def method(self, name: str):
        """The hyper-parameters of an editor (``rome``, ``rome-r1``: the paper's rank-one insert, nothing
        protected automatically, ``ft``, ``ftl``, ``kn``)."""
        if name == "ftl" and self.ftl.linf is None:
            raise ConfigError(f"{self.path}: ftl.linf: required (the L∞ bound of FT+L)")
        if name not in METHOD_TABLE:
            raise ConfigError(f"--methods: unknown method '{name}' (known: {', '.join(METHOD_TABLE)})")
        method = METHOD_TABLE[name]
        p = method.derive(getattr(self, method.section))
        return self._own_layer(p) if isinstance(p, RomeParams) else p

    def rome_variant(self, spec: str) -> tuple[str, RomeParams]:
        """``--variant NAME:key=value:...``: rome with those fields changed, checked by the rome rules."""
        from .engine.editors import parse_variant, rome_variant

        name, p = rome_variant(spec, self.rome)
        p = self._own_layer(p, parse_variant(spec, self.rome, "rome")[1])
        errors = validate_with(_section_validator("rome"), _plain(p))
        if errors:
            raise ConfigError(f"--variant {spec!r}: rome.{errors[0][0]}: {errors[0][1]}")
        return name, p

    def stack_variant(self, spec: str) -> tuple[str, StackParams]:
        """``bench stack --variant NAME:key=value:...``: a joint solve with those ``stack:`` fields changed
        (``JOINT_FIELDS``), checked by the stack rules."""
        from .engine.editors import parse_variant

        try:
            name, changes = parse_variant(spec, self.stack, "stack", JOINT_FIELDS, ("sum", "joint", "unedited"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        d = {**_plain(self.stack), **changes, "method": "joint"}
        errors = validate_with(_section_validator("stack"), d)
        if errors:
            raise ConfigError(f"--variant {spec!r}: stack.{errors[0][0]}: {errors[0][1]}")
        return name, _build(StackParams, d)

    def with_trace(self, options: dict[str, str], **values) -> "Params":
        """``trace:`` with command-line values (None = keep), validated by the same rules;
        ``options`` maps a field to the option that set it, for messages."""
        changed = {k: v for k, v in values.items() if v is not None}
        d = {**_plain(self.trace), **changed}
        errors = validate_with(_section_validator("trace"), d)
        if errors:
            where, what = errors[0]
            raise ConfigError(f"{options.get(where, 'trace.' + where)}: {what}")
        return replace(self, trace=_build(TraceParams, d))


def _plain(obj) -> dict:
    return {f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v for f in fields(obj)}


# --------------------------------------------------------------------------------------------------
# The schema, completed from the dataclasses
# --------------------------------------------------------------------------------------------------

_DATACLASS_SECTIONS = {("stats",): StatsParams, ("trace",): TraceParams, ("eval",): EvalParams,
                       ("bench", "generation"): GenerationParams,
                       **{(m.section,): m.params for m in METHOD_TABLE.values()}}


def _type_rule(hint) -> dict:
    """A JSON Schema rule from a type annotation (for a dataclass field the schema has no rule for)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_rule(a) for a in args]}
    if origin in (tuple, list):
        return {"type": "array", "items": _type_rule(args[0]) if args else {}}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null", dict: "object"}
    return {"type": simple[hint]} if hint in simple else {}


@cache
def schema() -> dict:
    """schemas/params.schema.json with each dataclass section's properties set to its dataclass's fields."""
    s = json.loads(_schema_text("params"))
    for path, cls in _DATACLASS_SECTIONS.items():
        node = s
        for part in path:
            node = node["properties"][part]
        rules, hints = node.get("properties", {}), typing.get_type_hints(cls)
        node["properties"] = {f.name: rules.get(f.name) or _type_rule(hints[f.name]) for f in fields(cls)}
        node["additionalProperties"] = False
    s["properties"]["rome"]["properties"]["insert"] = {**s["properties"]["rome"]["properties"]["insert"],
                                                       "enum": list(INSERTS)}  # the method table's inserts
    return s


@cache
def _validator() -> jsonschema.protocols.Validator:
    s = schema()
    cls = jsonschema.validators.validator_for(s)
    cls.check_schema(s)
    return cls(s)


@cache
def _section_validator(name: str) -> jsonschema.protocols.Validator:
    s = schema()["properties"][name]
    return jsonschema.validators.validator_for(schema())(s)


def _holds_tuple(hint) -> bool:
    """A field annotated tuple[...] (or X | tuple[...]): YAML's lists become tuples there."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_holds_tuple(a) for a in typing.get_args(hint))
    return origin is tuple


def _build(cls, d: dict | None):
    """``cls(**d)`` with lists turned into the tuples the dataclass holds."""
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if isinstance(v, list) and _holds_tuple(hints[k]):
            d[k] = tuple(v)
    return cls(**d)


# --------------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------------


def _non_finite(data, where: str = "") -> tuple[str, float] | None:
    if isinstance(data, float) and not math.isfinite(data):
        return where, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def parse_params(raw, path: str = "params.yaml", resolve_auto: bool = True) -> Params:
    """The checked Params of a params file's data (``raw``: what safeyaml read)."""
    def fail(where: str, what: str):
        raise ConfigError(f"{path}: {where}: {what}")

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail("(top level)", "must be a mapping of sections")
    errors = validate_with(_validator(), raw)
    if errors:
        where, what = errors[0]
        if what.startswith("unknown field '"):  # name the field itself: rome.learning_rate: unknown field
            key = what[len("unknown field '"):-1]
            where, what = (key if where == "(top level)" else f"{where}.{key}"), "unknown field"
        fail(where, what)
    bad = _non_finite(raw)
    if bad:
        fail(bad[0], f"must be a finite number, got {bad[1]}")
    section = lambda name: raw.get(name) or {}  # noqa: E731 - `rome:` with nothing under it is {}

    rome = dict(section("rome"))
    layer_auto = rome.get("layer") == "auto"
    if rome.get("essence_prompt") is not None and rome["essence_prompt"].count("{}") != 1:
        fail("rome.essence_prompt", "must contain {} exactly once")
    trace = _build(TraceParams, section("trace"))
    p = Params(path=str(path), trace=trace)
    if rome.get("layer") == "default":
        rome.pop("layer")
    layer_default = "layer" not in rome
    if layer_auto:
        rome.pop("layer")
        if resolve_auto:
            try:
                rome["layer"] = read_layer(p.layer_file)
            except (OSError, ValueError) as e:
                fail("rome.layer", f"auto: {e}")

    names = list(raw.get("manifests") or [])
    for i, name in enumerate(names):
        try:
            check_name(name)
        except BadName as e:
            fail(f"manifests[{i}]", str(e))
        if name in names[:i]:
            fail(f"manifests[{i}]", f"'{name}' is listed twice")

    if section("ft").get("linf") is not None:
        fail("ft.linf", "belongs to ftl (FT has no L∞ bound)")
    gate_eval, gate_stack = (section("gate").get(k) or {} for k in ("eval", "stack"))
    bench = section("bench")
    gen = bench.get("generation") or {}
    for i, t in enumerate(gen.get("templates") or []):
        if t.count("{}") != 1:
            fail(f"bench.generation.templates[{i}]", "must contain {} exactly once")
    model = raw.get("model", DEFAULT_MODEL)
    placement = Placement()
    if isinstance(model, dict):
        placement = _build(Placement, {k: v for k, v in model.items() if k != "name"})
        try:
            placement.check(machine=False)
        except ModelError as e:
            fail(*str(e).split(": ", 1))
        model = model["name"]
    out = replace(
        p,
        model=str(model),
        placement=placement,
        stats=_build(StatsParams, section("stats")),
        rome=_build(RomeParams, rome),
        layer_auto=layer_auto,
        manifests=tuple(names),
        processes=raw.get("processes") or 1,
        stack=_build(StackParams, section("stack")),
        eval=_build(EvalParams, section("eval")),
        gate=Gate({k: float(v) for k, v in gate_eval.items()},
                  **{k: None if v is None else float(v) for k, v in gate_stack.items()}),
        ft=_build(FtParams, section("ft")),
        ftl=_build(FtParams, section("ftl")),
        kn=_build(KnParams, section("kn")),
        bench=BenchParams((bench.get("counterfact") or {}).get("records"), (bench.get("zsre") or {}).get("records"),
                          _build(GenerationParams, gen), (bench.get("token_neighbors") or {}).get("k", 5),
                          (bench.get("token_neighbors") or {}).get("facts"),
                          (bench.get("damage") or {}).get("text"), (bench.get("damage") or {}).get("tokens", 256)),
        layer_default=layer_default,
    )
    # the file's own model decides the layer it has not set; a command with another model re-resolves it
    return out.for_model(out.model) if layer_default and default_layer(out.model) is not None else out


def load_params(path: str | Path | None = None, resolve_auto: bool = True) -> Params:
    """Read and check params.yaml. A missing default file (``path`` None) means all defaults; a missing
    named file is an error. ``rome.layer: auto`` is resolved to the traced layer (trace.out/layer.json,
    relative to the file) unless ``resolve_auto`` is False (the commands that compute it)."""
    if path is None:
        path = Path("params.yaml")
        if not path.exists():
            return Params(layer_default=True)  # the default model: its measured layer (RomeParams.layer)
    try:
        raw = safeyaml.load(path, "params file")
    except safeyaml.YamlError as e:
        raise ConfigError(str(e)) from None
    return parse_params(raw, str(path), resolve_auto)


def stage_params(path: str | Path = "params.yaml", resolve_auto: bool = True) -> Params:
    """load_params for the DVC stage scripts: a bad file ends the stage with one line, not a traceback."""
    try:
        return load_params(path, resolve_auto)
    except ConfigError as e:
        raise SystemExit(f"Error: {e}") from None


# --------------------------------------------------------------------------------------------------
# Layers vs the model, before its weights are loaded
# --------------------------------------------------------------------------------------------------


def check_layers(count: int | None, uses: list[tuple[str, int]]) -> None:
    """``uses``: (where, layer) pairs, e.g. ('params.yaml: rome.layer', 5); ``count``: the model's number
    of layers (None: unknown, not checked)."""
    if count is None:
        return
    for where, layer in uses:
        if not 0 <= layer < count:
            raise ConfigError(f"{where}: must be a layer of the model, 0 to {count - 1}, got {layer}")

