"""``recompute_rules``: a smaller equation for the backward to recompute, per primitive.

A multi-output primitive may compute outputs the backward never reads from operands only those
outputs need. A train-mode batch norm is the case: its new running statistics read the old ones,
its normalised output and batch statistics do not. Recomputing the whole equation in the backward
would make the backward read the old running statistics, which the caller overwrites after the
forward, so every partition that recomputes a batch norm would save copies of them. A rule gives
the equation that computes only some outputs (the same ``Var``s) from fewer operands; the
partitioner recomputes that form wherever the backward can read no other output, and the cost
model (``rt.cost``) counts it as a repeat of the forward's equation.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from reftrace.graph import Eqn
from reftrace.primitives import Primitive

#: a rule takes an equation and returns ``(form, kept)``: ``form`` computes ``eqn.outputs[i] for i
#: in kept`` (the same Vars) from a subset of its operands; or None when no smaller form exists
RecomputeRule = Callable[[Eqn], "tuple[Eqn, tuple[int, ...]] | None"]

recompute_rules: dict[Primitive, RecomputeRule] = {}


def smaller_forms(eqns: Sequence[Eqn]) -> dict[int, tuple[Eqn, tuple[int, ...]]]:
    """The rules' ``(form, kept)`` for ``eqns``, by index, leaving out every form that computes what
    another equation or form in ``eqns`` computes (the same primitive, operands and params: two
    batch norms of one input differ only in their running statistics). Such a form would be one
    computation under two names, and a recomputation could not be matched to its own forward
    equation (``rt.cost``); those equations are recomputed whole."""
    forms = {}
    for k, e in enumerate(eqns):
        rule = recompute_rules.get(e.primitive)
        found = None if rule is None else rule(e)
        if found is not None:
            forms[k] = found
    if not forms:
        return {}
    keys = Counter(_key(e) for e in eqns)
    keys.update(_key(form) for form, _ in forms.values())
    return {k: found for k, found in forms.items() if keys[_key(found[0])] == 1}


def _key(e: Eqn) -> tuple:
    return (e.primitive, e.inputs, e.params)
