"""Scaled dot-product attention as a composite, with a composite backward equation.

``dot_product_attention(q, k, v[, mask])`` on (batch, heads, length, features) operands returns the
attended values and the log-sum-exp of each row's scores (what a flash kernel keeps for its
backward). A row whose scores are all masked attends to nothing: its output is 0 and its
log-sum-exp 0, as torch's CPU kernel. The mask is additive and of the operands' dtype
(front ends turn boolean masks into 0 / -inf); the causal flag masks keys after each query.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import accumulation_dtype, along, cast, const
from reftrace.transforms.vjp import through_decomposition
from reftrace.transforms.vjp_rules import vjp_rules

_QK = (((3,), (3,)), ((0, 1), (0, 1)))     # (b, h, l, e) x (b, h, s, e) -> (b, h, l, s)
_PV = (((3,), (2,)), ((0, 1), (0, 1)))     # (b, h, l, s) x (b, h, s, e) -> (b, h, l, e)
_PT_G = (((2,), (2,)), ((0, 1), (0, 1)))   # (b, h, l, s) x (b, h, l, e) -> (b, h, s, e)
_ROWS = (0, 1, 2)


def _scores(q: Any, k: Any, mask: Any, *, causal: bool, scale: float) -> Any:
    d = q.dtype
    scores = lax.mul(lax.dot_general(q, k, _QK), const(scale, d))
    length, source = scores.shape[-2:]
    if causal:
        rows = lax.iota(np.int64, (length, source), 0)
        cols = lax.iota(np.int64, (length, source), 1)
        allowed = lax.broadcast_in_dim(lax.le(cols, rows), scores.shape, (2, 3))
        scores = lax.select(allowed, scores, lax.full(scores.shape, -np.inf, d))
    if mask is not None:
        scores = lax.add(scores, mask)
    return scores


def _attention(q: Any, k: Any, v: Any, *mask: Any, causal: bool, scale: float, has_mask: bool
               ) -> tuple[Any, Any]:
    d = q.dtype
    scores = _scores(q, k, mask[0] if has_mask else None, causal=causal, scale=scale)
    peak = lax.reduce_max(scores, (3,))
    peak = lax.select(lax.is_finite(peak), peak, lax.full(peak.shape, 0, d))
    e = lax.exp(lax.sub(scores, along(peak, scores.shape, _ROWS)))
    total = lax.reduce_sum(e, (3,))
    total = lax.select(lax.eq(total, const(0, d)), lax.full(total.shape, 1, d), total)  # fully masked rows
    out = lax.dot_general(lax.div(e, along(total, scores.shape, _ROWS)), v, _PV)
    return out, cast(lax.add(lax.log(total), peak), accumulation_dtype(d))


def _attention_backward(g: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *mask: Any, causal: bool, scale: float,
                        has_mask: bool) -> tuple[Any, Any, Any]:
    d = q.dtype
    scores = _scores(q, k, mask[0] if has_mask else None, causal=causal, scale=scale)
    p = lax.exp(lax.sub(scores, along(cast(lse, d), scores.shape, _ROWS)))
    dv = lax.dot_general(p, g, _PT_G)
    dp = lax.dot_general(g, v, _QK)
    row = lax.reduce_sum(lax.mul(g, out), (3,))
    ds = lax.mul(lax.mul(p, lax.sub(dp, along(row, dp.shape, _ROWS))), const(scale, d))
    dq = lax.dot_general(ds, k, _PV)
    dk = lax.dot_general(ds, q, _PT_G)
    return dq, dk, dv


attention_p = define_composite("attention", _attention, multiple_results=True, compute_intensive=True)
attention_backward_p = define_composite("attention_backward", _attention_backward, multiple_results=True,
                                        compute_intensive=True)


def dot_product_attention(q: Any, k: Any, v: Any, mask: Any = None, *, causal: bool = False, scale: float | None = None
              ) -> tuple[Any, Any]:
    """(softmax(q k^T * scale + mask) v, log-sum-exp of the scores) on (b, h, l, e) operands; ``scale``
    defaults to 1/sqrt(e)."""
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else float(scale)
    operands = (q, k, v) if mask is None else (q, k, v, mask)
    return lax.bind(attention_p, *operands, causal=bool(causal), scale=scale, has_mask=mask is not None)


def _attention_vjp(cts, primals, outs, *, causal, scale, has_mask):
    if cts[1] is not None or has_mask:
        # the log-sum-exp used downstream, or a mask's cotangent: the decomposition covers those (and vjp
        # drops its backward when only q, k, v's cotangents are used)
        through = through_decomposition(attention_p, cts, primals, outs, causal=causal, scale=scale,
                                        has_mask=has_mask)
        if cts[1] is not None:
            return through
    q, k, v = primals[:3]
    g = cts[0] if cts[0] is not None else lax.zeros(outs[0].aval)
    grads = lax.bind(attention_backward_p, g, q, k, v, outs[0], outs[1], *primals[3:], causal=causal, scale=scale,
                     has_mask=has_mask)
    return (*grads, *(through[3:] if has_mask else ()))


vjp_rules[attention_p] = _attention_vjp
