"""Second moments of the keys, corpus packing, and the statistics files and cache."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from safetensors.torch import save_file

from romeflow.engine import statistics
from romeflow.engine.statistics import (STATS_FORMAT, tensor_sha256, get_stats, load_stats, save_stats, second_moments, stats_meta,
                                 text_files_corpus, token_rows)

from conftest import EXPECTED_MODULE, INTERMEDIATE


def token_stream(lm, corpus) -> list[int]:
    """The corpus as one token stream, each document followed by <eos> (computed independently)."""
    out: list[int] = []
    for doc in corpus.documents():
        out += lm.tokenizer(doc, add_special_tokens=False).input_ids + [lm.tokenizer.eos_token_id]
    return out


def manual_second_moment(lm, model_type, corpus, layer, n_tokens, seq_len) -> torch.Tensor:
    """E[k kᵀ] with a forward hook of our own, one unpadded sequence at a time, <bos> left out."""
    stream = token_stream(lm, corpus)[:n_tokens]
    assert len(stream) == n_tokens
    bos = [lm.tokenizer.bos_token_id] if lm.adds_bos else []
    module = lm.model.get_submodule(EXPECTED_MODULE[model_type].format(layer))
    captured = []
    handle = module.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach()))
    total = torch.zeros(INTERMEDIATE, INTERMEDIATE, dtype=torch.float64)
    try:
        for start in range(0, n_tokens, seq_len):
            ids = torch.tensor([bos + stream[start:start + seq_len]])
            captured.clear()
            with torch.no_grad():
                lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            k = captured[0][0, len(bos):].double()  # (T, d_in) without <bos>
            total += k.T @ k
    finally:
        handle.remove()
    return total / n_tokens


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text", "qwen2"])
def test_second_moments_equal_a_manual_average(tiny_lm, corpus, model_type):
    lm = tiny_lm(model_type)
    n_tokens, seq_len = 300, 32  # 9 full rows + one of 12: the last batch is short and padded
    got = second_moments(lm, [0, 2], corpus, n_tokens, seq_len=seq_len, batch_size=4, progress=False)
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        c = got[layer]
        assert c.dtype == torch.float32 and c.shape == (INTERMEDIATE, INTERMEDIATE)
        torch.testing.assert_close(c, c.T)
        want = manual_second_moment(lm, model_type, corpus, layer, n_tokens, seq_len)
        # float32 sums of 300 key outer products in batches vs float64 one row at a time: ≲ 300·eps ≈ 4e-5
        # relative worst case (measured 3e-7 of the scale); rtol 1e-4
        torch.testing.assert_close(c.double(), want, rtol=1e-4, atol=1e-6)


def test_second_moments_exclude_bos(tiny_lm, corpus):
    """With <bos> counted the average would differ: the manual reference must be the one that matches."""
    lm = tiny_lm("gemma3_text")
    assert lm.adds_bos
    n_tokens, seq_len = 64, 32
    got = second_moments(lm, [1], corpus, n_tokens, seq_len=seq_len, batch_size=2, progress=False)[1]
    module = lm.model.get_submodule(EXPECTED_MODULE["gemma3_text"].format(1))
    rows = list(token_rows(lm, corpus, n_tokens, seq_len))
    keys = []
    handle = module.register_forward_hook(lambda _m, inputs, _o: keys.append(inputs[0][0].detach()))
    try:
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r])
                lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    with_bos = torch.cat(keys).double()
    without_bos = torch.cat([k[1:] for k in keys]).double()
    torch.testing.assert_close(got.double(), without_bos.T @ without_bos / n_tokens, rtol=1e-4, atol=1e-6)  # as above
    assert not torch.allclose(got.double(), with_bos.T @ with_bos / len(with_bos), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
@pytest.mark.parametrize("n_tokens,seq_len", [(300, 32), (256, 64), (10, 64), (1, 8)])
def test_token_rows_yield_exactly_n_text_tokens(tiny_lm, corpus, model_type, n_tokens, seq_len):
    lm = tiny_lm(model_type)
    head = [lm.tokenizer.bos_token_id] if lm.adds_bos else []
    rows = list(token_rows(lm, corpus, n_tokens, seq_len))
    assert rows
    for r in rows:
        assert r[: len(head)] == head
        assert 1 <= len(r) - len(head) <= seq_len
    assert all(len(r) - len(head) == seq_len for r in rows[:-1])  # only the last row may be short
    text = [t for r in rows for t in r[len(head):]]
    assert len(text) == n_tokens
    assert text == token_stream(lm, corpus)[:n_tokens]


def test_token_rows_use_the_whole_corpus_exactly(tiny_lm, corpus):
    lm = tiny_lm("gpt2")
    total = len(token_stream(lm, corpus))
    rows = list(token_rows(lm, corpus, total, 64))
    assert sum(len(r) for r in rows) == total
    with pytest.raises(ValueError, match=f"has only {total} tokens, {total + 1} asked for"):
        list(token_rows(lm, corpus, total + 1, 64))


def test_token_rows_raise_on_a_short_corpus(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    path = tmp_path / "short.txt"
    path.write_text("Pierre Curie was born in Paris.", encoding="utf-8")
    short = text_files_corpus([path])
    available = len(lm.tokenizer(path.read_text(), add_special_tokens=False).input_ids) + 1  # + <eos>
    with pytest.raises(ValueError, match=re.escape(f"corpus {short.id} has only {available} tokens, 1000 asked for")):
        list(token_rows(lm, short, 1000, 16))
    with pytest.raises(ValueError, match="asked for"):
        second_moments(lm, [0], short, 1000, seq_len=16, progress=False)


def test_text_files_corpus(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first document", encoding="utf-8")
    b.write_text("second document", encoding="utf-8")
    corpus = text_files_corpus([a, b])
    assert list(corpus.documents()) == ["first document", "second document"]
    assert list(corpus.documents()) == ["first document", "second document"]  # re-iterable
    assert corpus.id == "files:a.txt,b.txt"
    assert corpus.sha256 == text_files_corpus([a, b]).sha256
    assert corpus.sha256 != text_files_corpus([b, a]).sha256
    b.write_text("second document, changed", encoding="utf-8")
    assert corpus.sha256 != text_files_corpus([a, b]).sha256
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_files_corpus([a, tmp_path / "missing.txt"])


# --------------------------------------------------------------------------------------------------
# Files and the cache
# --------------------------------------------------------------------------------------------------


def test_save_and_load_stats_round_trip(tiny_lm, corpus, tmp_path):
    lm = tiny_lm("gpt2")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(INTERMEDIATE, INTERMEDIATE, generator=g)
    c = a @ a.T
    meta = stats_meta(lm, 1, corpus, 1234, 64)
    assert meta["format"] == STATS_FORMAT
    assert meta["module"] == EXPECTED_MODULE["gpt2"].format(1)
    assert meta["model_fingerprint"] == lm.fingerprint and meta["corpus_sha256"] == corpus.sha256

    path = tmp_path / "sub" / "stats.safetensors"
    saved = save_stats(path, c, meta)
    loaded = load_stats(path)
    for s in (saved, loaded):
        assert s.meta == {**meta, "tensor_sha256": tensor_sha256(c)}  # the content hash is added on save
        assert s.layer == 1
        assert torch.equal(s.second_moment, c)
        assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["stats.safetensors"]  # no temporary file left


def test_get_stats_computes_once_then_uses_the_cache(tiny_lm, corpus, tmp_path, monkeypatch):
    lm = tiny_lm("gpt2")
    calls = []
    real = statistics.second_moments

    def spy(lm_, layers, *args, **kwargs):
        calls.append(list(layers))
        result = real(lm_, layers, *args, **kwargs)
        spy.result = result
        return result

    monkeypatch.setattr(statistics, "second_moments", spy)
    first = get_stats(lm, [0, 1], corpus, 256, tmp_path, seq_len=32, progress=False)
    assert calls == [[0, 1]]
    assert sorted(first) == [0, 1]
    for layer in (0, 1):
        assert torch.equal(first[layer].second_moment, spy.result[layer])
        assert first[layer].meta == {**stats_meta(lm, layer, corpus, 256, 32), "tensor_sha256": tensor_sha256(spy.result[layer])}
        assert first[layer].layer == layer

    def fail(*_args, **_kwargs):
        raise AssertionError("second_moments must not run when the cache has the statistics")

    monkeypatch.setattr(statistics, "second_moments", fail)
    again = get_stats(lm, [1, 0], corpus, 256, tmp_path, seq_len=32, progress=False)
    for layer in (0, 1):
        assert again[layer].sha256 == first[layer].sha256
        assert torch.equal(again[layer].second_moment, first[layer].second_moment)

    # Only the missing layer is computed; a different token count is a different cache entry.
    monkeypatch.setattr(statistics, "second_moments", spy)
    get_stats(lm, [1, 2], corpus, 256, tmp_path, seq_len=32, progress=False)
    assert calls == [[0, 1], [2]]
    other = get_stats(lm, [1], corpus, 128, tmp_path, seq_len=32, progress=False)
    assert calls == [[0, 1], [2], [1]]
    assert other[1].sha256 != first[1].sha256
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4


def test_load_stats_rejects_non_stats_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_stats(garbage)

    plain = tmp_path / "plain.safetensors"  # a valid safetensors file without romeflow metadata
    save_file({"second_moment": torch.eye(3)}, str(plain))
    with pytest.raises(ValueError, match=re.escape(str(plain)) + ".*not a romeflow statistics file"):
        load_stats(plain)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"second_moment": torch.eye(3)}, str(wrong), metadata={"romeflow": '{"format": "other/9"}'})
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + ".*other/9"):
        load_stats(wrong)

    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_stats(tmp_path / "absent.safetensors")
