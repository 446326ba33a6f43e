"""Figures of causal tracing, drawn with matplotlib's Agg backend (no display needed).

    trace_heatmaps   one prompt: P[o] after restoring each (token, layer), three panels (hidden, MLP,
                     attention) side by side, subject tokens marked with * (the paper's Figure 1 e-g)
    average_curves   AIE per layer with 95% CIs at the last subject token and at the last token
                     (Figure 2), one panel per kind of state
    severed_curves   AIE of hidden states at the last subject token, with later MLP / attention
                     outputs frozen at their corrupted values, and the gap (Figure 3)

Every function writes each requested path (.png and/or .svg) atomically and returns nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..io import atomic_path  # noqa: E402

_COLORS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_LINE = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
_TITLE = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}
plt.rcParams["svg.hashsalt"] = "romeflow"  # reproducible SVG ids
plt.rcParams["svg.fonttype"] = "none"


def _save(fig, paths: list[str | os.PathLike]) -> None:
    for p in paths:
        p = Path(p)
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=p.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight",
                        metadata={"Date": None} if p.suffix == ".svg" else None)
    plt.close(fig)


def trace_heatmaps(trace: dict, paths: list[str | os.PathLike]) -> None:
    """Three heatmaps of P_restored[o] over (token, layer), from a trace report."""
    tokens = trace["tokens"]
    a, b = trace["subject_range"]
    labels = [repr(t)[1:-1] + (" *" if a <= i < b else "") for i, t in enumerate(tokens)]
    window = trace["params"]["window"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(tokens) + 1.8), sharey=True, layout="constrained")
    for ax, kind in zip(axes, ("hidden", "mlp", "attn")):
        grid = trace["restored"][kind]  # [T][L]
        im = ax.imshow(grid, cmap=_COLORS[kind], aspect="auto", interpolation="nearest",
                       vmin=min(min(r) for r in grid), vmax=max(max(r) for r in grid))
        ax.set_yticks(range(len(tokens)), labels)
        n_layers = len(grid[0])
        step = max(1, n_layers // 9)
        ax.set_xticks(range(0, n_layers, step))
        where = "" if kind == "hidden" else f" ({window} layers around)"
        ax.set_title(f"restore {_TITLE[kind]}{where}", fontsize=10)
        ax.set_xlabel("layer")
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label(f"P[{trace['target'].strip()}]", fontsize=8)
    fig.suptitle(f"{trace['prompt']!r} → {trace['target']!r}   P clean {trace['p_clean']:.3f}, "
                 f"corrupted {trace['p_corrupted']:.3f}   (* = subject token, noise ν = "
                 f"{trace['noise_std']:.2f}, {trace['params']['samples']} samples)", fontsize=10)
    _save(fig, paths)


def average_curves(avg: dict, paths: list[str | os.PathLike]) -> None:
    """AIE per layer (mean ± 95% CI) at the last subject token and the last token, per kind."""
    n = avg["facts"]["correct"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharey=True, layout="constrained")
    for ax, kind in zip(axes, ("hidden", "mlp", "attn")):
        for pos, style, label in (("last_subject", "-", "last subject token"), ("last", "--", "last token")):
            c = avg["effects"][kind][pos]
            layers = range(len(c["mean"]))
            lo = [m - e for m, e in zip(c["mean"], c["ci95"])]
            hi = [m + e for m, e in zip(c["mean"], c["ci95"])]
            ax.plot(layers, c["mean"], style, color=_LINE[kind], label=label)
            ax.fill_between(layers, lo, hi, color=_LINE[kind], alpha=0.2 if pos == "last_subject" else 0.1)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_title(f"AIE of {_TITLE[kind]}", fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("average indirect effect on P[o]")
    fig.suptitle(f"{avg['model']['name']}: {n} known facts, ATE {avg['ate']['mean']:.3f} "
                 f"(95% CI ±{avg['ate']['ci95']:.3f}); shaded: 95% CI", fontsize=10)
    _save(fig, paths)


def severed_curves(avg: dict, paths: list[str | os.PathLike]) -> None:
    """Figure 3: restoring hidden states at the last subject token, with later modules frozen."""
    s = avg["severed"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    layers = range(len(s["none"]["mean"]))
    for key, color, label in (("none", "tab:purple", "effect of a single state"),
                              ("attn", "tab:red", "with attention severed"),
                              ("mlp", "tab:green", "with MLP severed")):
        m, e = s[key]["mean"], s[key]["ci95"]
        ax.bar([l + {"none": -0.27, "attn": 0.0, "mlp": 0.27}[key] for l in layers], m, width=0.27,
               color=color, alpha=0.8, label=label, yerr=e, error_kw={"lw": 0.6})
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("layer of the restored hidden state (last subject token)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("average indirect effect on P[o]")
    ax.set_title(f"Severed paths: largest gap (MLP) {s['max_gap_mlp']:.3f}, "
                 f"(attention) {s['max_gap_attn']:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, paths)
