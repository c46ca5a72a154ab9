"""Plots of partition trade-offs (matplotlib, imported on use: ``pip install reftrace[plot]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from reftrace.errors import ArgumentError
from reftrace.graph import Graph

__all__ = ["pareto"]


def _default_marks() -> dict[str, Any]:
    """functorch's default, torch's min-cut, and the save-the-matmuls policy of torch's selective
    activation checkpointing and JAX (``dots_saveable``)."""
    from reftrace.transforms.policies import dots_saveable
    return {"default (functorch's default)": "default", "mincut (torch's min-cut)": "mincut",
            "dots_saveable (save matmuls/convs)": dots_saveable}


def pareto(joint: Graph, path: str | Path, *, points: int | None = 12,
           marks: Mapping[str, Any] | None = None, title: str | None = None) -> tuple[Any, ...]:
    """Draw the activation-bytes / recompute-FLOPs Pareto frontier of ``joint`` to ``path`` (the
    format from its suffix: ``.svg``, ``.png``, ``.pdf``) and return its partitions (``rt.pareto``).

    ``marks``: label -> policy of extra points to draw (default: ``default``, ``mincut``,
    ``dots_saveable``); points of policies that recompute more than the frontier at their memory
    show how far from optimal they are.
    """
    from reftrace.transforms.cost import cost
    from reftrace.transforms.optimal import pareto as frontier_of
    from reftrace.transforms.partition import partition

    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png", ".pdf"):
        raise ArgumentError(f"plot.pareto: {path} should end in .svg, .png or .pdf")
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ArgumentError("plot.pareto draws with matplotlib: pip install matplotlib "
                            "(or reftrace[plot])") from None
    frontier = frontier_of(joint, points=points)
    costs = [cost(p) for p in frontier]
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    xs = [c.activation_bytes / 2**20 for c in costs]
    ys = [c.recompute_flops / 1e6 for c in costs]
    axes.step(xs, ys, where="post", color="tab:blue", alpha=0.5)
    axes.plot(xs, ys, "o", color="tab:blue", label="rt.optimal (Pareto frontier)")
    chosen = marks if marks is not None else _default_marks()
    for (label, policy), marker in zip(chosen.items(), "s^Dvp*hx"):
        c = cost(partition(joint, policy))
        axes.plot([c.activation_bytes / 2**20], [c.recompute_flops / 1e6], marker, markersize=9,
                  fillstyle="none", markeredgewidth=2, label=label)
    axes.set_xlabel("activation bytes saved for the backward (MiB)")
    axes.set_ylabel("FLOPs the backward recomputes (MFLOP)")
    axes.set_title(title or f"Pareto frontier: {len(frontier)} partitions")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return frontier
