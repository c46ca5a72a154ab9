"""The p-norm of a vector (``torch.linalg.vector_norm``) as one composite, with torch's gradient.

The torch backend runs it as ``torch.linalg.vector_norm``, eager's kernel, so a 2-norm sums in eager's
order and gets eager's last bit; a sum of squares then a square root in another order did not (a
row of ``nn.Embedding(max_norm=...)`` was scaled one rounding differently). Its VJP rule is torch's
``norm_backward`` formula op for op, so the gradient is eager's too: ``x / norm`` (0 at a zero
norm) for p = 2, ``sgn(x)`` for p = 1, the gradient split evenly among the elements attaining the
max for p = ±inf, ``sgn(x) |x|^(p-1) / norm^(p-1)`` (0 at a zero norm, and at zero elements for
p < 1) otherwise. float16/bfloat16 norms are computed in float32 and rounded once, as torch's
kernel does; the backward runs in the input's dtype, as eager's.
"""
from __future__ import annotations

import math
from typing import Any

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import accumulation_dtype, along, cast, const, other_axes
from reftrace.transforms.vjp_rules import vjp_rules


def root_of_zero_safe(total: Any, p: float) -> Any:
    """``total ** (1/p)`` whose gradient at ``total == 0`` is 0, not inf (torch masks it)."""
    d = total.dtype
    zero = lax.eq(total, const(0, d))
    safe = lax.select(zero, along(const(1, d), total.shape, ()), total)
    root = lax.sqrt(safe) if p == 2 else lax.pow(safe, const(1.0 / p, d))
    return lax.select(zero, along(const(0, d), total.shape, ()), root)


def _vector_norm(x: Any, *, ord: float, axes: tuple[int, ...]) -> Any:  # noqa: A002 - torch's name
    """``(sum |x|^ord) ** (1/ord)`` over ``axes`` (max/min |x| for ±inf, the count of non-zeros for 0)."""
    dtype, d = x.dtype, accumulation_dtype(x.dtype)
    x = cast(x, d)
    a = lax.abs(x)
    p = float(ord)
    if p == math.inf:
        r = lax.reduce_max(a, axes)
    elif p == -math.inf:
        r = lax.reduce_min(a, axes)
    elif p == 0:
        r = lax.reduce_sum(cast(lax.ne(x, const(0, d)), d), axes)
    elif p == 1:
        r = lax.reduce_sum(a, axes)
    elif p == 2:
        r = root_of_zero_safe(lax.reduce_sum(lax.mul(x, x), axes), 2)
    else:  # |x|^p with a zero-safe stand-in: 0 at 0 for p > 0, inf for p < 0 (the norm is then 0)
        zero = lax.eq(a, const(0, d))
        at_zero = along(const(0 if p > 0 else math.inf, d), a.shape, ())
        powered = lax.select(zero, at_zero, lax.pow(lax.select(zero, along(const(1, d), a.shape, ()), a),
                                                     const(p, d)))
        total = lax.reduce_sum(powered, axes)
        r = root_of_zero_safe(total, p) if p > 0 else lax.pow(total, const(1.0 / p, d))
    return cast(r, dtype)


vector_norm_p = define_composite("vector_norm", _vector_norm)


def vector_norm(x: Any, ord: float, axes: tuple[int, ...]) -> Any:  # noqa: A002 - torch's name
    """The ``ord``-norm of a real floating ``x`` over ``axes`` (``torch.linalg.vector_norm``), ``x``'s dtype."""
    return lax.bind(vector_norm_p, x, ord=float(ord), axes=tuple(axes))


def _vector_norm_vjp(cts: Any, primals: Any, outs: Any, *, ord: float, axes: tuple[int, ...]) -> tuple[Any]:  # noqa: A002
    """torch's ``norm_backward``, op for op, in the input's dtype."""
    x, norm, g = primals[0], outs[0], cts[0]
    d, shape = x.dtype, x.shape
    kept = other_axes(x.ndim, axes)
    g, norm = along(g, shape, kept), along(norm, shape, kept)
    zero = along(const(0, d), shape, ())
    p = float(ord)
    if p == 0:  # torch's backward returns no tensor: the gradient is None, as for a constant
        return (None,)
    if p == 1:
        return (lax.mul(lax.sign(x), g),)
    if p == 2:
        return (lax.mul(g, lax.select(lax.eq(norm, zero), zero, lax.div(x, norm))),)
    if math.isinf(p):
        a = lax.abs(x)
        mask = lax.logical_or(lax.eq(a, norm), lax.ne(a, a))
        count = along(lax.reduce_sum(cast(mask, d), axes), shape, kept)
        return (lax.mul(lax.sign(x), lax.mul(lax.div(g, count), cast(mask, d))),)
    if p < 1:
        scaled = lax.mul(lax.sign(x), lax.select(lax.eq(x, zero), zero, lax.pow(lax.abs(x), const(p - 1, d))))
        return (lax.mul(lax.mul(scaled, g), lax.pow(norm, const(1 - p, d))),)
    if p < 2:
        scaled = lax.mul(lax.sign(x), lax.pow(lax.abs(x), const(p - 1, d)))
    else:
        scaled = lax.mul(x, lax.pow(lax.abs(x), const(p - 2, d)))
    scale = lax.select(lax.eq(norm, zero), zero, lax.div(g, lax.pow(norm, const(p - 1, d))))
    return (lax.mul(scaled, scale),)


vjp_rules[vector_norm_p] = _vector_norm_vjp
