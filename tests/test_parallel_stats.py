"""Data-parallel and resumable statistics: N processes equal one; an interrupted run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from romeflow.engine import statistics
from romeflow.engine.statistics import Shard, get_stats, load_stats, partial_path, second_moments

from conftest import EDIT_LAYER, STATS_TOKENS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_two_processes_equal_one_with_the_same_provenance(tmp_path, model_dir):
    from test_workflow import cli, make_project

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    r = cli(root, "stats", "--out", "one.safetensors")
    assert r.exit_code == 0, r.output
    (root.parent / "cache" / "stats").rename(root.parent / "cache" / "stats-one")  # not found in the cache next
    r = cli(root, "stats", "--processes", "2", "--out", "two.safetensors")
    assert r.exit_code == 0, r.output
    assert "rank 0 of 2" in r.stderr and "(2 processes)" in r.stderr, r.stderr
    one, two = load_stats(root / "one.safetensors"), load_stats(root / "two.safetensors")
    assert rel_err(two.second_moment, one.second_moment) <= 1e-6  # the same float32 sums split in two: 6e-8 measured
    strip = lambda m: {k: v for k, v in m.items() if k != "tensor_sha256"}  # noqa: E731
    assert strip(two.meta) == strip(one.meta)
    assert not list((root.parent / "cache" / "stats").glob("partial-*"))  # no checkpoint left
    r = cli(root, "stats", "--processes", "2", "--out", "again.safetensors")  # cached now: no processes started
    assert r.exit_code == 0 and "processes" not in r.stderr, r.output
    assert torch.equal(load_stats(root / "again.safetensors").second_moment, two.second_moment)


def test_shards_sum_to_the_whole(tiny_lm, corpus):
    """Three shards' sums, added by hand (the all-reduce), give the one-process C."""
    lm = tiny_lm("llama")
    whole = second_moments(lm, [0, EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False)
    parts = []

    def collect(tensors):
        parts.append(tensors)
        return tensors

    for rank in range(3):
        second_moments(lm, [0, EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False,
                       shard=Shard(rank, 3, collect))
    summed = [sum(p[i] for p in parts) for i in range(3)]  # [Σ layer 0, Σ layer 1, count]
    assert float(summed[2][0]) == STATS_TOKENS  # a count: exact
    for i, layer in enumerate([0, EDIT_LAYER]):
        assert rel_err(summed[i] / summed[2][0], whole[layer]) <= 1e-6  # 3 partial float32 sums: 7e-8 measured


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_lm, corpus, monkeypatch):
    lm = tiny_lm("gpt2")
    want = second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False)
    calls = {"n": 0}
    real = statistics.keys_at

    def dies_at_batch_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the run is killed in its 5th batch
        return real(*args, **kwargs)

    checkpoint = tmp_path / "partial.safetensors"
    monkeypatch.setattr(statistics, "keys_at", dies_at_batch_5)
    with pytest.raises(KeyboardInterrupt):
        second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False,
                       checkpoint=checkpoint, checkpoint_seconds=0)
    assert checkpoint.is_file()
    from safetensors import safe_open
    with safe_open(checkpoint, framework="pt") as f:
        assert json.loads(f.metadata()["romeflow"])["batches"] == 4  # the 4 batches before the kill

    calls["n"] = -1000  # no more interruptions; count the batches the resumed run computes
    got = second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False,
                         checkpoint=checkpoint, checkpoint_seconds=0)
    total_batches = -(-STATS_TOKENS // 64 // 8)  # 4000 tokens in rows of 64, 8 rows a batch
    assert calls["n"] + 1000 == total_batches - 4  # only the rest was computed
    assert torch.equal(got[EDIT_LAYER], want[EDIT_LAYER])  # the same sums in the same order: bit-identical
    assert not checkpoint.exists()  # removed on completion


def test_a_checkpoint_of_other_statistics_is_not_resumed(tmp_path, tiny_lm, corpus):
    lm = tiny_lm("gpt2")
    checkpoint = tmp_path / "partial.safetensors"
    run = statistics._partial_meta(lm, [EDIT_LAYER], corpus, 999, 64, 8, Shard())  # another token count
    statistics._save_partial(checkpoint, run, {EDIT_LAYER: torch.full((64, 64), 1e6)}, 10, 3)
    got = second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False, checkpoint=checkpoint)
    want = second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False)
    assert torch.equal(got[EDIT_LAYER], want[EDIT_LAYER])  # both computed from scratch: the same computation


def test_get_stats_checkpoints_in_the_cache(tmp_path, tiny_lm, corpus, monkeypatch):
    lm = tiny_lm("gpt2")
    real, calls = statistics.keys_at, {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(statistics, "keys_at", dies)
    with pytest.raises(KeyboardInterrupt):
        get_stats(lm, [EDIT_LAYER], corpus, STATS_TOKENS, tmp_path, seq_len=64, progress=False, checkpoint_seconds=0)
    assert partial_path(tmp_path, lm, [EDIT_LAYER], corpus, STATS_TOKENS).is_file()
    monkeypatch.setattr(statistics, "keys_at", real)
    found = get_stats(lm, [EDIT_LAYER], corpus, STATS_TOKENS, tmp_path, seq_len=64, progress=False)
    want = second_moments(lm, [EDIT_LAYER], corpus, STATS_TOKENS, seq_len=64, progress=False)
    assert torch.equal(found[EDIT_LAYER].second_moment, want[EDIT_LAYER])  # resumed: the same sums in the same order
    assert not partial_path(tmp_path, lm, [EDIT_LAYER], corpus, STATS_TOKENS).exists()


def test_a_datasets_folder_is_a_corpus(tmp_path, tiny_lm, corpus_files):
    datasets = pytest.importorskip("datasets")
    texts = [p.read_text() for p in corpus_files]
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": texts, "id": [0, 1]}).save_to_disk(str(folder))
    from_folder = statistics.corpus_from(str(folder))
    assert list(from_folder.documents()) == texts
    assert from_folder.id == "datasets:ds" and len(from_folder.sha256) == 64
    lm = tiny_lm("gpt2")
    a = second_moments(lm, [EDIT_LAYER], from_folder, 2000, seq_len=64, progress=False)
    b = second_moments(lm, [EDIT_LAYER], statistics.text_files_corpus(corpus_files), 2000, seq_len=64, progress=False)
    assert torch.equal(a[EDIT_LAYER], b[EDIT_LAYER])  # the same tokens: the same computation


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_under_a_launcher_equals_one_process(tmp_path, model_dir, launcher):
    """torchrun with 2 processes (what `accelerate launch --multi_gpu` runs underneath on GPUs); on a CPU
    `accelerate launch --cpu` starts one process (its multi-CPU mode needs MPI), which must just work."""
    import os
    import subprocess
    import sys

    from test_workflow import cli, make_project

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    r = cli(root, "stats", "--out", "one.safetensors")
    assert r.exit_code == 0, r.output
    start = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if launcher == "torchrun" else
             [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(start + ["-m", "romeflow.cli", "--params", str(root / "params.yaml"), "--cache",
                                   str(tmp_path / "cache2"), "--threads", "1", "stats", "--out", "two.safetensors"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if launcher == "torchrun":
        assert "rank 0 of 2" in done.stderr, done.stderr[-3000:]  # really two processes sharing the rows
    one, two = load_stats(root / "one.safetensors"), load_stats(root / "two.safetensors")
    assert rel_err(two.second_moment, one.second_moment) <= 1e-6  # as in the first test
    assert {k: v for k, v in two.meta.items() if k != "tensor_sha256"} == \
        {k: v for k, v in one.meta.items() if k != "tensor_sha256"}
