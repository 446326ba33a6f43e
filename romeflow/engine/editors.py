"""Editors behind one interface: ROME and the paper's baselines FT, FT+L and KN (Appendix E).

An editor changes the loaded model in place and returns a ``WeightEdit``: the original values of the
weights it touched (so the benchmark restores them exactly and cheaply, never reloading the model)
and, where the change has one, its factored form as rank-one updates (ROME: one; KN: one per neuron),
the same kind of factors a delta file stores. FT's change is dense and has no such form.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Protocol

import torch

from .hooks import on_input, run_with_hooks
from .models import (LoadedModel, cache_kwargs, edited_module, edited_module_name, final_hidden, logits_at, new_cache,
                     num_layers, weight_out_in)
from .prompts import continuation, encode, flush_denormals, mean_per_pair, target_logprobs, teacher_forced
from .gated import NeuronUpdate, add_neurons, cut_neurons, hidden_width
from .inserts import INSERTS
from .rome import EditRequest, RankOneUpdate, Rome, RomeParams, add_rank_one


@dataclass
class WeightEdit:
    """What one edit changed: original weights (to restore bit for bit) and rank-one factors if any."""

    originals: dict[str, torch.Tensor]  # module name -> its (d_out, d_in) weight before the edit
    updates: list | None = None  # RankOneUpdate / gated.NeuronUpdate
    info: dict = field(default_factory=dict)
    widths: dict[int, int] = field(default_factory=dict)  # layer -> its MLP's hidden units before neurons were added

    def restore(self, model: torch.nn.Module) -> None:
        for layer, width in self.widths.items():
            cut_neurons(model, layer, width)
        for name, weight in self.originals.items():
            weight_out_in(model, name).copy_(weight)


def _snapshot(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: weight_out_in(model, name).clone() for name in names}


class Editor(Protocol):
    name: str

    def edit(self, request: EditRequest) -> WeightEdit:
        """Apply one edit to the model in place; the returned WeightEdit undoes it."""


# --------------------------------------------------------------------------------------------------
# ROME
# --------------------------------------------------------------------------------------------------


class RomeEditor:
    name = "rome"

    def __init__(self, lm: LoadedModel, params: RomeParams, second_moment: Callable[[int], torch.Tensor],
                 name: str = "rome", values: dict | None = None, root: Path = Path(".")):
        self.lm, self.params, self.name = lm, params, name
        self.rome = Rome(lm, params, second_moment, root, values)

    def edit(self, request: EditRequest) -> WeightEdit:
        result = self.rome.compute(request)
        up = result.update
        info = {"steps": len(result.nll_trace), "final_nll": result.nll_trace[-1], "protected": result.protected,
                "family": result.family, **({"scale": result.scale} if result.scale != 1.0 else {})}
        if isinstance(up, NeuronUpdate):  # the gated insert: hidden units appended, cut back on restore
            width = hidden_width(self.lm.model, up.layer)
            add_neurons(self.lm.model, up)
            return WeightEdit({}, [up], info, {up.layer: width})
        originals = _snapshot(self.lm.model, [up.module])
        add_rank_one(self.lm.model, up.module, up.u, up.v)
        return WeightEdit(originals, [up], info)


# --------------------------------------------------------------------------------------------------
# FT and FT+L: Adam on one layer's MLP projection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FtParams:
    """The ``ft:`` / ``ftl:`` sections of params.yaml. linf = None is FT; a number is FT+L's ε."""

    layer: int = 1
    lr: float = 5e-4
    steps: int = 25
    early_stop_loss: float = 0.03  # mean target NLL
    linf: float | None = None  # FT+L: clamp every weight to θ₀ ± linf after each step

    def to_dict(self) -> dict:
        return asdict(self)


def target_loss(lm: LoadedModel, prompt: str, target: str) -> torch.Tensor:
    """Mean per-token NLL of the target after the prompt (scalar, differentiable)."""
    tb = teacher_forced(lm.tokenizer, [prompt], [target])
    return -mean_per_pair(target_logprobs(lm.model, tb), tb)[0]


class FineTune:
    """FT (linf None) or FT+L: minimise the target's NLL on the rewrite prompt by Adam on W_proj."""

    def __init__(self, lm: LoadedModel, params: FtParams, name: str | None = None):
        self.lm, self.params = lm, params
        self.name = name or ("ft" if params.linf is None else "ftl")

    def edit(self, request: EditRequest) -> WeightEdit:
        p, model = self.params, self.lm.model
        weight = edited_module(model, p.layer).weight  # the parameter itself, in its stored orientation
        originals = _snapshot(model, [edited_module_name(model, p.layer)])
        was_trainable = weight.requires_grad
        weight.requires_grad_(True)
        try:
            with flush_denormals():
                losses = self._optimise(weight, request)
        finally:
            weight.requires_grad_(was_trainable)
        return WeightEdit(originals, None, {"steps": len(losses), "final_nll": losses[-1]})

    def _optimise(self, weight: torch.nn.Parameter, request: EditRequest) -> list[float]:
        """Adam steps until the target NLL is below early_stop_loss; FT+L projects onto θ₀ ± ε each step."""
        p = self.params
        theta0 = weight.detach().clone()
        opt = torch.optim.Adam([weight], lr=p.lr)
        losses = []
        for _ in range(p.steps):
            loss = target_loss(self.lm, request.prompt, request.target)
            losses.append(loss.item())
            if losses[-1] < p.early_stop_loss:
                break
            (weight.grad,) = torch.autograd.grad(loss, [weight])
            opt.step()
            weight.grad = None
            if p.linf is not None:
                with torch.no_grad():
                    weight.copy_(torch.clamp(weight, theta0 - p.linf, theta0 + p.linf))
        return losses


# --------------------------------------------------------------------------------------------------
# KN: knowledge neurons (integrated gradients), then shift their value vectors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnParams:
    """The ``kn:`` section of params.yaml."""

    ig_steps: int = 5  # Riemann steps of the integrated gradient (Dai et al.: 20)
    threshold: float = 0.2  # keep neurons with attribution ≥ threshold · the largest one
    max_neurons: int = 10
    scale: float = 2.0  # each neuron's value vector moves by scale · its norm towards e[new] − e[true]
    layers: tuple[int, ...] | None = None  # None: every layer

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers) if self.layers is not None else None}


def last_token_keys(lm: LoadedModel, prompt: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """The MLP keys (W_proj inputs) at the prompt's last token, for each layer: {layer: (d_in,)}."""
    ids = encode(lm.tokenizer, [prompt]).input_ids  # (1, T)
    keys: dict[int, torch.Tensor] = {}
    record = [on_input(edited_module(lm.model, layer),
                       lambda _m, args, layer=layer: keys.__setitem__(layer, args[0][0, -1].detach().clone()))
              for layer in layers]
    with torch.no_grad(), run_with_hooks(lm.model, record):
        final_hidden(lm.model, ids, torch.ones_like(ids))
    return keys


def neuron_attributions(lm: LoadedModel, prompt: str, token_id: int, layers: list[int],
                        steps: int) -> torch.Tensor:
    """Integrated gradients of P(token | prompt) w.r.t. each layer's MLP neurons (the keys): (L, d_in).

    attr_j = a_j · (1/m) Σ_{i=1..m} ∂P/∂a_j evaluated at (i/m) · a, with a the layer's keys at the last
    token, one layer at a time. Only the last token sees the scaled keys, so the tokens before it run
    once into a KV cache and each layer's m scaled copies run as one batch of single tokens.
    """
    model, backbone = lm.model, lm.model.base_model
    ids = lm.tokenizer(prompt).input_ids
    T = len(ids)
    keys = last_token_keys(lm, prompt, layers)
    prefix_cache = None
    if T > 1:
        with torch.no_grad():
            prefix = torch.tensor([ids[:-1]] * steps)  # (m, T - 1)
            prefix_cache = new_cache(backbone)  # filled in place
            backbone(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                     **cache_kwargs(backbone, prefix_cache))
    last = torch.tensor([[ids[-1]]] * steps)  # (m, 1)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps  # (m,)
    out = []
    for layer in layers:
        a = keys[layer]  # (d_in,)
        scaled = (alphas[:, None] * a[None]).requires_grad_(True)  # (m, d_in)

        def swap(_m, args, scaled=scaled):
            return (scaled[:, None, :].to(args[0].dtype),) + tuple(args[1:])  # (m, 1, d_in)

        with run_with_hooks(model, [on_input(edited_module(model, layer), swap)]):
            hidden = backbone(input_ids=last, attention_mask=torch.ones((steps, T), dtype=torch.long),
                              position_ids=torch.full((steps, 1), T - 1),
                              use_cache=prefix_cache is not None,
                              **cache_kwargs(backbone, copy.deepcopy(prefix_cache))).last_hidden_state
            prob = logits_at(model, hidden[:, -1]).softmax(-1)[:, token_id]  # (m,)
            (grad,) = torch.autograd.grad(prob.sum(), [scaled])  # (m, d_in)
        out.append(a * grad.mean(0))
    return torch.stack(out)


class KnowledgeNeurons:
    """KN (Dai et al.): find the neurons that express the old fact, then rewrite their value vectors."""

    name = "kn"

    def __init__(self, lm: LoadedModel, params: KnParams):
        self.lm, self.params = lm, params

    def _first_token(self, target: str) -> int:
        return self.lm.tokenizer(continuation(target), add_special_tokens=False).input_ids[0]

    def edit(self, request: EditRequest) -> WeightEdit:
        p, model = self.params, self.lm.model
        layers = list(p.layers) if p.layers is not None else list(range(num_layers(model)))
        old = self._first_token(request.target_true) if request.target_true else None
        new = self._first_token(request.target)
        with flush_denormals():
            attr = neuron_attributions(self.lm, request.prompt, old if old is not None else new, layers,
                                       p.ig_steps)  # (L, d_in)
        flat = attr.flatten()
        top = flat.topk(min(p.max_neurons, flat.numel()))
        keep = top.indices[top.values >= p.threshold * top.values[0]]
        emb = model.get_output_embeddings().weight.detach()  # (vocab, d)
        direction = emb[new] - (emb[old] if old is not None else 0)
        direction = direction / direction.norm()  # (d,)
        neurons = [(layers[int(i) // attr.shape[1]], int(i) % attr.shape[1]) for i in keep]
        names = sorted({edited_module_name(model, layer) for layer, _ in neurons})
        originals = _snapshot(model, names)
        updates = []
        for layer, j in neurons:
            name = edited_module_name(model, layer)
            w = weight_out_in(model, name)  # (d_out, d_in)
            u = p.scale * w[:, j].norm() * direction  # (d_out,)
            v = torch.zeros(w.shape[1])
            v[j] = 1.0
            add_rank_one(model, name, u, v)
            updates.append(RankOneUpdate(name, layer, u, v))
        return WeightEdit(originals, updates, {"neurons": [list(n) for n in neurons]})


def timed_edit(editor: Editor, request: EditRequest) -> tuple[WeightEdit, float]:
    t0 = time.perf_counter()
    edit = editor.edit(request)
    return edit, time.perf_counter() - t0


@dataclass(frozen=True)
class Method:
    """One row of the method table: what an editor reads from params.yaml and how it is built."""

    section: str  # the params.yaml section of its hyper-parameters (a field of params.Params)
    params: type  # that section's class
    build: Callable  # (lm, params, second_moment, name, values, root) -> Editor
    derive: Callable = lambda p: p  # the method's hyper-parameters from the section's (an insert: rome.insert set)


def _rome(lm, params, second_moment, name, values, root):
    return RomeEditor(lm, params, second_moment, name, values, root)


def _fine_tune(lm, params, _second_moment, name, _values, _root):
    return FineTune(lm, params, name)


def _knowledge_neurons(lm, params, _second_moment, _name, _values, _root):
    return KnowledgeNeurons(lm, params)


def _with_insert(name: str) -> Callable[[RomeParams], RomeParams]:
    return lambda p: replace(p, insert=name)


# name -> Method: a new editor is a class above and a row here (and its params.yaml section); each named
# insert of inserts.INSERTS is ROME with rome.insert set (`rome` itself takes params.yaml's)
METHOD_TABLE: dict[str, Method] = {
    "rome": Method("rome", RomeParams, _rome),
    **{name: Method("rome", RomeParams, _rome, _with_insert(name)) for name in INSERTS},
    "rome-r1": Method("rome", RomeParams, _rome, _with_insert("rank-one")),  # the name older bench runs use
    "ft": Method("ft", FtParams, _fine_tune),
    "ftl": Method("ftl", FtParams, _fine_tune),
    "kn": Method("kn", KnParams, _knowledge_neurons),
}
METHODS = tuple(METHOD_TABLE)


def parse_variant(spec: str, base, section: str, allowed: tuple[str, ...] | None = None,
                  reserved: tuple[str, ...] = ()) -> tuple[str, dict]:
    """'NAME:key=value:key=value' -> (NAME, {field: value}) for the fields of the dataclass ``base``
    (only ``allowed`` ones, when given), each parsed as the type of base's value: tuple values are
    joined by '+', booleans are true/false, numbers must be finite. ``section``: the params.yaml
    section named in messages; ``reserved``: names a variant may not take."""
    name, _, rest = spec.partition(":")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name in reserved:
        raise ValueError(f"--variant {spec!r}: the name must be new, lower-case letters, digits, '_' or '-'")
    types = {f.name: type(getattr(base, f.name)) for f in fields(base) if allowed is None or f.name in allowed}
    wanted = f"one of {', '.join(allowed)}" if allowed is not None else f"a {section} hyper-parameter"
    changes = {}
    for item in filter(None, rest.split(":")):
        key, eq, text = item.partition("=")
        if not eq or key not in types:
            raise ValueError(f"--variant {spec!r}: '{item}' is not key=value with {wanted}")
        kind = types[key]
        try:
            value = (tuple(text.split("+")) if kind is tuple else
                     {"true": True, "false": False}[text.lower()] if kind is bool else kind(text))
        except (KeyError, ValueError):
            raise ValueError(f"--variant {spec!r}: {key}: expected a {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"--variant {spec!r}: {section}.{key}: must be a finite number, got {value}")
        changes[key] = value
    return name, changes


def rome_variant(spec: str, base: RomeParams) -> tuple[str, RomeParams]:
    """'NAME:key=value:key=value' -> (NAME, base with those ROME hyper-parameters changed).

    A benchmark's extra ROME methods, e.g. 'l4:layer=4' or 'e4:insert=entity:layer=4'; tuple
    values are joined by '+' ('protect_sources=wikipedia+data/known_1000.json')."""
    name, changes = parse_variant(spec, base, "rome", reserved=METHODS + ("unedited",))
    return name, replace(base, **changes)


def make_editor(name: str, lm: LoadedModel, params, second_moment: Callable[[int], torch.Tensor],
                values: dict | None = None, root: Path = Path(".")) -> Editor:
    """An editor by method name; a RomeParams makes a ROME editor of that name (a benchmark's variant).

    ``values``: a (k*, v*) cache shared by the ROME variants of one benchmark (they differ only in the
    insert, and every edit starts from the restored base model). ``root``: what ROME's
    ``protect_sources`` paths are relative to (the project's folder)."""
    method = METHOD_TABLE["rome"] if isinstance(params, RomeParams) else METHOD_TABLE.get(name)
    if method is None:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    return method.build(lm, params, second_moment, name, values, root)
