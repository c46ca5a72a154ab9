"""The one interpreter idiom: walk a graph's equations with an environment.

Every consumer of a graph (the backends, the transforms that re-emit equations,
the torch FX emitter) is ``eval_graph`` with a different ``apply``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from reftrace.errors import ArgumentError
from reftrace.graph import Atom, Eqn, Graph, Literal, Var

Apply = Callable[[Eqn, Sequence[Any]], Sequence[Any]]


def eval_graph(graph: Graph, args: Sequence[Any], apply: Apply,
               literal: Callable[[Literal], Any] = lambda lit: lit.value) -> list[Any]:
    """Evaluate ``graph`` on ``args``; ``apply(eqn, values)`` returns a sequence of ``eqn``'s outputs.

    ``apply`` gets the whole equation (primitive, params, and the output avals it must produce),
    so no consumer keeps a parallel list of what the equations are.
    """
    if len(args) != len(graph.inputs):
        raise ArgumentError(f"graph takes {len(graph.inputs)} inputs, got {len(args)}")
    env: dict[Var, Any] = dict(zip(graph.inputs, args))

    def read(a: Atom) -> Any:
        return literal(a) if isinstance(a, Literal) else env[a]

    for eqn in graph.eqns:
        outs = apply(eqn, [read(a) for a in eqn.inputs])
        for v, val in zip(eqn.outputs, outs, strict=True):
            env[v] = val
    return [read(a) for a in graph.outputs]
