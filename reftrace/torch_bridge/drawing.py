"""Drawing FX graphs as SVG with graphviz (through torch's FxGraphDrawer and pydot)."""
from __future__ import annotations

import copy
import os
import shutil

import torch

from reftrace.errors import ReftraceError


def draw_graph(traced: torch.fx.GraphModule, fname: str, figname: str = "fx_graph", clear_meta: bool = True,
               prog: str | list[str] | None = None, parse_stack_trace: bool = False) -> None:
    """Write ``traced`` as an image; ``name`` without an extension becomes ``name.svg``.

    Same signature as ``functorch.compile.draw_graph``. Needs Graphviz's ``dot``.
    """
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    if shutil.which("dot") is None:
        raise ReftraceError("draw_graph needs Graphviz's `dot` on PATH (Debian: apt-get install graphviz)")
    base, ext = os.path.splitext(fname)
    if not ext:
        ext = ".svg"
    if clear_meta:
        traced = torch.fx.GraphModule(traced, copy.deepcopy(traced.graph))  # a copy whose meta we drop
        for node in traced.graph.nodes:
            node.meta = {}
    drawer = FxGraphDrawer(traced, figname, parse_stack_trace=parse_stack_trace)
    dot = drawer.get_main_dot_graph()
    out = base + ext
    writer = getattr(dot, "write_" + ext.lstrip("."), None)
    if writer is None:
        raise ReftraceError(f"draw_graph cannot write {ext!r} files; use .svg, .png or .pdf")
    if prog is None:
        writer(out)
    else:
        writer(out, prog=prog)
