"""The gated insert: an edit as two neurons added to the edit layer's MLP, silent below a threshold.

Every linear insert gives a key k the share s(k) = kᵀC⁻¹k*/k*ᵀC⁻¹k* of the edit (docs/specificity.md), so a
change large enough for the paraphrases reaches the neighbours that share the subject's last token. A
threshold can tell them apart (bench/gate_diagnostic.py). Here the edit is written as hidden units of the
MLP itself, so that an exported model is a standard one with a slightly wider MLP:

    score     s(x) = aᵀx / aᵀx*                             x: the MLP's input at a token; x*: at the rewrite
                                                            prompt's last subject token (s(x*) = 1)
    gate      g(x) = [φ(β(s − τ₀c)) − φ(β(s − τ₁c))] · c / (β(τ₁ − τ₀))     c(x) = eᵀx / eᵀx* ≈ 1
    output    out(x) = W_out k(x) + g(x) δ                  δ: the edit's change, optimised with g in place

a is a logistic direction without intercept: the prefixes and the rewrite prompt (at the last subject token)
against the other tokens of those prompts, the subject's family (reference names and made-up siblings
sharing its last token, never the benchmark's neighbours) and generic text. φ is the MLP's own activation;
β is chosen so that φ(z) is exactly 0 in float for every z ≤ −β·SOFT: where s ≤ min(τ₀c, τ₁c) − SOFT
both neurons give exactly 0, and the edit adds exactly nothing (with c > 0, as on the default model's
text, that is s ≤ τ₀c − SOFT). The gate rises from 0 at τ₀ to 1 at τ₁ and stays at c above; at x* it is
1, so the edit adds exactly δ there (to float rounding), as Eq. 2's Ŵ k* = v* does. A gated MLP (Llama,
Gemma, ...) has no bias: the gate's offsets ride on c(x), a direction of nearly constant projection over
text (e = the Fisher direction of its mean), which is also the second factor act(gate·x)·(up·x). An MLP
with biases (GPT-2, GPT-J, NeoX) takes the offsets as biases and has c = 1.

Shapes: x (…, d_model); a, e (d_model,); δ (d_model,) on the MLP's output (after W_out, before any post-norm).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .hooks import Hook, on_input, on_output, run_with_hooks, stop_after
from .models import LoadedModel, ModelError, arch_of, blocks
from .prompts import encode, fill, subject_last_index

SOFT = 0.25  # width, in score units, of the band below τ₀ where the activation is not yet exactly 0
MAX_LOW, MAX_HIGH = 0.7, 0.9  # the highest thresholds a family may push the gate to (the prompt scores 1)
TEXT_TOKENS = 2048  # generic-text tokens the gate is fitted against (the statistics corpus's first ones)
FAMILY_MAX = 64  # family members the gate is fitted against (each in the relation and alone)


@dataclass
class NeuronUpdate:
    """Hidden units added to the MLP of one block: out += down · h, h_i = φ(gate_i·x)·(up_i·x) (gated MLP)
    or h_i = φ(gate_i·x + bias_i) (MLP with biases)."""

    module: str  # the MLP's name ("model.layers.1.mlp")
    layer: int
    gate: torch.Tensor  # (r, d_model)
    up: torch.Tensor | None  # (r, d_model), gated MLPs
    bias: torch.Tensor | None  # (r,), MLPs with biases
    down: torch.Tensor  # (d_model, r)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass
class Gate:
    """g(x) of one edit (module docstring), in float32."""

    a: torch.Tensor  # (d_model,) the score's direction, scaled so that the rewrite prompt scores 1
    e: torch.Tensor  # (d_model,) the constant direction, scaled so that the rewrite prompt's projection is 1
    low: float  # τ₀
    high: float  # τ₁
    beta: float
    gated: bool  # a gated MLP (c = eᵀx); else c = 1 and the offsets are biases

    def c(self, x: torch.Tensor) -> torch.Tensor:  # (…,)
        return x @ self.e.to(x) if self.gated else torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)

    def score(self, x: torch.Tensor) -> torch.Tensor:  # (…,) s(x)
        return x @ self.a.to(x)

    def update(self, module: str, layer: int, delta: torch.Tensor) -> NeuronUpdate:
        """The two neurons that compute g(x) δ."""
        b, lo, hi = self.beta, self.low, self.high
        down = torch.stack([delta, -delta], 1) / (b * (hi - lo))  # (d_model, 2)
        if self.gated:
            gate = torch.stack([b * (self.a - lo * self.e), b * (self.a - hi * self.e)])  # (2, d_model)
            return NeuronUpdate(module, layer, gate, torch.stack([self.e, self.e]), None, down)
        return NeuronUpdate(module, layer, torch.stack([b * self.a, b * self.a]), None,
                            torch.tensor([-b * lo, -b * hi]), down)


# --------------------------------------------------------------------------------------------------
# Neurons in the model
# --------------------------------------------------------------------------------------------------


def _mlp_parts(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Module]:
    arch, block = arch_of(model), blocks(model)[layer]
    gate = block.get_submodule(arch.mlp_gate) if arch.mlp_gate else None
    return block.get_submodule(arch.mlp_in), gate, block.get_submodule(arch.mlp_out), block.get_submodule(arch.mlp_act)


def mlp_name(model: nn.Module, layer: int) -> str:
    arch = arch_of(model)
    return f"{arch.layers}.{layer}.{arch.mlp}"


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def _resize_rows(module: nn.Module, rows: torch.Tensor | None, bias: torch.Tensor | None, keep: int | None = None):
    """An input projection with ``rows`` (r, d_model) appended as hidden units (and ``bias`` (r,)), or cut
    back to its first ``keep`` units. Linear weights are (d_ff, d_model), Conv1D ones (d_model, d_ff)."""
    conv1d = type(module).__name__ == "Conv1D"
    w = module.weight.data
    if w.device.type == "meta":
        raise ModelError("the gated insert cannot edit an MLP whose weights accelerate offloads")
    axis = 1 if conv1d else 0
    if keep is not None:
        _set(module, "weight", w.narrow(axis, 0, keep).clone())
        if module.bias is not None:
            _set(module, "bias", module.bias.data[:keep].clone())
    else:
        new = rows.to(w.device, w.dtype)
        _set(module, "weight", torch.cat([w, new.T if conv1d else new], axis))
        if module.bias is not None:
            _set(module, "bias", torch.cat([module.bias.data, bias.to(w.device, w.dtype)]))
    width = module.weight.shape[axis]
    if conv1d:
        module.nf = width
    else:
        module.out_features = width


def _resize_cols(module: nn.Module, cols: torch.Tensor | None, keep: int | None = None):
    """The output projection with ``cols`` (d_model, r) appended, or cut back to its first ``keep`` inputs."""
    conv1d = type(module).__name__ == "Conv1D"
    w = module.weight.data
    axis = 0 if conv1d else 1
    if keep is not None:
        _set(module, "weight", w.narrow(axis, 0, keep).clone())
    else:
        new = cols.to(w.device, w.dtype)
        _set(module, "weight", torch.cat([w, new.T if conv1d else new], axis))
    if not conv1d:
        module.in_features = module.weight.shape[1]


@torch.no_grad()
def unit_activations(model: nn.Module, layer: int, x: torch.Tensor, r: int) -> torch.Tensor:
    """The last r hidden units' activations h (N, r) for MLP inputs x (N, d_model), by the MLP's own modules:
    what its output projection multiplies (the input of W_out)."""
    inp, gate, _out, act = _mlp_parts(model, layer)
    x = x.to(inp.weight.dtype)
    if gate is not None:
        return act(gate(x)[..., -r:]) * inp(x)[..., -r:]
    return act(inp(x)[..., -r:])


def hidden_width(model: nn.Module, layer: int) -> int:
    inp = _mlp_parts(model, layer)[0]
    return inp.weight.shape[1 if type(inp).__name__ == "Conv1D" else 0]


def zero_units(model: nn.Module, layer: int, r: int) -> NeuronUpdate:
    """r hidden units that add exactly nothing (all weights 0: φ(0)·0 = 0, and a zero output column)."""
    d = model.get_input_embeddings().weight.shape[1]
    gated = arch_of(model).mlp_gate is not None
    return NeuronUpdate(mlp_name(model, layer), layer, torch.zeros(r, d), torch.zeros(r, d) if gated else None,
                        None if gated else torch.zeros(r), torch.zeros(d, r))


def add_neurons(model: nn.Module, update: NeuronUpdate) -> None:
    """Append the update's hidden units to its block's MLP (in the weights' own dtype and device)."""
    inp, gate, out, _ = _mlp_parts(model, update.layer)
    if gate is not None:
        _resize_rows(gate, update.gate, None)
        _resize_rows(inp, update.up, None)
    else:
        _resize_rows(inp, update.gate, update.bias)
    _resize_cols(out, update.down)


def cut_neurons(model: nn.Module, layer: int, width: int) -> None:
    """Drop every hidden unit of the block's MLP beyond the first ``width`` (the ones added after them)."""
    inp, gate, out, _ = _mlp_parts(model, layer)
    for m in (gate, inp):
        if m is not None:
            _resize_rows(m, None, None, keep=width)
    _resize_cols(out, None, keep=width)


# --------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _exact_zero_below(act_name: str, act: nn.Module, dtype: torch.dtype) -> float:
    """z₀ > 0 with φ(z) exactly 0 for every z ≤ −z₀ (φ in ``dtype``): 10% beyond the last non-zero point of a
    fine grid down to −1000, taken over the memory layouts the kernels treat differently (a vectorised
    contiguous run, strided columns, short tails: their tanh and exp round differently near the edge)."""
    z = -torch.linspace(0.0, 1000.0, 400_001, dtype=torch.float32).to(dtype)  # 0 .. -1000, step 0.0025
    with torch.no_grad():
        runs = [act(z), act(torch.stack([z, z, z], 1)[:, 1]), torch.cat([act(z[i:i + 3]) for i in range(0, 4003, 3)]),
                act(z.repeat(5, 1).T.contiguous()[:, 2:4])[:, 0]]
    last = 0.0
    for y in runs:
        nonzero = (y != 0).nonzero()
        if len(nonzero) and int(nonzero.max()) == len(y) - 1 and len(y) == len(z):
            raise ModelError(f"the MLP's activation {act_name} is not exactly 0 below -1000: the gated insert needs one that is")
        if len(nonzero):
            last = max(last, float(-z[int(nonzero.max())]))
    return 1.1 * last


def exact_zero_below(model: nn.Module, layer: int) -> float:
    act = _mlp_parts(model, layer)[3]
    dtype = next(model.parameters()).dtype
    return _exact_zero_below(type(act).__name__, act, dtype)


@lru_cache(maxsize=16)
def _exact_identity_above(act_name: str, act: nn.Module, dtype: torch.dtype) -> float:
    """z₁ > 0 with φ(z) = z to float precision (relative 1e-6) for every z ≥ z₁ on a grid up to 1000, over
    the same layouts as ``_exact_zero_below``; 10% beyond the last point where it is not."""
    z = torch.linspace(0.0, 1000.0, 400_001, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        runs = [act(z), act(torch.stack([z, z, z], 1)[:, 1]), act(z.repeat(5, 1).T.contiguous()[:, 2:4])[:, 0]]
    last = 0.0
    for y in runs:
        off = ((y.double() - z.double()).abs() > 1e-6 * z.double().abs()).nonzero()
        if len(off):
            last = max(last, float(z[int(off.max())]))
    return 1.1 * last


def slope(model: nn.Module, layer: int, gate_high: float) -> float:
    """β: large enough that φ is exactly 0 below τ₀ − SOFT (z ≤ −z₀) and exactly the identity at the rewrite
    prompt (s = 1: both units' pre-activations β(1 − τ) ≥ z₁), so the edit adds exactly δ there."""
    act = _mlp_parts(model, layer)[3]
    dtype = next(model.parameters()).dtype
    z1 = _exact_identity_above(type(act).__name__, act, dtype)
    return max(exact_zero_below(model, layer) / SOFT, z1 / max(1.0 - gate_high, 1e-3), 1.0 / SOFT)


@torch.no_grad()
def _inputs_at(lm: LoadedModel, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The MLP's input x at every token, (B, T, d_model) float32; the forward stops after the block."""
    found = {}
    hook = on_input(blocks(lm.model)[layer].get_submodule(arch_of(lm.model).mlp),
                    lambda _m, args: found.__setitem__("x", args[0].detach()))
    with run_with_hooks(lm.model, [hook, stop_after(blocks(lm.model)[layer])]):
        lm.model(input_ids=input_ids, attention_mask=attention_mask)
    return found["x"].float()


@torch.no_grad()
def mlp_inputs(lm: LoadedModel, layer: int, texts: list[str], where: list[int] | None = None) -> torch.Tensor:
    """The MLP's input x at one position of each text ((B, d_model); ``where``: the index; default the
    last token) float32, the forward stopped after the block."""
    batch = encode(lm.tokenizer, texts)
    x = _inputs_at(lm, layer, batch.input_ids, batch.attention_mask)  # (B, T, d_model)
    at = torch.tensor(where) if where is not None else batch.lengths - 1
    return x[torch.arange(len(texts)), at.to(x.device)]


@torch.no_grad()
def text_inputs(lm: LoadedModel, layer: int, rows: list[list[int]]) -> torch.Tensor:
    """x at every token of the token rows but each row's first: (N, d_model), float32."""
    out = []
    for row in rows:
        ids = torch.tensor([row])  # (1, T)
        out.append(_inputs_at(lm, layer, ids, torch.ones_like(ids))[0, 1:])
    return torch.cat(out)


def logistic_direction(pos: torch.Tensor, negatives: list[torch.Tensor], text: torch.Tensor, l2: float,
                       steps: int = 200) -> torch.Tensor:
    """a (d,) of an L2-regularised logistic regression without intercept, P(positive | x) = σ(aᵀx): the
    positives (p, d) against each group of ``negatives`` (n_i, d) and text (t, d), every group weighing the
    same, on coordinates divided by their spread over the text (returned for raw x). float64, L-BFGS:
    deterministic."""
    scale = text.double().std(0).clamp_min(1e-6)  # (d,)
    groups = [(pos.double() / scale, 1.0), (text.double() / scale, -1.0)]
    groups += [(n.double() / scale, -1.0) for n in negatives if len(n)]
    w = torch.zeros(pos.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(nn.functional.softplus(-y * (z @ w)).mean() for z, y in groups) / len(groups) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach() / scale


def constant_direction(text: torch.Tensor) -> torch.Tensor:
    """e (d,) with the most nearly constant projection over the text (the Fisher direction of its mean,
    Σ⁻¹μ with a small ridge), scaled so that the mean projection is 1. float64."""
    x = text.double()
    mu = x.mean(0)
    cov = torch.cov(x.T)
    cov = cov + 1e-6 * cov.diagonal().mean() * torch.eye(len(mu), dtype=cov.dtype)
    e = torch.linalg.solve(cov, mu)
    return e / (x @ e).mean()


def family_inputs(rome, request, layer: int) -> torch.Tensor:
    """x of the subject's family (inserts.family): every reference name sharing its last token (a seeded
    sample of FAMILY_MAX when there are more), then made-up siblings up to FAMILY_MAX in all, each asked the
    relation and alone, at their last subject token: (2f, d_model), or (0, d_model) without a family."""
    from .inserts import family

    rng = random.Random(f"{rome.params.seed}:gate:{request.subject}")
    real = set(rome.names().sharing(rome.lm.tokenizer, request.subject))
    members = [n for n in family(rome, request.subject) if n != request.subject]
    known = [n for n in members if n in real]
    known = rng.sample(known, min(FAMILY_MAX, len(known)))
    made_up = [n for n in members if n not in real]
    names = known + rng.sample(made_up, min(max(FAMILY_MAX - len(known), 0), len(made_up)))
    if not names:
        return torch.zeros(0, rome.lm.model.config.hidden_size)
    tok = rome.lm.tokenizer
    texts = [fill(t, n) for n in names for t in (request.relation, "{}")]
    where = [subject_last_index(tok, t, n) for n in names for t in (request.relation, "{}")]
    return torch.cat([mlp_inputs(rome.lm, layer, texts[i:i + 64], where[i:i + 64]) for i in range(0, len(texts), 64)])


@torch.no_grad()
def prompt_inputs(lm: LoadedModel, layer: int, texts: list[str], where: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x at each text's position ``where`` (B, d_model), and at every other token but <bos> and the first
    (the rest of the prompts: the subject's other tokens, the context, the relation) (N, d_model)."""
    batch = encode(lm.tokenizer, texts)
    x = _inputs_at(lm, layer, batch.input_ids, batch.attention_mask)  # (B, T, d_model)
    at = torch.tensor(where)
    rest = batch.attention_mask.bool().clone()
    rest[:, 0] = False
    rest[torch.arange(len(texts)), at] = False
    return x[torch.arange(len(texts)), at], x[rest.to(x.device)]


def held_inputs(rome, request, layer: int) -> torch.Tensor:
    """x of the request's ``protect:`` subjects at their last token, asked the relation, alone, and after each
    context prefix: (h, d_model), or (0, d_model). The gate must stay exactly closed there (``fit_gate``)."""
    names = [n for n in dict.fromkeys(request.protect) if n != request.subject]
    if not names:
        return torch.zeros(0, rome.lm.model.config.hidden_size)
    templates = [request.relation, "{}"] + [p + "{}" for p in rome.prefixes if p]
    tok = rome.lm.tokenizer
    return mlp_inputs(rome.lm, layer, [fill(t, n) for n in names for t in templates],
                      [subject_last_index(tok, t, n) for n in names for t in templates])


def gate_examples(rome, request, layer: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """What the gate's direction is fitted on: the positives (p, d_model), the edit's prefixes and rewrite prompt
    (last) at the last subject token; the groups of negatives [family (f, d), the rest of those prompts' tokens
    (r, d), the ``protect:`` subjects (h, d)]; and the text (t, d_model)."""
    tok = rome.lm.tokenizer
    templates = [p + "{}" for p in rome.prefixes] + [request.relation]
    pos, rest = prompt_inputs(rome.lm, layer, [fill(t, request.subject) for t in templates],
                              [subject_last_index(tok, t, request.subject) for t in templates])  # (p, d), (r, d)
    text = rome.text_inputs(layer)  # (t, d_model)
    held = held_inputs(rome, request, layer)  # (h, d_model)
    family = family_inputs(rome, request, layer)  # (f, d_model)
    return pos, [family, rest, held], text


def fit_gate(rome, request, layer: int, low: float, high: float, l2: float) -> Gate:
    """The edit's gate: a from its prefixes and rewrite prompt (at the last subject token) against the rest
    of those prompts' tokens, its family, the ``protect:`` subjects and text; e from text. A protected
    subject's input the gate would not keep exactly closed is refused (InsertError, naming it)."""
    from .rome import InsertError

    pos, (family, rest, held), text = gate_examples(rome, request, layer)
    a = logistic_direction(pos, [family, rest, held], text, l2)
    x_star = pos[-1].double()  # the rewrite prompt's input
    if not float(x_star @ a) > 0:
        raise ValueError(f"the gate of '{request.subject}' does not separate its own prompt from the family and "
                         f"text at layer {layer} (score {float(x_star @ a):.3g})")
    a = a / (x_star @ a)  # s(x*) = 1
    gated = arch_of(rome.lm.model).mlp_gate is not None
    e = constant_direction(text) if gated else torch.zeros_like(a)
    if gated:
        e = e / (x_star @ e)  # c(x*) = 1
    # the gate's own known negatives close it: a family member (or protected subject) the regression left above
    # τ₀ − SOFT raises τ₀ (and τ₁ with it) for this edit, up to MAX_LOW (MAX_HIGH)
    need = closing_low(a.float(), e.float(), gated, torch.cat([family, held]))
    if need > low:
        low, high = min(need, MAX_LOW), min(max(high, need + (high - low)), MAX_HIGH)
    gate = Gate(a.float(), e.float(), low, high, slope(rome.lm.model, layer, high), gated)
    if len(held):
        z0 = exact_zero_below(rome.lm.model, layer)
        s, c = gate.score(held), gate.c(held)
        open_ = gate.beta * (s - torch.minimum(low * c, high * c)) > -z0  # (h,) not exactly closed
        if open_.any():
            names = [n for n in dict.fromkeys(request.protect) if n != request.subject]
            who = names[int(open_.nonzero()[0]) // (len(held) // len(names))]
            raise InsertError(f"protect: {who}: the gate of '{request.subject}' at layer {layer} cannot keep it "
                              f"closed (its score {float(s[open_].max()):.2f} is above the threshold)")
    return gate


def closing_low(a: torch.Tensor, e: torch.Tensor, gated: bool, x: torch.Tensor) -> float:
    """The least τ₀ at which every input x (n, d_model) is exactly closed, τ₀ ≥ (s(x) + SOFT) / c(x) (inputs
    with c ≤ 0 left out: there τ₁ decides, and c > 0 on all of the default model's text); 0 without any."""
    if not len(x):
        return 0.0
    s = x.float() @ a
    c = x.float() @ e if gated else torch.ones_like(s)
    ok = c > 0
    return float(((s[ok] + SOFT) / c[ok]).max()) if ok.any() else 0.0


def gate_values(gate: Gate, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x) (…,) computed as the two neurons compute it (float32): what the hook adds δ times."""
    b, lo, hi = gate.beta, gate.low, gate.high
    s, c = gate.score(x.float()), gate.c(x.float())
    both = act(torch.stack([b * (s - lo * c), b * (s - hi * c)]))  # (2, …)
    return (both[0] - both[1]) * c / (b * (hi - lo))


@torch.no_grad()
def silent_before_subject(rome, layer: int, gate: Gate, request) -> bool:
    """Whether g is exactly 0 at every token before the last subject token of v*'s prompts (the rewrite
    prompt after each context prefix, and the essence prompt). The MLP's input at layer l does not depend on
    what the units add there, so then those tokens are the same at every step of Eq. 4 and run once, into a
    KV cache (``rome._cached_forward``)."""
    tok = rome.lm.tokenizer
    templates = [p + request.relation for p in rome.prefixes] + [rome.params.essence_prompt]
    batch = encode(tok, [fill(t, request.subject) for t in templates])
    found = {}
    mlp = blocks(rome.lm.model)[layer].get_submodule(arch_of(rome.lm.model).mlp)
    with run_with_hooks(rome.lm.model, [on_input(mlp, lambda _m, args: found.__setitem__("x", args[0])),
                                        stop_after(blocks(rome.lm.model)[layer])]):
        rome.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    g = gate_values(gate, _mlp_parts(rome.lm.model, layer)[3], found["x"])  # (B, T)
    for row, t in enumerate(templates):
        if (g[row, :subject_last_index(tok, t, request.subject)] != 0).any():
            return False
    return True


def gate_hook(rome, layer: int, gate: Gate, delta: torch.Tensor) -> list[Hook]:
    """Hooks that add g(x_t) δ to the MLP's output at every token t of a forward (the written neurons'
    effect): the MLP's input is read on its way in."""
    mlp = blocks(rome.lm.model)[layer].get_submodule(arch_of(rome.lm.model).mlp)
    act = _mlp_parts(rome.lm.model, layer)[3]

    def add(_module, inputs, output):
        g = gate_values(gate, act, inputs[0])  # (B, T)
        return (output.float() + g[..., None] * delta.to(output.device)).to(output.dtype)

    return [on_output(mlp, add)]


# --------------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------------


def compute(rome, request, layer: int):
    """The gated insert of one edit on the model as it is now (not modified): k* (Eq. 3, kept for the
    record and v*'s norm), the gate, v* = W k* + δ with δ optimised under g (Eq. 4 with the neurons in
    place at every token), and the two neurons."""
    import hashlib
    import time

    from .prompts import flush_denormals
    from .rome import EditResult, key, value

    spec, lm = rome.spec, rome.lm
    clock = time.perf_counter
    with flush_denormals():
        t0 = clock()
        prefixes = rome.prefixes
        t1 = clock()
        k_star = key(lm, layer, request.subject, prefixes)  # (d_in,)
        gate = rome.scratch["gate"] = fit_gate(rome, request, layer, spec.gate_low, spec.gate_high, spec.gate_l2)
        t2 = clock()
        tag = hashlib.sha1(torch.cat([gate.a, gate.e, torch.tensor([gate.low, gate.high, gate.beta])]).numpy().tobytes())
        value_key = rome._value_key(request, layer) + ("gated", tag.hexdigest())
        cached = None if rome.values is None else rome.values.get(value_key)
        if cached is None:
            quiet = silent_before_subject(rome, layer, gate, request)  # then the prompts' heads can be cached
            v_star, trace = value(lm, layer, request, prefixes, k_star, rome.params,
                                  hooks_for=lambda delta: gate_hook(rome, layer, gate, delta), cache_prefix=quiet)
            if rome.values is not None:
                rome.values[value_key] = (k_star, v_star, trace)
        else:
            _, v_star, trace = cached
            v_star = v_star.to(k_star.device)
        t3 = clock()
        delta = (v_star - rome.module_out(layer, k_star)).float().cpu()  # (d_model,)
        update = gate.update(mlp_name(lm.model, layer), layer, delta)
        t4 = clock()
    timings = {"prefixes": t1 - t0, "key": t2 - t1, "value": t3 - t2, "insert": t4 - t3}
    held = [n for n in dict.fromkeys(request.protect) if n != request.subject]  # the gate is closed there, exactly
    return EditResult(request, update, k_star, v_star, trace, timings, protected=held,
                      family={"gate": {"low": gate.low, "high": gate.high, "beta": gate.beta}})
