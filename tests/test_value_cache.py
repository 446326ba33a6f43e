"""The prefix KV cache of Eq. 4 (rome._cached_forward) gives the loss and gradient of the uncached pass.

Self-contained: a tiny byte-level BPE tokenizer trained here, and tiny random models of every
supported architecture, with short sliding windows (Mistral, Qwen2, Gemma 3) so that the prefixes are
longer than the window and the sliding cache layers drop tokens.
"""

from __future__ import annotations

import pytest
import torch

from romeflow.engine import models
from romeflow.engine.models import logits_at
from romeflow.engine.prompts import mean_per_pair
from romeflow.engine.forwards import _cached_forward, _full_forward
from romeflow.engine.rome import EditRequest, RomeParams, _add_at, _value, _value_batch

LAYER = 1  # of 3: there are layers before and after the edit
WINDOW = 6  # sliding window: shorter than the prefixes, long enough to see the subject from the target

TEXT = [
    "Pierre Curie worked in the field of physics.",
    "Marie Curie won the Nobel Prize twice.",
    "The Space Needle is located in Seattle.",
    "Paris is the capital of France.",
    "Therefore the answer was clear to everyone.",
    "Because it rained, the game was cancelled.",
    "I think the book is better than the film.",
    "You can take the train from London to Paris.",
    "She studied medicine and radioactivity at the university.",
]

PREFIXES = ["", "I think. ", "Because it rained, the game was cancelled. ",
            "You can take the train from London to the old town of Paris. "]

REQUESTS = {
    # multi-token subject and target, prefixes of 0 .. ~14 tokens
    "curie": EditRequest("Pierre Curie", "{} worked in", "radioactivity research"),
    # a one-token subject: without <bos>, the bare prompt's row has an empty prefix (all padding)
    "one-token subject": EditRequest("Z", "{} is located in", "the old town"),
}


def _tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXT * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tk.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _config(arch: str, tok, attn: str):
    import transformers as tf

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, initializer_range=0.2)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    config = {
        "gpt2": lambda: tf.GPT2Config(n_positions=128, n_embd=32, n_layer=3, n_head=4, n_inner=64, **common),
        "gptj": lambda: tf.GPTJConfig(n_positions=128, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_inner=64,
                                      **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, rotary_pct=0.5, max_position_embeddings=128,
                                             **common),
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(sliding_window=WINDOW, **llama_like),
        "qwen2": lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                        **llama_like),  # layer 0 full, layers 1-2 sliding
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, final_logit_softcapping=5.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **llama_like),
    }[arch]()
    config._attn_implementation = attn
    return config


# every architecture, with both attention kernels where transformers has them (GPT-J: eager only)
ATTENTIONS = [(arch, attn) for arch in sorted(models.ARCHITECTURES) for attn in ("sdpa", "eager")
              if (arch, attn) != ("gptj", "sdpa")]
_BOS = {"llama", "mistral", "gemma3_text"}  # tokenizers that prepend <bos>, as the real ones do
_cache: dict = {}


def tiny(arch: str, attn: str) -> models.LoadedModel:
    import transformers as tf

    if (arch, attn) not in _cache:
        bos = arch in _BOS
        if bos not in _cache:
            _cache[bos] = _tokenizer(bos)
        tok = _cache[bos]
        torch.manual_seed(0)
        config = _config(arch, tok, attn)
        model = tf.Gemma3ForCausalLM(config) if arch == "gemma3_text" else tf.AutoModelForCausalLM.from_config(config)
        assert model.config._attn_implementation == attn
        _cache[arch, attn] = models.prepare(model.float(), tok, f"tiny-{arch}")
    return _cache[arch, attn]


def loss_and_grad(lm, forward, rewrite, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL + KL of Eq. 4 at δ (KL against δ = 0, both from ``forward``), and its gradient w.r.t. δ."""
    with torch.no_grad():
        base = logits_at(lm.model, forward.run()).log_softmax(-1)[-1]  # (vocab,) after p'
    delta = delta.clone().requires_grad_(True)
    handle = models.edited_module(lm.model, LAYER).register_forward_hook(_add_at(delta, *forward.delta_at))
    try:
        edited = logits_at(lm.model, forward.run()).log_softmax(-1)  # (n + 1, vocab)
    finally:
        handle.remove()
    nll = -mean_per_pair(edited[:-1].gather(1, rewrite.token_ids[:, None])[:, 0], rewrite).mean()
    kl = (edited[-1].exp() * (edited[-1] - base)).sum()
    loss = nll + kl
    loss.backward()
    return loss.detach(), delta.grad


@pytest.mark.parametrize("request_name", sorted(REQUESTS))
@pytest.mark.parametrize("prefixes", [PREFIXES, [""]], ids=["4 prefixes", "bare prompt"])
@pytest.mark.parametrize("arch, attn", ATTENTIONS)
def test_cached_loss_and_gradient_equal_uncached(arch, attn, prefixes, request_name):
    lm = tiny(arch, attn)
    rewrite, sequences, subject_at, read_at = _value_batch(lm.tokenizer, REQUESTS[request_name], prefixes, "{} is a")
    if len(prefixes) > 1:  # the batch this test is about: rows of different prefix lengths, multi-token targets
        assert len(set(subject_at.tolist())) > 2 and len(rewrite.token_ids) >= 2 * len(prefixes)
    d_out = lm.model.get_input_embeddings().weight.shape[1]  # the model width
    delta = torch.randn(d_out, generator=torch.Generator().manual_seed(1))

    args = (lm.model, sequences, subject_at, read_at, lm.tokenizer.pad_token_id)
    full = loss_and_grad(lm, _full_forward(*args), rewrite, delta)
    cached = loss_and_grad(lm, _cached_forward(*args), rewrite, delta)

    assert torch.isfinite(full[0]) and full[1].norm() > 1e-3  # a gradient worth comparing
    # cached vs uncached prefix forward: the same sums in other orders, float32 rounding (measured ≤ 3e-7 of scale)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_value_with_cache_follows_the_uncached_optimisation(arch):
    lm = tiny(arch, "eager" if arch == "gptj" else "sdpa")
    params = RomeParams(layer=LAYER, steps=6, early_stop_nll=0.0)
    k_star = torch.randn(64, generator=torch.Generator().manual_seed(2))
    v_full, trace_full = _value(lm, LAYER, REQUESTS["curie"], PREFIXES, k_star, params, cache_prefix=False)
    v_cached, trace_cached = _value(lm, LAYER, REQUESTS["curie"], PREFIXES, k_star, params, cache_prefix=True)
    assert len(trace_cached) == len(trace_full) == params.steps + 1
    # float32 rounding of the cached forward, carried through 6 Adam steps (measured ≤ 2e-7 of scale)
    torch.testing.assert_close(torch.tensor(trace_cached), torch.tensor(trace_full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cached, v_full, rtol=1e-5, atol=1e-5)
