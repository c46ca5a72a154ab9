"""A matrix product plus a bias row, as one composite: ``x @ w + b`` on (m, k), (k, n), (n,).

Eager torch runs a Linear layer as one ``addmm`` (the bias added in the GEMM's epilogue); as core
primitives it is a ``dot_general``, a broadcast and an ``add``, one more pass over the output.
The VJP rule needs no composite backward: two ``dot_general``s and a ``reduce_sum``.
"""
from __future__ import annotations

from typing import Any

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import along
from reftrace.transforms.vjp_rules import vjp_rules


def _linear(x: Any, w: Any, b: Any) -> Any:
    product = lax.dot_general(x, w, (((1,), (0,)), ((), ())))
    return lax.add(product, along(b, product.shape, (1,)))


linear_p = define_composite("linear", _linear, compute_intensive=True)


def linear(x: Any, w: Any, b: Any) -> Any:
    """``x @ w + b`` for a matrix ``x`` (m, k), a matrix ``w`` (k, n) and a bias ``b`` (n,)."""
    return lax.bind(linear_p, x, w, b)


def _linear_vjp(cts, primals, outs):
    (g,), (x, w, _) = cts, primals
    x, w = lax.conj_if_complex(x), lax.conj_if_complex(w)  # complex: the adjoint (docs/complex.md)
    dx = lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    dw = lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return dx, dw, lax.reduce_sum(g, (0,))


vjp_rules[linear_p] = _linear_vjp
