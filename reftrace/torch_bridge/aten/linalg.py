"""Contractions: matrix products (mm, bmm, addmm, ...) and convolution (transposed ones included).

A transposed convolution is the gradient-style convolution: dilate the input by
the stride (``lhs_dilation``), flip the kernel and swap its in/out channels per
group, and pad by ``dilation * (k - 1) - padding`` (plus ``output_padding`` high).
"""
from __future__ import annotations

from typing import Any, Sequence

from reftrace import lax
from reftrace.torch_bridge.aten._common import aten, cast, literal, out_aval, register


def _dot(a: Any, b: Any, contract: tuple[int, int], batch: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
         ) -> Any:
    d = out_aval().dtype
    return lax.dot_general(cast(a, d), cast(b, d), (((contract[0],), (contract[1],)), batch))


@register(aten.mm.default)
def mm(a: Any, b: Any) -> Any:
    return _dot(a, b, (1, 0))


@register(aten.bmm.default)
def bmm(a: Any, b: Any) -> Any:
    return _dot(a, b, (2, 1), ((0,), (0,)))


@register(aten.mv.default)
def mv(a: Any, v: Any) -> Any:
    return _dot(a, v, (1, 0))


@register(aten.dot.default, aten.vdot.default)
def dot(a: Any, b: Any) -> Any:
    return _dot(a, b, (0, 0))


def _scaled_add(bias: Any, product: Any, beta: Any, alpha: Any) -> Any:
    d = product.dtype
    if alpha != 1:
        product = lax.mul(product, literal(alpha, d))
    if beta == 0:  # torch ignores the bias entirely (even NaNs) when beta == 0
        return product
    bias = cast(bias, d)
    if beta != 1:
        bias = lax.mul(bias, literal(beta, d))
    return lax.add(product, lax.broadcast_to_rank(bias, product.shape) if bias.ndim else bias)


@register(aten.addmm.default)
def addmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    return _scaled_add(bias, mm(a, b), beta, alpha)


@register(aten.addmv.default)
def addmv(bias: Any, a: Any, v: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    return _scaled_add(bias, mv(a, v), beta, alpha)


@register(aten.addbmm.default)
def addbmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    """``beta * bias + alpha * sum_i a[i] @ b[i]``: one contraction over the batch and inner dims."""
    d = out_aval().dtype
    product = lax.dot_general(cast(a, d), cast(b, d), (((0, 2), (0, 1)), ((), ())))
    return _scaled_add(bias, product, beta, alpha)


@register(aten.baddbmm.default)
def baddbmm(bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1) -> Any:
    return _scaled_add(bias, bmm(a, b), beta, alpha)


def _per_dim(values: Sequence[int], n: int) -> list[int]:
    values = [int(v) for v in values]
    return values * n if len(values) == 1 else values


@register(aten.convolution.default)
def convolution(x: Any, weight: Any, bias: Any, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int) -> Any:
    d = out_aval().dtype
    x, weight = cast(x, d), cast(weight, d)
    n = x.ndim - 2
    stride, padding = _per_dim(stride, n), _per_dim(padding, n)
    dilation, output_padding = _per_dim(dilation, n), _per_dim(output_padding, n)
    if not transposed:
        y = lax.conv_general_dilated(x, weight, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                     feature_group_count=groups)
    else:
        y = _conv_transpose(x, weight, stride, padding, dilation, output_padding, groups)
    if bias is not None:
        y = lax.add(y, lax.broadcast_in_dim(cast(bias, d), y.shape, (1,)))
    return y


def _conv_transpose(x: Any, weight: Any, stride: list[int], padding: list[int], dilation: list[int],
                    output_padding: list[int], groups: int) -> Any:
    n = x.ndim - 2
    cin, cout_g, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    w = lax.reshape(weight, (groups, cin // groups, cout_g) + kernel)
    w = lax.transpose(w, (0, 2, 1) + tuple(range(3, 3 + n)))
    w = lax.reshape(w, (groups * cout_g, cin // groups) + kernel)
    w = lax.rev(w, tuple(range(2, 2 + n)))
    pads, crops = [], []
    for k, p, dil, op in zip(kernel, padding, dilation, output_padding):
        lo = dil * (k - 1) - p
        hi = lo + op
        pads.append((max(lo, 0), max(hi, 0)))
        crops.append((max(-lo, 0), max(-hi, 0)))  # negative padding: crop the output instead
    y = lax.conv_general_dilated(x, w, [1] * n, pads, lhs_dilation=stride, rhs_dilation=dilation,
                                 feature_group_count=groups)
    if any(c != (0, 0) for c in crops):
        start = [0, 0] + [lo for lo, _ in crops]
        limit = list(y.shape[:2]) + [size - hi for size, (_, hi) in zip(y.shape[2:], crops)]
        y = lax.slice(y, start, limit)
    return y


@register(aten._cdist_forward.default)
def cdist(x1: Any, x2: Any, p: float, compute_mode: int | None = None) -> Any:
    """Pairwise p-norm distances between the rows of ``x1`` (..., P, M) and ``x2`` (..., R, M)."""
    d = out_aval().dtype
    batch = out_aval().shape[:-2]
    (pn, m), (rn, _) = x1.shape[-2:], x2.shape[-2:]
    full = batch + (pn, rn, m)
    nb = len(batch)
    a = lax.broadcast_in_dim(cast(x1, d), full, tuple(range(nb - (x1.ndim - 2), nb)) + (nb, nb + 2))
    b = lax.broadcast_in_dim(cast(x2, d), full, tuple(range(nb - (x2.ndim - 2), nb)) + (nb + 1, nb + 2))
    diff = lax.abs(lax.sub(a, b))
    last = (len(full) - 1,)
    if p == 0:
        return lax.reduce_sum(cast(lax.ne(diff, literal(0, d)), d), last)
    if p == float("inf"):
        return lax.reduce_max(diff, last)
    if p == 1:
        return lax.reduce_sum(diff, last)
    if p == 2:
        return lax.sqrt(lax.reduce_sum(lax.mul(diff, diff), last))
    return lax.pow(lax.reduce_sum(lax.pow(diff, literal(p, d)), last), literal(1.0 / p, d))
