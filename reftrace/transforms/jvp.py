"""``jvp``: a Graph in, its forward-mode (Jacobian-vector product) Graph out.

The result takes ``(*primals, *tangents)`` and returns ``(*outs, *out_tangents)``. It is
built the way ``vjp`` is: replay the equations verbatim into a Builder, then walk them
forward applying ``jvp_rules`` to the tangents. The rules emit ordinary primitives, so the
result is an ordinary Graph: ``jvp(vjp(g))`` gives Hessian-vector products (forward over
reverse) and ``vjp(jvp(g))`` differentiates again, with no special case.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

from reftrace import lax, names
from reftrace.builder import Builder
from reftrace.composite import decomposition_graph, is_composite
from reftrace.errors import GraphError, UnsupportedOperatorError
from reftrace.graph import Aval, Eqn, Graph, Params, Var, expect_graph, live_eqns
from reftrace.interpreter import eval_graph
from reftrace.lax import TracedArray, new_input, tracing
from reftrace.primitives import Primitive, checked, is_inexact
from reftrace.transforms.jvp_rules import jvp_rules
from reftrace.transforms.vjp import Record, differentiable_inputs, replay

Tangent = TracedArray | None


def jvp(graph: Graph, wrt: int | Sequence[int] | None = None) -> Graph:
    """The forward-mode graph of ``graph``: ``(*primals, *tangents) -> (*outs, *out_tangents)``.

    - One tangent input per differentiable input, in input order, with that input's aval.
      Differentiable means what it means for ``vjp``: a floating dtype and, if ``wrt`` (an
      input index or a sequence of them) is given, listed there; listing an integer/bool input
      in ``wrt`` is an ArgumentError. Other inputs are held constant.
    - One tangent output per output, with that output's aval: the directional derivative of
      the output along the tangents. An integer or bool output's tangent is zeros (JAX's
      float0 zeros, with the output's dtype), so ``out_tangents`` line up with ``outs`` as
      ``vjp``'s cotangents do.
    - The forward equations come first, verbatim; the tangent equations follow, only those
      some output tangent needs. ``jvp`` is pure and deterministic, and the result has no
      ``joint`` spec (it is an ordinary graph, not a joint for ``partition``).
    - Choices at non-differentiable points are the VJP's (docs/autodiff.md), so
      ``<u, J v> = <J^T u, v>`` holds exactly between ``jvp`` and ``vjp``.

    A composite primitive with no JVP rule is differentiated through its decomposition.
    Raises UnsupportedOperatorError naming a primitive that has no JVP rule.
    """
    expect_graph(graph, "jvp")
    diff_inputs = differentiable_inputs(graph, wrt, "jvp")

    builder = Builder()
    primals = [new_input(builder, v.aval) for v in graph.inputs]
    tangents = [new_input(builder, graph.inputs[i].aval) for i in diff_inputs]
    with tracing(builder):
        records, outs = replay(builder, graph, primals)
        num_forward_eqns = len(builder.eqns)
        tangent_of: dict[Var, TracedArray] = {graph.inputs[i]: t for i, t in zip(diff_inputs, tangents)}
        _forward_tangents(graph, records, tangent_of)
        out_tangents = [tangent_of[o] if isinstance(o, Var) and o in tangent_of else lax.zeros(o.aval)
                        for o in graph.outputs]

    outputs = [o.atom for o in outs] + [t.atom for t in out_tangents]
    # rules compute a tangent for every result; the ones no output tangent needs die here
    builder.eqns = builder.eqns[:num_forward_eqns] + live_eqns(builder.eqns[num_forward_eqns:], outputs)
    inputs = [p.atom for p in primals] + [t.atom for t in tangents]
    result = builder.build(inputs, outputs)
    if graph.input_names is not None or graph.output_names is not None:
        in_names = names.or_default(graph.input_names, len(graph.inputs), "args")
        out_names = names.or_default(graph.output_names, len(graph.outputs), "out")
        result = result.named(in_names + tuple(names.tangent(in_names[i]) for i in diff_inputs),
                              out_names + tuple(names.tangent(n) for n in out_names))
    return checked(result, "jvp")


# ----------------------------------------------------------------------------- tangent walk

def _forward_tangents(graph: Graph, records: Sequence[Record], tangent_of: dict[Var, TracedArray]) -> None:
    """Walk the equations in order, turning operand tangents into result tangents."""
    for eqn, (primals, outs) in zip(graph.eqns, records):
        tangents = tuple(tangent_of.get(a) if isinstance(a, Var) else None for a in eqn.inputs)
        if all(t is None for t in tangents):
            continue  # symbolic zero: nothing to emit
        rule = jvp_rules.get(eqn.primitive)
        if rule is None and is_composite(eqn.primitive):
            rule = functools.partial(through_decomposition, eqn.primitive)
        if rule is None:
            raise UnsupportedOperatorError(
                f"primitive {eqn.primitive.name} has no JVP rule, so jvp cannot differentiate through it; "
                "add one to reftrace.transforms.jvp_rules.jvp_rules (see docs/autodiff.md), or wrap the "
                "value in stop_gradient")
        out_tangents = rule(tangents, tuple(primals), outs, **eqn.params.to_dict())
        if len(out_tangents) != len(eqn.outputs):
            raise GraphError(f"the JVP rule of {eqn.primitive.name} returned {len(out_tangents)} tangents for "
                             f"{len(eqn.outputs)} results")
        for k, (result, t) in enumerate(zip(eqn.outputs, out_tangents)):
            if t is None or not is_inexact(result.dtype):
                continue  # integer and bool results are piecewise constant
            if t.aval != result.aval:
                raise GraphError(f"the JVP rule of {eqn.primitive.name} returned a {t.aval.str_short()} "
                                 f"tangent for result {k} of type {result.aval.str_short()}")
            tangent_of[result] = t


# ----------------------------------------------------------------------------- composites

def through_decomposition(prim: Primitive, tangents: Sequence[Tangent], primals: Sequence[TracedArray],
                          outs: Sequence[TracedArray], **params: Any) -> tuple[Tangent, ...]:
    """The JVP rule of a composite primitive that has none of its own: the forward-mode graph of its
    decomposition (with respect to the operands that have tangents), inlined. It recomputes the
    decomposition's intermediate values next to the fused equation; this makes every composite
    differentiable in forward mode, to any order."""
    wrt = tuple(k for k, t in enumerate(tangents) if t is not None)
    forward = _decomposition_jvp(prim, tuple(p.aval for p in primals), Params(params), wrt)
    builder = outs[0].builder
    results = eval_graph(forward, [*primals, *(tangents[k] for k in wrt)], lambda e, vals: [
        TracedArray(builder, v) for v in builder.bind(e.primitive, [x.atom for x in vals], e.params)],
        literal=lambda lit: TracedArray(builder, lit))
    return tuple(t if is_inexact(o.dtype) else None for t, o in zip(results[len(outs):], outs))


@functools.lru_cache(maxsize=1024)
def _decomposition_jvp(prim: Primitive, in_avals: tuple[Aval, ...], params: Params, wrt: tuple[int, ...]) -> Graph:
    return jvp(decomposition_graph(prim, in_avals, params), wrt=wrt)
