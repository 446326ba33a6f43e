"""Second-moment statistics C = E[k kᵀ] of the edited module's input (the keys) over generic text.

C is what makes ROME's update minimal: Eq. 2 spreads the change along C⁻¹k*, the direction that
disturbs the other keys least. It is estimated once per (model, layer, corpus, token count) and
cached as safetensors with its provenance in the header.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import __version__
from ..io import atomic_path, check_input
from .models import LoadedModel, edited_module_name, keys_at, sha256_file, weight_shape
from .prompts import pad

WIKI_EXCERPT = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Corpus:
    id: str  # human-readable name
    sha256: str  # of the raw files: the cache key and the provenance
    documents: Callable[[], Iterator[str]]  # plain-text documents, in a fixed order


def wikipedia_corpus() -> Corpus:
    """The English Wikipedia excerpt shipped in the gensim wheel, cleaned of wiki markup."""
    import gensim

    path = Path(gensim.__file__).parent / WIKI_EXCERPT

    def documents() -> Iterator[str]:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        with bz2.BZ2File(path) as f:
            for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
                clean = filter_wiki(text).replace("'''", "").replace("''", "")
                if clean.lstrip().upper().startswith("#REDIRECT"):
                    continue
                paragraphs = [p.strip() for p in re.split(r"\n\s*\n", clean) if len(p.strip()) > 40]
                if paragraphs:
                    yield "\n".join(paragraphs)

    return Corpus("wikipedia-gensim-excerpt", sha256_file(path), documents)


def text_files_corpus(paths: Iterable[str | os.PathLike]) -> Corpus:
    """User-supplied plain-text files, one document each, in the order given."""
    paths = [Path(p) for p in paths]
    h = hashlib.sha256()
    for p in paths:
        check_input(p, "corpus file")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: corpus file not found")
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())

    def documents() -> Iterator[str]:
        for p in paths:
            yield p.read_text(encoding="utf-8", errors="replace")

    return Corpus("files:" + ",".join(p.name for p in paths), h.hexdigest(), documents)


def hf_dataset_corpus(folder: str | os.PathLike, column: str = "text") -> Corpus:
    """A Hugging Face ``datasets`` folder (written by ``Dataset.save_to_disk``; needs the optional
    ``datasets`` package): one document per row of its ``text`` column, in row order. Its sha256 is over
    the folder's files (relative name and content)."""
    folder = Path(folder)
    try:
        import datasets  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError(f"{folder}: a datasets folder needs the package `datasets` (pip install datasets)") from None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}:{sha256_file(p)}\n".encode())

    def documents() -> Iterator[str]:
        from datasets import load_from_disk

        data = load_from_disk(str(folder))
        if hasattr(data, "keys"):  # a DatasetDict: its splits in name order
            data = [data[k] for k in sorted(data.keys())]
        else:
            data = [data]
        for split in data:
            if column not in split.column_names:
                raise ValueError(f"{folder}: no column '{column}' (columns: {', '.join(split.column_names)})")
            for text in split[column]:
                yield text

    return Corpus(f"datasets:{folder.name}", h.hexdigest(), documents)


def corpus_from(spec: str | tuple[str, ...] | list[str]) -> Corpus:
    """``stats.corpus``: 'wikipedia' (the gensim excerpt), or paths: plain-text files, or one Hugging Face
    ``datasets`` folder (a directory)."""
    if spec == "wikipedia":
        return wikipedia_corpus()
    paths = [spec] if isinstance(spec, str) else list(spec)
    folders = [p for p in paths if Path(p).is_dir()]
    if folders:
        if len(paths) != 1:
            raise ValueError(f"{folders[0]}: a datasets folder must be the only corpus entry")
        return hf_dataset_corpus(folders[0])
    return text_files_corpus(paths)


def token_rows(lm: LoadedModel, corpus: Corpus, n_tokens: int, seq_len: int) -> Iterator[list[int]]:
    """Pack the corpus into rows of ``seq_len`` text tokens (plus <bos> where the model uses one).

    Stops after exactly ``n_tokens`` text tokens; raises if the corpus is too short.
    """
    if n_tokens <= 0:
        raise ValueError(f"the number of tokens must be positive, got {n_tokens}")
    tok = lm.tokenizer
    head = [tok.bos_token_id] if lm.adds_bos else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    buffer: list[int] = []
    left = n_tokens
    for doc in corpus.documents():
        buffer += tok(doc, add_special_tokens=False).input_ids + eos
        while len(buffer) >= seq_len and left > 0:
            take = min(seq_len, left)
            yield head + buffer[:take]
            buffer, left = buffer[seq_len:], left - take
        if left == 0:
            return
    if left > 0 and buffer:
        take = min(len(buffer), left)
        yield head + buffer[:take]
        left -= take
    if left > 0:
        raise ValueError(f"corpus {corpus.id} has only {n_tokens - left} tokens, {n_tokens} asked for")


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel statistics run: token-row batches b with b % world == rank.

    ``reduce`` sums tensors over the processes (torch.distributed's all-reduce; the default, for one
    process, is the identity). ``checkpoint``: a file for the partial sums, or None for no checkpoints.
    """

    rank: int = 0
    world: int = 1
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


def _partial_meta(lm: LoadedModel, layers: list[int], corpus: "Corpus", n_tokens: int, seq_len: int,
                  batch_size: int, shard: Shard) -> dict:
    """What a partial sum is a partial sum of: a checkpoint is resumed only when all of it matches."""
    return {"format": "romeflow.stats-partial/1", "model_fingerprint": lm.fingerprint, "layers": layers,
            "dtype": str(lm.dtype), "corpus_sha256": corpus.sha256, "tokens": n_tokens, "seq_len": seq_len,
            "batch_size": batch_size, "rank": shard.rank, "world": shard.world}


def _load_partial(path: Path | None, want: dict) -> tuple[dict[int, torch.Tensor], int, int] | None:
    """(sums, tokens counted, batches done) from a checkpoint of the same run, else None."""
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("romeflow", "{}"))
            if meta.get("run") != want:
                return None
            sums = {int(k.removeprefix("sum.")): f.get_tensor(k) for k in f.keys()}
        return sums, int(meta["counted"]), int(meta["batches"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is recomputed, never trusted
        return None


def _save_partial(path: Path, run: dict, sums: dict, counted: int, batches: int) -> None:
    tensors = {f"sum.{l}": s.detach().cpu().contiguous() for l, s in sums.items() if isinstance(s, torch.Tensor)}
    meta = {"run": run, "counted": counted, "batches": batches}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"romeflow": json.dumps(meta)})


@torch.no_grad()
def second_moments(lm: LoadedModel, layers: list[int], corpus: Corpus, n_tokens: int,
                   seq_len: int = 256, batch_size: int = 8, progress: bool = True, shard: Shard = Shard(),
                   checkpoint: Path | None = None, checkpoint_seconds: float = 60.0) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] for every layer l in ``layers``, in one pass over the corpus.

    k is the input of the edited module W_proj (d_in,). Every text token counts once; <bos> and
    padding do not. The sums Σ k kᵀ accumulate in float32 (on the keys' device) whatever the model's
    dtype. Returns {l: (d_in, d_in)} float32, on the host.

    Data parallel: with a ``shard`` this process runs only its batches, and the sums and the count are
    then all-reduced, so every process gets the C of the whole corpus (equal to one process's up to
    the order of the float32 sums). Resumable: with ``checkpoint`` the partial sums are written there
    (atomically) every ``checkpoint_seconds``; a later run of the same statistics starts from them and
    removes the file when done.
    """
    run = _partial_meta(lm, layers, corpus, n_tokens, seq_len, batch_size, shard)
    resumed = _load_partial(checkpoint, run)
    sums, counted, done = resumed if resumed else ({}, 0, 0)
    skip = 1 if lm.adds_bos else 0
    rows = token_rows(lm, corpus, n_tokens, seq_len)
    last_save = time.monotonic()
    desc = "second moments" + (f" (rank 0 of {shard.world}, ×{shard.world})" if shard.world > 1 else "")
    with tqdm(total=n_tokens, initial=min(n_tokens, counted * shard.world), unit="tok", desc=desc,
              disable=not progress or shard.rank != 0, leave=False, smoothing=0.1) as bar:
        index = 0
        while batch := [r for _, r in zip(range(batch_size), rows)]:
            index += 1
            if index <= done or not shard.owns(index - 1):
                continue  # counted before the interruption, or another process's batch
            b = pad(batch, lm.tokenizer.pad_token_id)
            counts = b.attention_mask.bool()  # (B, T): the positions that enter C
            counts[:, :skip] = False
            for l, k in keys_at(lm.model, layers, b.input_ids, b.attention_mask).items():
                k = k[counts.to(k.device)].float()  # (n, d_in)
                sums[l] = sums[l] + k.T @ k if l in sums else k.T @ k  # (d_in, d_in)
            counted += int(counts.sum())
            done = index
            bar.update(int(counts.sum()) * shard.world)
            if checkpoint is not None and time.monotonic() - last_save >= checkpoint_seconds:
                _save_partial(checkpoint, run, sums, counted, done)
                last_save = time.monotonic()
    d_in = {l: weight_shape(lm.model, edited_module_name(lm.model, l))[1] for l in layers}
    totals = [sums.get(l, torch.zeros(d_in[l], d_in[l])).cpu() for l in layers]  # (a process may own no batch)
    count = torch.tensor([counted], dtype=torch.float64)
    if shard.reduce is not None:
        *totals, count = shard.reduce(totals + [count])
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return {l: total / float(count[0]) for l, total in zip(layers, totals)}


# --------------------------------------------------------------------------------------------------
# Files and the cache
# --------------------------------------------------------------------------------------------------

STATS_FORMAT = "romeflow.stats/1"


@dataclass
class Stats:
    second_moment: torch.Tensor  # (d_in, d_in) float32
    meta: dict
    sha256: str  # of the file: what deltas record as their provenance

    @property
    def layer(self) -> int:
        return self.meta["layer"]


def stats_meta(lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int, seq_len: int) -> dict:
    return {"format": STATS_FORMAT, "model": lm.name, "model_fingerprint": lm.fingerprint, "layer": layer,
            "module": edited_module_name(lm.model, layer), "corpus_id": corpus.id,
            "corpus_sha256": corpus.sha256, "tokens": n_tokens, "seq_len": seq_len,
            "romeflow_version": __version__, **_dtype_field(lm)}


def _dtype_field(lm: LoadedModel) -> dict:
    """{"dtype": ...} for a model in low precision (its keys are rounded: other statistics); {} for float32."""
    dtype = str(lm.dtype).removeprefix("torch.")
    return {} if dtype == "float32" else {"dtype": dtype}


MAX_STATS_DIM = 65536  # d_in of the edited module


def tensor_sha256(c: torch.Tensor) -> str:
    """sha256 of the second-moment tensor: dtype and shape, then its bytes."""
    c = c.detach().cpu().contiguous()
    h = hashlib.sha256(f"second_moment|{str(c.dtype).removeprefix('torch.')}|{tuple(c.shape)}|".encode())
    h.update(c.numpy().tobytes())
    return h.hexdigest()


def save_stats(path: str | os.PathLike, second_moment: torch.Tensor, meta: dict) -> Stats:
    """Write (atomically) with the tensor's sha256 in the metadata; return the file as load_stats reads it."""
    c = second_moment.detach().float().cpu().contiguous()
    meta = {**meta, "tensor_sha256": tensor_sha256(c)}
    with atomic_path(path) as tmp:
        save_file({"second_moment": c}, tmp, metadata={"romeflow": json.dumps(meta, sort_keys=True)})
    return load_stats(path)


def _check_meta(path: Path, meta) -> None:
    def bad(field: str, what: str):
        raise ValueError(f"{path}: {field}: {what}")

    if not isinstance(meta, dict):
        bad("metadata", "not an object")
    if meta.get("format") != STATS_FORMAT:
        bad("format", f"{meta.get('format')!r} is not {STATS_FORMAT}")
    for key, kind in (("layer", int), ("tokens", int), ("seq_len", int), ("model", str),
                      ("model_fingerprint", str), ("module", str), ("corpus_id", str), ("corpus_sha256", str)):
        v = meta.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0) or (kind is str and len(v) > 1000):
            bad(key, f"missing or not {'a non-negative integer' if kind is int else 'a string'}")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["model_fingerprint"]):
        bad("model_fingerprint", "not a sha256")
    if "tensor_sha256" in meta and not (isinstance(meta["tensor_sha256"], str)
                                        and re.fullmatch(r"[0-9a-f]{64}", meta["tensor_sha256"])):
        bad("tensor_sha256", "not a sha256")


def load_stats(path: str | os.PathLike) -> Stats:
    """Read and check a statistics file: metadata fields, one float32 (d, d) tensor, finite, symmetric,
    non-negative diagonal, and its sha256 against the metadata's ``tensor_sha256`` (files written
    before that field existed are accepted without it). Problems are ValueErrors, one line."""
    path = check_input(path, "statistics file")  # a FIFO, a link loop: said, never opened
    if not path.is_file():
        raise FileNotFoundError(f"{path}: statistics file not found")
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("romeflow")
            if text is None or len(text) > 1 << 20:
                raise ValueError("no romeflow metadata" if text is None else "metadata over 1 MiB")
            meta = json.loads(text)
            keys = sorted(f.keys())
            if keys != ["second_moment"]:
                raise ValueError(f"tensors {keys}, expected only second_moment")
            shape = f.get_slice("second_moment").get_shape()
            if len(shape) != 2 or shape[0] != shape[1] or not 0 < shape[0] <= MAX_STATS_DIM:
                raise ValueError(f"second_moment: shape {tuple(shape)}, expected (d, d) with d <= {MAX_STATS_DIM}")
            c = f.get_tensor("second_moment")
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a romeflow statistics file ({first})") from e
    _check_meta(path, meta)
    if c.dtype != torch.float32:
        raise ValueError(f"{path}: second_moment: dtype {str(c.dtype).removeprefix('torch.')}, not float32")
    if not torch.isfinite(c).all():
        raise ValueError(f"{path}: second_moment: holds NaN or infinite values")
    scale = c.abs().max().item()
    if (c.diagonal() < 0).any() or (c - c.T).abs().max().item() > 1e-4 * max(scale, 1e-30):
        raise ValueError(f"{path}: second_moment: not a second moment (asymmetric or a negative diagonal)")
    if "tensor_sha256" in meta and tensor_sha256(c) != meta["tensor_sha256"]:
        raise ValueError(f"{path}: tensor_sha256: does not match the tensor (changed after it was written)")
    return Stats(c, meta, sha256_file(path))


def cached_stats_path(cache: Path, lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int) -> Path:
    dtype = "".join(f"-{v}" for v in _dtype_field(lm).values())  # float32: the name it always had
    return cache / "stats" / f"{lm.fingerprint[:16]}-L{layer}-{corpus.sha256[:12]}-{n_tokens}{dtype}.safetensors"


def partial_path(cache: Path, lm: LoadedModel, layers: list[int], corpus: Corpus, n_tokens: int,
                 shard: Shard = Shard()) -> Path:
    """The checkpoint of an unfinished statistics run (one per process), beside the cache's files."""
    first = cached_stats_path(cache, lm, layers[0], corpus, n_tokens)
    tag = "-".join(f"L{l}" for l in layers)
    return first.with_name(f"partial-{first.stem}-{tag}-rank{shard.rank}of{shard.world}.safetensors")


def get_stats(lm: LoadedModel, layers: list[int], corpus: Corpus, n_tokens: int, cache: Path,
              seq_len: int = 256, progress: bool = True, shard: Shard = Shard(),
              checkpoint_seconds: float = 60.0) -> dict[int, Stats]:
    """Statistics for each layer: from the cache when (model, layer, corpus, tokens) match, else computed
    (all missing layers in one pass; resumable from the cache's checkpoint of an interrupted run) and
    cached. In a data-parallel run every process computes its share; only rank 0 writes, and the other
    ranks get {}."""
    paths = {l: cached_stats_path(cache, lm, l, corpus, n_tokens) for l in layers}
    missing = [l for l, p in paths.items() if not p.exists()]
    if missing:
        checkpoint = partial_path(cache, lm, missing, corpus, n_tokens, shard)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        computed = second_moments(lm, missing, corpus, n_tokens, seq_len, progress=progress, shard=shard,
                                  checkpoint=checkpoint, checkpoint_seconds=checkpoint_seconds)
        if shard.rank != 0:
            return {}
        for l in missing:
            save_stats(paths[l], computed[l], stats_meta(lm, l, corpus, n_tokens, seq_len))
    if shard.rank != 0:
        return {}
    return {l: load_stats(p) for l, p in paths.items()}
