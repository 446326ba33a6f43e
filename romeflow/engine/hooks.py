"""The one hook tool: forward hooks at named points of a model for the span of a ``with`` block.

Every read or write of a module's input or output mid-forward goes through ``run_with_hooks``: the
hooks are registered when the block starts and removed when it ends, also when the forward raises
(``StopForward`` ends a pass early on purpose). A point is a submodule's name, as
``model.get_submodule`` takes it ("model.layers.1.mlp.down_proj"), or the module itself.

    with run_with_hooks(model, [on_input(name, record), on_output(block, stop)]):
        model(input_ids=ids)

(The one hook that is not here is models._follow_inputs: it moves inputs to the model's device for the
model's whole life, so it is registered once when a model is prepared.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass at its point (``run_with_hooks`` swallows it)."""


@dataclass(frozen=True)
class Hook:
    point: str | nn.Module  # a submodule's name, or the module
    fn: Callable  # "output": fn(module, inputs, output) -> output or None; "input": fn(module, args) -> args or None
    kind: str = "output"


def on_output(point: str | nn.Module, fn: Callable) -> Hook:
    """fn(module, inputs, output) after the point's forward; what it returns (if not None) replaces the output."""
    return Hook(point, fn, "output")


def on_input(point: str | nn.Module, fn: Callable) -> Hook:
    """fn(module, args) before the point's forward; what it returns (if not None) replaces the positional args."""
    return Hook(point, fn, "input")


def stop_after(point: str | nn.Module) -> Hook:
    """End the forward pass once the point has run (the caller reads what earlier hooks recorded)."""
    def stop(_module, _inputs, _output):
        raise StopForward
    return Hook(point, stop, "output")


@contextmanager
def run_with_hooks(model: nn.Module, hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` in order (several at one point run in that order), run the block, remove them all.
    A ``StopForward`` raised inside the block ends it quietly."""
    handles = []
    try:
        for h in hooks:
            module = model.get_submodule(h.point) if isinstance(h.point, str) else h.point
            if h.kind == "output":
                handles.append(module.register_forward_hook(h.fn))
            elif h.kind == "input":
                handles.append(module.register_forward_pre_hook(h.fn))
            else:
                raise ValueError(f"hook kind must be 'input' or 'output', got {h.kind!r}")
        yield
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
