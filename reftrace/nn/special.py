"""``xlogy``, ``xlog1py`` and ``entr`` as composites: their VJP rules are torch's, which no
decomposition's gradient can be.

``x * log(y)`` has slope ``log(y)`` in ``x``; where ``y == 0`` that is ``-inf``, and a zero cotangent
(an output masked out downstream, as a loss masks its non-finite terms) times ``-inf`` is NaN, which
then reaches every upstream gradient. Torch's backward is ``xlogy(cotangent, y)``: 0 wherever the
cotangent is. So the rule here gives the slope in ``x`` as ``xlogy(g, y)`` (0 at ``x == 0, y <= 0``, as
torch masks it), and in ``y`` as ``g * x / y`` (0 at the origin, where torch's is ``0/0``); ``xlog1py``
likewise with ``log1p`` and ``y + 1``. ``entr`` (``-x log x``, 0 at 0) has torch's slope
``-(1 + log x)``, +inf at 0, where a decomposition selecting 0 there gives ``0 * inf``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.transforms.vjp_rules import vjp_rules


def _x_times_log(x: Any, y: Any, *, log1p: bool) -> Any:
    """``x * log(y)`` (``log1p(y)`` with ``log1p``), 0 where ``x == 0`` unless ``y`` is NaN (torch's
    kernels). Where ``x == 0`` and the log is not finite, it sees a stand-in 0 (the value is 0 either way)."""
    at_zero = lax.eq(x, lax.full(x.shape, 0, x.dtype))
    pole = lax.full(y.shape, -1 if log1p else 0, y.dtype)
    log_unsafe = lax.logical_or(lax.le(y, pole), lax.eq(y, lax.full(y.shape, np.inf, y.dtype)))
    stand_in = lax.full(y.shape, 0 if log1p else 1, y.dtype)
    safe_y = lax.select(lax.logical_and(at_zero, log_unsafe), stand_in, y)
    product = lax.mul(x, lax.log1p(safe_y) if log1p else lax.log(safe_y))
    return lax.select(at_zero, lax.add(product, lax.full(x.shape, 0, x.dtype)), product)  # torch's 0 is +0.0


xlogy_p = define_composite("xlogy", lambda x, y: _x_times_log(x, y, log1p=False))
xlog1py_p = define_composite("xlog1py", lambda x, y: _x_times_log(x, y, log1p=True))


def xlogy(x: Any, y: Any) -> Any:
    """``x * log(y)`` with ``0 * log(y) = 0`` (``y`` not NaN); ``x`` and ``y`` of one shape and dtype."""
    return lax.bind(xlogy_p, x, y)


def xlog1py(x: Any, y: Any) -> Any:
    """``x * log1p(y)`` with ``0 * log1p(y) = 0`` (``y`` not NaN); ``x`` and ``y`` of one shape and dtype."""
    return lax.bind(xlog1py_p, x, y)


def _x_times_log_vjp(cts: Any, primals: Any, outs: Any, *, log1p: bool) -> tuple[Any, Any]:
    (g,), (x, y) = cts, primals
    zeros = lax.full(x.shape, 0, x.dtype)
    pole = lax.full(y.shape, -1 if log1p else 0, y.dtype)
    at_zero = lax.eq(x, zeros)
    dx = lax.select(lax.logical_and(at_zero, lax.le(y, pole)), zeros, (xlog1py if log1p else xlogy)(g, y))
    shifted = lax.sub(y, pole)  # y + 1 for log1p
    dy = lax.select(lax.logical_and(at_zero, lax.eq(y, pole)), zeros, lax.div(lax.mul(g, x), shifted))
    return dx, dy


vjp_rules[xlogy_p] = lambda cts, primals, outs: _x_times_log_vjp(cts, primals, outs, log1p=False)
vjp_rules[xlog1py_p] = lambda cts, primals, outs: _x_times_log_vjp(cts, primals, outs, log1p=True)


def _entr(x: Any) -> Any:
    """``-x log x`` for ``x > 0``, 0 at 0, ``-inf`` below, NaN at NaN (torch's kernel); the log sees a
    stand-in 1 where ``x <= 0``."""
    zeros, ones = lax.full(x.shape, 0, x.dtype), lax.full(x.shape, 1, x.dtype)
    positive = lax.gt(x, zeros)
    inside = lax.neg(lax.mul(x, lax.log(lax.select(positive, x, ones))))
    outside = lax.select(lax.eq(x, zeros), zeros, lax.full(x.shape, -np.inf, x.dtype))
    return lax.select(lax.ne(x, x), x, lax.select(positive, inside, outside))


entr_p = define_composite("entr", _entr)


def entr(x: Any) -> Any:
    """``-x log x`` (0 at 0, ``-inf`` for negative ``x``), with torch's slope ``-(1 + log x)``."""
    return lax.bind(entr_p, x)


vjp_rules[entr_p] = lambda cts, primals, outs: (
    lax.mul(cts[0], lax.neg(lax.add(lax.full(primals[0].shape, 1, primals[0].dtype), lax.log(primals[0])))),)
