"""Symbolic zeros: a graph linear in some inputs, specialized to those inputs being zero.

A backward graph is linear in its cotangents. When an output gets no cotangent at all (the
caller never uses it), eager torch does not run its part of the backward; running it on a tensor
of zeros is not the same, because ``0 * inf`` is NaN: ``(sqrt(x), 2 * x)`` at ``x = 0`` with only the
second output used has gradient 2 in eager and NaN with a zero cotangent for the first. As JAX's
transpose does with its ``Zero`` cotangents, ``with_zero_inputs`` never computes with such a zero:
an equation whose every operand that depends on a linear input is zero gives zero (no equation), a
sum drops its zero terms, and any other equation reads explicit zeros for them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.errors import ArgumentError
from reftrace.graph import Atom, Aval, Graph, Literal, Var, expect_graph, live_eqns
from reftrace.primitives import checked


class _Zero:
    """The value of an atom known to be zero (never materialized unless an equation needs it)."""


ZERO = _Zero()


def with_zero_inputs(graph: Graph, linear_inputs: Sequence[int], zero_inputs: Sequence[int]) -> Graph:
    """``graph``, linear in the inputs at ``linear_inputs`` (together), with those at ``zero_inputs`` (a
    subset) zero and removed.

    The result takes the other inputs in order and computes the same outputs as ``graph`` given
    zeros there, except that no equation multiplies a zero by an infinity or a NaN: a term that is
    zero because of the zero inputs is left out instead of computed.
    """
    expect_graph(graph, "with_zero_inputs")
    zero = set(zero_inputs)
    if not zero <= set(linear_inputs):
        raise ArgumentError(f"with_zero_inputs: zero inputs {sorted(zero)} must be among the linear inputs "
                            f"{sorted(linear_inputs)}")
    builder = Builder()
    env: dict[Var, Atom | _Zero] = {v: (ZERO if i in zero else v) for i, v in enumerate(graph.inputs)}
    depends = {graph.inputs[i] for i in linear_inputs}  # the values linear in the linear inputs

    def read(a: Atom) -> Atom | _Zero:
        return a if isinstance(a, Literal) else env[a]

    def shaped(x: Atom, aval: Aval) -> Atom:
        """``x`` (rank 0, which elementwise ops broadcast, or already of ``aval``'s shape) at ``aval``'s shape."""
        if tuple(x.aval.shape) == tuple(aval.shape):
            return x
        return builder.bind(P.broadcast_in_dim_p, [x], {"shape": tuple(aval.shape), "broadcast_dimensions": ()})[0]

    def explicit(x: Atom | _Zero, aval: Aval) -> Atom:
        return shaped(Literal.of(np.zeros((), aval.dtype)), aval) if isinstance(x, _Zero) else x

    for eqn in graph.eqns:
        values = [read(a) for a in eqn.inputs]
        flowing = [isinstance(a, Var) and a in depends for a in eqn.inputs]
        if any(flowing):
            depends.update(eqn.outputs)
        zeros = [isinstance(x, _Zero) for x in values]
        if not any(zeros):
            outs = builder.bind(eqn.primitive, values, eqn.params)
        elif all(z for z, f in zip(zeros, flowing) if f):  # linear in what is zero: zero
            outs = (ZERO,) * len(eqn.outputs)
        elif eqn.primitive is P.add_p:  # one term is zero: the other, at the sum's shape
            outs = (shaped(values[1] if zeros[0] else values[0], eqn.outputs[0].aval),)
        elif eqn.primitive is P.sub_p:
            kept = shaped(values[0] if zeros[1] else values[1], eqn.outputs[0].aval)
            outs = (kept,) if zeros[1] else builder.bind(P.neg_p, [kept])
        else:
            outs = builder.bind(eqn.primitive, [explicit(x, a.aval) for x, a in zip(values, eqn.inputs)],
                                eqn.params)
        for v, out in zip(eqn.outputs, outs):
            env[v] = out
    outputs = [explicit(read(a), a.aval) for a in graph.outputs]
    inputs = tuple(v for i, v in enumerate(graph.inputs) if i not in zero)
    names = None if graph.input_names is None else tuple(n for i, n in enumerate(graph.input_names) if i not in zero)
    result = Graph(inputs, tuple(live_eqns(builder.eqns, outputs)), tuple(outputs), None, names, graph.output_names)
    return checked(result, "with_zero_inputs")
