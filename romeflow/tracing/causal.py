"""Causal tracing (Meng et al. 2022, §2): which hidden states carry a fact from the subject to the answer.

Three runs of the same prompt:

    clean      the prompt as is                                   -> P_clean[o]
    corrupted  Gaussian noise (ν = scale · σ_emb) added to the     -> P_corr[o]
               token embeddings of the subject tokens
    restored   corrupted, but one state — a block's output (the    -> P_rest[o]
               hidden state), an MLP output or an attention output
               — at one (token, layer) set back to its clean value
               (MLP / attention: a window of layers around it)

    total effect    TE = P_clean[o] − P_corr[o]
    indirect effect IE = P_rest[o]  − P_corr[o]

Everything is batched: one batch row is one (noise sample, restoration) configuration, and forward
hooks on the embedding, block, MLP and attention modules (found through the adapter table in
engine/models.py) add the noise to, or overwrite, exactly the rows and positions a configuration names. Only
the last position goes through the output head (``final_hidden`` + ``logits_at``).

Severed paths (Figure 3): restore a hidden state at (t, l) while the MLP (or attention) outputs at
token t in the layers after l stay frozen at their corrupted values; the drop in IE measures how much
of the restored state's effect flows through those modules.

Averages over known facts (Figure 2) keep only what the plots need: the last subject token and the
last token, every layer, three kinds of state, plus the severed hidden-state curves at the last
subject token. Per-fact rows go to a JSONL file as they are computed, so a long run can resume.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .. import __version__
from ..engine.hooks import on_output, run_with_hooks
from ..io import check_input, json_number_problem
from ..engine.models import LoadedModel, blocks, block_submodule, final_hidden, input_device, logits_at, num_layers
from ..engine.prompts import MAX_PROMPT_CHARS, continuation, flush_denormals

KINDS = ("hidden", "mlp", "attn")  # block output (the residual stream), MLP output, attention output
SEVERABLE = ("mlp", "attn")
POSITIONS = ("last_subject", "last")  # where the averages are taken


@dataclass(frozen=True)
class TraceParams:
    """Hyper-parameters of causal tracing (the ``trace:`` section of params.yaml; checked by romeflow.params)."""

    facts: str = "../shared/data/known_1000.json"  # known facts for the average and `layer: auto`
    n: int = 100  # facts the model gets right, traced for the average
    samples: int = 3  # noise samples per fact (and per single trace unless overridden)
    noise_scale: float = 3.0  # ν = noise_scale × the empirical std of the token embeddings
    window: int = 10  # layers restored around layer l for MLP / attention outputs
    seed: int = 0  # of the noise
    batch_rows: int = 256  # batch rows per forward pass
    out: str = "reports/trace"  # folder of the trace stage's outputs (layer.json, average.json, ...)

    def to_dict(self) -> dict:
        return asdict(self)

    def method(self) -> dict:
        """The fields that change traced numbers (not where files go or how big a batch is)."""
        return {k: getattr(self, k) for k in ("samples", "noise_scale", "window", "seed")}


# --------------------------------------------------------------------------------------------------
# The prompt: tokens, subject span, target token
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracePrompt:
    ids: torch.Tensor  # (T,) token ids, <bos> included where the tokenizer adds it
    subject: tuple[int, int]  # [start, end) token range of the subject
    target_id: int  # the token whose probability is traced (the first token of the object)
    tokens: tuple[str, ...]  # (T,) each token decoded, for plots and JSON

    @property
    def last_subject(self) -> int:
        return self.subject[1] - 1

    @property
    def length(self) -> int:
        return len(self.ids)


def subject_range(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """[start, end) of the tokens that overlap the first occurrence of ``subject`` in ``prompt``."""
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} not found in the prompt {prompt!r}")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    end_char = at + len(subject)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end_char and b > at]
    if not inside:
        raise ValueError(f"subject {subject!r} covers no token of the prompt {prompt!r}")
    return inside[0], inside[-1] + 1


def target_token(tokenizer, target: str) -> int:
    """The first token of the object as it follows a prompt (' Seattle')."""
    ids = tokenizer(continuation(target), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids[0]


def make_prompt(lm: LoadedModel, prompt: str, subject: str, target: str | None = None) -> TracePrompt:
    """Tokenise; without a target, trace the clean model's own top-1 next token."""
    tok = lm.tokenizer
    ids = torch.tensor(tok(prompt).input_ids, dtype=torch.long)  # (T,)
    span = subject_range(tok, prompt, subject)
    target_id = target_token(tok, target) if target is not None else int(next_token_probs(lm, ids[None])[0].argmax())
    tokens = tuple(tok.decode([int(i)]) for i in ids)
    return TracePrompt(ids, span, target_id, tokens)


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def embedding_std(lm: LoadedModel, chunk: int = 16384) -> float:
    """σ_emb: the standard deviation of every entry of the embedding module's output over the whole
    vocabulary (after any scaling the module applies, e.g. Gemma's √d)."""
    embed = lm.model.get_submodule(lm.arch.embed)
    vocab = embed.weight.shape[0]
    total = total_sq = 0.0
    count = 0
    for start in range(0, vocab, chunk):
        e = embed(torch.arange(start, min(vocab, start + chunk), device=input_device(lm.model))).double()  # (chunk, d)
        total += e.sum().item()
        total_sq += (e * e).sum().item()
        count += e.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0))


def subject_noise(samples: int, n_tokens: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    """(samples, n_tokens, d_model) Gaussian noise of standard deviation ``std``; seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, d_model, generator=g) * std


# --------------------------------------------------------------------------------------------------
# One batched forward pass with noise, patches and recording
# --------------------------------------------------------------------------------------------------


def state_module(model: nn.Module, kind: str, layer: int) -> nn.Module:
    """The module whose output is the state: the block ('hidden'), its MLP or its attention."""
    if kind == "hidden":
        return blocks(model)[layer]
    return block_submodule(model, layer, kind)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@dataclass
class Patch:
    """Overwrite the output of (kind, layer) at rows × positions with given values."""

    kind: str
    layer: int
    rows: torch.Tensor  # (m,)
    positions: torch.Tensor  # (m,)
    values: torch.Tensor  # (m, d)


@dataclass
class Noise:
    """Noise on the subject's token embeddings: row r gets ``samples[sample_of_row[r]]``."""

    span: tuple[int, int]  # [start, end) subject tokens
    samples: torch.Tensor  # (S, n_subject, d)
    sample_of_row: torch.Tensor  # (B,)


@torch.no_grad()
def run(lm: LoadedModel, ids: torch.Tensor, target_id: int, noise: Noise | None = None,
        patches: Iterable[Patch] = (), record: bool = False) -> tuple[torch.Tensor, dict]:
    """Forward ``ids`` (B, T) with noise and patches; P[target] at the last position: (B,).

    With ``record``, also returns every state {(kind, layer): (B, T, d)} as the model computed it.
    """
    model = lm.model
    recorded = {}
    grouped: dict[tuple[str, int], list[Patch]] = {}
    for p in patches:
        grouped.setdefault((p.kind, p.layer), []).append(p)

    def add_noise(_module, _inputs, output):  # (B, T, d) token embeddings
        e = _first(output).clone()
        a, b = noise.span
        e[:, a:b] += noise.samples[noise.sample_of_row].to(e.device, e.dtype)  # (B, n_subject, d)
        return _with_first(output, e)

    def patcher(ps: list[Patch]):
        rows = torch.cat([p.rows for p in ps])  # (m,)
        positions = torch.cat([p.positions for p in ps])  # (m,)
        values = torch.cat([p.values for p in ps])  # (m, d)

        def hook(_module, _inputs, output):
            h = _first(output).clone()  # (B, T, d)
            h[rows, positions] = values.to(h.device, h.dtype)
            return _with_first(output, h)
        return hook

    def recorder(key):
        def hook(_module, _inputs, output):
            recorded[key] = _first(output).detach()
        return hook

    hooks = [on_output(lm.arch.embed, add_noise)] if noise is not None else []
    hooks += [on_output(state_module(model, kind, layer), patcher(ps)) for (kind, layer), ps in grouped.items()]
    if record:  # registered after the patchers: records the patched values
        hooks += [on_output(state_module(model, kind, layer), recorder((kind, layer)))
                  for kind in KINDS for layer in range(num_layers(model))]
    with run_with_hooks(model, hooks):
        probs = next_token_probs(lm, ids)[:, target_id].cpu()  # (B,) on the host, whatever the model's device
    return probs, recorded


@torch.no_grad()
def next_token_probs(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, vocab) next-token distribution at the last position (no padding)."""
    with flush_denormals():
        hidden = final_hidden(lm.model, ids, torch.ones_like(ids))[:, -1]  # (B, d)
        return logits_at(lm.model, hidden).float().softmax(-1)  # (B, vocab)


# --------------------------------------------------------------------------------------------------
# Restorations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restore:
    """Restore ``kind`` at (token, layer) — a window of layers for MLP / attention — from the clean run;
    with ``sever``, also freeze that kind's outputs at the token in every later layer at their
    corrupted values."""

    kind: str
    token: int
    layer: int
    sever: str | None = None


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred on ``layer`` (clipped to the model): 10 -> l-5 .. l+4."""
    start = max(0, layer - window // 2)
    return range(start, min(n_layers, layer - window // 2 + window))


@dataclass
class Runs:
    """The clean and corrupted runs of one prompt, shared by all its restorations."""

    prompt: TracePrompt
    noise: torch.Tensor  # (S, n_subject, d)
    p_clean: float
    p_corrupted: torch.Tensor  # (S,) per noise sample
    clean: dict  # {(kind, layer): (T, d)}
    corrupted: dict  # {(kind, layer): (S, T, d)}

    @property
    def samples(self) -> int:
        return self.noise.shape[0]


def clean_and_corrupted(lm: LoadedModel, prompt: TracePrompt, std: float, params: TraceParams) -> Runs:
    """Clean run (1 row) and corrupted run (S rows, one per noise sample), every state recorded."""
    ids = prompt.ids[None]  # (1, T)
    p_clean, clean = run(lm, ids, prompt.target_id, record=True)
    S = params.samples
    a, b = prompt.subject
    samples = subject_noise(S, b - a, lm.model.config.hidden_size, params.noise_scale * std, params.seed)
    noise = Noise(prompt.subject, samples, torch.arange(S))
    p_corr, corrupted = run(lm, ids.expand(S, -1), prompt.target_id, noise, record=True)
    return Runs(prompt, samples, float(p_clean[0]), p_corr,
                {k: v[0] for k, v in clean.items()}, corrupted)


def _patches_for(runs: Runs, r: Restore, rows: torch.Tensor, params: TraceParams, n_layers: int) -> list[Patch]:
    """The patches of one restoration, on the S batch rows ``rows`` (one per noise sample)."""
    S, t = runs.samples, r.token
    pos = torch.full((S,), t, dtype=torch.long)  # (S,)
    layers = [r.layer] if r.kind == "hidden" else list(window_layers(r.layer, params.window, n_layers))
    out = [Patch(r.kind, l, rows, pos, runs.clean[(r.kind, l)][t].expand(S, -1)) for l in layers]  # (S, d)
    if r.sever:
        out += [Patch(r.sever, l, rows, pos, runs.corrupted[(r.sever, l)][:, t])  # (S, d) per sample
                for l in range(r.layer + 1, n_layers)]
    return out


def restored_probs(lm: LoadedModel, runs: Runs, restores: list[Restore], params: TraceParams,
                   progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """P[target] after each restoration, averaged over the noise samples: (len(restores),).

    A batch holds ⌊batch_rows / S⌋ restorations × S noise samples; row = restoration · S + sample.
    """
    S, n_layers = runs.samples, num_layers(lm.model)
    per_batch = max(1, params.batch_rows // S)
    out = []
    for start in range(0, len(restores), per_batch):
        chunk = restores[start:start + per_batch]
        B = len(chunk) * S
        patches = []
        for j, r in enumerate(chunk):
            patches += _patches_for(runs, r, torch.arange(j * S, (j + 1) * S), params, n_layers)
        noise = Noise(runs.prompt.subject, runs.noise, torch.arange(B) % S)
        probs, _ = run(lm, runs.prompt.ids[None].expand(B, -1), runs.prompt.target_id, noise, patches)
        out.append(probs.view(len(chunk), S).mean(1))  # (chunk,)
        progress(len(chunk))
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# One prompt: the full (token × layer) grids
# --------------------------------------------------------------------------------------------------


def trace_prompt(lm: LoadedModel, prompt: str, subject: str, target: str | None, params: TraceParams,
                 std: float | None = None, progress: Callable[[int], None] = lambda n: None,
                 total: Callable[[int], None] = lambda n: None) -> dict:
    """Every (token, layer) restoration of every kind -> the trace report (schemas/trace.schema.json)."""
    t0 = time.perf_counter()
    std = embedding_std(lm) if std is None else std
    p = make_prompt(lm, prompt, subject, target)
    runs = clean_and_corrupted(lm, p, std, params)
    L, T = num_layers(lm.model), p.length
    restores = [Restore(k, t, l) for k in KINDS for t in range(T) for l in range(L)]
    total(len(restores))
    probs = restored_probs(lm, runs, restores, params, progress).view(len(KINDS), T, L)  # (3, T, L)
    return {
        "format": "romeflow-trace/1",
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "layers": L},
        "prompt": prompt, "subject": subject,
        "tokens": list(p.tokens), "subject_range": list(p.subject),
        "target": lm.tokenizer.decode([p.target_id]), "target_id": p.target_id,
        "target_given": target,
        "params": params.method(), "embedding_std": std, "noise_std": params.noise_scale * std,
        "p_clean": runs.p_clean, "p_corrupted": float(runs.p_corrupted.mean()),
        "p_corrupted_samples": runs.p_corrupted.tolist(),
        "restored": {k: probs[i].tolist() for i, k in enumerate(KINDS)},  # P_rest: [T][L]
        "indirect_effect": {k: (probs[i] - runs.p_corrupted.mean()).tolist() for i, k in enumerate(KINDS)},
        "seconds": round(time.perf_counter() - t0, 2),
        "romeflow_version": __version__,
    }


# --------------------------------------------------------------------------------------------------
# Many known facts: per-fact rows, then averages (Figure 2) and the severed paths (Figure 3)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    known_id: int
    subject: str
    prompt: str
    attribute: str


def load_facts(path: str | Path) -> list[Fact]:
    """known_1000.json-style records: {known_id, subject, attribute, prompt, ...}."""
    path = check_input(path, "facts file")  # a FIFO would block the read
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the facts file ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    except ValueError as e:  # an integer of more digits than Python converts
        raise ValueError(f"{path}: invalid JSON ({json_number_problem(e)})") from e
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: must be a non-empty JSON list of facts")
    facts = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: [{i}]: must be an object")
        for key in ("subject", "attribute", "prompt"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"{path}: [{i}].{key}: missing or empty")
            if len(r[key]) > MAX_PROMPT_CHARS:
                raise ValueError(f"{path}: [{i}].{key}: is {len(r[key])} characters long, more than the "
                                 f"{MAX_PROMPT_CHARS} allowed")
        if r["subject"] not in r["prompt"]:
            raise ValueError(f"{path}: [{i}].subject: {r['subject']!r} not found in the prompt")
        facts.append(Fact(int(r.get("known_id", i)), r["subject"], r["prompt"], r["attribute"]))
    return facts


@torch.no_grad()
def greedy_matches(lm: LoadedModel, prompt: str, attribute: str) -> bool:
    """The rule for "the model knows the fact": greedy decoding from the prompt yields exactly the
    attribute's tokens (as tokenised after a space), one forward pass per attribute token."""
    tok = lm.tokenizer
    want = tok(continuation(attribute), add_special_tokens=False).input_ids
    ids = tok(prompt).input_ids
    for w in want:
        nxt = int(next_token_probs(lm, torch.tensor([ids]))[0].argmax())
        if nxt != w:
            return False
        ids = ids + [nxt]
    return True


def fact_effects(lm: LoadedModel, fact: Fact, std: float, params: TraceParams) -> dict:
    """One fact's row: P_clean, P_corr and IE[kind][position][layer], plus the severed curves."""
    t0 = time.perf_counter()
    p = make_prompt(lm, fact.prompt, fact.subject, fact.attribute)
    runs = clean_and_corrupted(lm, p, std, params)
    L = num_layers(lm.model)
    at = {"last_subject": p.last_subject, "last": p.length - 1}
    restores = [Restore(k, at[pos], l) for k in KINDS for pos in POSITIONS for l in range(L)]
    restores += [Restore("hidden", p.last_subject, l, sever=s) for s in SEVERABLE for l in range(L)]
    ie = (restored_probs(lm, runs, restores, params) - runs.p_corrupted.mean()).tolist()
    effects = {k: {pos: ie[(i * len(POSITIONS) + j) * L:(i * len(POSITIONS) + j + 1) * L]
                   for j, pos in enumerate(POSITIONS)} for i, k in enumerate(KINDS)}
    base = len(KINDS) * len(POSITIONS) * L
    severed = {s: ie[base + i * L: base + (i + 1) * L] for i, s in enumerate(SEVERABLE)}
    return {"known_id": fact.known_id, "prompt": fact.prompt, "subject": fact.subject,
            "attribute": fact.attribute, "tokens": p.length, "subject_range": list(p.subject),
            "p_clean": runs.p_clean, "p_corrupted": float(runs.p_corrupted.mean()),
            "effects": effects, "severed": severed, "seconds": round(time.perf_counter() - t0, 2)}


def run_header(lm: LoadedModel, params: TraceParams, std: float) -> dict:
    """What every row of a per-fact JSONL file must share to be averaged together."""
    return {"model_fingerprint": lm.fingerprint, "method": params.method(), "embedding_std": round(std, 6)}


def read_rows(path: Path, header: dict) -> Iterator[dict]:
    """Rows of a per-fact JSONL written with the same header (others are ignored; a torn last line too)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("header") == header:
            yield row


def trace_facts(lm: LoadedModel, facts: list[Fact], params: TraceParams, rows_path: str | Path,
                std: float | None = None, progress: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Check facts in order, trace the first ``params.n`` the model gets right; resumable.

    Each fact checked appends one line to ``rows_path``: {"header", "known_id", "correct"} and, for the
    correct ones, the traced row. Lines already there (same header) are reused, not recomputed.
    """
    rows_path = Path(rows_path)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    std = embedding_std(lm) if std is None else std
    header = run_header(lm, params, std)
    done = {r["known_id"]: r for r in read_rows(rows_path, header)}
    if rows_path.exists() and len(rows_path.read_text().splitlines()) != len(done):
        from ..io import write_text_atomic  # drop rows of another model or method, and torn lines

        write_text_atomic(rows_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    traced = []
    with open(rows_path, "a") as f:
        for fact in facts:
            if len(traced) >= params.n:
                break
            row = done.get(fact.known_id)
            if row is None:
                row = {"header": header, "known_id": fact.known_id,
                       "correct": greedy_matches(lm, fact.prompt, fact.attribute)}
                if row["correct"]:
                    row.update(fact_effects(lm, fact, std, params))
                f.write(json.dumps(row) + "\n")
                f.flush()
            if row["correct"]:
                traced.append(row)
            progress(row)
    return traced


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def average(rows: list[dict], checked: int, lm_name: str, fingerprint: str, params: TraceParams,
            std: float, source: str) -> dict:
    """Average indirect effects over the traced facts (schemas/trace-average.schema.json)."""
    if not rows:
        raise ValueError("no traced facts to average (the model got none of the facts checked right)")
    L = len(rows[0]["effects"]["hidden"]["last"])

    def curve(get) -> dict:
        per_layer = [mean_ci([get(r)[l] for r in rows]) for l in range(L)]
        return {"mean": [m for m, _ in per_layer], "ci95": [c for _, c in per_layer]}

    effects = {k: {pos: curve(lambda r, k=k, pos=pos: r["effects"][k][pos]) for pos in POSITIONS} for k in KINDS}
    severed = {"none": effects["hidden"]["last_subject"]}
    severed.update({s: curve(lambda r, s=s: r["severed"][s]) for s in SEVERABLE})
    ate, ate_ci = mean_ci([r["p_clean"] - r["p_corrupted"] for r in rows])
    peaks = {}
    for k in KINDS:
        for pos in POSITIONS:
            m = effects[k][pos]["mean"]
            l = max(range(L), key=lambda i: m[i])
            peaks[f"{k}.{pos}"] = {"layer": l, "aie": m[l], "ci95": effects[k][pos]["ci95"][l]}
    gap = [a - b for a, b in zip(severed["none"]["mean"], severed["mlp"]["mean"])]
    gap_attn = [a - b for a, b in zip(severed["none"]["mean"], severed["attn"]["mean"])]
    return {
        "format": "romeflow-trace-average/1",
        "model": {"name": lm_name, "fingerprint": fingerprint, "layers": L},
        "params": params.method(), "embedding_std": std, "noise_std": params.noise_scale * std,
        "facts": {"source": source, "checked": checked, "correct": len(rows),
                  "rule": "greedy decoding from the prompt yields exactly the attribute's tokens"},
        "ate": {"mean": ate, "ci95": ate_ci},
        "p_clean": mean_ci([r["p_clean"] for r in rows])[0],
        "p_corrupted": mean_ci([r["p_corrupted"] for r in rows])[0],
        "effects": effects, "peaks": peaks,
        "severed": {**severed, "gap_mlp": gap, "gap_attn": gap_attn,
                    "max_gap_mlp": max(gap), "max_gap_attn": max(gap_attn)},
        "known_ids": [r["known_id"] for r in rows],
        "seconds_per_fact": sum(r["seconds"] for r in rows) / len(rows),
        "romeflow_version": __version__,
    }


def chosen_layer(avg: dict) -> dict:
    """``layer: auto``: the layer of peak MLP AIE at the last subject token (layer.schema.json)."""
    peak = avg["peaks"]["mlp.last_subject"]
    return {"format": "romeflow-trace-layer/1", "layer": peak["layer"], "aie": peak["aie"], "ci95": peak["ci95"],
            "rule": "argmax over layers of the average MLP indirect effect at the last subject token",
            "model": avg["model"], "facts": avg["facts"]["correct"], "params": avg["params"]}


def read_layer(path: str | Path) -> int:
    """The chosen layer from a layer.json (what `layer: auto` resolves to)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the traced layer ({e.strerror}); "
                                f"run `dvc repro trace` (or `romeflow trace-average`) first") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg})") from e
    layer = data.get("layer") if isinstance(data, dict) else None
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"{path}: layer: missing or not a non-negative integer")
    return layer


def rows_file(cache: str | Path, lm: LoadedModel, params: TraceParams, std: float, facts: str | Path) -> Path:
    """Where the per-fact rows of a run live (in the cache: reused by any later run with the same
    model, method and facts file, e.g. `dvc repro trace` after an interrupted run)."""
    import hashlib

    key = json.dumps({**run_header(lm, params, std), "facts": Path(facts).name}, sort_keys=True)
    return Path(cache) / "trace" / f"{lm.fingerprint[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"


# --------------------------------------------------------------------------------------------------
# Artifacts: validated JSON and figures
# --------------------------------------------------------------------------------------------------


def write_validated(path: str | Path, schema: str, obj: dict) -> None:
    """Check ``obj`` against schemas/<schema>.schema.json, then write it atomically."""
    from ..io import write_json_atomic
    from ..schemas import validate

    errors = validate(schema, obj)
    if errors:
        where, what = errors[0]
        raise ValueError(f"{path}: {where}: {what} (schemas/{schema}.schema.json)")
    write_json_atomic(path, obj)


def write_trace(trace: dict, out: str | Path | None, figures: list[str | Path]) -> None:
    """One prompt's trace: the JSON report (if ``out``) and the heatmaps (.png / .svg)."""
    from ..evaluation.plots import trace_heatmaps

    if out:
        write_validated(out, "trace", trace)
    if figures:
        trace_heatmaps(trace, figures)


@dataclass
class AverageOutputs:
    """Where `romeflow trace-average` (and the trace stage) writes, inside one folder."""

    folder: Path

    @property
    def average(self) -> Path:
        return self.folder / "average.json"

    @property
    def layer(self) -> Path:
        return self.folder / "layer.json"

    def figures(self, name: str) -> list[Path]:
        return [self.folder / f"{name}.png", self.folder / f"{name}.svg"]


def trace_average(lm: LoadedModel, params: TraceParams, facts_path: str | Path, out: str | Path,
                  rows_path: str | Path, progress: Callable[[dict], None] = lambda row: None) -> dict:
    """Trace the first ``params.n`` facts the model gets right, average, and write into ``out``:
    average.json, layer.json (the `layer: auto` choice), average.{png,svg}, severed.{png,svg}."""
    from ..evaluation.plots import average_curves, severed_curves

    facts = load_facts(facts_path)
    std = embedding_std(lm)
    checked = [0]

    def count(row):
        checked[0] += 1
        progress(row)

    rows = trace_facts(lm, facts, params, rows_path, std, count)
    if len(rows) < params.n:
        raise ValueError(f"{facts_path}: the model got only {len(rows)} of {len(facts)} facts right; "
                         f"trace.n asks for {params.n}")
    avg = average(rows, checked[0], lm.name, lm.fingerprint, params, std, str(facts_path))
    outputs = AverageOutputs(Path(out))
    write_validated(outputs.average, "trace-average", avg)
    write_validated(outputs.layer, "trace-layer", chosen_layer(avg))
    average_curves(avg, outputs.figures("average"))
    severed_curves(avg, outputs.figures("severed"))
    return avg
