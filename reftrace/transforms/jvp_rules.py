"""JVP rules: ``jvp_rules[primitive]``, reftrace's own table of forward-mode derivatives.

Every rule has one signature::

    rule(tangents, primals, outs, **params) -> tuple[TracedArray | None, ...]

- ``tangents``: one tangent per operand of the equation; ``None`` is a symbolic zero
  (a constant, an integer value, or a value no differentiated input reaches). A rule
  is only called when at least one is not ``None``.
- ``primals``: the equation's operands, ``outs``: its outputs, both as ``TracedArray``
  values of the graph being built (a Literal operand is a ``TracedArray`` holding
  that Literal), so rules may reuse ``exp x`` and friends.
- ``params``: the equation's parameters, as keywords.
- returns one tangent per output, each with that output's aval, ``None`` for "zero"
  (always ``None`` for an integer or bool output). A tangent ``jvp`` never uses is
  harmless: dead equations are dropped.

Rules are written with ``reftrace.lax`` only, so everything they emit is made of
primitives that have rules here and in ``vjp_rules``: ``jvp(vjp(g))`` (forward over
reverse) and ``vjp(jvp(g))`` need nothing extra.

Every rule is the transpose of its VJP rule, choices at non-differentiable points
included (max/min ties, ``abs'(0)``, reduction ties and NaNs, ``pow`` at 0, scatter
duplicates, the symmetric-input conventions of cholesky/eigh): ``<u, J v> = <J^T u, v>``
holds between ``jvp`` and ``vjp`` everywhere, not only where the function is smooth.
Where the convention lives in a helper of ``vjp_rules`` (the tie weights, the
zero-safe product of the others, the n x n grids of the scans) the helper is shared.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.composite import is_composite
from reftrace.errors import UnsupportedOperatorError
from reftrace.graph import Aval
from reftrace.lax import TracedArray
from reftrace.matrices import (diag_embed, diagonal, eye_mask, leading, matmul, mH, mT, scale_columns, scale_rows,
                               trailing, triangle)
from reftrace.nn import activations as _activations
from reftrace.nn import dense as _dense
from reftrace.nn._util import along
from reftrace.primitives import Primitive
# the VJP table's building blocks where a convention lives: sharing them keeps the two tables' choices identical
from reftrace.transforms.vjp_rules import (_choice_weight, _eig_solve, _exclusive_cumprod, _expand_reduced,
                                           _inverse_permutation, _kept_dims, _pair_masks, _pairwise, _spectral_gaps,
                                           vjp_rules)

Tangent = TracedArray | None
JvpRule = Callable[..., tuple[Tangent, ...]]

jvp_rules: dict[Primitive, JvpRule] = {}


# ----------------------------------------------------------------------------- small helpers

def _const(value: float, like: TracedArray) -> TracedArray:
    """A rank-0 constant of ``like``'s dtype (rank-0 operands broadcast in elementwise ops)."""
    return lax.constant(value, like.dtype)


def _zeros_if_none(t: Tangent, like: TracedArray) -> TracedArray:
    return lax.zeros(like.aval) if t is None else t


def _add(a: Tangent, b: Tangent) -> Tangent:
    """Tangents add; ``None`` is zero."""
    if a is None:
        return b
    return a if b is None else lax.add(a, b)


def _fit(t: Tangent, out: TracedArray) -> Tangent:
    """A tangent of an elementwise op's output: a rank-0 operand's tangent broadcast to the result."""
    if t is None or t.shape == out.shape:
        return t
    return lax.broadcast_in_dim(t, out.shape, ())


def _zero(tangents: Sequence[Tangent], primals: Sequence[TracedArray], outs: Sequence[TracedArray],
          **params: Any) -> tuple[Tangent, ...]:
    """Zero tangent for every output: piecewise-constant or integer/bool-valued primitives."""
    return (None,) * len(outs)


def _register(prims: Sequence[Primitive] | Primitive):
    prims = (prims,) if isinstance(prims, Primitive) else tuple(prims)

    def deco(rule: JvpRule) -> JvpRule:
        for p in prims:
            jvp_rules[p] = rule
        return rule
    return deco


# ----------------------------------------------------------------------------- elementwise unary

def _diagonal_jacobian(prim: Primitive) -> None:
    """An elementwise unary primitive's Jacobian is diagonal, hence its own transpose: its JVP is its
    VJP rule applied to the tangent. Reusing the rule (rather than restating thirty derivatives)
    keeps every choice at a kink (``abs'(0) = 0``, ``sqrt'(0) = inf``, ...) the VJP's."""
    reverse = vjp_rules[prim]

    def rule(tangents, primals, outs, **params):
        if P.is_complex(primals[0].dtype):  # the VJP multiplies by conj(f'(x)): conjugate around it
            (t,) = tangents
            return tuple(lax.conj(r) for r in reverse((lax.conj(t),), primals, outs, **params))
        return reverse(tangents, primals, outs, **params)
    rule.__name__ = f"{prim.name}_jvp"
    jvp_rules[prim] = rule


for _prim in (*(P.registry[name] for name in P.FLOAT_UNARY), P.neg_p, P.integer_pow_p):
    _diagonal_jacobian(_prim)


@_register(P.abs_p)
def _abs_jvp(tangents, primals, outs):
    """``t * sign(x)``; complex: the tangent's component along ``x / |x|``, ``Re(conj(sign(x)) t)``."""
    (t,), (x,) = tangents, primals
    if P.is_complex(x.dtype):
        return (lax.real(lax.mul(lax.conj(lax.sign(x)), t)),)
    return (lax.mul(t, lax.sign(x)),)


@_register(P.sign_p)
def _sign_jvp(tangents, primals, outs, **params):
    """Zero on reals; complex: the VJP's map, a projection over |x|, is self-adjoint."""
    return vjp_rules[P.sign_p](tangents, primals, outs, **params)

# Operate on bool/int only, or have bool/int results, or draw random numbers: no tangent.
_register((P.not_p, P.and_p, P.or_p, P.xor_p))(_zero)
_register(P.COMPARISONS + (P.is_finite_p, P.argmax_p, P.argmin_p, P.iota_p, P.random_p, P.random_fold_in_p,
                           P.reduce_and_p, P.reduce_or_p, P.stop_gradient_p))(_zero)


# ----------------------------------------------------------------------------- elementwise binary

def _binary(prim: Primitive, tangent: Callable[..., Tangent]) -> None:
    """``tangent(tx, ty, x, y, out)`` (``tx``/``ty`` may be ``None``); a rank-0 operand's tangent is
    broadcast to the result."""
    def rule(tangents, primals, outs, **params):
        (tx, ty), (x, y), (out,) = tangents, primals, outs
        return (_fit(tangent(tx, ty, x, y, out), out),)
    rule.__name__ = f"{prim.name}_jvp"
    jvp_rules[prim] = rule


def _scaled(t: Tangent, factor: Callable[[], TracedArray]) -> Tangent:
    """``t * factor()``, building the factor only when the tangent is not a symbolic zero."""
    return None if t is None else lax.mul(t, factor())


def _sub_jvp(tx, ty, x, y, out):
    if ty is None:
        return tx
    return lax.neg(ty) if tx is None else lax.sub(tx, ty)


def _div_jvp(tx, ty, x, y, out):
    # tx / y - (ty / y) * out: the transpose of the VJP's (ct / y, -(ct / y) * out)
    from_x = None if tx is None else lax.div(tx, y)
    from_y = None if ty is None else lax.neg(lax.mul(lax.div(ty, y), out))
    return _add(from_x, from_y)


def _rem_jvp(tx, ty, x, y, out):
    def truncated_quotient():
        quotient = lax.div(x, y)
        return lax.neg(lax.mul(lax.sign(quotient), lax.floor(lax.abs(quotient))))
    return _add(tx, _scaled(ty, truncated_quotient))


def _pow_jvp(tx, ty, x, y, out):
    """The VJP's conventions: slope 0 in x where y == 0 (0^0 included); in y, ``out * log x`` with
    log(1) standing in at x == 0 for y >= 0 (see docs/autodiff.md)."""
    def slope_x():
        zero, one = _const(0, x), _const(1, x)
        return lax.select(lax.eq(y, zero), zero, lax.mul(y, lax.pow(x, lax.sub(y, one))))

    def slope_y():
        zero, one = _const(0, x), _const(1, x)
        x_zero = lax.eq(x, zero)
        flat_at_zero = x_zero if P.is_complex(x.dtype) else lax.logical_and(x_zero, lax.ge(y, zero))
        return lax.mul(out, lax.log(lax.select(flat_at_zero, one, x)))
    return _add(_scaled(tx, slope_x), _scaled(ty, slope_y))


def _atan2_jvp(tx, ty, x, y, out):
    numerator = _add(_scaled(tx, lambda: y), None if ty is None else lax.neg(lax.mul(ty, x)))
    return lax.div(numerator, lax.add(lax.mul(x, x), lax.mul(y, y)))


def _choose_jvp(beats: Callable) -> Callable[..., Tangent]:
    """max (``beats`` = gt) and min (lt): each tangent weighted as the VJP weights its cotangent
    (0 where the other operand is chosen, 0.5 on a tie, 1 to both at a NaN)."""
    def tangent(tx, ty, x, y, out):
        return _add(_scaled(tx, lambda: _choice_weight(x, y, beats)),
                    _scaled(ty, lambda: _choice_weight(y, x, beats)))
    return tangent


_binary(P.add_p, lambda tx, ty, x, y, out: _add(tx, ty))
_binary(P.sub_p, _sub_jvp)
_binary(P.mul_p, lambda tx, ty, x, y, out: _add(_scaled(tx, lambda: y), _scaled(ty, lambda: x)))
_binary(P.div_p, _div_jvp)
_binary(P.rem_p, _rem_jvp)
_binary(P.pow_p, _pow_jvp)
_binary(P.atan2_p, _atan2_jvp)
_binary(P.max_p, _choose_jvp(lax.gt))
_binary(P.min_p, _choose_jvp(lax.lt))


@_register(P.select_p)
def _select_jvp(tangents, primals, outs):
    (_, t_true, t_false), (pred, _, _), (out,) = tangents, primals, outs
    zero = _const(0, out)
    chosen = lax.select(pred, zero if t_true is None else t_true, zero if t_false is None else t_false)
    return (_fit(chosen, out),)


@_register(P.convert_element_type_p)
def _convert_jvp(tangents, primals, outs, *, new_dtype):
    (t,), (x,) = tangents, primals
    if not (P.is_inexact(x.dtype) and P.is_inexact(new_dtype)):
        return (None,)  # to or from integers/bool: the result is piecewise constant
    return (lax.convert_element_type(t, new_dtype),)  # complex -> real keeps the real part, as the value


# ----------------------------------------------------------------------------- complex numbers

def _linear(fn: Callable[[TracedArray], TracedArray]) -> JvpRule:
    def rule(tangents, primals, outs, **params):
        return (fn(tangents[0], **params),)
    return rule


_register(P.real_p)(_linear(lax.real))
_register(P.imag_p)(_linear(lax.imag))
_register(P.conj_p)(_linear(lax.conj))
_register(P.fft_p)(_linear(lax.fft))


@_register(P.complex_p)
def _complex_jvp(tangents, primals, outs):
    (t_re, t_im), (re, im), (out,) = tangents, primals, outs
    part = Aval(out.shape, P.real_dtype(out.dtype))
    t_re = lax.zeros(part) if t_re is None else _fit(t_re, out)
    t_im = lax.zeros(part) if t_im is None else _fit(t_im, out)
    return (lax.complex(t_re, t_im),)


# ----------------------------------------------------------------------------- reductions

@_register(P.reduce_sum_p)
def _reduce_sum_jvp(tangents, primals, outs, *, axes):
    return (lax.reduce_sum(tangents[0], axes),)


@_register((P.reduce_max_p, P.reduce_min_p))
def _reduce_choose_jvp(tangents, primals, outs, *, axes):
    """The mean of the tangents at the positions equal to the result (ties; a NaN result: the NaNs'),
    the transpose of the VJP's equal split."""
    (t,), (x,), (out,) = tangents, primals, outs
    if x.size == 0:
        return (lax.zeros(out.aval),)
    result = _expand_reduced(out, x.shape, axes)
    chosen = lax.logical_or(lax.eq(x, result), lax.logical_and(lax.ne(x, x), lax.ne(result, result)))
    chosen = lax.convert_element_type(chosen, x.dtype)
    return (lax.div(lax.reduce_sum(lax.mul(chosen, t), axes), lax.reduce_sum(chosen, axes)),)


def _product_of_others(x: TracedArray, axes: Sequence[int]) -> TracedArray:
    """For each element, the product of the other elements of its reduced slice, formed without
    dividing (zero-safe): exclusive cumprods from both ends, as the VJP forms them."""
    kept = _kept_dims(x.ndim, axes)
    perm = kept + tuple(axes)
    moved = lax.transpose(x, perm)
    flat = lax.reshape(moved, tuple(x.shape[d] for d in kept) + (int(np.prod([x.shape[a] for a in axes])),))
    last = flat.ndim - 1
    others = lax.mul(_exclusive_cumprod(flat, last, False), _exclusive_cumprod(flat, last, True))
    return lax.transpose(lax.reshape(others, moved.shape), _inverse_permutation(perm))


@_register(P.reduce_prod_p)
def _reduce_prod_jvp(tangents, primals, outs, *, axes):
    (t,), (x,), (out,) = tangents, primals, outs
    if x.size == 0:
        return (lax.zeros(out.aval),)
    return (lax.reduce_sum(lax.mul(_product_of_others(x, axes), t), axes),)


@_register(P.cumsum_p)
def _cumsum_jvp(tangents, primals, outs, *, axis, reverse):
    return (lax.cumsum(tangents[0], axis, reverse),)


def _forward_only(rule_fn):
    """Write a scan's rule for ``reverse=False``; the reverse case flips, applies, flips back."""
    def rule(tangents, primals, outs, *, axis, reverse):
        (t,), (x,), (out,) = tangents, primals, outs
        if x.shape[axis] == 0:
            return (lax.zeros(out.aval),)
        if reverse:
            t, x, out = (lax.rev(v, (axis,)) for v in (t, x, out))
        t_out = rule_fn(t, x, out, axis)
        return (lax.rev(t_out, (axis,)) if reverse else t_out,)
    rule.__name__ = rule_fn.__name__
    return rule


@_register(P.cumprod_p)
@_forward_only
def _cumprod_jvp(t, x, out, axis):
    """t_out[i] = sum_{k<=i} t[k] * prod_{j<=i, j!=k} x[j]: the VJP's zero-safe n x n grid of partial
    products (row k: a cumprod of x with x[k] replaced by 1), summed over k instead of i."""
    diagonal_mask, lower = _pair_masks(x, axis)
    partial = lax.bind(P.cumprod_p, lax.select(diagonal_mask, _const(1, x), _pairwise(x, axis, 1)),
                       axis=axis + 1, reverse=False)
    weighted = lax.select(lower, lax.mul(partial, _pairwise(t, axis, 0)), _const(0, x))
    return lax.reduce_sum(weighted, (axis,))


@_register((P.cummax_p, P.cummin_p))
@_forward_only
def _cumchoose_jvp(t, x, out, axis):
    """t_out[i] = mean of t[k] over the k <= i with x[k] == out[i] (ties share, as in the VJP)."""
    _, lower = _pair_masks(x, axis)
    hit = lax.logical_and(lower, lax.eq(_pairwise(x, axis, 0), _pairwise(out, axis, 1)))
    hit = lax.convert_element_type(hit, x.dtype)
    total = lax.reduce_sum(lax.mul(hit, _pairwise(t, axis, 0)), (axis,))
    return lax.div(total, lax.reduce_sum(hit, (axis,)))


@_register(P.sort_p)
def _sort_jvp(tangents, primals, outs, *, axis, descending, index_dtype):
    """The values are ``x`` permuted along ``axis``: permute the tangent the same way."""
    (t,), (_, indices) = tangents, outs
    return lax.gather(t, indices, axis), None


# ----------------------------------------------------------------------------- shape ops (linear)

def _same_op(prim: Primitive) -> None:
    """A linear primitive of one operand: the tangent goes through the primitive itself."""
    def rule(tangents, primals, outs, **params):
        return (lax.bind(prim, tangents[0], **params),)
    rule.__name__ = f"{prim.name}_jvp"
    jvp_rules[prim] = rule


for _prim in (P.broadcast_in_dim_p, P.reshape_p, P.transpose_p, P.rev_p, P.slice_p):
    _same_op(_prim)


@_register(P.pad_p)
def _pad_jvp(tangents, primals, outs, *, padding_config):
    (tx, t_value), (x, value) = tangents, primals
    return (lax.bind(P.pad_p, _zeros_if_none(tx, x), _const(0, x) if t_value is None else t_value,
                     padding_config=padding_config),)


@_register(P.concatenate_p)
def _concatenate_jvp(tangents, primals, outs, *, dimension):
    return (lax.concatenate([_zeros_if_none(t, x) for t, x in zip(tangents, primals)], dimension),)


# ----------------------------------------------------------------------------- contractions (bilinear)

def _bilinear(prim: Primitive) -> None:
    """``d(lhs * rhs) = dlhs * rhs + lhs * drhs`` for a product-like primitive of two operands."""
    def rule(tangents, primals, outs, **params):
        (t_lhs, t_rhs), (lhs, rhs) = tangents, primals
        from_lhs = None if t_lhs is None else lax.bind(prim, t_lhs, rhs, **params)
        from_rhs = None if t_rhs is None else lax.bind(prim, lhs, t_rhs, **params)
        return (_add(from_lhs, from_rhs),)
    rule.__name__ = f"{prim.name}_jvp"
    jvp_rules[prim] = rule


_bilinear(P.dot_general_p)
_bilinear(P.conv_general_dilated_p)


# ----------------------------------------------------------------------------- linear algebra
# Each rule is the transpose of the VJP rule (torch's formulas), so the symmetric-input conventions
# agree: cholesky and eigh differentiate as functions of the Hermitian part (a + a^H) / 2.

def _sym(t: TracedArray) -> TracedArray:
    """The Hermitian part (t + t^H) / 2 (the symmetric part of a real t): what cholesky and eigh differentiate."""
    return lax.mul(_const(0.5, t), lax.add(t, mH(t)))


def _real_part(x: TracedArray) -> TracedArray:
    """Re(x) in the real dtype, ``x`` itself when real: eigenvalues and singular values are real."""
    return lax.real(x) if P.is_complex(x.dtype) else x


def _imaginary_part(x: TracedArray) -> TracedArray:
    """i Im(x) = x - Re(x), in x's complex dtype."""
    return lax.sub(x, lax.convert_element_type(lax.real(x), x.dtype))


@_register(P.cholesky_p)
def _cholesky_jvp(tangents, primals, outs):
    """dL = L Phi(L^-1 sym(da) L^-H), Phi = lower triangle with the diagonal halved (L^-1 dL has a real
    diagonal, as L's diagonal stays positive)."""
    (t,), (factor,) = tangents, outs
    left = lax.triangular_solve(factor, _sym(t), left_side=True, lower=True, transpose_a=False)
    # X L^H = left: transpose_a is the plain transpose, so solve with conj(L)
    both = lax.triangular_solve(lax.conj_if_complex(factor), left, left_side=False, lower=True, transpose_a=True)
    phi = lax.sub(triangle(both, 0, True), lax.mul(_const(0.5, both), diag_embed(diagonal(both))))
    return (matmul(factor, phi),)


@_register(P.triangular_solve_p)
def _triangular_solve_jvp(tangents, primals, outs, *, left_side, lower, transpose_a, unit_diagonal):
    """op(a) x = b gives op(a) dx = db - op(da) x (or dx op(a) = db - x op(da)), da read on a's
    triangle only (the strict one with a unit diagonal). op is the plain transpose, so the rule is
    holomorphic: complex matrices need no conjugates."""
    (t_a, t_b), (a, b), (x,) = tangents, primals, outs
    rhs = t_b
    if t_a is not None:
        t_a = triangle(t_a, (-1 if lower else 1) if unit_diagonal else 0, lower)
        op_t_a = mT(t_a) if transpose_a else t_a
        rhs = _add(rhs, lax.neg(matmul(op_t_a, x) if left_side else matmul(x, op_t_a)))
    return (lax.triangular_solve(a, rhs, left_side=left_side, lower=lower, transpose_a=transpose_a,
                                 unit_diagonal=unit_diagonal),)


def _resize(x: TracedArray, rows: int, cols: int) -> TracedArray:
    """The top-left ``rows`` x ``cols`` block of ``x``, zero-extended where ``x`` is smaller."""
    config = [(0, 0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2], 0), (0, cols - x.shape[-1], 0)]
    return lax.pad(x, _const(0, x), config)


@_register(P.lu_p)
def _lu_jvp(tangents, primals, outs):
    """P^T a = L U with L (m, k) unit lower and U (k, n) upper. Complete them to square L~ (m, m) and
    U~ (n, n) with identity blocks; then M = L~^-1 P^T da U~^-1 splits into dL = L~ tril_-1(M) and
    dU = triu(M) U~ (their first k columns / rows), packed like the factors. Holomorphic: the same for
    complex matrices."""
    (t,), (a,), (packed, _, permutation) = tangents, primals, outs
    if a.size == 0:
        return lax.zeros(packed.aval), None, None
    m, n = a.shape[-2:]
    k = min(m, n)
    rows = lax.broadcast_in_dim(lax.convert_element_type(permutation, np.int64), a.shape, tuple(range(a.ndim - 1)))
    permuted = lax.gather(t, rows, a.ndim - 2)                                   # P^T da
    square_lower = _resize(packed, m, m)                        # strictly lower part of L~ (unit diagonal)
    unit_lower = lax.add(triangle(square_lower, -1, True), lax.convert_element_type(
        eye_mask(square_lower.shape), a.dtype))
    square_upper = triangle(_resize(packed, n, n), 0, False)
    if m < n:  # U~ = [U; 0 I]
        beyond = lax.ge(lax.iota(np.int64, (n, n), 0), lax.full((), m, np.int64))
        identity_rows = lax.logical_and(eye_mask(square_upper.shape),
                                        lax.broadcast_in_dim(beyond, square_upper.shape, (a.ndim - 2, a.ndim - 1)))
        square_upper = lax.select(identity_rows, _const(1, a), square_upper)
    left = lax.triangular_solve(square_lower, permuted, left_side=True, lower=True, unit_diagonal=True)
    middle = lax.triangular_solve(square_upper, left, left_side=False, lower=False)
    d_lower = matmul(unit_lower, leading(triangle(middle, -1, True), 1, k))     # (m, k), strictly lower
    d_upper = matmul(leading(triangle(middle, 0, False), 2, k), square_upper)   # (k, n), upper
    return lax.add(_resize(d_lower, m, n), _resize(d_upper, m, n)), None, None


def _qr_tall_jvp(q: TracedArray, r: TracedArray, t: TracedArray) -> tuple[TracedArray, TracedArray]:
    """m >= n: C = Q^H da R^-1 = Omega + dR R^-1 with Omega = Q^H dQ skew-Hermitian and dR R^-1 upper, so
    Omega = tril_-1(C) - tril_-1(C)^H + i Im diag(C), dR = (C - Omega) R, dQ = da R^-1 - Q (C - Omega).
    The imaginary diagonal keeps R's diagonal real, as LAPACK returns it (torch's and JAX's choice)."""
    c = lax.triangular_solve(r, matmul(mH(q), t), left_side=False, lower=False)
    strict = triangle(c, -1, True)
    omega = lax.sub(strict, mH(strict))
    if P.is_complex(c.dtype):
        omega = lax.add(omega, diag_embed(_imaginary_part(diagonal(c))))
    upper_part = lax.sub(c, omega)                                             # C - Omega = dR R^-1
    d_r = matmul(upper_part, r)
    d_q = lax.sub(lax.triangular_solve(r, t, left_side=False, lower=False), matmul(q, upper_part))
    return d_q, d_r


@_register(P.qr_p)
def _qr_jvp(tangents, primals, outs, *, full_matrices):
    (t,), (a,), (q, r) = tangents, primals, outs
    rows, cols = a.shape[-2:]
    if full_matrices and rows > cols:
        raise UnsupportedOperatorError("the QR decomposition with complete Q of a tall matrix is not "
                                       "differentiable (as in torch); use mode='reduced'")
    if rows >= cols:
        return _qr_tall_jvp(q, r, t)
    # wide: a = q [x | y] with x square; y = q^H a_y moves with q too
    d_q, d_x = _qr_tall_jvp(q, leading(r, 1, rows), leading(t, 1, rows))
    d_y = lax.add(matmul(mH(d_q), trailing(a, 1, rows)), matmul(mH(q), trailing(t, 1, rows)))
    return d_q, lax.concatenate([d_x, d_y], a.ndim - 1)


@_register(P.pinv_p)
def _pinv_jvp(tangents, primals, outs, *, hermitian):
    """The constant-rank derivative (Golub & Pereyra), whose transpose is the VJP's:
    dP = -P da P + P P^H da^H (I - A P) + (I - P A) da^H P^H P."""
    (t, _, _), (a, _, _), (p,) = tangents, primals, outs
    if t is None:
        return (None,)
    tt = mH(t)
    first = lax.neg(matmul(matmul(p, t), p))
    second = matmul(matmul(p, mH(p)), lax.sub(tt, matmul(matmul(tt, a), p)))
    third = matmul(lax.sub(tt, matmul(p, matmul(a, tt))), matmul(mH(p), p))
    return (lax.add(first, lax.add(second, third)),)


@_register(P.eigh_p)
def _eigh_jvp(tangents, primals, outs, *, lower):
    """B = V^H sym(da) V: dw = Re diag(B) (real), dV = V (B / E) off the diagonal, E_ij = w_j - w_i. The zero
    diagonal of V^H dV fixes the phases of complex eigenvectors (torch's and JAX's choice)."""
    (t,), (w, v) = tangents, outs
    b = matmul(matmul(mH(v), _sym(t)), v)
    gaps, off = _spectral_gaps(w)
    gaps = lax.convert_element_type(gaps, b.dtype)
    return _real_part(diagonal(b)), matmul(v, lax.select(off, lax.div(b, gaps), _const(0, b)))


@_register(P.svd_p)
def _svd_jvp(tangents, primals, outs, *, full_matrices):
    """dP = U^H da V; dS = Re diag(dP) (real); U^H dU = (dP S + S dP^H) / E, V^H dV = (S dP + dP^H S) / E off
    the diagonal (E_ij = s_j^2 - s_i^2), plus the parts of da outside U's / V's column spaces. Complex
    singular vectors have a phase each: torch's choice puts +i Im diag(dP) / 2S on the diagonal of U^H dU
    and -i Im diag(dP) / 2S on V^H dV's. With full matrices only the first min(m, n) singular vectors move
    (the VJP ignores the rest, as torch)."""
    (t,), (a,), (u, s, vh) = tangents, primals, outs
    k = s.shape[-1]
    rows, cols = a.shape[-2:]
    u_k, vh_k = (leading(u, 1, k), leading(vh, 2, k)) if full_matrices else (u, vh)
    v = mH(vh_k)
    t_v = matmul(t, v)
    d_p = matmul(mH(u_k), t_v)
    gaps, off = _spectral_gaps(lax.mul(s, s))
    gaps, s_a = lax.convert_element_type(gaps, a.dtype), lax.convert_element_type(s, a.dtype)

    def over_gaps(x):
        return lax.select(off, lax.div(x, gaps), _const(0, x))

    d_u = matmul(u_k, over_gaps(lax.add(scale_columns(d_p, s_a), scale_rows(s_a, mH(d_p)))))
    d_v = matmul(v, over_gaps(lax.add(scale_rows(s_a, d_p), scale_columns(mH(d_p), s_a))))
    inv_s = lax.div(_const(1, s_a), s_a)
    if P.is_complex(a.dtype):
        phase = lax.mul(_const(0.5, inv_s), lax.mul(_imaginary_part(diagonal(d_p)), inv_s))
        d_u, d_v = lax.add(d_u, scale_columns(u_k, phase)), lax.sub(d_v, scale_columns(v, phase))
    if rows > k:
        d_u = lax.add(d_u, scale_columns(lax.sub(t_v, matmul(u_k, d_p)), inv_s))
    if cols > k:
        t_u = matmul(mH(t), u_k)
        d_v = lax.add(d_v, scale_columns(lax.sub(t_u, matmul(v, mH(d_p))), inv_s))
    d_vh = mH(d_v)
    if full_matrices:
        d_u, d_vh = _resize(d_u, rows, rows), _resize(d_vh, cols, cols)
    return d_u, _real_part(diagonal(d_p)), d_vh


@_register(P.eig_p)
def _eig_jvp(tangents, primals, outs):
    """torch's linalg_eig_jvp: dP = V^-1 da V, dl = diag(dP), dX = V (dP / E) off the diagonal
    (E_ij = l_j - l_i), dV = dX - V diag(re diag(V^H dX)) (the columns keep unit norm). A real tangent
    is made complex first."""
    (t,), (l, v) = tangents, outs
    d_p = _eig_solve(v, matmul(lax.convert_element_type(t, v.dtype), v), adjoint=False)
    gaps, off = _spectral_gaps(l)
    d_x = matmul(v, lax.select(off, lax.div(d_p, gaps), _const(0, d_p)))
    norm_change = lax.convert_element_type(lax.real(diagonal(matmul(mH(v), d_x))), v.dtype)
    return diagonal(d_p), lax.sub(d_x, scale_columns(v, norm_change))


# ----------------------------------------------------------------------------- indexing

@_register(P.gather_p)
def _gather_jvp(tangents, primals, outs, *, axis):
    (t, _), (_, indices) = tangents, primals
    return (None if t is None else lax.gather(t, indices, axis),)


@_register(P.scatter_add_p)
def _scatter_add_jvp(tangents, primals, outs, *, axis):
    (t_operand, _, t_updates), (operand, indices, _) = tangents, primals
    if t_updates is None:
        return (t_operand,)
    return (lax.scatter_add(_zeros_if_none(t_operand, operand), indices, t_updates, axis),)


@_register(P.scatter_p)
def _scatter_jvp(tangents, primals, outs, *, axis):
    """Overwritten positions lose the operand's tangent and get the updates' tangents, summed over
    duplicate indices: the transpose of the VJP, which gives every duplicate the cotangent (without
    duplicates, the derivative)."""
    (t_operand, _, t_updates), (operand, indices, updates) = tangents, primals
    kept = None if t_operand is None else lax.scatter(t_operand, indices, lax.zeros(updates.aval), axis)
    if t_updates is None:
        return (kept,)
    return (lax.scatter_add(_zeros_if_none(kept, operand), indices, t_updates, axis),)


# ----------------------------------------------------------------------------- composites
# A composite without a rule here is differentiated through its decomposition (``jvp`` does that);
# these are the cheap ones whose forward-mode derivative is a composite again or a few primitives.

@_register(_dense.linear_p)
def _linear_jvp(tangents, primals, outs):
    """d(x w + b) = dx w + x dw + db: one ``linear`` when dx and db are both there."""
    (t_x, t_w, t_b), (x, w, _), (out,) = tangents, primals, outs
    matrix_product = (((1,), (0,)), ((), ()))
    if t_x is not None and t_b is not None:
        result = lax.bind(_dense.linear_p, t_x, w, t_b)
    else:
        result = None if t_x is None else lax.dot_general(t_x, w, matrix_product)
        result = _add(result, None if t_b is None else along(t_b, out.shape, (1,)))
    return (_add(result, None if t_w is None else lax.dot_general(x, t_w, matrix_product)),)


@_register(_activations.gelu_p)
def _gelu_jvp(tangents, primals, outs, *, approximate):
    """Elementwise: the tangent times the slope, which is what ``gelu_backward`` computes."""
    return (lax.bind(_activations.gelu_backward_p, tangents[0], primals[0], approximate=approximate),)


@_register(_activations.softmax_p)
def _softmax_jvp(tangents, primals, outs, *, axis):
    """softmax's Jacobian diag(y) - y y^T is symmetric: its JVP is ``softmax_backward``."""
    return (lax.bind(_activations.softmax_backward_p, tangents[0], outs[0], axis=axis),)


@_register(_activations.log_softmax_p)
def _log_softmax_jvp(tangents, primals, outs, *, axis):
    """dy = dx - sum(dx * softmax(x)) along ``axis``, softmax(x) = exp(y)."""
    (t,), (y,) = tangents, outs
    kept = [d for d in range(y.ndim) if d != axis]
    weighted = lax.reduce_sum(lax.mul(t, lax.exp(y)), (axis,))
    return (lax.sub(t, along(weighted, y.shape, kept)),)


def missing_rules() -> list[str]:
    """Names of registered core primitives without a JVP rule (empty when the table is total); a
    composite without one is differentiated through its decomposition."""
    return sorted(name for name, p in P.registry.items() if p not in jvp_rules and not is_composite(p))
