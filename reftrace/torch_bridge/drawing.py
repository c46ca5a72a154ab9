"""Drawing graphs as SVG (or PNG/PDF) with graphviz, through torch's FxGraphDrawer and pydot."""
from __future__ import annotations

import copy
import os
import re
import shutil
from typing import Any

import torch

from reftrace.backends.torch import to_fx
from reftrace.errors import ArgumentError, ReftraceError
from reftrace.graph import Graph

# FxGraphDrawer writes graphviz record labels; it escapes braces but not angle brackets, which
# records read as port names (an einsum's "ab,bc->ac" is "bad label format" to dot).
_UNESCAPED_ANGLE = re.compile(r"(?<!\\)([<>])")


def draw_graph(traced: torch.fx.GraphModule | Graph, fname: str, figname: str = "fx_graph",
               clear_meta: bool = True, prog: str | list[str] | None = None, parse_stack_trace: bool = False
               ) -> None:
    """Write ``traced`` as an image; ``fname`` without an extension becomes ``fname.svg``.

    Same signature as ``functorch.compile.draw_graph``; ``traced`` may also be a reftrace
    ``Graph`` (drawn as the torch code it lowers to). Needs Graphviz's ``dot``.
    """
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    if isinstance(traced, Graph):
        traced = to_fx(traced)
    elif not isinstance(traced, torch.fx.GraphModule):
        raise ArgumentError(f"draw_graph draws an fx.GraphModule or a reftrace Graph, got {type(traced).__name__}")
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
    for node in dot.get_nodes():
        label = node.get("label")
        if isinstance(label, str):
            node.set("label", _UNESCAPED_ANGLE.sub(r"\\\1", label))
    out = base + ext
    writer: Any = getattr(dot, "write_" + ext.lstrip("."), None)
    if writer is None:
        raise ArgumentError(f"draw_graph cannot write {ext!r} files; use .svg, .png or .pdf")
    try:
        if prog is None:
            writer(out)
        else:
            writer(out, prog=prog)
    except AssertionError as err:  # pydot asserts on dot's exit code, with the whole input in the message
        first_line = str(err).splitlines()[0][:300] if str(err) else "dot failed"
        raise ReftraceError(f"graphviz could not draw {out}: {first_line}") from None
