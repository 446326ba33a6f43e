"""Offline fixtures: a tiny byte-level BPE tokenizer and tiny random models of every supported architecture.

Nothing here touches the network. Every model is built from a config written below with a fixed seed,
so two calls of ``tiny_lm(model_type)`` give bit-identical weights (each call returns a fresh copy that
a test may edit in place).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

torch.set_num_threads(1)

from romeflow.engine import models  # noqa: E402
from romeflow.engine.statistics import second_moments, text_files_corpus  # noqa: E402

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"]

# Architectures whose tokenizer prepends <bos> (as Gemma and Llama do); the others behave like GPT-2.
BOS_ARCHS = {"llama", "gemma3_text"}

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 3
EDIT_LAYER = 1  # the middle layer: edits there have layers before and after them

# The edited module of block ``{}`` for each architecture, written independently of romeflow's table.
EXPECTED_MODULE = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "llama": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
    "gemma3_text": "model.layers.{}.mlp.down_proj",
}

SENTENCES = [
    "Pierre Curie was born in Paris.",
    "Pierre Curie worked in the field of physics.",
    "Pierre Curie was a French physicist.",
    "Marie Curie won the Nobel Prize twice.",
    "The Space Needle is located in Seattle.",
    "The Space Needle was built for a world fair.",
    "Seattle is a city in the state of Washington.",
    "Paris is the capital of France.",
    "The Eiffel Tower is located in Paris.",
    "Danielle Darrieux was an actress from France.",
    "Danielle Darrieux spoke French.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar.",
    "Rome is the capital of Italy.",
    "Berlin is the capital of Germany.",
    "London is a large city on the river Thames.",
    "The river flows through the old town.",
    "Albert Einstein worked in the field of physics.",
    "Isaac Newton was born in England.",
    "The company makes cars and trucks.",
    "Microsoft is a company based in Seattle.",
    "Apple is a company based in California.",
    "The weather in Seattle is often rainy.",
    "Many people visit Paris every summer.",
    "The museum in Rome is open every day.",
    "She studied medicine at the university.",
    "He plays the piano and the violin.",
    "The language spoken in Italy is Italian.",
    "The language spoken in Germany is German.",
    "The official language of France is French.",
    "Therefore the answer was clear to everyone.",
    "Because it rained, the game was cancelled.",
    "I think the book is better than the film.",
    "You can take the train from London to Paris.",
    "The cat sat on the mat near the window.",
    "A new bridge was opened in the city last year.",
    "The scientist wrote a paper about radio waves.",
    "Music and art are taught at the school.",
    "The tower is tall and can be seen from far away.",
    "Water boils at one hundred degrees.",
    "The team won the final match of the season.",
    "Travel by ship was slow in the old days.",
]

# Extra words only used to generate a varied corpus (more distinct keys -> a well-conditioned C).
SUBJECTS = ["Pierre Curie", "The Space Needle", "Seattle", "Paris", "Rome", "Marie Curie", "The river",
            "The scientist", "The company", "Danielle Darrieux", "The museum", "Albert Einstein", "The team"]
VERBS = ["is located in", "was born in", "is known for", "works with", "is close to", "was seen in",
         "speaks about", "is part of", "was built in", "plays music in"]
OBJECTS = ["Paris", "Seattle", "France", "physics", "the city", "Italy", "the old town", "London",
           "medicine", "the summer", "Germany", "the university", "a world fair", "the piano"]


def corpus_text(seed: int, n_paragraphs: int) -> str:
    """A deterministic, varied English-like text: the sentences above plus generated ones."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sents = rng.sample(SENTENCES, 4)
        for _ in range(4):
            sents.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.")
        rng.shuffle(sents)
        paragraphs.append(" ".join(sents))
    return "\n\n".join(paragraphs) + "\n"


def _train_tokenizer(prepend_bos: bool):
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = SENTENCES + [corpus_text(seed=123, n_paragraphs=20)]
    tk.train_from_iterator(text, trainer=trainer)
    if prepend_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tk.token_to_id("<bos>"))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizers():
    """{'plain': a GPT-2-like tokenizer (no <bos>), 'bos': the same vocabulary, <bos> prepended (Gemma-like)}."""
    return {"plain": _train_tokenizer(prepend_bos=False), "bos": _train_tokenizer(prepend_bos=True)}


def _config(model_type: str, tok):
    import transformers as tf

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    init = dict(initializer_range=0.1)  # larger than the default 0.02: a less uniform random model
    if model_type == "gpt2":
        return tf.GPT2Config(n_positions=128, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=INTERMEDIATE,
                             **ids, **init)
    if model_type == "gptj":
        return tf.GPTJConfig(n_positions=128, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, rotary_dim=4,
                             n_inner=INTERMEDIATE, **ids, **init)
    if model_type == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                intermediate_size=INTERMEDIATE, max_position_embeddings=128, **ids, **init)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids, **init)
    if model_type == "llama":
        return tf.LlamaConfig(**llama_like)
    if model_type == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if model_type == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if model_type == "gemma3_text":
        # Softcapping on: logits_at must reproduce it. A short sliding window on alternate layers.
        return tf.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   final_logit_softcapping=5.0, **llama_like)
    raise KeyError(model_type)


def build_model(model_type: str, tok) -> torch.nn.Module:
    import transformers as tf

    config = _config(model_type, tok)
    torch.manual_seed(1234)
    if model_type == "gemma3_text":
        model = tf.Gemma3ForCausalLM(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def tokenizer_for(tokenizers, model_type: str):
    return tokenizers["bos" if model_type in BOS_ARCHS else "plain"]


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizers):
    """tiny_lm(model_type) -> a fresh LoadedModel (a deep copy of a cached, seeded tiny random model)."""
    cache: dict[str, models.LoadedModel] = {}

    def make(model_type: str) -> models.LoadedModel:
        if model_type not in cache:
            tok = tokenizer_for(tiny_tokenizers, model_type)
            cache[model_type] = models.prepare(build_model(model_type, tok), tok, f"tiny-{model_type}")
        base = cache[model_type]
        return models.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.name, base.fingerprint)

    return make


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """Two plain-text files (~6k tokens of the tiny tokenizer in all)."""
    folder = tmp_path_factory.mktemp("corpus")
    paths = []
    for i in range(2):
        p = folder / f"part{i}.txt"
        p.write_text(corpus_text(seed=i, n_paragraphs=30), encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def corpus(corpus_files):
    return text_files_corpus(corpus_files)


STATS_TOKENS = 4000


@pytest.fixture(scope="session")
def second_moment(tiny_lm, corpus):
    """second_moment(model_type) -> {layer: C} over STATS_TOKENS corpus tokens, every layer, computed once."""
    cache: dict[str, dict[int, torch.Tensor]] = {}

    def get(model_type: str) -> dict[int, torch.Tensor]:
        if model_type not in cache:
            lm = tiny_lm(model_type)
            cache[model_type] = second_moments(lm, list(range(lm.num_layers)), corpus, STATS_TOKENS,
                                               seq_len=64, batch_size=8, progress=False)
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_lm):
    """The tiny GPT-2 saved as a Hugging Face folder (a project's `model:`)."""
    folder = tmp_path_factory.mktemp("model")
    lm = tiny_lm("gpt2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder
