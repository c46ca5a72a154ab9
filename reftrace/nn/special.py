"""``xlogy`` as a composite: its VJP rule is torch's, which no decomposition's gradient can be.

``x * log(y)`` has slope ``log(y)`` in ``x``; where ``y == 0`` that is ``-inf``, and a zero cotangent
(an output masked out downstream, as a loss masks its non-finite terms) times ``-inf`` is NaN, which
then reaches every upstream gradient. Torch's backward is ``xlogy(cotangent, y)``: 0 wherever the
cotangent is. So the rule here gives the slope in ``x`` as ``xlogy(g, y)`` (0 at ``x == 0, y <= 0``, as
torch masks it), and in ``y`` as ``g * x / y`` (0 at the origin, where torch's is ``0/0``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.transforms.vjp_rules import vjp_rules


def _xlogy(x: Any, y: Any) -> Any:
    """``x * log(y)``, 0 where ``x == 0`` unless ``y`` is NaN (torch's kernel). Where ``x == 0`` and
    ``log(y)`` is not finite, the log sees a stand-in 1 (the value is 0 either way)."""
    at_zero = lax.eq(x, lax.full(x.shape, 0, x.dtype))
    log_unsafe = lax.logical_or(lax.le(y, lax.full(y.shape, 0, y.dtype)),
                                lax.eq(y, lax.full(y.shape, np.inf, y.dtype)))
    safe_y = lax.select(lax.logical_and(at_zero, log_unsafe), lax.full(y.shape, 1, y.dtype), y)
    product = lax.mul(x, lax.log(safe_y))
    return lax.select(at_zero, lax.add(product, lax.full(x.shape, 0, x.dtype)), product)  # torch's 0 is +0.0


xlogy_p = define_composite("xlogy", _xlogy)


def xlogy(x: Any, y: Any) -> Any:
    """``x * log(y)`` with ``0 * log(y) = 0`` (``y`` not NaN); ``x`` and ``y`` of one shape and dtype."""
    return lax.bind(xlogy_p, x, y)


def _xlogy_vjp(cts: Any, primals: Any, outs: Any) -> tuple[Any, Any]:
    (g,), (x, y) = cts, primals
    zeros = lax.full(x.shape, 0, x.dtype)
    at_zero = lax.eq(x, zeros)
    dx = lax.select(lax.logical_and(at_zero, lax.le(y, zeros)), zeros, xlogy(g, y))
    dy = lax.select(lax.logical_and(at_zero, lax.eq(y, zeros)), zeros, lax.div(lax.mul(g, x), y))
    return dx, dy


vjp_rules[xlogy_p] = _xlogy_vjp
