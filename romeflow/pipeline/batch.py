"""Many deltas at once: the model loaded once per process, the stale deltas shared over N processes.

    romeflow apply-all [NAME ...] [--processes N]           # the DVC stage `edit` (stages/edit.py)
    torchrun --nproc-per-node N -m romeflow.cli apply-all    # or accelerate launch: the launcher's processes

A delta is a function of its inputs: the manifest file, the model (fingerprint, dtype), the ROME
hyper-parameters and layers, the statistics, the statistics' corpus (the gated insert reads it), the
reference-name files of ``rome.protect_sources``, the deltas it was applied ``--onto`` and the source
of the engine (``EDIT_SOURCES``). ``inputs_sha256`` hashes them and the delta records it in its
metadata, so each manifest's delta is, before anything is computed:

    up to date       deltas/NAME.safetensors records the same inputs: kept as it is
    from the cache   <cache>/deltas/<key>.safetensors has it (key: inputs, threads, device): copied
    to compute       otherwise

The deltas to compute are split statically over the processes: sorted by name, rank r computes the
r-th, (r+N)-th, ... (no scheduler). Each rank writes each delta as soon as it is computed, atomically
(``io.atomic_path``) into deltas/ and into the cache: a killed run leaves whole deltas or none, and the
next run computes only what is still missing. A delta's bytes do not depend on which rank computed it
or on how many there were: the same thread count (recorded in the delta) and device type give the
same bytes as a one-process run (or ``romeflow apply``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..engine.models import LoadedModel, Placement, load_model, sha256_file
from ..engine.protect import WIKIPEDIA
from ..engine.rome import RomeParams
from ..engine.statistics import Stats, corpus_from, load_stats
from ..io import atomic_path
from .deltas import Delta, DeltaError, compute_delta, load_delta, save_delta
from .manifests import Manifest

# The romeflow files whose code computes a delta (dvc.yaml's `edit` stage depends on exactly these).
EDIT_SOURCES = (
    "romeflow/engine/rome.py",
    "romeflow/engine/inserts.py",
    "romeflow/engine/gated.py",
    "romeflow/engine/forwards.py",
    "romeflow/engine/margins.py",
    "romeflow/engine/protect.py",
    "romeflow/engine/models.py",
    "romeflow/engine/hooks.py",
    "romeflow/engine/prompts.py",
    "romeflow/evaluation/scoring.py",  # the before/after probabilities in the delta's metadata
    "romeflow/pipeline/deltas.py",
    "romeflow/pipeline/neurons.py",
    "romeflow/pipeline/manifests.py",
    "romeflow/pipeline/batch.py",
)


@lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 over EDIT_SOURCES (path and content of each, in that order)."""
    root = Path(__file__).resolve().parent.parent.parent
    h = hashlib.sha256()
    for rel in EDIT_SOURCES:
        h.update(f"{rel}:{sha256_file(root / rel)}\n".encode())
    return h.hexdigest()


def protect_hashes(sources: tuple[str, ...], root: Path) -> dict[str, str]:
    """{source: sha256 of the file} for ``rome.protect_sources`` (relative to ``root``); the Wikipedia
    names by name (they come with the installed gensim)."""
    return {s: WIKIPEDIA if s == WIKIPEDIA else sha256_file(root / s) for s in sources}


def inputs_sha256(manifest: Manifest, rome: RomeParams, layers: list[int], fingerprint: str, dtype: str,
                  stats: dict[int, Stats], corpus_sha256: str | None, protect: dict[str, str],
                  onto: list[str] = ()) -> str:
    """The sha256 of everything a manifest's delta is computed from (module docstring). ``layers``: the
    layer of each edit; ``onto``: the tensors_sha256 of the --onto deltas."""
    record = {"manifest": {"name": manifest.name, "sha256": manifest.sha256}, "layers": list(layers),
              "model": {"fingerprint": fingerprint, "dtype": dtype}, "rome": rome.to_dict(),
              "stats": {str(l): stats[l].sha256 for l in sorted(set(layers))}, "corpus": corpus_sha256,
              "protect_sources": protect, "onto": list(onto), "source": source_sha256(), "romeflow": __version__}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One manifest's delta: where it goes and the sha256 of its inputs."""

    manifest: Manifest
    out: Path
    inputs: str

    @property
    def name(self) -> str:
        return self.manifest.name


def cache_file(folder: Path, job: Job, threads: int, device: str) -> Path:
    """Where the cache keeps this delta: its inputs, thread count and device type decide its bytes."""
    key = hashlib.sha256(f"{job.inputs}|threads={threads}|device={device}".encode()).hexdigest()
    return folder / f"{key}.safetensors"


def _records(path: Path, inputs: str) -> bool:
    """Whether ``path`` is a valid delta computed from ``inputs``."""
    if not path.is_file():
        return False
    try:
        return load_delta(path).meta.get("inputs_sha256") == inputs
    except DeltaError:
        return False  # damaged or not a delta: computed again


@dataclass
class Plan:
    fresh: list[Job]  # up to date
    cached: list[Job]  # in the cache
    compute: list[Job]  # sorted by name: the order the ranks split


def plan(jobs: list[Job], cache: Path, threads: int, device: str) -> Plan:
    fresh = [j for j in jobs if _records(j.out, j.inputs)]
    rest = [j for j in jobs if j not in fresh]
    cached = [j for j in rest if _records(cache_file(cache, j, threads, device), j.inputs)]
    return Plan(fresh, cached, sorted((j for j in rest if j not in cached), key=lambda j: j.name))


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def restore(jobs: list[Job], cache: Path, threads: int, device: str) -> None:
    """Copy cached deltas to their outputs."""
    for j in jobs:
        copy_atomic(cache_file(cache, j, threads, device), j.out)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compute_share(lm: LoadedModel, jobs: list[Job], rank: int, world: int, rome: RomeParams,
                  stats: dict[int, Stats], root: Path, corpus, cache: Path, device: str,
                  log: Callable[[str], None] = say) -> int:
    """Compute this rank's deltas (jobs[rank::world]); write each into its output, then into the cache
    (``device``: the placement's device type, part of the cache key). One line per delta:
    ``computed NAME in S s (rank r of N)`` (S: compute_delta's own time)."""
    threads = torch.get_num_threads()
    mine = jobs[rank::world]
    for job in mine:
        t = time.perf_counter()
        delta: Delta = compute_delta(lm, job.manifest, rome, stats, root=root, corpus=corpus)
        seconds = time.perf_counter() - t
        delta.meta["inputs_sha256"] = job.inputs
        save_delta(job.out, delta)
        copy_atomic(job.out, cache_file(cache, job, threads, device))
        log(f"computed {job.name} in {seconds:.2f} s (rank {rank} of {world}) -> {job.out}")
    return len(mine)


def rank_worker(rank: int, world: int, spec: str, model_cache: str | None, placement: Placement, threads: int,
                stats_files: dict[int, str], jobs: list[Job], rome: RomeParams, root: Path, corpus_spec,
                cache: Path, device: str) -> None:
    """Ranks 1..N-1 of ``romeflow apply-all --processes N`` (spawned by engine.parallel.Ranks): load the
    model and the statistics, compute this rank's share, then join rank 0's final all-reduce. A user
    error ends the process with one line on stderr and exit status 1 (rank 0 reports the rank)."""
    from ..engine.parallel import rank_placement

    torch.set_num_threads(threads)
    try:
        lm = load_model(spec, model_cache, placement=rank_placement(placement, rank))
        stats = {int(l): load_stats(p) for l, p in stats_files.items()}
        done = compute_share(lm, jobs, rank, world, rome, stats, root, corpus_from(corpus_spec), cache, device)
    except (ValueError, OSError) as e:
        say(f"Error: (rank {rank} of {world}) {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise SystemExit(1) from None
    finish(done)


def run(jobs: list[Job], rank: int, world: int, launched: bool, load: Callable[[], LoadedModel], rome: RomeParams,
        stats: dict[int, Stats], root: Path, corpus, cache: Path, device: str,
        spawn_args: tuple = ()) -> tuple[Plan, int, int]:
    """apply-all on this rank: plan (rank 0's plan, broadcast under a launcher), copy the cached deltas (rank
    0), compute this rank's share, and add up the ranks' counts. ``launched``: the process group is the
    launcher's (already initialised); else with ``world`` > 1 this process is rank 0 and spawns ranks
    1..N-1 (``rank_worker``, with ``spawn_args``: spec, model cache, placement, stats files, corpus spec).
    ``load`` loads the model, only if something is computed here; no more processes are spawned than there
    are deltas to compute. Returns (plan, deltas computed, processes that computed them)."""
    import torch.distributed as dist

    from ..engine.parallel import Ranks

    threads = torch.get_num_threads()
    todo = plan(jobs, cache, threads, device)
    if launched:
        shared = [todo]
        dist.broadcast_object_list(shared, src=0)  # rank 0's plan: the split every rank follows
        todo = shared[0]
    if rank == 0:
        restore(todo.cached, cache, threads, device)
    if not todo.compute:
        return todo, 0, world if launched else 1
    if not launched:
        world = min(world, len(todo.compute))
    if launched or world == 1:
        done = compute_share(load(), todo.compute, rank, world, rome, stats, root, corpus, cache, device)
        return todo, finish(done) if launched else done, world
    spec, model_cache, placement, stats_files, corpus_spec = spawn_args
    with Ranks(world, rank_worker, (spec, model_cache, placement, threads, stats_files, todo.compute, rome, root,
                                    corpus_spec, cache, device), what="apply-all process") as ranks:
        done = compute_share(load(), todo.compute, 0, world, rome, stats, root, corpus, cache, device)
        return todo, finish(done, ranks.alive), world


def finish(done: int, alive: Callable[[], None] = lambda: None) -> int:
    """The all-reduce every rank ends with (gloo): the number of deltas computed over all ranks. Rank 0
    passes ``alive`` (engine.parallel.Ranks.alive), which raises if a spawned rank failed meanwhile."""
    from ..engine.parallel import _reducer

    (total,) = _reducer("gloo", torch.device("cpu"), alive)([torch.tensor([float(done)])])
    return int(total.item())
