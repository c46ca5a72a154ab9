"""Composite primitives: one equation that means a small graph of core primitives.

A composite (``layer_norm``, ``softmax``, ``gelu``, ``batch_norm``, their backward
equations, ...) stays one equation through capture, ``vjp`` and ``partition``, so a
backend can run it as one fused kernel. Its **decomposition** (a function written with
``reftrace.lax``) is its meaning:

- its shape rule is the decomposition traced at the operands' avals (cached), so the two
  can never disagree (a composite whose decomposition grows with its operands, the CTC loss or
  an LSTM layer unrolled over time, gives a rule of its own, tested against it);
- a transform or backend with no rule of its own for it uses the decomposition
  (``vjp`` differentiates through it, the backends inline it: see ``lower_through``);
- ``decompose(graph)`` rewrites every composite into core primitives.

The composites themselves, with their VJP rules, live in ``reftrace.nn``; their fused
lowerings in ``reftrace.backends.torch_nn`` and ``reftrace.backends.jax_nn``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from reftrace.builder import Builder
from reftrace.errors import ArgumentError
from reftrace.graph import Aval, Eqn, Graph, Params, expect_graph
from reftrace.interpreter import eval_graph
from reftrace.lax import TracedArray, new_input, to_atom, tracing
from reftrace.primitives import Primitive, checked, registry, shape_rules

__all__ = ["Composite", "define_composite", "decomposition_graph", "decompose", "is_composite",
           "is_compute_intensive", "lower_through", "traced_graph"]


class Composite(Primitive):
    """A primitive with a decomposition into core primitives (see the module docstring).

    ``compute_intensive`` marks composites too expensive to run twice (attention): the
    min-cut partitioner saves their outputs rather than recomputing them, as it does for
    matmuls.
    """

    __slots__ = ("decomposition", "compute_intensive")

    def __init__(self, name: str, decomposition: Callable[..., Any], multiple_results: bool,
                 compute_intensive: bool) -> None:
        super().__init__(name, multiple_results)
        self.decomposition = decomposition
        self.compute_intensive = compute_intensive


def define_composite(name: str, decomposition: Callable[..., Any], *, multiple_results: bool = False,
                     compute_intensive: bool = False, shape_rule: Callable[..., Any] | None = None) -> Composite:
    """Register a composite primitive whose meaning is ``decomposition(*operands, **params)``.

    The decomposition receives ``TracedArray`` operands and static params and returns a
    TracedArray (a tuple of them when ``multiple_results``), built with ``reftrace.lax``.
    ``shape_rule`` (operand avals and params to the output aval or avals) is for a composite whose
    decomposition is costly to trace (the CTC recursion, unrolled over the frames); the others'
    is the decomposition's, and tests check a given one against it.
    """
    prim = Composite(name, decomposition, multiple_results, compute_intensive)
    registry[name] = prim

    def decomposition_shape_rule(*in_avals: Aval, **params: Any) -> Any:
        outs = decomposition_graph(prim, tuple(in_avals), Params(params)).out_avals
        return outs if multiple_results else outs[0]
    shape_rules[prim] = shape_rule or decomposition_shape_rule
    return prim


def is_composite(prim: Primitive) -> bool:
    return isinstance(prim, Composite)


def is_compute_intensive(prim: Primitive) -> bool:
    """A composite worth saving rather than recomputing (the partitioner's cost class of a matmul)."""
    return isinstance(prim, Composite) and prim.compute_intensive


@functools.lru_cache(maxsize=4096)
def decomposition_graph(prim: Composite, in_avals: tuple[Aval, ...], params: Params) -> Graph:
    """``prim``'s decomposition as a Graph at these operand avals (built once per signature)."""
    def decomposition(*operands: TracedArray) -> tuple[Any, ...]:
        out = prim.decomposition(*operands, **params.to_dict())
        return tuple(out) if prim.multiple_results else (out,)
    return traced_graph(decomposition, in_avals)


def traced_graph(fn: Callable[..., Any], in_avals: Sequence[Aval]) -> Graph:
    """``fn``, written with ``reftrace.lax``, traced at ``in_avals``: its result (one array, or a tuple
    of them) is the graph's outputs. A decomposition's pieces are traced so too (``reftrace.nn.ctc``)."""
    builder = Builder()
    operands = [new_input(builder, aval) for aval in in_avals]
    with tracing(builder):
        out = fn(*operands)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return builder.build([x.atom for x in operands], [to_atom(o) for o in outs])


def decomposition_of(eqn: Eqn) -> Graph:
    return decomposition_graph(eqn.primitive, tuple(a.aval for a in eqn.inputs), eqn.params)


def lower_through(eqn: Eqn, operands: Sequence[Any], apply: Callable[[Eqn, Sequence[Any]], Sequence[Any]],
                  literal: Callable[[Any], Any]) -> list[Any]:
    """Run a composite equation as its decomposition, with a backend's own ``apply`` and literals:
    how a backend runs a composite it has no fused lowering for."""
    return eval_graph(decomposition_of(eqn), operands, apply, literal)


def decompose(graph: Graph, which: Callable[[Primitive], bool] = is_composite) -> Graph:
    """``graph`` with every composite equation (those ``which`` selects) replaced by its
    decomposition, recursively (a decomposition may use other composites): the primitive-level
    graph, for research on the core primitive set. Values and gradients are unchanged."""
    expect_graph(graph, "decompose")
    if not callable(which):
        raise ArgumentError(f"decompose: which must be a predicate on primitives, got {which!r}")
    builder = Builder()
    inputs = [new_input(builder, v.aval) for v in graph.inputs]

    def emit(eqn: Eqn, values: Sequence[TracedArray]) -> list[TracedArray]:
        if is_composite(eqn.primitive) and which(eqn.primitive):
            return eval_graph(decomposition_of(eqn), values, emit, lambda lit: TracedArray(builder, lit))
        return [TracedArray(builder, v) for v in builder.bind(eqn.primitive, [x.atom for x in values], eqn.params)]

    outs = eval_graph(graph, inputs, emit, lambda lit: TracedArray(builder, lit))
    result = builder.build([x.atom for x in inputs], [o.atom for o in outs], joint=graph.joint)
    result = result.named(graph.input_names, graph.output_names)
    return checked(result, "decompose")
