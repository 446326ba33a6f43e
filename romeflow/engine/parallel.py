"""N processes with torch.distributed: data-parallel statistics, and the deltas of `romeflow apply-all`.

Two ways to get N processes, the same computation in both:

    romeflow stats --processes N          # this process is rank 0 and spawns ranks 1..N-1 itself (Ranks)
    accelerate launch -m romeflow.cli stats   # or torchrun: the launcher starts them (WORLD_SIZE, RANK)

Statistics (``statistics.second_moments`` with a ``Shard``): each process loads the model, runs the
batches b with b % N == rank, and the float32 sums (and the token count, in float64) are summed over the
processes with torch.distributed: gloo on the CPU, NCCL when every process has a GPU (process r on
cuda:r). Rank 0 alone writes the statistics, with the same provenance as a one-process run; they equal
its result up to the order of the float32 sums.

`romeflow apply-all --processes N` (pipeline/batch.py) uses the same ``Ranks``: each process computes
its own deltas; only a count is all-reduced at the end (gloo).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .models import Placement, load_model
from .statistics import Shard, corpus_from, get_stats

TIMEOUT = timedelta(hours=6)  # a process that waits longer than this for the others gives up


def _backend(placement: Placement) -> str:
    return "nccl" if placement.torch_device().type == "cuda" and placement.device_map is None else "gloo"


def rank_placement(placement: Placement, local_rank: int) -> Placement:
    """Process r on its own GPU (cuda:r) when the model runs on CUDA; otherwise unchanged."""
    if placement.device_map is None and placement.torch_device().type == "cuda":
        return replace(placement, device=f"cuda:{local_rank % torch.cuda.device_count()}")
    return placement


def _reducer(backend: str, device: torch.device, alive: Callable[[], None] = lambda: None):
    """Sum tensors over all processes; ``alive`` is called while waiting (it raises if a process died)."""
    def reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        on = [t.to(device) if backend == "nccl" else t.cpu() for t in tensors]
        works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in on]
        while not all(w.is_completed() for w in works):
            alive()
            time.sleep(0.05)
        for w in works:
            w.wait()
        return [t.cpu() for t in on]
    return reduce


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of a process started by ``accelerate launch`` / ``torchrun``
    (WORLD_SIZE > 1); None otherwise. The process group is not initialised here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def launched_shard(placement: Placement) -> tuple[Shard, Placement] | None:
    """The shard of a process started by ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1), with the
    process group initialised and the process's own GPU; None when not launched that way."""
    found = launched()
    if found is None:
        return None
    rank, world, local = found
    placement = rank_placement(placement, local)
    backend = _backend(placement)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    return Shard(rank, world, _reducer(backend, placement.torch_device())), placement


class RankFailed(RuntimeError):
    """A spawned rank ended with an error (its own message is on its stderr)."""


def _joined(index: int, world: int, folder: str, backend: str, target: Callable, args: tuple) -> None:
    """A spawned rank (index + 1): say so (rank 0 waits for that, watching for a rank that died first),
    join the process group, run ``target(rank, world, *args)``, leave."""
    rank = index + 1
    Path(folder, f"started-{rank}").touch()
    dist.init_process_group(backend, init_method=Path(folder, "init").as_uri(), rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        target(rank, world, *args)
    finally:
        dist.destroy_process_group()


class Ranks:
    """N processes with one torch.distributed process group: ranks 1..N-1 spawned, each running
    ``target(rank, world, *args)`` (a module-level function), and this process joined as rank 0.

    Use as a context manager around rank 0's own share of the work; on the way out the spawned ranks
    are joined (or, after an error, terminated). ``alive()`` raises once a spawned rank has failed: call
    it while waiting for them. The spawned processes get SIGINT if this one dies (torch's spawn sets
    their parent-death signal), so a killed run leaves no process behind.
    """

    def __init__(self, n: int, target: Callable, args: tuple, backend: str = "gloo", what: str = "process"):
        import torch.multiprocessing as mp

        self.world, self.backend, self.what = n, backend, what  # what: the processes, in a failed rank's message
        self._folder = tempfile.mkdtemp(prefix="romeflow-dist-")  # the file:// rendezvous: no port to choose
        self.context = mp.start_processes(_joined, args=(n, self._folder, backend, target, args), nprocs=n - 1,
                                          join=False, start_method="spawn")
        try:
            while not all(Path(self._folder, f"started-{r}").exists() for r in range(1, n)):
                self.alive()  # a rank that dies before joining would leave rank 0 waiting for it
                time.sleep(0.05)
            dist.init_process_group(backend, init_method=Path(self._folder, "init").as_uri(), rank=0, world_size=n,
                                    timeout=TIMEOUT)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def alive(self) -> None:
        for i, p in enumerate(self.context.processes):
            if p.exitcode not in (None, 0):
                raise RankFailed(f"{self.what} rank {i + 1} failed (exit code {p.exitcode})")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                while not self.context.join():
                    pass
            else:
                for p in self.context.processes:
                    if p.is_alive():
                        p.terminate()
                for p in self.context.processes:
                    p.join(30)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            import shutil

            shutil.rmtree(self._folder, ignore_errors=True)


def _stats_worker(rank: int, world: int, spec: str, cache: str | None, placement: Placement, layers: list[int],
                  corpus_spec, n_tokens: int, seq_len: int, threads: int, checkpoint_seconds: float) -> None:
    """Ranks 1..N-1 of ``romeflow stats --processes N``."""
    from .models import cache_dir

    torch.set_num_threads(threads)
    placement = rank_placement(placement, rank)
    lm = load_model(spec, cache, placement=placement)
    shard = Shard(rank, world, _reducer(_backend(placement), placement.torch_device()))
    get_stats(lm, layers, corpus_from(corpus_spec), n_tokens, cache_dir(cache), seq_len, progress=False,
              shard=shard, checkpoint_seconds=checkpoint_seconds)


class Spawned(Ranks):
    """``romeflow stats --processes N``: ranks 1..N-1 spawned, this process joined as rank 0.

    Use as a context manager around rank 0's own ``get_stats(..., shard=spawned.shard)``; on the way
    out the workers are joined (or, after an error, terminated).
    """

    def __init__(self, n: int, spec: str, cache: str | None, placement: Placement, layers: list[int],
                 corpus_spec, n_tokens: int, seq_len: int, threads: int, checkpoint_seconds: float = 60.0):
        self.placement = rank_placement(placement, 0)
        backend = _backend(self.placement)
        super().__init__(n, _stats_worker, (spec, cache, placement, layers, corpus_spec, n_tokens, seq_len, threads,
                                            checkpoint_seconds), backend, "statistics process")
        self.shard = Shard(0, n, _reducer(backend, self.placement.torch_device(), self.alive))
