"""Builder: the one way equations are emitted, by front ends and transforms alike.

``Builder.bind`` runs the primitive's shape rule, makes fresh output variables and
records the equation; ``Builder.build`` freezes the result into a Graph. Fresh
variables draw from a process-wide counter far above any canonical id, so a builder
never confuses its own variables with those of a graph it reads.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from reftrace.graph import Atom, Aval, Eqn, Graph, Params, Var
from reftrace.primitives import Primitive, infer_avals

_fresh_ids = itertools.count(1 << 48)


class Builder:
    def __init__(self) -> None:
        self.eqns: list[Eqn] = []

    def new_var(self, aval: Aval) -> Var:
        return Var(next(_fresh_ids), aval)

    def bind(self, prim: Primitive, inputs: Sequence[Atom], params: dict[str, Any] | Params | None = None
             ) -> tuple[Var, ...]:
        frozen = params if isinstance(params, Params) else Params(params or {})
        avals = infer_avals(prim, [a.aval for a in inputs], frozen)
        outs = tuple(self.new_var(a) for a in avals)
        self.eqns.append(Eqn(prim, tuple(inputs), outs, frozen))
        return outs

    def build(self, inputs: Sequence[Var], outputs: Sequence[Atom],
              joint: tuple[int, int] | None = None) -> Graph:
        return Graph(tuple(inputs), tuple(self.eqns), tuple(outputs), joint)
