"""Contractions: matrix products (mm, bmm, addmm, ...) and convolution (transposed ones included).

A transposed convolution is the gradient-style convolution: dilate the input by
the stride (``lhs_dilation``), flip the kernel and swap its in/out channels per
group, and pad by ``dilation * (k - 1) - padding`` (plus ``output_padding`` high).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace import lax, nn
from reftrace import matrices as M
from reftrace import primitives as P
from reftrace.torch_bridge.aten._common import aten, cast, is_tensor, literal, out_aval, register, unsupported
from reftrace.torch_bridge.aten.indexing import take
from reftrace.torch_bridge.aten.nn import per_dim
from reftrace.torch_bridge.aten.reductions import chebyshev_norm, linalg_vector_norm


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


@register(aten._grouped_mm.default, "transformers::grouped_mm_fallback")
def grouped_mm(a: Any, b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
    """Matrix products per group (mixture-of-experts layers). ``offs`` holds each group's end along the
    grouped dimension: 2d x 3d groups ``a``'s rows (row ``r`` times ``b[g]`` for the group ``g`` holding
    it), 2d x 2d groups the contraction (``out[g]`` sums over group ``g``'s columns of ``a``); 3d x 3d is
    a batched product. Computed densely, every group on every row, then selected: G times the
    arithmetic of the grouped kernel, for the same values; rows past the last group are 0 (the kernel
    leaves them unwritten). transformers' MoE layers call their own 2d x 3d op while compiling, where
    torch's fake ``_grouped_mm`` takes bfloat16 only."""
    d = out_aval().dtype
    a, b = cast(a, d), cast(b, d)
    grouped = offs is not None
    if bias is not None or (a.ndim, b.ndim, grouped) not in ((3, 3, False), (2, 3, True), (2, 2, True)):
        raise unsupported(f"_grouped_mm of a {a.ndim}-d and a {b.ndim}-d tensor {'with' if grouped else 'without'} "
                          f"offs{' and with a bias' if bias is not None else ''} (covered, without a bias: 2d x 3d "
                          "and 2d x 2d with offs, 3d x 3d without)")
    if not grouped:
        return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))
    groups = offs.shape[0]
    if a.ndim == 2 and b.ndim == 3:  # a (S, K), b (G, K, N) -> (S, N)
        rows = a.shape[0]
        every = lax.dot_general(a, b, (((1,), (1,)), ((), ())))  # (S, G, N)
        member = _group_membership(offs, rows)  # (S, G)
        mask = lax.broadcast_in_dim(member, every.shape, (0, 1))
        return lax.reduce_sum(lax.select(mask, every, literal(0, d)), (1,))
    # a (M, K), b (K, N) -> (G, M, N), group g contracting over its columns of a
    member = lax.transpose(_group_membership(offs, a.shape[1]), (1, 0))  # (G, K)
    masked = lax.select(lax.broadcast_in_dim(member, (groups,) + a.shape, (0, 2)),
                        lax.broadcast_in_dim(a, (groups,) + a.shape, (1, 2)), literal(0, d))
    return lax.dot_general(masked, b, (((2,), (0,)), ((), ())))


def _group_membership(offs: Any, n: int) -> Any:
    """(n, G) booleans: index ``i`` belongs to group ``g`` (``offs[g-1] <= i < offs[g]``, from 0)."""
    groups = offs.shape[0]
    ends = lax.broadcast_in_dim(cast(offs, np.int64), (n, groups), (1,))
    index = lax.iota(np.int64, (n, groups), 0)
    group_of = lax.reduce_sum(cast(lax.le(ends, index), np.int64), (1,))  # how many groups end at or before i
    return lax.eq(lax.broadcast_in_dim(group_of, (n, groups), (0,)), lax.iota(np.int64, (n, groups), 1))


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
    d = out_aval().dtype
    if beta == 1 and alpha == 1 and is_tensor(bias) and bias.shape == (b.shape[1],):  # a Linear layer
        return nn.linear(cast(a, d), cast(b, d), cast(bias, d))
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


@register(aten.convolution.default)
def convolution(x: Any, weight: Any, bias: Any, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int) -> Any:
    d = out_aval().dtype
    x, weight = cast(x, d), cast(weight, d)
    n = x.ndim - 2
    stride, padding = per_dim(stride, n), per_dim(padding, n)
    dilation, output_padding = per_dim(dilation, n), per_dim(output_padding, n)
    if not transposed and 1 <= n <= 3:  # torch's own convolutions: one composite, bias included
        return nn.convolution(x, weight, None if bias is None else cast(bias, d), stride=stride, padding=padding,
                              dilation=dilation, groups=groups)
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
    last = [len(full) - 1]
    if p == float("inf"):
        return chebyshev_norm(lax.sub(a, b), last)  # torch's cdist backward: every tied coordinate, whole
    return linalg_vector_norm(lax.sub(a, b), p, last)  # the norm's subgradients: 0 at coincident points


# ----------------------------------------------------------------------------- factorizations and solves
# Built on the cholesky / triangular_solve / lu / qr / eigh / svd primitives. torch raises for
# singular or indefinite inputs (``_linalg_check_errors``); a captured graph cannot branch on values,
# so there the results are inf/NaN instead (and the ``info`` outputs say so, as LAPACK's do).

def _float(x: Any) -> Any:
    """A float or complex matrix as it is; anything else in the output's float dtype (or float64)."""
    if P.is_inexact(x.dtype):
        return x
    return cast(x, out_aval().dtype if P.is_inexact(out_aval().dtype) else np.float64)


def _in_dtype_of(x: Any, like: Any) -> Any:
    """A real factor (eigenvalues, singular values) in ``like``'s (maybe complex) dtype."""
    return cast(x, like.dtype)


def _batch_broadcast(a: Any, b: Any, b_matrix_dims: int = 2) -> tuple[Any, Any]:
    """``a`` (..., n, n) and ``b`` (..., r, c) broadcast to one batch shape."""
    batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-b_matrix_dims]))
    return (lax.broadcast_to_rank(a, batch + a.shape[-2:]),
            lax.broadcast_to_rank(b, batch + b.shape[b.ndim - b_matrix_dims:]))


def _rows_by(x: Any, permutation: Any) -> Any:
    """``x[..., permutation, :]``."""
    index = lax.broadcast_in_dim(cast(permutation, np.int64), x.shape, tuple(range(x.ndim - 1)))
    return lax.gather(x, index, x.ndim - 2)


def _rows_to(x: Any, permutation: Any) -> Any:
    """``y`` with ``y[..., permutation, :] = x`` (the inverse of ``_rows_by``)."""
    index = lax.broadcast_in_dim(cast(permutation, np.int64), x.shape, tuple(range(x.ndim - 1)))
    return lax.scatter(lax.zeros(x.aval), index, x, x.ndim - 2)


def _unit_lower(packed: Any) -> Any:
    k = min(packed.shape[-2:])
    lower = M.leading(M.triangle(packed, -1, True), 1, k)
    return lax.add(lower, M.eye(lower.shape, packed.dtype))


def _upper(packed: Any) -> Any:
    return M.leading(M.triangle(packed, 0, False), 2, min(packed.shape[-2:]))


def _lu_info(packed: Any) -> Any:
    """LAPACK getrf's info: 1 + the first i with U[i, i] == 0, else 0."""
    k = min(packed.shape[-2:])
    d = M.diagonal(M.leading(M.leading(packed, 1, k), 2, k))
    position = lax.iota(np.int64, d.shape, d.ndim - 1)
    zero_at = lax.select(lax.eq(d, literal(0, d.dtype)), lax.add(position, literal(1, np.int64)),
                         literal(k + 1, np.int64))
    first = lax.reduce_min(zero_at, (d.ndim - 1,))
    return cast(lax.select(lax.gt(first, literal(k, np.int64)), literal(0, np.int64), first), np.int32)


def _lu_solve(packed: Any, permutation: Any, b: Any, left: bool = True, adjoint: bool = False) -> Any:
    """Solve with A = P L U given (packed, permutation): A x = b, A^H x = b, x A = b or x A^H = b."""
    lower, upper = _unit_lower(packed), _upper(packed)
    solve = lax.triangular_solve
    if left and not adjoint:
        y = solve(lower, _rows_by(b, permutation), left_side=True, lower=True, unit_diagonal=True)
        return solve(upper, y, left_side=True, lower=False)
    if adjoint:  # A^H = U^H L^H P^T: transposed solves with the conjugated factors
        lower, upper = lax.conj_if_complex(lower), lax.conj_if_complex(upper)
    if left:
        y = solve(upper, b, left_side=True, lower=False, transpose_a=True)
        return _rows_to(solve(lower, y, left_side=True, lower=True, transpose_a=True, unit_diagonal=True),
                        permutation)
    if not adjoint:
        y = solve(lower, solve(upper, b, left_side=False, lower=False), left_side=False, lower=True,
                  unit_diagonal=True)
        return M.mT(_rows_to(M.mT(y), permutation))
    y = M.mT(_rows_by(M.mT(b), permutation))
    y = solve(lower, y, left_side=False, lower=True, transpose_a=True, unit_diagonal=True)
    return solve(upper, y, left_side=False, lower=False, transpose_a=True)


def _permutation_of_pivots(pivots: Any, rows: int) -> Any:
    """LAPACK's 1-based row interchanges applied in order to 0..rows-1: row i of L U is row perm[i] of A."""
    pivots = cast(pivots, np.int64)
    batch = pivots.shape[:-1]
    perm = lax.iota(np.int64, batch + (rows,), len(batch))
    position = lax.iota(np.int64, batch + (rows,), len(batch))
    for i in range(pivots.shape[-1]):
        target = lax.sub(M.leading(M.trailing(lax.reshape(pivots, batch + (1, pivots.shape[-1])), 1, i), 1, 1),
                         literal(1, np.int64))
        target = lax.reshape(target, batch + (1,))
        here = M.leading(M.trailing(lax.reshape(perm, batch + (1, rows)), 1, i), 1, 1)
        here = lax.reshape(here, batch + (1,))
        there = lax.gather(perm, target, len(batch))
        full_target = lax.broadcast_in_dim(lax.reshape(target, batch), batch + (rows,), tuple(range(len(batch))))
        perm = lax.select(lax.eq(position, literal(i, np.int64)),
                          lax.broadcast_in_dim(lax.reshape(there, batch), batch + (rows,), tuple(range(len(batch)))),
                          lax.select(lax.eq(position, full_target),
                                     lax.broadcast_in_dim(lax.reshape(here, batch), batch + (rows,),
                                                          tuple(range(len(batch)))), perm))
    return perm


def _permutation_matrix(permutation: Any, dtype: Any) -> Any:
    """P with A = P L U: P[perm[i], i] = 1."""
    n = permutation.shape[-1]
    shape = permutation.shape + (n,)
    rows = lax.iota(np.int64, shape, len(shape) - 2)
    targets = lax.broadcast_in_dim(cast(permutation, np.int64), shape, tuple(range(len(shape) - 2)) + (len(shape) - 1,))
    return cast(lax.eq(rows, targets), dtype)


def _pivots_out(pivots: Any) -> Any:
    return cast(lax.add(cast(pivots, np.int64), literal(1, np.int64)), np.int32)


@register(aten.linalg_cholesky_ex.default)
def linalg_cholesky_ex(a: Any, *, upper: bool = False, check_errors: bool = False) -> tuple[Any, Any]:
    factor = lax.cholesky(_float(a))
    diagonal = M.diagonal(factor)
    ok = lax.reduce(P.reduce_and_p, lax.is_finite(lax.real(diagonal) if P.is_complex(diagonal.dtype) else diagonal),
                    (factor.ndim - 2,))
    info = cast(lax.select(ok, literal(0, np.int32), literal(1, np.int32)), np.int32)
    return (M.mH(factor) if upper else factor), info


@register(aten.linalg_lu_factor_ex.default)
def linalg_lu_factor_ex(a: Any, *, pivot: bool = True, check_errors: bool = False) -> tuple[Any, Any, Any]:
    if not pivot:
        raise unsupported("LU without pivoting")
    packed, pivots, _ = lax.lu(_float(a))
    return packed, _pivots_out(pivots), _lu_info(packed)


@register(aten.linalg_lu.default)
def linalg_lu(a: Any, *, pivot: bool = True) -> tuple[Any, Any, Any]:
    if not pivot:
        raise unsupported("LU without pivoting")
    packed, _, permutation = lax.lu(_float(a))
    return _permutation_matrix(permutation, packed.dtype), _unit_lower(packed), _upper(packed)


@register(aten.lu_unpack.default)
def lu_unpack(packed: Any, pivots: Any, unpack_data: bool = True, unpack_pivots: bool = True) -> tuple[Any, Any, Any]:
    rows = packed.shape[-2]
    p = (_permutation_matrix(_permutation_of_pivots(pivots, rows), packed.dtype) if unpack_pivots
         else lax.full(out_aval(0).shape, 0, packed.dtype))
    if not unpack_data:
        return p, lax.full(out_aval(1).shape, 0, packed.dtype), lax.full(out_aval(2).shape, 0, packed.dtype)
    return p, _unit_lower(packed), _upper(packed)


@register(aten.linalg_lu_solve.default)
def linalg_lu_solve(packed: Any, pivots: Any, b: Any, *, left: bool = True, adjoint: bool = False) -> Any:
    packed, b = _batch_broadcast(cast(packed, out_aval().dtype), cast(b, out_aval().dtype))
    pivots = lax.broadcast_to_rank(pivots, packed.shape[:-2] + pivots.shape[-1:])
    permutation = _permutation_of_pivots(pivots, packed.shape[-2])
    return _lu_solve(packed, permutation, b, left, adjoint)


@register(aten.linalg_inv_ex.default)
def linalg_inv_ex(a: Any, *, check_errors: bool = False) -> tuple[Any, Any]:
    a = _float(a)
    packed, _, permutation = lax.lu(a)
    return _lu_solve(packed, permutation, M.eye(a.shape, a.dtype)), _lu_info(packed)


@register(aten._linalg_solve_ex.default)
def linalg_solve_ex(a: Any, b: Any, *, left: bool = True, check_errors: bool = False) -> tuple[Any, Any, Any, Any]:
    d = out_aval(0).dtype
    a, b = cast(a, d), cast(b, d)
    vector = out_aval(0).shape == b.shape and (b.ndim == 1 or (b.ndim == a.ndim - 1 and b.shape == a.shape[:-1]))
    if vector:
        b = lax.reshape(b, b.shape + (1,)) if left else lax.reshape(b, b.shape[:-1] + (1, b.shape[-1]))
    a, b = _batch_broadcast(a, b)
    packed, pivots, permutation = lax.lu(a)
    x = _lu_solve(packed, permutation, b, left)
    x = lax.reshape(x, out_aval(0).shape)
    lu_shape = out_aval(1).shape
    return x, lax.broadcast_to_rank(packed, lu_shape), lax.broadcast_to_rank(_pivots_out(pivots), out_aval(2).shape), \
        lax.broadcast_to_rank(_lu_info(packed), out_aval(3).shape)


def _parity(pivots: Any) -> Any:
    """1 where the row interchanges (0-based pivots) are an odd permutation, else 0; None without pivots."""
    if pivots.shape[-1] == 0:
        return None
    swaps = lax.ne(cast(pivots, np.int64), lax.iota(np.int64, pivots.shape, pivots.ndim - 1))
    return lax.rem(lax.reduce_sum(cast(swaps, np.int64), (pivots.ndim - 1,)), literal(2, np.int64))


@register(aten._linalg_det.default)
def linalg_det(a: Any) -> tuple[Any, Any, Any]:
    a = _float(a)
    packed, pivots, _ = lax.lu(a)
    d = M.diagonal(packed)
    det = lax.reduce_prod(d, (d.ndim - 1,)) if d.shape[-1] else lax.full(d.shape[:-1], 1, d.dtype)
    odd = _parity(pivots)
    if odd is not None:
        det = lax.select(lax.eq(odd, literal(1, np.int64)), lax.neg(det), det)
    return det, packed, _pivots_out(pivots)


@register(aten._linalg_slogdet.default)
def linalg_slogdet(a: Any) -> tuple[Any, Any, Any, Any]:
    a = _float(a)
    packed, pivots, _ = lax.lu(a)
    d = M.diagonal(packed)
    last = (d.ndim - 1,)
    if P.is_complex(d.dtype):
        return _complex_slogdet(d, pivots) + (packed, _pivots_out(pivots))
    negatives = lax.reduce_sum(cast(lax.lt(d, literal(0, d.dtype)), np.int64), last)
    odd = _parity(pivots)
    if odd is not None:
        negatives = lax.add(negatives, odd)
    sign = lax.select(lax.eq(lax.rem(negatives, literal(2, np.int64)), literal(1, np.int64)),
                      literal(-1, d.dtype), literal(1, d.dtype))
    zero = lax.reduce(P.reduce_or_p, lax.eq(d, literal(0, d.dtype)), last) if d.shape[-1] else None
    if zero is not None:
        sign = lax.select(zero, literal(0, d.dtype), sign)
    logabsdet = lax.reduce_sum(lax.log(lax.abs(d)), last)
    return sign, logabsdet, packed, _pivots_out(pivots)


def _complex_slogdet(d: Any, pivots: Any) -> tuple[Any, Any]:
    """(sign, log|det|) of a complex LU: sign = (-1)^swaps prod(d / |d|), 0 for a singular matrix."""
    last = (d.ndim - 1,)
    magnitude = lax.abs(d)
    zero = lax.eq(magnitude, literal(0, magnitude.dtype))
    unit = lax.select(zero, literal(1, d.dtype), lax.div(d, cast(magnitude, d.dtype)))
    sign = lax.reduce_prod(unit, last) if d.shape[-1] else lax.full(d.shape[:-1], 1, d.dtype)
    odd = _parity(pivots)
    if odd is not None:
        sign = lax.select(lax.eq(odd, literal(1, np.int64)), lax.neg(sign), sign)
    if d.shape[-1]:
        sign = lax.select(lax.reduce(P.reduce_or_p, zero, last), literal(0, d.dtype), sign)
    return sign, lax.reduce_sum(lax.log(magnitude), last)


@register(aten.linalg_solve_triangular.default)
def linalg_solve_triangular(a: Any, b: Any, *, upper: bool, left: bool = True, unitriangular: bool = False) -> Any:
    d = out_aval().dtype
    a, b = _batch_broadcast(cast(a, d), cast(b, d))
    return lax.triangular_solve(a, b, left_side=left, lower=not upper, unit_diagonal=unitriangular)


@register(aten.triangular_solve.default)
def triangular_solve(b: Any, a: Any, upper: bool = True, transpose: bool = False, unitriangular: bool = False
                     ) -> tuple[Any, Any]:
    d = out_aval(0).dtype
    a_b, b_b = _batch_broadcast(cast(a, d), cast(b, d))
    x = lax.triangular_solve(a_b, b_b, left_side=True, lower=not upper, transpose_a=transpose,
                             unit_diagonal=unitriangular)
    return x, lax.broadcast_to_rank(a_b, out_aval(1).shape)


@register(aten.cholesky_solve.default)
def cholesky_solve(b: Any, factor: Any, upper: bool = False) -> Any:
    d = out_aval().dtype
    factor, b = _batch_broadcast(cast(factor, d), cast(b, d))
    lower = M.mH(factor) if upper else factor
    y = lax.triangular_solve(lower, b, left_side=True, lower=True)
    return lax.triangular_solve(lax.conj_if_complex(lower), y, left_side=True, lower=True, transpose_a=True)


@register(aten.cholesky_inverse.default)
def cholesky_inverse(factor: Any, upper: bool = False) -> Any:
    factor = _float(factor)
    lower = M.mH(factor) if upper else factor
    y = lax.triangular_solve(lower, M.eye(lower.shape, lower.dtype), left_side=True, lower=True)
    return lax.triangular_solve(lax.conj_if_complex(lower), y, left_side=True, lower=True, transpose_a=True)


@register(aten.linalg_qr.default)
def linalg_qr(a: Any, mode: str = "reduced") -> tuple[Any, Any]:
    q, r = lax.qr(_float(a), full_matrices=mode == "complete")
    if mode == "r":
        return lax.full(out_aval(0).shape, 0, q.dtype), r
    return q, r


@register(aten._linalg_eigh.default)
def linalg_eigh(a: Any, UPLO: str = "L", compute_v: bool = True) -> tuple[Any, Any]:  # noqa: N803
    w, v = lax.eigh(_float(a), lower=UPLO.upper() == "L")
    if not compute_v:
        return w, lax.full(out_aval(1).shape, 0, v.dtype)
    return w, v


@register(aten._linalg_svd.default)
def linalg_svd(a: Any, full_matrices: bool = False, compute_uv: bool = True, *, driver: str | None = None
               ) -> tuple[Any, Any, Any]:
    u, s, vh = lax.svd(_float(a), full_matrices=full_matrices and compute_uv)
    if not compute_uv:
        return lax.full(out_aval(0).shape, 0, u.dtype), s, lax.full(out_aval(2).shape, 0, vh.dtype)
    return u, s, vh


@register(aten.linalg_eig.default)
def linalg_eig(a: Any) -> tuple[Any, Any]:
    """(eigenvalues, eigenvectors), complex for a real ``a`` too; torch.linalg.eigvals reaches this op as well."""
    return lax.eig(_float(a))


def _tolerance(value: Any, batch: tuple[int, ...], dtype: Any) -> Any:
    return lax.broadcast_to_rank(cast(value, dtype), batch)


@register(aten.linalg_pinv.atol_rtol_tensor, aten.linalg_pinv.atol_rtol_float)
def linalg_pinv(a: Any, *, atol: Any = None, rtol: Any = None, hermitian: bool = False) -> Any:
    """torch's tolerances: keep s > max(atol, rtol * s_max); rtol defaults to eps * max(m, n), or to 0
    where a positive atol is given."""
    a = _float(a)
    d, batch = P.real_dtype(a.dtype), a.shape[:-2]  # tolerances compare with (real) singular values
    default_rtol = np.finfo(d).eps * max(a.shape[-2:])
    atol_ = _tolerance(0 if atol is None else atol, batch, d)
    if rtol is not None:
        rtol_ = _tolerance(rtol, batch, d)
    elif atol is None:
        rtol_ = _tolerance(default_rtol, batch, d)
    else:
        rtol_ = lax.select(lax.gt(atol_, literal(0, d)), literal(0, d), literal(default_rtol, d))
        rtol_ = lax.broadcast_to_rank(rtol_, batch)
    return lax.pinv(a, atol_, rtol_, hermitian)


@register(aten.linalg_householder_product.default)
def householder_product(a: Any, tau: Any) -> Any:
    """Q = H_1 ... H_k, H_i = I - tau_i v_i v_i^H with v_i = (0.., 1, a[i+1:, i]) (LAPACK orgqr/ungqr)."""
    a, tau = _float(a), cast(tau, out_aval().dtype)
    rows, cols = a.shape[-2:]
    q = M.eye(a.shape[:-2] + (rows, cols), a.dtype)
    for i in reversed(range(tau.shape[-1])):
        q = _reflect(a, tau, i, q, left=True)
    return q


def _reflector(a: Any, i: int) -> Any:
    """v_i as a column (..., rows, 1)."""
    rows = a.shape[-2]
    column = M.leading(M.trailing(a, 1, i), 1, 1)
    position = lax.iota(np.int64, column.shape, column.ndim - 2)
    v = lax.select(lax.lt(position, literal(i, np.int64)), literal(0, a.dtype), column)
    return lax.select(lax.eq(position, literal(i, np.int64)), literal(1, a.dtype), v) if rows else v


def _reflect(a: Any, tau: Any, i: int, c: Any, left: bool, adjoint: bool = False) -> Any:
    """H_i c (left) or c H_i, with H_i = I - tau_i v v^H; with ``adjoint``, H_i^H (conj(tau_i) for tau_i)."""
    v = _reflector(a, i)
    t = lax.reshape(M.leading(M.trailing(lax.reshape(tau, tau.shape[:-1] + (1, tau.shape[-1])), 1, i), 1, 1),
                    tau.shape[:-1] + (1, 1))
    if adjoint:
        t = lax.conj_if_complex(t)
    if left:
        w = M.matmul(M.mH(v), c)                  # (.., 1, n)
        return lax.sub(c, lax.mul(lax.broadcast_to_rank(t, c.shape), M.matmul(v, w)))
    w = M.matmul(c, v)                            # (.., m, 1)
    return lax.sub(c, lax.mul(lax.broadcast_to_rank(t, c.shape), M.matmul(w, M.mH(v))))


@register(aten.ormqr.default)
def ormqr(a: Any, tau: Any, c: Any, left: bool = True, transpose: bool = False) -> Any:
    """op(Q) C or C op(Q) for Q = H_1 ... H_k stored as reflectors, op(Q) = Q^H with ``transpose``
    (LAPACK ormqr/unmqr)."""
    d = out_aval().dtype
    a, tau, c = cast(a, d), cast(tau, d), cast(c, d)
    k = tau.shape[-1]
    # Q C = H_1 (H_2 (... H_k C)); Q^H C = H_k^H (... H_1^H C); C Q = ((C H_1) H_2)...; C Q^H = ((C H_k^H) ...) H_1^H
    forward = (left and transpose) or (not left and not transpose)
    order = range(k) if forward else reversed(range(k))
    for i in order:
        c = _reflect(a, tau, i, c, left, adjoint=transpose)
    return c


# ----------------------------------------------------------------------------- matrix functions

@register(aten.linalg_matrix_sqrth.default)
def linalg_matrix_sqrth(a: Any) -> Any:
    """V sqrt(max(w, 0)) V^H from the Hermitian eigendecomposition of a's lower triangle."""
    w, v = lax.eigh(_float(a))
    root = lax.sqrt(lax.max(w, literal(0, w.dtype)))
    return M.matmul(M.scale_columns(v, _in_dtype_of(root, v)), M.mH(v))


@register(aten.linalg_polar.default)
def linalg_polar(a: Any) -> tuple[Any, Any]:
    """a = U H with U = W Vh (unitary) and H = Vh^H S Vh (positive semi-definite), from a = W S Vh."""
    w, s, vh = lax.svd(_float(a))
    return M.matmul(w, vh), M.matmul(M.mH(vh), M.scale_rows(_in_dtype_of(s, vh), vh))


_EXPM_TERMS = 16      # Taylor terms once the 1-norm is <= 1/2: the remainder is below 2e-19
_EXPM_SQUARINGS = 40  # 1-norms up to 2^39; beyond that the result is NaN rather than inaccurate


@register(aten.linalg_matrix_exp.default)
def linalg_matrix_exp(a: Any) -> Any:
    """Scaling and squaring: exp(A) = exp(A / 2^s)^(2^s), s chosen from the 1-norm at run time.

    s depends on the values, so all squarings are emitted and step k applies only where k < s
    (a select); the Taylor polynomial is evaluated by Horner's rule. A 1-norm above 2^39 (more
    squarings than emitted) gives NaN.
    """
    a = _float(a)
    d, r = a.dtype, P.real_dtype(a.dtype)  # a complex matrix has a real norm and real scale factors
    n = a.shape[-1]
    if n == 0:
        return a
    eye = M.eye(a.shape, d)
    norm = lax.reduce_max(lax.reduce_sum(lax.abs(a), (a.ndim - 2,)), (a.ndim - 2,))    # 1-norm per matrix
    steps = lax.ceil(lax.div(lax.log(lax.mul(norm, literal(2.0, r))), literal(np.log(2.0), r)))
    steps = lax.max(lax.select(lax.is_finite(steps), steps, literal(0, r)), literal(0, r))
    too_large = lax.gt(steps, literal(_EXPM_SQUARINGS, r))
    steps = lax.min(steps, literal(_EXPM_SQUARINGS, r))
    scale = lax.convert_element_type(lax.pow(literal(2.0, r), lax.neg(steps)), d)
    batch = tuple(range(a.ndim - 2))
    x = lax.mul(a, lax.broadcast_in_dim(scale, a.shape, batch))
    t = eye
    for k in range(_EXPM_TERMS, 0, -1):
        t = lax.add(eye, lax.div(M.matmul(x, t), literal(k, d)))
    for k in range(_EXPM_SQUARINGS):
        apply = lax.broadcast_in_dim(lax.lt(literal(k, r), steps), a.shape, batch)
        t = lax.select(apply, M.matmul(t, t), t)
    return lax.select(lax.broadcast_in_dim(too_large, a.shape, batch), literal(np.nan, d), t)


@register(aten._trilinear.default)
def trilinear(i1: Any, i2: Any, i3: Any, expand1: Sequence[int], expand2: Sequence[int], expand3: Sequence[int],
              sumdim: Sequence[int], unroll_dim: int = 1) -> Any:
    """sum over ``sumdim`` of i1 * i2 * i3, each first unsqueezed at its ``expand`` dims (nn.Bilinear)."""
    d = out_aval().dtype
    parts = []
    for t, dims in ((i1, expand1), (i2, expand2), (i3, expand3)):
        t = cast(t, d)
        shape = list(t.shape)
        for dim in sorted(dims):
            shape.insert(dim, 1)
        parts.append(lax.reshape(t, shape))
    full = tuple(np.broadcast_shapes(*[p.shape for p in parts]))
    product = lax.mul(lax.mul(lax.broadcast_to_rank(parts[0], full), lax.broadcast_to_rank(parts[1], full)),
                      lax.broadcast_to_rank(parts[2], full))
    return lax.reshape(lax.reduce_sum(product, sorted(set(int(s) % len(full) for s in sumdim))), out_aval().shape)


@register(aten._pdist_forward.default)
def pdist(x: Any, p: float = 2.0) -> Any:
    """p-norm distances between rows i < j (row-major), with the vector norm's subgradients at 0."""
    n = x.shape[0]
    first, second = np.triu_indices(n, 1)
    if first.size == 0:
        return lax.full(out_aval().shape, 0, out_aval().dtype)
    x = cast(x, out_aval().dtype)
    diff = lax.sub(take(x, 0, literal(first, np.int64)), take(x, 0, literal(second, np.int64)))
    if p == np.inf:
        return chebyshev_norm(diff, [1])  # torch's pdist backward: every tied coordinate, whole
    return linalg_vector_norm(diff, p, [1])
