"""`romeflow verify`: a recomputation with the recorded thread count and dtype, and a relative tolerance
that accepts what other threads and machines change (the last bits) but not a real change.

On the tiny GPT-2 of the workflow tests, a recomputation with the recorded threads is byte-identical,
so every difference below is the perturbation the test made."""

from __future__ import annotations

import json

import pytest
import torch

from romeflow.pipeline.deltas import load_delta, save_delta
from romeflow.pipeline.verify import DEFAULT_RTOL, factor_difference

from test_workflow import built, cli, one_line, project  # noqa: F401 - fixtures


def verify_json(project, *args) -> tuple[int, list[dict]]:
    r = cli(project, "verify", "--json", *args)
    return r.exit_code, json.loads(r.stdout[:r.stdout.rindex("]") + 1]) if "[" in r.stdout else []


def perturbed(project, name: str, change) -> str:
    """deltas/NAME with ``change(update)`` applied to every edit's factors (rehashed: a valid file)."""
    path = project / "deltas" / f"{name}.safetensors"
    d = load_delta(path)
    for up in d.updates:
        change(up)
    save_delta(path, d)
    return str(path)


def test_verify_says_identical_then_reports_the_factor_difference(project):
    code, rows = verify_json(project, "a")
    assert code == 0 and rows[0]["result"] == "identical" and rows[0]["compute"] == [], rows
    path = perturbed(project, "a", lambda up: up.u.__setitem__(0, up.u[0] + 0.25))
    r = cli(project, "verify", "a")
    assert r.exit_code == 1 and "DIFFERENT" in r.stdout
    rel = 0.25 / load_delta(path).updates[0].u.abs().max().item()
    assert one_line(r) == (f"Error: verify failed: {path}: differs from a recomputation (max |Δ| of the factors = "
                           f"0.25, {rel:.3g} of the largest entry; --rtol {DEFAULT_RTOL:.3g})")
    assert cli(project, "verify", "a", "--atol", "0.3").exit_code == 0


@pytest.mark.parametrize("scale, passes", [(1e-3, False), (1e-4, True)])
def test_the_default_tolerance_fails_a_real_change_and_passes_machine_noise(project, scale, passes):
    """1e-3: every entry of u scaled by 1.001, a real (if small) change: it must fail. 1e-4: random noise
    of up to 1e-4 of the largest entry on u and v, twice what 1 vs 2 threads changed on Gemma-3-270M
    (4.5e-5, docs/reproducibility.md) and the top of the cross-machine range: it must pass."""
    if passes:
        gen = torch.Generator().manual_seed(0)
        noise = lambda t: t + scale * t.abs().max() * (2 * torch.rand(t.shape, generator=gen) - 1)  # noqa: E731
        change = lambda up: (up.u.copy_(noise(up.u)), up.v.copy_(noise(up.v)))  # noqa: E731
    else:
        change = lambda up: up.u.mul_(1 + scale)  # noqa: E731
    perturbed(project, "a", change)
    code, rows = verify_json(project, "a")
    rel = rows[0]["max_rel_diff"]
    # the measured relative difference is the perturbation: scale/(1+scale) for the scaling, <= scale for noise
    assert (rel == pytest.approx(scale / (1 + scale), rel=1e-3)) if not passes else (0 < rel <= scale * 1.001), rel
    assert (code == 0) == passes and rows[0]["result"].startswith("equal within" if passes else "DIFFERENT"), rows


def test_verify_recomputes_with_the_recorded_threads_and_restores_them(project, monkeypatch):
    d = load_delta(project / "deltas" / "a.safetensors")
    assert d.meta["threads"] == torch.get_num_threads() == 1 and d.meta["device"] == "cpu"  # recorded (conftest: 1)
    d.meta["threads"] = 3  # as if computed with 3 threads
    save_delta(project / "deltas" / "a.safetensors", d)
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    code, rows = verify_json(project, "a")
    assert code == 0 and calls == [3, 1] and torch.get_num_threads() == 1, (calls, rows)  # set for it, then restored
    assert rows[0]["compute"] == [], rows  # recomputed as recorded: nothing to explain


def test_threads_that_cannot_be_set_are_reported_and_do_not_fail(project, monkeypatch):
    d = load_delta(project / "deltas" / "a.safetensors")
    d.meta["threads"] = 2
    save_delta(project / "deltas" / "a.safetensors", d)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a torch that keeps its thread count
    code, rows = verify_json(project, "a")
    assert code == 0 and rows[0]["compute"] == ["threads differ: 2 vs 1"], rows
    assert rows[0]["result"] in ("equal factors (threads differ: 2 vs 1)",) or \
        rows[0]["result"].startswith("equal within") and rows[0]["result"].endswith("(threads differ: 2 vs 1)"), rows


def test_a_delta_written_before_threads_were_recorded_still_loads_and_verifies(project):
    d = load_delta(project / "deltas" / "a.safetensors")
    for key in ("threads", "device"):
        d.meta.pop(key)
    save_delta(project / "deltas" / "a.safetensors", d)
    assert "threads" not in load_delta(project / "deltas" / "a.safetensors").meta
    code, rows = verify_json(project, "a")
    assert code == 0 and rows[0]["result"] == "equal factors" and rows[0]["compute"] == [], rows  # the new one records them


def test_factor_difference_is_relative_to_the_largest_stored_entry(project):
    a = load_delta(project / "deltas" / "a.safetensors")
    b = load_delta(project / "deltas" / "a.safetensors")
    b.updates[0].v.mul_(2)
    diff, rel = factor_difference(a, b)  # |v - 2v| / |2v|: 0.5 exactly (a power-of-two scaling is exact)
    assert diff == b.updates[0].v.abs().max().item() / 2 and rel == 0.5
    b.updates.append(b.updates[0])
    assert factor_difference(a, b) == (float("inf"), float("inf"))  # edits that do not line up


def test_factor_difference_compares_a_gated_edits_units_too():
    from romeflow.engine.gated import NeuronUpdate
    from romeflow.pipeline.deltas import Delta

    gen = torch.Generator().manual_seed(0)
    units = lambda: NeuronUpdate("m.mlp", 1, torch.randn(2, 8, generator=gen), None,  # noqa: E731
                                 torch.randn(2, generator=gen), torch.randn(8, 2, generator=gen))
    a = units()
    b = NeuronUpdate(a.module, a.layer, a.gate.clone(), None, a.bias.clone(), a.down * 2)
    diff, rel = factor_difference(Delta([b], {}), Delta([a], {}))
    assert diff == a.down.abs().max().item() and rel == 1.0  # |2x - x| / |x|: 1 (doubling is exact)
    assert factor_difference(Delta([a], {}), Delta([a], {})) == (0.0, 0.0)
    with_up = NeuronUpdate(a.module, a.layer, a.gate, a.gate.clone(), None, a.down)  # another MLP kind
    assert factor_difference(Delta([with_up], {}), Delta([a], {})) == (float("inf"), float("inf"))


def test_a_gated_delta_verifies_identical(project):
    """The gated insert scores against the statistics' corpus: verify passes it as apply does."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  lr: 0.1\n", "  lr: 0.1\n  insert: gated\n", 1))
    r = cli(project, "apply", "edits/a.yaml", "--out", "deltas/a.safetensors")
    assert r.exit_code == 0, r.output
    assert load_delta(project / "deltas" / "a.safetensors").meta["format"] == "romeflow.delta/2"
    code, rows = verify_json(project, "a")
    assert code == 0 and rows[0]["result"] == "identical", rows
