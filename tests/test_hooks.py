"""The one hook tool: named points, hooks in order, always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from romeflow.engine.hooks import Hook, on_input, on_output, run_with_hooks, stop_after


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_read_and_replace_at_named_points_and_are_removed():
    model, x = net(), torch.randn(3, 4)
    seen = {}
    zero_input = on_input("2", lambda _m, args: (torch.zeros_like(args[0]),))
    record = on_output("0", lambda _m, _i, out: seen.__setitem__("first", out.detach()))
    with run_with_hooks(model, [record, zero_input]):
        y = model(x)
    assert torch.equal(seen["first"], model[0](x))
    assert torch.allclose(y, model[2].bias.expand(3, 2))  # the last layer saw zeros
    assert hook_count(model) == 0
    assert not torch.allclose(model(x), y)  # and the model is itself again


def test_hooks_are_removed_when_the_forward_raises_and_run_in_order():
    model, x = net(), torch.randn(3, 4)
    order = []

    def boom(_m, _i, _o):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with run_with_hooks(model, [on_output(model[0], lambda *a: order.append("a")),
                                    on_output(model[0], lambda *a: order.append("b")), on_output("1", boom)]):
            model(x)
    assert order == ["a", "b"] and hook_count(model) == 0


def test_stop_after_ends_the_pass_at_its_point():
    model, x = net(), torch.randn(3, 4)
    seen, after = {}, []
    with run_with_hooks(model, [on_input("1", lambda _m, args: seen.__setitem__("k", args[0])), stop_after("1"),
                                on_input("2", lambda *a: after.append(1))]):
        model(x)
        after.append("not reached")
    assert torch.equal(seen["k"], model[0](x)) and after == [] and hook_count(model) == 0


def test_an_unknown_point_or_kind_is_refused_and_nothing_stays():
    model = net()
    with pytest.raises(AttributeError):
        with run_with_hooks(model, [on_output("0", lambda *a: None), on_output("9", lambda *a: None)]):
            pass
    with pytest.raises(ValueError, match="hook kind"):
        with run_with_hooks(model, [Hook("0", lambda *a: None, "backward")]):
            pass
    assert hook_count(model) == 0
