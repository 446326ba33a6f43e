"""params.yaml: the single source of hyper-parameters (model, statistics, ROME)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .models import DEFAULT_MODEL
from .rome import RomeParams
from .statistics import Corpus, text_files_corpus, wikipedia_corpus
from .tracing import TraceParams, read_layer


class ConfigError(ValueError):
    """An invalid params file; str(error) is the one-line message for the user."""


@dataclass(frozen=True)
class StatsParams:
    corpus: str | tuple[str, ...] = "wikipedia"  # 'wikipedia' (the gensim excerpt) or text files
    tokens: int = 100_000
    seq_len: int = 256

    def corpus_source(self) -> Corpus:
        if self.corpus == "wikipedia":
            return wikipedia_corpus()
        return text_files_corpus([self.corpus] if isinstance(self.corpus, str) else self.corpus)


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    stats: StatsParams = field(default_factory=StatsParams)
    rome: RomeParams = field(default_factory=RomeParams)
    raw: dict = field(default_factory=dict)  # the whole file, for sections other modules own
    trace: TraceParams = field(default_factory=TraceParams)
    layer_file: Path = Path(TraceParams.out) / "layer.json"  # the traced layer, what `layer: auto` means
    layer_auto: bool = False  # rome.layer is `auto` (rome.layer then holds the traced layer)

    def traced_layer(self) -> int:
        """The layer `layer: auto` resolves to (reports/trace/layer.json, written by the trace stage)."""
        return read_layer(self.layer_file)

    def resolve_manifest(self, manifest):
        """The manifest with every `layer: auto` replaced by the traced layer."""
        return manifest.with_auto_layer(self.traced_layer()) if manifest.uses_auto else manifest


def load_settings(path: str | Path | None, resolve_auto: bool = True) -> Settings:
    """Read params.yaml; a missing default file means all defaults, a missing named file is an error.

    ``rome.layer: auto`` is resolved here to the traced layer (``trace.out``/layer.json, relative to
    the params file); with ``resolve_auto=False`` (the commands that compute it) it is left at the
    default and ``layer_auto`` is set.
    """
    if path is None:
        path = Path("params.yaml")
        if not path.exists():
            return Settings()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    try:
        stats_raw = dict(raw.get("stats") or {})
        unknown = set(stats_raw) - {f.name for f in fields(StatsParams)}
        if unknown:
            raise ValueError(f"unknown field '{sorted(unknown)[0]}'")
        if isinstance(stats_raw.get("corpus"), list):
            stats_raw["corpus"] = tuple(stats_raw["corpus"])
        stats = StatsParams(**stats_raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: stats: {e}") from e
    try:
        trace = TraceParams.from_dict(raw.get("trace"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: trace: {e}") from e
    layer_file = path.parent / trace.out / "layer.json"
    rome_raw = dict(raw.get("rome") or {})
    layer_auto = rome_raw.get("layer") == "auto"
    if layer_auto:
        rome_raw.pop("layer")
        if resolve_auto:
            try:
                rome_raw["layer"] = read_layer(layer_file)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: rome.layer: auto: {e}") from e
    try:
        rome = RomeParams.from_dict(rome_raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: rome: {e}") from e
    return Settings(str(raw.get("model", DEFAULT_MODEL)), stats, rome, raw, trace, layer_file, layer_auto)


def stage_settings(path: str | Path = "params.yaml", resolve_auto: bool = True) -> Settings:
    """load_settings for the DVC stage scripts: a bad file (or `layer: auto` before the trace stage ran)
    ends the stage with one line on stderr, as the CLI does, not a traceback."""
    try:
        return load_settings(path, resolve_auto)
    except ConfigError as e:
        raise SystemExit(f"Error: {e}") from None
