"""A reftrace Graph as a plain JAX function (``graph_function``): each equation through its row in
``jax_rules``, a composite without a row through its decomposition.

The JAX backend (``reftrace.backends.jax``) jits these functions; rows that run a graph of their own
(the CTC loss's scanned step, ``reftrace.backends.jax_nn``) call them too.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from reftrace import primitives as P
from reftrace.backends.jax_rules import jax_rules
from reftrace.composite import is_composite, lower_through
from reftrace.errors import UnsupportedOperatorError
from reftrace.graph import Eqn, Graph, Literal, Var
from reftrace.interpreter import eval_graph


def _apply(eqn: Eqn, args: Sequence[Any]) -> Sequence[Any]:
    prim = eqn.primitive
    rule = jax_rules.get(prim)
    if rule is None:
        if is_composite(prim):
            return lower_through(eqn, args, _apply, _literal)
        raise UnsupportedOperatorError(f"primitive {prim.name} has no JAX lowering")
    out = rule(*args, **dict(eqn.params))
    return out if prim.multiple_results else (out,)


def _literal(lit: Literal) -> Any:
    import jax.numpy as jnp
    return jnp.asarray(np.array(lit.value))


def graph_function(graph: Graph):
    """A plain Python function running ``graph`` with jax ops (jit it, vmap it, grad it)."""
    exact = rounded_divisions(graph)

    def apply(eqn: Eqn, args: Sequence[Any]) -> Sequence[Any]:
        return (_ieee_div(*args),) if id(eqn) in exact else _apply(eqn, args)

    def run(*args: Any) -> tuple[Any, ...]:
        return tuple(eval_graph(graph, args, apply if exact else _apply, _literal))
    return run


_ROUNDING = frozenset({P.floor_p, P.ceil_p, P.round_p, *P.COMPARISONS})


def rounded_divisions(graph: Graph) -> set[int]:
    """``id``s of ``graph``'s floating divisions whose quotient goes straight into a rounding, a
    comparison, an integer conversion or a narrower float (``trunc(a / b)``, histogram bins,
    ``(x / step).floor()``, a bfloat16 tensor divided by a number, in float32 as torch does).

    XLA turns ``a / b`` into ``a * (1 / b)`` where ``b`` is a broadcast or a constant, which is off by one
    unit in the last place for about a third of the quotients: harmless for a value, but it moves a
    quotient that torch computes as exactly 3.0 to 2.9999999999999996, and ``trunc`` then gives 2.
    These divisions are lowered as IEEE divisions (``_ieee_div``), as torch and numpy compute them.
    """
    users: dict[Var, list[Eqn]] = {}
    for eqn in graph.eqns:
        for a in eqn.inputs:
            if isinstance(a, Var):
                users.setdefault(a, []).append(eqn)

    def rounds(user: Eqn, dtype: np.dtype) -> bool:
        if user.primitive is P.convert_element_type_p:  # to an integer, or to fewer bits (bfloat16 x / 0.3)
            new = np.dtype(user.params["new_dtype"])
            return not P.is_inexact(new) or (P.is_float(new) and new.itemsize < dtype.itemsize)
        return user.primitive in _ROUNDING

    return {id(e) for e in graph.eqns if e.primitive is P.div_p and P.is_float(d := e.outputs[0].aval.dtype)
            and any(rounds(u, np.dtype(d)) for u in users.get(e.outputs[0], ()))}


def _ieee_div(x: Any, y: Any) -> Any:
    """``x / y`` rounded once, as IEEE division: the divisor, made a full array behind an optimization
    barrier, is neither a broadcast nor a constant to XLA, which then divides element by element."""
    import jax.numpy as jnp
    x, y = jnp.broadcast_arrays(x, y)
    return x / jax.lax.optimization_barrier(y)
