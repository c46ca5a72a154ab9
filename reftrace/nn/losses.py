"""Negative log-likelihood as a composite (cross-entropy is ``log_softmax`` then this), with ATen's
backward equation.

``nll_loss(logp, target[, weight])`` on (n, classes) log-probabilities (or one row of them) and
integer targets returns ``(loss, total_weight)`` as ``aten.nll_loss_forward``: targets equal to
``ignore_index`` count for nothing (their terms are 0, in the loss and its gradient, whatever
their log-probabilities); ``reduction`` is ATen's code (0 none, 1 mean, 2 sum); the mean divides
by the total weight of the counted targets (0/0 = NaN when none counts, while the gradient stays
0, as eager's), and ``total_weight`` is 0 without reduction. ``total_weight`` carries no gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import along, cast
from reftrace.transforms.vjp_rules import vjp_rules

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _as_rows(logp: Any, target: Any) -> tuple[Any, Any]:
    """(n, classes) log-probabilities and an (n, 1) int64 target column."""
    if logp.ndim == 1:
        logp = lax.reshape(logp, (1, logp.shape[0]))
    target = cast(target, np.int64)
    return logp, lax.reshape(target, (logp.shape[0], 1))


def _target_weights(logp: Any, column: Any, weight: Any, ignore_index: int) -> tuple[Any, Any, Any]:
    """(a safe class column, each row's weight: 0 where the target is ignored, whether it counts),
    all (n, 1)."""
    counted = lax.ne(column, lax.full(column.shape, ignore_index, np.int64))
    safe = lax.select(counted, column, lax.full(column.shape, 0, np.int64))
    d = logp.dtype
    # the class weights carry no gradient, as in torch (whose nll_loss has no derivative for them)
    per_row = (lax.gather(along(lax.stop_gradient(weight), (column.shape[0], weight.shape[0]), (1,)), safe, 1)
               if weight is not None else lax.full(column.shape, 1, d))
    return safe, lax.select(counted, cast(per_row, d), lax.full(column.shape, 0, d)), counted


def _counted_only(counted: Any, values: Any) -> Any:
    """``values`` where the row's target counts, 0 where it is ignored: ATen skips ignored rows, so
    their terms are 0 even where a factor is not finite (a -inf log-probability; the mean's 1/0 when
    no target counts, whose gradient eager leaves 0 while the loss is NaN)."""
    return lax.select(counted, values, lax.full(values.shape, 0, values.dtype))


def _nll_loss(logp: Any, target: Any, *weight: Any, reduction: int, ignore_index: int, has_weight: bool
              ) -> tuple[Any, Any]:
    rows, column = _as_rows(logp, target)
    safe, w, counted = _target_weights(rows, column, weight[0] if has_weight else None, ignore_index)
    losses = _counted_only(counted, lax.neg(lax.mul(lax.gather(rows, safe, 1), w)))          # (n, 1)
    total = lax.stop_gradient(lax.reduce_sum(w, (0, 1)))
    if reduction == REDUCTIONS["none"]:  # ATen reports the total weight only for a single row
        return lax.reshape(losses, target.shape), total if logp.ndim == 1 else lax.full((), 0, rows.dtype)
    loss = lax.reduce_sum(losses, (0, 1))
    return (lax.div(loss, total) if reduction == REDUCTIONS["mean"] else loss), total


def _nll_loss_backward(g: Any, logp: Any, target: Any, *rest: Any, reduction: int, ignore_index: int,
                       has_weight: bool) -> Any:
    weight, total = (rest[0], rest[1]) if has_weight else (None, rest[0])
    rows, column = _as_rows(logp, target)
    safe, w, counted = _target_weights(rows, column, weight, ignore_index)
    n = rows.shape[0]
    if reduction == REDUCTIONS["none"]:
        scale = lax.reshape(g, (n, 1))
    else:
        scale = lax.broadcast_in_dim(lax.div(g, total) if reduction == REDUCTIONS["mean"] else g, (n, 1), ())
    picked = _counted_only(counted, lax.neg(lax.mul(w, scale)))
    grad = lax.scatter_add(lax.full(rows.shape, 0, rows.dtype), safe, picked, 1)
    return lax.reshape(grad, logp.shape)


nll_loss_p = define_composite("nll_loss", _nll_loss, multiple_results=True)
nll_loss_backward_p = define_composite("nll_loss_backward", _nll_loss_backward)


def nll_loss(logp: Any, target: Any, weight: Any = None, reduction: str = "mean", ignore_index: int = -100
             ) -> tuple[Any, Any]:
    """(loss, total_weight) of log-probabilities ``logp`` at integer ``target``s; see the module docstring."""
    if reduction not in REDUCTIONS:
        from reftrace.errors import ArgumentError
        raise ArgumentError(f"nll_loss: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    operands = (logp, target) if weight is None else (logp, target, weight)
    return lax.bind(nll_loss_p, *operands, reduction=REDUCTIONS[reduction], ignore_index=int(ignore_index),
                    has_weight=weight is not None)


def _nll_loss_vjp(cts, primals, outs, *, reduction, ignore_index, has_weight):
    if cts[0] is None:  # only total_weight has a cotangent: it carries no gradient
        return (None,) * len(primals)
    grad = lax.bind(nll_loss_backward_p, cts[0], *primals, outs[1], reduction=reduction, ignore_index=ignore_index,
                    has_weight=has_weight)
    return (grad, *(None,) * (len(primals) - 1))


vjp_rules[nll_loss_p] = _nll_loss_vjp


# ----------------------------------------------------------------------------- binary cross-entropy
# ``aten.binary_cross_entropy`` on probabilities: each log is clamped at -100, as torch's kernel. Its
# backward is torch's, not the decomposition's: ``g * (p - t) / max(p * (1 - p), 1e-12)``. At a
# probability of exactly 0 or 1 (a saturated sigmoid) the decomposition's gradient is NaN (the
# clamped log's untaken branch: 0 * 1/0); torch's is finite, and 0 through the sigmoid.

_BCE_EPSILON = 1e-12


def reduce_loss(values: Any, reduction: int) -> Any:
    """Per-element losses reduced as ATen's ``reduction`` code says (0 none, 1 mean, 2 sum); the mean of
    no elements is 0/0 = NaN, as torch's."""
    if reduction == REDUCTIONS["none"]:
        return values
    total = lax.reduce_sum(values, tuple(range(values.ndim)))
    return lax.div(total, lax.full((), values.size, values.dtype)) if reduction == REDUCTIONS["mean"] else total


def _per_element(g: Any, like: Any, reduction: int) -> Any:
    """The cotangent of a reduced loss as one value per element (the mean's divided by the count)."""
    if reduction == REDUCTIONS["none"]:
        return g
    if reduction == REDUCTIONS["mean"]:
        g = lax.div(g, lax.full((), max(like.size, 1), like.dtype))
    return lax.broadcast_in_dim(g, like.shape, ())


def _binary_cross_entropy(p: Any, t: Any, *weight: Any, reduction: int, has_weight: bool) -> Any:
    d = p.dtype
    floor = lax.full(p.shape, -100, d)
    one = lax.full(p.shape, 1, d)
    log_p = lax.max(lax.log(p), floor)
    log_q = lax.max(lax.log1p(lax.neg(p)), floor)
    losses = lax.sub(lax.mul(lax.sub(t, one), log_q), lax.mul(t, log_p))
    if has_weight:
        losses = lax.mul(losses, lax.stop_gradient(weight[0]))
    return reduce_loss(losses, reduction)


def _binary_cross_entropy_backward(g: Any, p: Any, t: Any, *weight: Any, reduction: int, has_weight: bool) -> Any:
    d = p.dtype
    denominator = lax.max(lax.mul(lax.sub(lax.full(p.shape, 1, d), p), p), lax.full(p.shape, _BCE_EPSILON, d))
    grad = lax.div(lax.mul(_per_element(g, p, reduction), lax.sub(p, t)), denominator)
    return lax.mul(grad, weight[0]) if has_weight else grad


binary_cross_entropy_p = define_composite("binary_cross_entropy", _binary_cross_entropy)
binary_cross_entropy_backward_p = define_composite("binary_cross_entropy_backward", _binary_cross_entropy_backward)


def binary_cross_entropy(p: Any, target: Any, weight: Any = None, reduction: str = "mean") -> Any:
    """Binary cross-entropy of probabilities ``p`` against ``target`` (same shape and dtype; ``weight``
    too), each log clamped at -100, with torch's gradient (finite at ``p`` of exactly 0 or 1)."""
    if reduction not in REDUCTIONS:
        from reftrace.errors import ArgumentError
        raise ArgumentError(f"binary_cross_entropy: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    operands = (p, target) if weight is None else (p, target, weight)
    return lax.bind(binary_cross_entropy_p, *operands, reduction=REDUCTIONS[reduction], has_weight=weight is not None)


def _binary_cross_entropy_vjp(cts, primals, outs, *, reduction, has_weight):
    p, t, *weight = primals
    dp = lax.bind(binary_cross_entropy_backward_p, cts[0], *primals, reduction=reduction, has_weight=has_weight)
    # the target's slope is torch's: -logit(p), weighted (the weight itself gets none, as in torch)
    dt = lax.mul(_per_element(cts[0], p, reduction), lax.neg(lax.sub(lax.log(p), lax.log1p(lax.neg(p)))))
    if has_weight:
        dt = lax.mul(dt, lax.stop_gradient(weight[0]))
    return (dp, dt, *(None,) * len(weight))


vjp_rules[binary_cross_entropy_p] = _binary_cross_entropy_vjp
