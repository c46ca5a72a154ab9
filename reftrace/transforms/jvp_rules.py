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
duplicates, the symmetric-input conventions of cholesky/eigh in ``linalg_jvp_rules``): ``<u, J v> = <J^T u, v>``
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
from reftrace.graph import Aval
from reftrace.lax import TracedArray
from reftrace.nn import activations as _activations
from reftrace.nn import dense as _dense
from reftrace.nn._util import along
from reftrace.primitives import Primitive
# the VJP table's building blocks where a convention lives: sharing them keeps the two tables' choices identical
from reftrace.transforms.linalg_jvp_rules import linalg_jvp_rules
from reftrace.transforms.vjp_rules import (_choice_weight, _exclusive_cumprod, _expand_reduced, _inverse_permutation,
                                           _kept_dims, _pair_masks, _pairwise, vjp_rules)

Tangent = TracedArray | None
JvpRule = Callable[..., tuple[Tangent, ...]]

jvp_rules: dict[Primitive, JvpRule] = {}
jvp_rules.update(linalg_jvp_rules)  # the matrix factorizations: transforms/linalg_jvp_rules.py


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


@_register(_activations.hardsigmoid_p)
def _hardsigmoid_jvp(tangents, primals, outs):
    """Elementwise: the tangent times torch's slope (``1.0f / 6.0f`` inside), as the VJP rule has it."""
    return (lax.bind(_activations.hardsigmoid_backward_p, tangents[0], primals[0]),)


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
