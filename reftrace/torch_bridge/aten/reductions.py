"""Reduction ATen ops: sum/mean/prod, max/min (with indices), arg-extrema, any/all, var/std, scans, softmax.

ATen's convention that an empty ``dim`` list means "every dimension" is honoured
(``x.sum()`` arrives as ``sum.dim_IntList(x, [])``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax, nn
from reftrace import primitives as P
from reftrace.torch_bridge.aten._common import (aten, cast, float_dtype, highest, keep_dims, literal, lowest,
                                                norm_dim, norm_dims, opmath, out_aval, promote, register,
                                                unsupported)
from reftrace.nn.vector_norms import root_of_zero_safe
from reftrace.torch_bridge.aten.elementwise import to_bool


def _count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


@register(aten.sum.dim_IntList)
def sum_dim(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    axes = norm_dims(dim, x.ndim)
    d = out_aval().dtype
    if P.is_bool(d):
        return keep_dims(lax.reduce(P.reduce_or_p, x, axes), x.shape, axes, keepdim)
    return keep_dims(lax.reduce_sum(cast(x, d), axes), x.shape, axes, keepdim)


@register(aten.sum.default)
def sum_all(x: Any, *, dtype: Any = None) -> Any:
    return sum_dim(x, None)


@register(aten.mean.dim)
def mean_dim(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """Summed and divided in float32 for float16/bfloat16, rounded once (torch's ``mean_out``)."""
    axes = norm_dims(dim, x.ndim)
    d = float_dtype(out_aval().dtype)
    c = opmath(d)
    total = lax.reduce_sum(cast(x, c), axes)
    return cast(keep_dims(lax.div(total, literal(_count(x.shape, axes), c)), x.shape, axes, keepdim), d)


@register(aten.mean.default)
def mean_all(x: Any, *, dtype: Any = None) -> Any:
    return mean_dim(x, None)


@register(aten.prod.dim_int)
def prod_dim(x: Any, dim: int, keepdim: bool = False, *, dtype: Any = None) -> Any:
    axes = norm_dims(dim, x.ndim)
    d = out_aval().dtype
    if P.is_bool(d):
        return keep_dims(lax.reduce(P.reduce_and_p, x, axes), x.shape, axes, keepdim)
    return keep_dims(lax.reduce_prod(cast(x, d), axes), x.shape, axes, keepdim)


@register(aten.prod.default)
def prod_all(x: Any, *, dtype: Any = None) -> Any:
    d = out_aval().dtype
    axes = tuple(range(x.ndim))
    if P.is_bool(d):
        return lax.reduce(P.reduce_and_p, x, axes)
    return lax.reduce_prod(cast(x, d), axes)


def _extremum(prim: P.Primitive):
    def rule(x: Any, dim: Any = None, keepdim: bool = False) -> Any:
        axes = norm_dims(dim, x.ndim)
        return keep_dims(lax.reduce(prim, x, axes), x.shape, axes, keepdim)
    return rule


register(aten.amax.default)(_extremum(P.reduce_max_p))
register(aten.amin.default)(_extremum(P.reduce_min_p))
register(aten.max.default)(_extremum(P.reduce_max_p))
register(aten.min.default)(_extremum(P.reduce_min_p))


def _arg(fn: Any):
    def rule(x: Any, dim: int | None = None, keepdim: bool = False) -> Any:
        if x.ndim == 0:
            return lax.full(out_aval().shape, 0, np.int64)
        if dim is None:
            return lax.reshape(fn(lax.reshape(x, (x.size,)), 0, np.int64), out_aval().shape)
        axis = norm_dim(dim, x.ndim)
        return keep_dims(fn(x, axis, np.int64), x.shape, (axis,), keepdim)
    return rule


argmax = register(aten.argmax.default)(_arg(lax.argmax))
argmin = register(aten.argmin.default)(_arg(lax.argmin))


def _extremum_with_index(arg: Any):
    def rule(x: Any, dim: int, keepdim: bool = False) -> tuple[Any, Any]:
        """``x`` gathered at the returned index (the first extremum, or the first NaN), so the whole
        gradient goes to that one element, as torch's backward (``amax`` splits ties instead)."""
        if x.ndim == 0:
            return x, lax.full((), 0, np.int64)
        axis = norm_dim(dim, x.ndim)
        index = arg(x, axis, True)
        values = lax.gather(x, index, axis)
        if not keepdim:
            kept = x.shape[:axis] + x.shape[axis + 1:]
            return lax.reshape(values, kept), lax.reshape(index, kept)
        return values, index
    return rule


register(aten.max.dim)(_extremum_with_index(argmax))
register(aten.min.dim)(_extremum_with_index(argmin))


def _logical_reduce(prim: P.Primitive):
    def rule(x: Any, dim: Any = None, keepdim: bool = False) -> Any:
        axes = norm_dims(dim, x.ndim)
        return keep_dims(lax.reduce(prim, to_bool(x), axes), x.shape, axes, keepdim)
    return rule


register(aten.any.default, aten.any.dim, aten.any.dims)(_logical_reduce(P.reduce_or_p))
register(aten.all.default, aten.all.dim, aten.all.dims)(_logical_reduce(P.reduce_and_p))


def _moments(x: Any, dim: Any, correction: Any, keepdim: bool) -> tuple[Any, Any]:
    """(variance with ``correction`` degrees of freedom, mean), two-pass, in torch's CPU accumulation
    dtype: float32 (and complex64) in float64, float16/bfloat16 in float32; the callers round once, so a
    float32 ``var`` is eager's bits. A complex variance is the mean squared modulus, real."""
    axes = norm_dims(dim, x.ndim)
    d = opmath(float_dtype(x.dtype))
    d = {np.dtype(np.float32): np.dtype(np.float64), np.dtype(np.complex64): np.dtype(np.complex128)}.get(d, d)
    x = cast(x, d)
    n = _count(x.shape, axes)
    mean = lax.div(lax.reduce_sum(x, axes), literal(n, d))
    centred = lax.sub(x, lax.broadcast_in_dim(mean, x.shape, [i for i in range(x.ndim) if i not in axes]))
    squares = lax.mul(centred, lax.conj_if_complex(centred))
    if P.is_complex(d):
        squares = lax.real(squares)
    correction = 1 if correction is None else correction
    var = lax.div(lax.reduce_sum(squares, axes), literal(max(n - correction, 0), squares.dtype))
    return keep_dims(var, x.shape, axes, keepdim), keep_dims(mean, x.shape, axes, keepdim)


@register(aten.var.correction)
def var(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    return cast(_moments(x, dim, correction, keepdim)[0], out_aval().dtype)


@register(aten.var.dim)
def var_dim(x: Any, dim: Any = None, unbiased: bool = True, keepdim: bool = False) -> Any:
    return cast(_moments(x, dim, 1 if unbiased else 0, keepdim)[0], out_aval().dtype)


@register(aten.var_mean.correction)
def var_mean(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> tuple[Any, Any]:
    v, m = _moments(x, dim, correction, keepdim)
    return cast(v, out_aval(0).dtype), cast(m, out_aval(1).dtype)


@register(aten.std.correction)
def std(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> Any:
    """``sqrt(var)`` with gradient 0 where the variance is 0 (torch's std_backward masks it)."""
    return cast(root_of_zero_safe(_moments(x, dim, correction, keepdim)[0], 2), out_aval().dtype)


@register(aten.std_mean.correction)
def std_mean(x: Any, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> tuple[Any, Any]:
    v, m = _moments(x, dim, correction, keepdim)
    return cast(root_of_zero_safe(v, 2), out_aval(0).dtype), cast(m, out_aval(1).dtype)


def _scan(prim: P.Primitive):
    def rule(x: Any, dim: int, *, dtype: Any = None) -> Any:
        y = cast(x, out_aval().dtype)
        if y.ndim == 0:
            return y
        return lax.bind(prim, y, axis=norm_dim(dim, y.ndim), reverse=False)
    return rule


register(aten.cumsum.default)(_scan(P.cumsum_p))
register(aten.cumprod.default)(_scan(P.cumprod_p))


def _max_keep(x: Any, axis: int) -> Any:
    """The max along ``axis`` broadcast back to ``x``'s shape, with infinities replaced by 0 (stable shift)."""
    m = lax.reduce_max(x, (axis,))
    m = lax.select(lax.is_finite(m), m, lax.full(m.shape, 0, m.dtype))
    return lax.broadcast_in_dim(m, x.shape, [i for i in range(x.ndim) if i != axis])


@register(aten._softmax.default)
def softmax(x: Any, dim: int, half_to_float: bool = False) -> Any:
    x = cast(x, float_dtype(out_aval().dtype))
    if x.ndim == 0:
        return lax.full((), 1, x.dtype)
    return nn.softmax(x, norm_dim(dim, x.ndim))


@register(aten._log_softmax.default)
def log_softmax(x: Any, dim: int, half_to_float: bool = False) -> Any:
    x = cast(x, float_dtype(out_aval().dtype))
    if x.ndim == 0:
        return lax.full((), 0, x.dtype)
    return nn.log_softmax(x, norm_dim(dim, x.ndim))


@register(aten.logsumexp.default)
def logsumexp(x: Any, dim: Any = (), keepdim: bool = False) -> Any:
    x = cast(x, float_dtype(out_aval().dtype))
    axes = norm_dims(dim, x.ndim)
    if not axes:
        return x
    m = lax.reduce_max(x, axes)
    m = lax.select(lax.is_finite(m), m, lax.full(m.shape, 0, m.dtype))
    keep = [i for i in range(x.ndim) if i not in axes]
    s = lax.reduce_sum(lax.exp(lax.sub(x, lax.broadcast_in_dim(m, x.shape, keep))), axes)
    return keep_dims(lax.add(lax.log(s), m), x.shape, axes, keepdim)


@register(aten.logcumsumexp.default)
def logcumsumexp(x: Any, dim: int) -> Any:
    """``log(cumsum(exp(x - m))) + m`` with ``m`` the (finite) maximum along ``dim``."""
    if P.is_complex(x.dtype):  # torch's scan carries imaginary parts past (-pi, pi]; one log would wrap them
        raise unsupported("complex inputs (torch's running log-add-exp keeps imaginary parts that a single "
                          "complex log would wrap into (-pi, pi])")
    x = cast(x, float_dtype(out_aval().dtype))
    if x.ndim == 0:
        return x
    axis = norm_dim(dim, x.ndim)
    shift = _max_keep(x, axis)
    return lax.add(lax.log(lax.cumsum(lax.exp(lax.sub(x, shift)), axis)), shift)


@register(aten.dist.default)
def dist(x: Any, y: Any, p: Any = 2) -> Any:
    """The p-norm of ``x - y``, with the vector norm's subgradients (0 where ``x == y``, as torch's)."""
    d = float_dtype(promote(x, y))
    shape = tuple(np.broadcast_shapes(x.shape, y.shape))
    diff = lax.sub(lax.broadcast_to_rank(cast(x, d), shape), lax.broadcast_to_rank(cast(y, d), shape))
    return linalg_vector_norm(diff, p)


def _search(boundaries: Any, values: Any, right: bool) -> Any:
    """How many boundaries are ``<`` (``<=`` if ``right``) each value: the insertion index into a sorted row."""
    n = boundaries.shape[-1]
    d = promote(boundaries, values)
    b, v = cast(boundaries, d), cast(values, d)
    lead = v.shape[:-1] if b.ndim > 1 else v.shape
    k = v.shape[-1] if b.ndim > 1 else 1
    vv = lax.reshape(v, lead + (k, 1)) if b.ndim > 1 else lax.reshape(v, lead + (1,))
    full = lead + ((k, n) if b.ndim > 1 else (n,))
    vb = lax.broadcast_in_dim(vv, full, tuple(range(len(full))))
    bb = lax.broadcast_in_dim(b, full, tuple(range(len(lead))) + (len(full) - 1,) if b.ndim > 1
                              else (len(full) - 1,))
    below = lax.le(bb, vb) if right else lax.lt(bb, vb)
    count = lax.reduce_sum(cast(below, np.int64), (len(full) - 1,))
    return cast(count, out_aval().dtype)


@register(aten.searchsorted.Tensor)
def searchsorted(sorted_sequence: Any, values: Any, *, out_int32: bool = False, right: bool = False,
                 side: str | None = None, sorter: Any = None) -> Any:
    if sorter is not None:
        raise unsupported("searchsorted with a sorter")
    return _search(sorted_sequence, values, right or side == "right")


@register(aten.repeat_interleave.Tensor)
def repeat_interleave_indices(repeats: Any, *, output_size: int | None = None) -> Any:
    """``[0] * repeats[0] + [1] * repeats[1] + ...``, the indices ``x.repeat_interleave(repeats, dim,
    output_size=n)`` gathers with: position ``j`` belongs to the first run whose running total exceeds
    it. Without ``output_size`` the length depends on the values, and torch's fake kernel refuses it."""
    if output_size is None:
        raise unsupported("repeat_interleave with tensor repeats and no output_size (pass output_size=)")
    totals = lax.cumsum(cast(repeats, np.int64), 0)
    return _search(totals, lax.iota(np.int64, (output_size,)), right=True)


@register(aten.bucketize.Tensor)
def bucketize(values: Any, boundaries: Any, *, out_int32: bool = False, right: bool = False) -> Any:
    flat = lax.reshape(values, (values.size,))
    return lax.reshape(_search(boundaries, flat, right), values.shape)


@register(aten.histc.default)
def histc(x: Any, bins: int = 100, min: Any = 0, max: Any = 0) -> Any:
    """Counts of ``x`` in ``bins`` equal bins over ``[min, max]`` (the data's range where ``min == max``,
    widened by 1 each way where that is one value), as torch's CPU kernel bins them: element ``e`` goes
    to bin ``trunc((e - min) * bins / (max - min))`` in ``x``'s dtype, the last bin takes ``max``,
    elements outside the range and NaN are not counted. Counts carry no gradient (torch has none). Where
    the data's range is not finite (a NaN or an infinity in ``x``), torch raises; the counts are NaN."""
    d = out_aval().dtype
    if not P.is_float(d):
        raise unsupported(f"histc of {x.dtype} (torch's CPU kernel takes floating tensors only)")
    if not (np.isfinite(min) and np.isfinite(max)) or min > max:
        raise unsupported(f"histc over [{min}, {max}]: torch needs a finite range with min <= max")
    flat = lax.stop_gradient(lax.reshape(cast(x, d), (x.size,)))
    data_range = min == max and x.size > 0
    if data_range:
        lo, hi = lax.reduce_min(flat, (0,)), lax.reduce_max(flat, (0,))
    else:
        lo, hi = literal(min, d), literal(max, d)
    finite = lax.logical_and(lax.is_finite(lo), lax.is_finite(hi))
    same = lax.eq(lo, hi)
    lo = lax.select(same, lax.sub(lo, literal(1, d)), lo)
    hi = lax.select(same, lax.add(hi, literal(1, d)), hi)
    inside = lax.logical_and(lax.ge(flat, lo), lax.le(flat, hi))
    scaled = lax.div(lax.mul(lax.sub(flat, lo), literal(bins, d)), lax.sub(hi, lo))
    pos = lax.min(lax.convert_element_type(scaled, np.int64), literal(bins - 1, np.int64))  # max: the last bin
    pos = lax.select(inside, pos, literal(-1, np.int64))  # counted nowhere
    hit = lax.eq(lax.broadcast_in_dim(pos, (x.size, bins), (0,)), lax.iota(np.int64, (x.size, bins), 1))
    counts = lax.reduce_sum(cast(hit, d), (0,))
    return lax.select(finite, counts, literal(np.nan, d)) if data_range else counts


@register(aten._safe_softmax.default)
def safe_softmax(x: Any, dim: int, dtype: Any = None) -> Any:
    """softmax whose rows of all ``-inf`` are 0, with a finite gradient there (torch's own backward)."""
    x = cast(x, float_dtype(out_aval().dtype))
    if x.ndim == 0:
        return lax.select(lax.eq(x, literal(-np.inf, x.dtype)), literal(0, x.dtype), literal(1, x.dtype))
    axis = norm_dim(dim, x.ndim)
    e = lax.exp(lax.sub(x, _max_keep(x, axis)))
    total = lax.reduce_sum(e, (axis,))
    total = lax.select(lax.eq(total, literal(0, x.dtype)), literal(1, x.dtype), total)
    return lax.div(e, lax.broadcast_in_dim(total, x.shape, [i for i in range(x.ndim) if i != axis]))


def chebyshev_norm(x: Any, axes: Any) -> Any:
    """max |x| over ``axes`` where every element attaining it gets the whole gradient (times its sign),
    as torch's cdist/pdist backward (the vector norm's inf-norm splits it among ties instead).

    The value is the max with no gradient plus, for each tied element, ``a - stop_gradient(a)``
    (exactly 0, slope 1); infinite ties carry none (``inf - inf`` would be NaN).
    """
    axes = norm_dims(axes, x.ndim)
    a = lax.abs(x)
    peak = lax.stop_gradient(lax.reduce_max(a, axes))
    tied = lax.logical_and(lax.eq(a, lax.broadcast_in_dim(peak, a.shape, [i for i in range(a.ndim) if i not in axes])),
                           lax.is_finite(a))
    slope = lax.select(tied, lax.sub(a, lax.stop_gradient(a)), literal(0, a.dtype))
    return lax.add(peak, lax.reduce_sum(slope, axes))


@register(aten.linalg_vector_norm.default)
def linalg_vector_norm(x: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *,  # noqa: A002
                       dtype: Any = None) -> Any:
    """p-norms as one composite (``reftrace.nn.vector_norm``: torch's kernel, and torch's gradient with its
    subgradients: 0 at the zero vector, and at zero entries for p < 1). A complex vector's norms are its
    moduli's."""
    d = float_dtype(out_aval().dtype)
    x = cast(lax.abs(x) if P.is_complex(x.dtype) else x, d)
    axes = norm_dims(dim, x.ndim)
    return keep_dims(nn.vector_norm(x, float(ord), axes), x.shape, axes, keepdim)


def _running_extremum(prim: P.Primitive):
    """cummax/cummin with torch's indices: the latest position holding the running extremum (NaN wins).

    The values are ``x`` gathered at those indices, so the gradient goes to that one
    position, as torch's backward does. Finding the index compares every pair along the
    axis (n^2 work per column).
    """
    def rule(x: Any, dim: int) -> tuple[Any, Any]:
        if x.ndim == 0:
            return x, lax.full((), 0, np.int64)
        axis = norm_dim(dim, x.ndim)
        n = x.shape[axis]
        if n == 0:
            return x, lax.full(x.shape, 0, np.int64)
        running = lax.bind(prim, x, axis=axis, reverse=False)
        grid = x.shape[:axis] + (n, n) + x.shape[axis + 1:]
        rest = tuple(range(axis + 2, len(grid)))
        lead = tuple(range(axis))
        xk = lax.broadcast_in_dim(x, grid, lead + (axis,) + rest)          # x[k] on the k axis
        ri = lax.broadcast_in_dim(running, grid, lead + (axis + 1,) + rest)  # running[i] on the i axis
        k = lax.iota(np.int64, grid, axis)
        same = lax.eq(xk, ri)
        if P.is_float(x.dtype):
            same = lax.logical_or(same, lax.logical_and(lax.ne(xk, xk), lax.ne(ri, ri)))
        hit = lax.logical_and(same, lax.le(k, lax.iota(np.int64, grid, axis + 1)))
        index = lax.reduce_max(lax.select(hit, k, literal(-1, np.int64)), (axis,))
        return lax.gather(x, index, axis), index
    return rule


register(aten.cummax.default)(_running_extremum(P.cummax_p))
register(aten.cummin.default)(_running_extremum(P.cummin_p))


# ----------------------------------------------------------------------------- sorting
# All on the ``sort`` primitive (stable; NaN above +inf). Selections (kthvalue, median...) gather
# ``x`` at the chosen index, so the gradient goes to that one position, as torch's backward does.

def _sorted(x: Any, dim: int, descending: bool) -> tuple[Any, Any]:
    if x.ndim == 0:
        return x, lax.full((), 0, np.int64)
    return lax.sort(x, norm_dim(dim, x.ndim), descending)


@register(aten.sort.default)
def sort(x: Any, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
    return _sorted(x, dim, descending)


@register(aten.sort.stable)
def sort_stable(x: Any, *, stable: bool | None = None, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
    return _sorted(x, dim, descending)  # always stable: ties keep their order (allowed when stable=False)


def _pick(x: Any, order: Any, axis: int, position: Any, keepdim: bool) -> tuple[Any, Any]:
    """The element of ``x`` at sorted ``position`` (rank-0 per slice, or an int) along ``axis``."""
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    if lax.is_traced(position):
        position = lax.reshape(position, shape)
    else:
        position = lax.full(shape, position, np.int64)
    index = lax.gather(order, position, axis)
    value = lax.gather(x, index, axis)
    if not keepdim:
        kept = x.shape[:axis] + x.shape[axis + 1:]
        index, value = lax.reshape(index, kept), lax.reshape(value, kept)
    return value, index


@register(aten.topk.default)
def topk(x: Any, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> tuple[Any, Any]:  # noqa: A002
    """The first k of a stable sort (torch's order for sorted=False is unspecified; this one is sorted)."""
    if x.ndim == 0:
        return x, lax.full((), 0, np.int64)
    axis = norm_dim(dim, x.ndim)
    _, order = lax.sort(x, axis, largest)
    limit = list(x.shape)
    limit[axis] = k
    index = lax.slice(order, (0,) * x.ndim, limit)
    return lax.gather(x, index, axis), index


@register(aten.kthvalue.default)
def kthvalue(x: Any, k: int, dim: int = -1, keepdim: bool = False) -> tuple[Any, Any]:
    if x.ndim == 0:
        return x, lax.full((), 0, np.int64)
    axis = norm_dim(dim, x.ndim)
    _, order = lax.sort(x, axis)
    return _pick(x, order, axis, k - 1, keepdim)


def _median(x: Any, axis: int, keepdim: bool, ignore_nan: bool) -> tuple[Any, Any]:
    """The lower median along ``axis``. NaN: ``median`` returns the first NaN, ``nanmedian`` skips NaNs."""
    n = x.shape[axis]
    _, order = lax.sort(x, axis)
    if not P.is_float(x.dtype):
        return _pick(x, order, axis, (n - 1) // 2, keepdim)
    nans = lax.reduce_sum(cast(lax.ne(x, x), np.int64), (axis,))
    valid = lax.sub(literal(n, np.int64), nans)
    if ignore_nan:  # (valid - 1) // 2, with an all-NaN slice at 0 (truncating division does both)
        position = lax.div(lax.sub(valid, literal(1, np.int64)), literal(2, np.int64))
    else:  # NaNs sort last: the first one sits at ``valid``
        position = lax.select(lax.gt(nans, literal(0, np.int64)), valid, literal((n - 1) // 2, np.int64))
    return _pick(x, order, axis, position, keepdim)


def _split_evenly(x: Any, value: Any) -> Any:
    """``value`` (an element of the 1-d ``x``) with its gradient split evenly among the elements equal to
    it, NaN equal to NaN: torch's backward of the reductions without ``dim`` (``median()``, ``max()``).

    The max of the equal elements (fill -inf) is ``value`` exactly and reduce_max's rule splits the
    cotangent among them; where ``value`` is -inf the fill would tie, so the min (fill +inf) is used.
    """
    if not P.is_float(x.dtype):
        return value
    d = x.dtype
    v = lax.stop_gradient(value)
    vb = lax.broadcast_in_dim(v, x.shape, ())
    equal = lax.logical_or(lax.eq(x, vb), lax.logical_and(lax.ne(x, x), lax.ne(vb, vb)))
    top = lax.reduce_max(lax.select(equal, x, literal(-np.inf, d)), (0,))
    bottom = lax.reduce_min(lax.select(equal, x, literal(np.inf, d)), (0,))
    return lax.select(lax.eq(v, literal(-np.inf, d)), bottom, top)


@register(aten.median.default)
def median_all(x: Any) -> Any:
    if x.size == 0:
        return lax.full((), np.nan, x.dtype)
    flat = lax.reshape(x, (x.size,))
    return _split_evenly(flat, _median(flat, 0, False, ignore_nan=False)[0])


@register(aten.nanmedian.default)
def nanmedian_all(x: Any) -> Any:
    if x.size == 0:
        return lax.full((), np.nan, x.dtype)
    flat = lax.reshape(x, (x.size,))
    return _split_evenly(flat, _median(flat, 0, False, ignore_nan=True)[0])


def _median_dim(ignore_nan: bool):
    def rule(x: Any, dim: int = -1, keepdim: bool = False) -> tuple[Any, Any]:
        if x.ndim == 0:
            return x, lax.full((), 0, np.int64)
        return _median(x, norm_dim(dim, x.ndim), keepdim, ignore_nan)
    return rule


register(aten.median.dim)(_median_dim(False))
register(aten.nanmedian.dim)(_median_dim(True))


@register(aten.mode.default)
def mode(x: Any, dim: int = -1, keepdim: bool = False) -> tuple[Any, Any]:
    """The most frequent value (the smallest among equally frequent ones) and its last position.

    Counts compare every pair along ``dim`` (n^2 work per slice).
    """
    if x.ndim == 0:
        return x, lax.full((), 0, np.int64)
    axis = norm_dim(dim, x.ndim)
    n = x.shape[axis]
    grid = x.shape[:axis] + (n, n) + x.shape[axis + 1:]
    lead, rest = tuple(range(axis)), tuple(range(axis + 2, len(grid)))
    xk = lax.broadcast_in_dim(x, grid, lead + (axis,) + rest)
    xi = lax.broadcast_in_dim(x, grid, lead + (axis + 1,) + rest)
    counts = lax.reduce_sum(cast(lax.eq(xk, xi), np.int32), (axis,))           # per i: how many equal x[i]
    best = lax.broadcast_in_dim(lax.reduce_max(counts, (axis,)), x.shape, lead + tuple(range(axis + 1, x.ndim)))
    candidates = lax.select(lax.eq(counts, best), x, literal(highest(x.dtype), x.dtype))
    value = lax.reduce_min(candidates, (axis,))
    at = lax.eq(x, lax.broadcast_in_dim(value, x.shape, lead + tuple(range(axis + 1, x.ndim))))
    index = lax.reduce_max(lax.select(at, lax.iota(np.int64, x.shape, axis), literal(-1, np.int64)), (axis,))
    return _pick_index(x, index, axis, keepdim)


def _pick_index(x: Any, index: Any, axis: int, keepdim: bool) -> tuple[Any, Any]:
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:]
    index = lax.reshape(index, shape)
    value = lax.gather(x, index, axis)
    if not keepdim:
        kept = x.shape[:axis] + x.shape[axis + 1:]
        return lax.reshape(value, kept), lax.reshape(index, kept)
    return value, index


@register(aten.segment_reduce.default)
def segment_reduce(data: Any, reduce: str, *, lengths: Any = None, indices: Any = None, offsets: Any = None,
                   axis: int = 0, unsafe: bool = False, initial: Any = None) -> Any:
    """Reduce consecutive segments along ``axis``; a mask compares every (segment, position) pair.

    ``initial`` joins every segment's reduction (an empty segment gives it; without it: 0 for sum,
    1 for prod, +-inf for min/max, NaN for mean).
    """
    if indices is not None or (lengths is None) == (offsets is None):
        raise unsupported("segment_reduce needs exactly one of lengths= or offsets=")
    d = out_aval().dtype
    x = cast(data, d)
    a = norm_dim(axis, x.ndim)
    if lengths is not None:
        lengths = cast(lengths, np.int64)
        ends = lax.cumsum(lengths, lengths.ndim - 1)
        starts = lax.sub(ends, lengths)
    else:
        offsets = cast(offsets, np.int64)
        k = offsets.shape[-1] - 1
        starts = lax.slice(offsets, (0,) * offsets.ndim, offsets.shape[:-1] + (k,))
        ends = lax.slice(offsets, (0,) * (offsets.ndim - 1) + (1,), offsets.shape)
    segments, n = starts.shape[-1], x.shape[a]
    grid = x.shape[:a] + (segments, n) + x.shape[a + 1:]
    lead, rest = tuple(range(a)), tuple(range(a + 2, len(grid)))
    position = lax.iota(np.int64, grid, a + 1)
    inside = lax.logical_and(lax.le(lax.broadcast_in_dim(starts, grid, lead + (a,)), position),
                             lax.lt(position, lax.broadcast_in_dim(ends, grid, lead + (a,))))
    values = lax.broadcast_in_dim(x, grid, lead + (a + 1,) + rest)
    over = (a + 1,)
    start = None if initial is None else literal(initial, d)
    if reduce in ("sum", "mean"):
        total = lax.reduce_sum(lax.select(inside, values, literal(0, d)), over)
        if start is not None:
            total = lax.add(total, start)
        if reduce == "sum":
            return total
        count = lax.reduce_sum(cast(inside, d), over)
        if start is None:
            return lax.div(total, count)  # an empty segment: 0/0 = NaN, as torch
        empty = lax.eq(count, literal(0, d))
        return lax.select(empty, start, lax.div(total, lax.select(empty, literal(1, d), count)))
    if reduce == "prod":
        result = lax.reduce_prod(lax.select(inside, values, literal(1, d)), over)
        return result if start is None else lax.mul(result, start)
    if reduce in ("max", "min"):
        prim = P.reduce_max_p if reduce == "max" else P.reduce_min_p
        fill = lowest(d) if reduce == "max" else highest(d)
        candidates = lax.select(inside, values, literal(fill, d))
        if start is not None:  # the initial value is one more candidate of every segment
            shape = list(grid)
            shape[a + 1] = 1
            candidates = lax.concatenate([candidates, lax.full(shape, initial, d)], a + 1)
        return lax.reduce(prim, candidates, over)
    raise unsupported(f"reduce={reduce!r}")
