"""``vjp``: a Graph in, its joint forward+backward Graph out.

The joint graph takes ``(*primals, *cotangents)`` and returns ``(*outs, *grads)``.
It is built the way every transform here is: replay the forward equations into a
Builder with ``eval_graph``, then walk them in reverse applying ``vjp_rules``.
The rules emit ordinary primitives, so the joint is an ordinary Graph and
``vjp(vjp(g))`` gives second derivatives with no special case.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Iterable, Sequence

import numpy as np

from reftrace import lax, names
from reftrace.builder import Builder
from reftrace.composite import decomposition_graph, is_composite
from reftrace.errors import ArgumentError, GraphError, UnsupportedOperatorError
from reftrace.graph import Aval, Eqn, Graph, Params, Var, expect_graph, live_eqns
from reftrace.interpreter import eval_graph
from reftrace.lax import TracedArray, new_input, tracing
from reftrace.primitives import Primitive, checked, is_inexact, stop_gradient_p
from reftrace.transforms.vjp_rules import vjp_rules


def vjp(graph: Graph, wrt: int | Sequence[int] | None = None,
        nondiff_outputs: int | Sequence[int] | None = None) -> Graph:
    """The joint graph of ``graph``: ``(*primals, *cotangents) -> (*outs, *grads)``.

    - One cotangent input per output of ``graph`` except those in ``nondiff_outputs``
      (they get none; their cotangent is taken as zero). A cotangent's aval equals its
      output's; the cotangent of an integer/bool output is accepted and ignored.
    - One gradient output per differentiable input, in input order. Differentiable means a
      floating dtype and, if ``wrt`` (an input index or a sequence of them, like ``jax.grad``'s
      ``argnums``) is given, listed there; listing an integer/bool input in ``wrt`` is an
      ArgumentError. ``nondiff_outputs`` likewise takes one index or a sequence.
    - Defaults read the graph's names (``reftrace.names``), so a traced module is
      differentiated as ``loss.backward()`` would: ``wrt=None`` leaves out ``buffer(...)``
      inputs, ``nondiff_outputs=None`` is every ``update(...)`` output (a new running
      statistic). A graph without names: every floating input, no output.
    - Names: ``ct(<output>)`` for the cotangent inputs, ``grad(<input>)`` for the gradients.
    - An input no cotangent reaches gets a zeros gradient (a broadcast literal).
    - The result has ``joint == (len(graph.inputs), len(graph.outputs))``.

    Raises UnsupportedOperatorError naming a primitive that has no VJP rule.
    """
    expect_graph(graph, "vjp")
    diff_inputs = _differentiable_inputs(graph, wrt)
    if nondiff_outputs is None:
        nondiff_outputs = [j for j, name in enumerate(graph.output_names or ()) if names.is_update(name)]
    skipped = _check_output_indices(graph, nondiff_outputs)
    with_ct = [j for j in range(len(graph.outputs)) if j not in skipped]

    builder = Builder()
    primals = [new_input(builder, v.aval) for v in graph.inputs]
    cotangents = [new_input(builder, graph.outputs[j].aval) for j in with_ct]
    with tracing(builder):
        records, outs = replay(builder, graph, primals)
        num_forward_eqns = len(builder.eqns)
        active = _active_vars(graph, [graph.inputs[i] for i in diff_inputs])
        ct_env: dict[Var, TracedArray] = {}
        for j, ct in zip(with_ct, cotangents):
            out = graph.outputs[j]
            if isinstance(out, Var) and out in active:
                _accumulate(ct_env, out, ct)
        _backward(graph, records, active, ct_env)
        grads = []
        for i in diff_inputs:
            v = graph.inputs[i]
            grads.append(ct_env[v] if v in ct_env else lax.zeros(v.aval))

    outputs = [o.atom for o in outs] + [g.atom for g in grads]
    # the forward replay stays verbatim; rules compute a cotangent for every operand, and the ones no
    # gradient needs (a constant's, a non-``wrt`` input's) die here instead of complicating each rule
    builder.eqns = builder.eqns[:num_forward_eqns] + live_eqns(builder.eqns[num_forward_eqns:], outputs)
    inputs = [p.atom for p in primals] + [c.atom for c in cotangents]
    joint = builder.build(inputs, outputs, joint=(len(graph.inputs), len(graph.outputs)))
    if graph.input_names is not None or graph.output_names is not None:
        in_names = names.or_default(graph.input_names, len(graph.inputs), "args")
        out_names = names.or_default(graph.output_names, len(graph.outputs), "out")
        joint = joint.named(in_names + tuple(names.ct(out_names[j]) for j in with_ct),
                            out_names + tuple(names.grad(in_names[i]) for i in diff_inputs))
    return checked(joint, "vjp")


def differentiable_inputs(graph: Graph, wrt: int | Sequence[int] | None = None, verb: str = "vjp"
                          ) -> tuple[int, ...]:
    """Indices of the inputs ``vjp(graph, wrt)`` returns gradients for (``jvp`` takes tangents for),
    in order; errors name ``verb``."""
    return _differentiable_inputs(graph, wrt, verb)


# ----------------------------------------------------------------------------- argument checks

def _index_list(indices: int | Iterable[int], name: str, verb: str = "vjp") -> list[Any]:
    """``indices`` as a list of ints; one int means ``[int]``, as ``jax.grad``'s ``argnums``.
    numpy integers count as ints; anything else is kept for the caller to reject by name."""
    if _is_index(indices):
        return [operator.index(indices)]
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise ArgumentError(f"{verb}: {name} must be an int or a sequence of ints, got {type(indices).__name__} "
                            f"{indices!r}")
    return [operator.index(i) if _is_index(i) else i for i in indices]


def _is_index(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _differentiable_inputs(graph: Graph, wrt: int | Iterable[int] | None, verb: str = "vjp") -> tuple[int, ...]:
    n = len(graph.inputs)
    if wrt is None:
        state = [names.is_buffer(name) for name in graph.input_names or [""] * n]
        return tuple(i for i, v in enumerate(graph.inputs) if is_inexact(v.dtype) and not state[i])
    chosen = set()
    for i in _index_list(wrt, "wrt", verb):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise ArgumentError(f"{verb}: wrt index {i!r} is not an input index (the graph has {n} inputs)")
        if not is_inexact(graph.inputs[i].dtype):
            raise ArgumentError(f"{verb}: input {i} is {graph.inputs[i].aval.str_short()}, not floating point or complex, "
                                "so it has no gradient; leave it out of wrt")
        chosen.add(i)
    return tuple(sorted(chosen))


def _check_output_indices(graph: Graph, nondiff_outputs: int | Iterable[int]) -> frozenset[int]:
    n = len(graph.outputs)
    indices = _index_list(nondiff_outputs, "nondiff_outputs")
    for j in indices:
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < n:
            raise ArgumentError(f"vjp: nondiff_outputs index {j!r} is not an output index "
                                f"(the graph has {n} outputs)")
    return frozenset(indices)


# ----------------------------------------------------------------------------- forward replay

Record = tuple[list[TracedArray], tuple[TracedArray, ...]]


def replay(builder: Builder, graph: Graph, primals: Sequence[TracedArray]) -> tuple[list[Record], list[TracedArray]]:
    """Re-emit ``graph``'s equations verbatim; record each one's operand and result values
    (the first half of ``vjp`` and of ``jvp``)."""
    records: list[Record] = []

    def apply(eqn: Eqn, values: Sequence[TracedArray]) -> tuple[TracedArray, ...]:
        # the equation verbatim: its params are already frozen, so the builder takes them as they are
        outs = tuple(TracedArray(builder, v)
                     for v in builder.bind(eqn.primitive, [v.atom for v in values], eqn.params))
        records.append((list(values), outs))
        return outs

    outs = eval_graph(graph, primals, apply, literal=lambda lit: TracedArray(builder, lit))
    return records, outs


def _active_vars(graph: Graph, diff_inputs: Sequence[Var]) -> set[Var]:
    """Floating values that depend on a differentiable input through differentiable primitives."""
    return set(_dependencies(graph, diff_inputs))


def _dependencies(graph: Graph, diff_inputs: Sequence[Var]) -> dict[Var, int]:
    """For each active value, the bit set (bit k: ``diff_inputs[k]``) of the inputs it depends on
    through differentiable primitives. Values missing from the map depend on none."""
    deps = {v: 1 << k for k, v in enumerate(diff_inputs)}
    for e in graph.eqns:
        if not e.primitive.differentiable or e.primitive is stop_gradient_p:
            continue
        mask = 0
        for a in e.inputs:
            if isinstance(a, Var):
                mask |= deps.get(a, 0)
        if mask:
            for v in e.outputs:
                if is_inexact(v.dtype):
                    deps[v] = mask
    return deps


def output_dependencies(graph: Graph, wrt: Sequence[int] | None = None) -> tuple[frozenset[int], ...]:
    """For each output of ``graph``, the differentiable inputs (indices into the graph's inputs, as
    ``vjp(graph, wrt)`` chooses them) it depends on through differentiable primitives.

    An input no output with a cotangent depends on gets a symbolic-zero gradient from ``vjp``; an
    output that depends on no input carries no gradient at all. The torch bridge uses this to return
    ``None`` gradients and non-differentiable outputs exactly where eager torch does.
    """
    diff_inputs = _differentiable_inputs(graph, wrt)
    deps = _dependencies(graph, [graph.inputs[i] for i in diff_inputs])
    result = []
    for out in graph.outputs:
        mask = deps.get(out, 0) if isinstance(out, Var) else 0
        result.append(frozenset(i for k, i in enumerate(diff_inputs) if mask >> k & 1))
    return tuple(result)


# ----------------------------------------------------------------------------- backward walk

def _backward(graph: Graph, records: Sequence[Record], active: set[Var], ct_env: dict[Var, TracedArray]) -> None:
    """Walk the equations in reverse, turning output cotangents into operand cotangents."""
    for eqn, (primals, outs) in zip(reversed(graph.eqns), reversed(records)):
        cts = tuple(ct_env.pop(v, None) for v in eqn.outputs)
        if all(ct is None for ct in cts):
            continue  # symbolic zero: nothing to emit
        rule = vjp_rules.get(eqn.primitive)
        if rule is None and is_composite(eqn.primitive):
            rule = functools.partial(through_decomposition, eqn.primitive)
        if rule is None:
            raise UnsupportedOperatorError(
                f"primitive {eqn.primitive.name} has no VJP rule, so vjp cannot differentiate through it; "
                "add one to reftrace.transforms.vjp_rules.vjp_rules (see docs/autodiff.md), or wrap the "
                "value in stop_gradient")
        in_cts = rule(cts, tuple(primals), outs, **eqn.params.to_dict())
        if len(in_cts) != len(eqn.inputs):
            raise GraphError(f"the VJP rule of {eqn.primitive.name} returned {len(in_cts)} cotangents for "
                             f"{len(eqn.inputs)} operands")
        for k, (operand, ct) in enumerate(zip(eqn.inputs, in_cts)):
            if ct is None or not isinstance(operand, Var) or operand not in active:
                continue
            if ct.aval != operand.aval:
                raise GraphError(f"the VJP rule of {eqn.primitive.name} returned a {ct.aval.str_short()} "
                                 f"cotangent for operand {k} of type {operand.aval.str_short()}")
            _accumulate(ct_env, operand, ct)


def _accumulate(ct_env: dict[Var, TracedArray], v: Var, ct: TracedArray) -> None:
    """Cotangents of a value used more than once add up."""
    ct_env[v] = lax.add(ct_env[v], ct) if v in ct_env else ct


# ----------------------------------------------------------------------------- composites

def through_decomposition(prim: Primitive, cts: Sequence[TracedArray | None], primals: Sequence[TracedArray],
                          outs: Sequence[TracedArray], **params: Any) -> tuple[TracedArray | None, ...]:
    """The VJP rule of a composite primitive that has none of its own (or of a rule that defers to
    it, for a cotangent its fused backward does not cover): the joint graph of its decomposition,
    inlined. It recomputes the decomposition's forward values in the backward, which is why the
    common composites have rules of their own; this one makes every composite differentiable to
    any order."""
    joint = _decomposition_joint(prim, tuple(p.aval for p in primals), Params(params))
    builder = outs[0].builder
    given = [ct if ct is not None else lax.zeros(o.aval) for ct, o in zip(cts, outs)]
    results = eval_graph(joint, [*primals, *given], lambda e, vals: [
        TracedArray(builder, v) for v in builder.bind(e.primitive, [x.atom for x in vals], e.params)],
        literal=lambda lit: TracedArray(builder, lit))
    grads = iter(results[len(outs):])
    return tuple(next(grads) if is_inexact(p.dtype) else None for p in primals)


@functools.lru_cache(maxsize=1024)
def _decomposition_joint(prim: Primitive, in_avals: tuple[Aval, ...], params: Params) -> Graph:
    return vjp(decomposition_graph(prim, in_avals, params))
