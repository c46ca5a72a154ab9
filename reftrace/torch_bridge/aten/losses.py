"""Loss ops: ``nll_loss_forward`` as the ``nll_loss`` composite, ``smooth_l1_loss`` and ``huber_loss``
with torch's slopes, torch's chunked linear + cross-entropy (``torch.ops.torch_nn``), one graph of
matmul, log-softmax and the picked targets, and ``reftrace::ctc_loss`` (what capture makes of
``F.ctc_loss``) as the ``ctc_loss`` composite.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax, nn
from reftrace import primitives as P
from reftrace.nn.losses import reduce_loss
from reftrace.torch_bridge.aten._common import (aten, bcast_full, broadcast_shapes, cast, literal, opmath, out_aval,
                                                register, unsupported)
from reftrace.torch_bridge.aten.indexing import take
from reftrace.torch_bridge.ctc import ctc_loss_op


@register(aten.nll_loss_forward.default)
def nll_loss_forward(x: Any, target: Any, weight: Any, reduction: int, ignore_index: int) -> tuple[Any, Any]:
    d = out_aval().dtype
    loss, total = nn.nll_loss(cast(x, d), cast(target, np.int64), None if weight is None else cast(weight, d),
                              ("none", "mean", "sum")[reduction], ignore_index)
    return loss, lax.stop_gradient(total)


@register(ctc_loss_op._opoverload)
def ctc_loss(log_probs: Any, targets: Any, input_lengths: Any, target_lengths: Any, blank: int, zero_infinity: bool
             ) -> Any:
    return nn.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)


@register(aten.binary_cross_entropy.default)
def binary_cross_entropy(p: Any, target: Any, weight: Any = None, reduction: int = 1) -> Any:
    """The ``binary_cross_entropy`` composite: torch's values and torch's gradient (finite at a
    probability of exactly 0 or 1, where differentiating the clamped logs gives NaN)."""
    d = out_aval().dtype
    w = None if weight is None else bcast_full(cast(weight, d), p.shape)
    return nn.binary_cross_entropy(cast(p, d), bcast_full(cast(target, d), p.shape), w,
                                   ("none", "mean", "sum")[reduction])


def _residual(x: Any, target: Any) -> Any:
    """``x - target`` broadcast, in float32 for float16/bfloat16 as torch's decompositions compute losses."""
    c = opmath(out_aval().dtype)
    shape = broadcast_shapes(x, target)
    return lax.sub(bcast_full(cast(x, c), shape), bcast_full(cast(target, c), shape))


def _piecewise_loss(x: Any, target: Any, reduction: int, width: float, quadratic: Any, linear: Any) -> Any:
    """``quadratic(d)`` for ``|d| < width``, ``linear(|d|)`` from there on (``d = x - target``), in float32
    for float16/bfloat16 as torch's decomposition computes it.

    The rows select on ``d`` itself, not ``|d|``, as torch's backward kernels do, and the quadratic sees
    0 where the linear side is taken: a zero cotangent at an infinite ``d`` (a masked-out term) then
    gives 0 as in eager, not ``0 * inf``; a NaN ``d`` takes the quadratic side, whose slope is NaN, as
    eager's ``x * grad / beta``. At ``|d| == width`` the value is the linear side's (torch's forward)
    and so is the slope, ±1 times the linear factor, which torch's backward gives too."""
    d = _residual(x, target)
    c = d.dtype
    w = literal(width, c)
    below, above = lax.le(d, lax.neg(w)), lax.ge(d, w)
    outside = lax.logical_or(below, above)
    inside = quadratic(lax.select(outside, literal(0, c), d))
    loss = lax.select(below, linear(lax.neg(d)), lax.select(above, linear(d), inside))
    return cast(reduce_loss(loss, reduction), out_aval().dtype)


@register(aten.smooth_l1_loss.default)
def smooth_l1_loss(x: Any, target: Any, reduction: int = 1, beta: float = 1.0) -> Any:
    """``0.5 d**2 / beta`` inside ``|d| < beta``, ``|d| - 0.5 beta`` outside; ``beta == 0`` is the L1 loss
    (``F.smooth_l1_loss`` calls ``l1_loss`` then, torch's slope 0 at ``d == 0``)."""
    if beta == 0:
        return cast(reduce_loss(lax.abs(_residual(x, target)), reduction), out_aval().dtype)
    return _piecewise_loss(
        x, target, reduction, beta,
        lambda d: lax.div(lax.mul(lax.mul(d, d), literal(0.5, d.dtype)), literal(beta, d.dtype)),
        lambda a: lax.sub(a, literal(0.5 * beta, a.dtype)))


@register(aten.huber_loss.default)
def huber_loss(x: Any, target: Any, reduction: int = 1, delta: float = 1.0) -> Any:
    """``0.5 d**2`` inside ``|d| < delta``, ``delta (|d| - 0.5 delta)`` outside."""
    if not delta > 0:
        raise unsupported(f"huber_loss with delta={delta} (torch requires delta > 0)")
    return _piecewise_loss(
        x, target, reduction, delta,
        lambda d: lax.mul(lax.mul(d, literal(0.5, d.dtype)), d),
        lambda a: lax.mul(literal(delta, a.dtype), lax.sub(a, literal(0.5 * delta, a.dtype))))


# ----------------------------------------------------------------------------- fused linear + cross-entropy
# torch's chunked F.linear_cross_entropy is a custom op (torch_nn::) whose forward also returns the
# gradients its own backward rescales. reftrace differentiates the loss itself; the extra outputs
# are the same closed form (dL/dlogits = coefficient * (softmax - target)) for callers of the op.

def _linear_cross_entropy(x: Any, w: Any, target: Any, bias: Any, weight: Any, reduction: str,
                          ignore_index: int) -> tuple[Any, Any, Any]:
    """(loss, dloss/dlogits, logits dtype): cross-entropy of x w^T + bias, index or probability targets."""
    d = x.dtype
    logits = lax.dot_general(x, cast(w, d), (((1,), (1,)), ((), ())))
    if bias is not None:
        logits = lax.add(logits, lax.broadcast_in_dim(cast(bias, d), logits.shape, (1,)))
    n, classes = logits.shape
    peak = lax.reduce_max(logits, (1,))
    peak = lax.select(lax.is_finite(peak), peak, literal(0, d))
    shifted = lax.sub(logits, lax.broadcast_in_dim(peak, logits.shape, (0,)))
    total = lax.reduce_sum(lax.exp(shifted), (1,))
    lse = lax.add(lax.log(total), peak)
    softmax = lax.div(lax.exp(shifted), lax.broadcast_in_dim(total, logits.shape, (0,)))
    if P.is_float(target.dtype):  # probability targets: mean divides by the batch size
        wt = cast(target, d)
        if weight is not None:
            wt = lax.mul(wt, lax.broadcast_in_dim(cast(weight, d), wt.shape, (1,)))
        scale = (1.0 / n if n else np.nan) if reduction == "mean" else 1.0
        per_row = lax.sub(lax.mul(lax.reduce_sum(wt, (1,)), lse), lax.reduce_sum(lax.mul(wt, logits), (1,)))
        loss = lax.mul(lax.reduce_sum(per_row, (0,)), literal(scale, d))
        rows = lax.broadcast_in_dim(lax.reduce_sum(wt, (1,)), logits.shape, (0,))
        grad = lax.mul(lax.sub(lax.mul(rows, softmax), wt), literal(scale, d))
        return loss, grad, logits
    t = cast(target, np.int64)
    ignored = lax.eq(t, literal(ignore_index, np.int64))
    safe_t = lax.select(ignored, literal(0, np.int64), t)
    row_weight = (take(cast(weight, d), 0, safe_t) if weight is not None else lax.full((n,), 1, d))
    row_weight = lax.select(ignored, literal(0, d), row_weight)
    picked = lax.reshape(lax.gather(logits, lax.reshape(safe_t, (n, 1)), 1), (n,))
    per_row = lax.mul(row_weight, lax.sub(lse, picked))
    one_hot = cast(lax.eq(lax.broadcast_in_dim(safe_t, logits.shape, (0,)), lax.iota(np.int64, logits.shape, 1)), d)
    coefficient = row_weight
    if reduction == "none":
        return per_row, None, logits
    loss = lax.reduce_sum(per_row, (0,))
    if reduction == "mean":
        denominator = lax.reduce_sum(row_weight, (0,))
        denominator = lax.select(lax.eq(denominator, literal(0, d)), literal(np.nan, d), denominator)
        loss = lax.div(loss, denominator)
        coefficient = lax.div(row_weight, denominator)
    grad = lax.mul(lax.broadcast_in_dim(coefficient, logits.shape, (0,)), lax.sub(softmax, one_hot))
    return loss, grad, logits


def _register_custom(name: str):
    """Register for ``torch.ops.torch_nn.<name>`` if this torch has it (its module defines it on import)."""
    try:
        import torch.nn.modules.linear_cross_entropy  # noqa: F401
        op = getattr(torch.ops.torch_nn, name).default
    except (ImportError, AttributeError):
        return lambda fn: fn
    return register(op)


@_register_custom("_linear_cross_entropy_batch_chunked")
def linear_cross_entropy_chunked(x: Any, w: Any, target: Any, bias: Any, weight: Any, reduction: str,
                                 ignore_index: int, label_smoothing: float, batch_chunk_size: int, acc_policy: str,
                                 acc_dtype: Any, allow_retain_graph: bool, compute_input_grad: bool,
                                 compute_linear_weight_grad: bool, compute_linear_bias_grad: bool
                                 ) -> tuple[Any, Any, Any, Any]:
    if label_smoothing:
        raise unsupported("label smoothing (torch's chunked path does not support it either)")
    loss, grad, _ = _linear_cross_entropy(x, w, target, bias, weight, reduction, ignore_index)
    d = x.dtype
    grad_x = (lax.dot_general(grad, cast(w, d), (((1,), (0,)), ((), ()))) if compute_input_grad
              else lax.full(out_aval(1).shape, 0, d))
    grad_w = (lax.dot_general(grad, x, (((0,), (0,)), ((), ()))) if compute_linear_weight_grad
              else lax.full(out_aval(2).shape, 0, d))
    grad_b = lax.reduce_sum(grad, (0,)) if compute_linear_bias_grad else lax.full(out_aval(3).shape, 0, d)
    return loss, grad_x, grad_w, grad_b


@_register_custom("_linear_cross_entropy_batch_chunked_no_reduction")
def linear_cross_entropy_chunked_none(x: Any, w: Any, target: Any, bias: Any, weight: Any, ignore_index: int,
                                      batch_chunk_size: int, acc_policy: str, acc_dtype: Any) -> Any:
    return _linear_cross_entropy(x, w, target, bias, weight, "none", ignore_index)[0]
