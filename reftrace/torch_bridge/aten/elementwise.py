"""Elementwise ATen ops: arithmetic, math functions, comparisons, logic, select, dtype conversion.

Each rule casts its operands to the dtype torch computes in (the node's output
dtype for arithmetic, the promoted operand dtype for comparisons) and broadcasts
them like torch; the translator then checks the result against torch's meta.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reftrace import lax, nn
from reftrace import primitives as P
from reftrace.errors import TracingError
from reftrace.torch_bridge.aten._common import (aten, bcast, bcast_full, broadcast_shapes, cast, current,
                                                elementwise, float_dtype, is_tensor, literal, opmath, out_aval,
                                                promote, register, unsupported)


def _out_dtype() -> np.dtype:
    return out_aval().dtype


def to_bool(x: Any) -> Any:
    """torch's truthiness: ``x != 0`` (bool tensors pass through)."""
    if is_tensor(x):
        return x if P.is_bool(x.dtype) else lax.ne(x, literal(0, x.dtype))
    return literal(bool(x), np.bool_)


def trunc(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return x
    return lax.select(lax.lt(x, literal(0, x.dtype)), lax.ceil(x), lax.floor(x))


# ----------------------------------------------------------------------------- arithmetic

@register(aten.add.Tensor, aten.add.Scalar)
def add(x: Any, y: Any, alpha: Any = 1) -> Any:
    d = _out_dtype()
    if P.is_bool(d):
        return elementwise(P.or_p, x, y, dtype=d)
    if alpha != 1:
        y = elementwise(P.mul_p, y, alpha, dtype=d) if is_tensor(y) else y * alpha
    return elementwise(P.add_p, x, y, dtype=d)


@register(aten.sub.Tensor, aten.sub.Scalar)
def sub(x: Any, y: Any, alpha: Any = 1) -> Any:
    d = _out_dtype()
    if alpha != 1:
        y = elementwise(P.mul_p, y, alpha, dtype=d) if is_tensor(y) else y * alpha
    return elementwise(P.sub_p, x, y, dtype=d)


@register(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(x: Any, y: Any, alpha: Any = 1) -> Any:
    return sub(y, x, alpha)


def _by_a_scalar_in_float32(prim: P.Primitive, x: Any, y: Any, d: Any) -> Any | None:
    """torch's CPU kernels multiply or divide a float16/bfloat16 tensor by a 0-dim second operand (a
    Python number, a 0-dim tensor) in float32, the operand unrounded, and round the result once
    (``bf16 3.0 * 1.3`` is 3.90625, where ``1.3`` rounded to bfloat16 first gives 3.890625). None where
    that does not apply (``add``/``sub`` round the number to the tensor's dtype, as the rest do)."""
    if opmath(d) == np.dtype(d) or (is_tensor(y) and y.ndim != 0) or isinstance(y, bool):
        return None
    return cast(elementwise(prim, x, y, dtype=np.float32), d)


@register(aten.mul.Tensor, aten.mul.Scalar)
def mul(x: Any, y: Any) -> Any:
    d = _out_dtype()
    if P.is_bool(d):
        return elementwise(P.and_p, x, y, dtype=d)
    scaled = _by_a_scalar_in_float32(P.mul_p, x, y, d)
    return elementwise(P.mul_p, x, y, dtype=d) if scaled is None else scaled


def _true_div(x: Any, y: Any) -> Any:
    d = float_dtype(_out_dtype())
    scaled = _by_a_scalar_in_float32(P.div_p, x, y, d)
    return elementwise(P.div_p, x, y, dtype=d) if scaled is None else scaled


def _floor_div_float(a: Any, b: Any) -> Any:
    """torch's floor division for floats (``div_floor_floating``), exact at the rounding edges."""
    dt = a.dtype
    zero = literal(0, dt)
    mod = lax.rem(a, b)
    div = lax.div(lax.sub(a, mod), b)
    fix = lax.logical_and(lax.ne(mod, zero), lax.ne(lax.lt(b, zero), lax.lt(mod, zero)))
    div = lax.select(fix, lax.sub(div, literal(1, dt)), div)
    floordiv = lax.floor(div)
    floordiv = lax.select(lax.gt(lax.sub(div, floordiv), literal(0.5, dt)), lax.add(floordiv, literal(1, dt)),
                          floordiv)
    true_div = lax.div(a, b)
    signed_zero = lax.mul(zero, true_div)
    result = lax.select(lax.ne(div, zero), floordiv, signed_zero)
    return lax.select(lax.eq(b, zero), true_div, result)


def _refuse_integer_division_by_zero(y: Any, d: Any) -> None:
    """Eager torch raises ZeroDivisionError for an integer division by 0; a graph cannot raise at run time
    (XLA returns some integer), so a literal 0 divisor is refused while capturing. A tensor divisor that
    holds a 0 is data: its quotient is whatever the backend's integer division gives."""
    if not P.is_inexact(d) and not P.is_bool(d) and not is_tensor(y) and not isinstance(y, bool) and y == 0:
        raise TracingError(f"{current().op}: integer division by the number 0 (eager torch raises "
                           "ZeroDivisionError)")


def floor_div_int(a: Any, b: Any) -> Any:
    """Integer division rounding toward minus infinity (Python's ``//``), from the truncating one."""
    q, r = lax.div(a, b), lax.rem(a, b)
    zero = literal(0, a.dtype)
    adjust = lax.logical_and(lax.ne(r, zero), lax.ne(lax.lt(r, zero), lax.lt(b, zero)))
    return lax.select(adjust, lax.sub(q, literal(1, a.dtype)), q)


def same_shape(x: Any, y: Any, dtype: Any) -> tuple[Any, Any]:
    shape = broadcast_shapes(x, y)
    return bcast(cast(x, dtype), shape), bcast(cast(y, dtype), shape)


@register(aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor)
def div(x: Any, y: Any) -> Any:
    return _true_div(x, y)


@register(aten.div.Tensor_mode, aten.div.Scalar_mode)
def div_mode(x: Any, y: Any, rounding_mode: str | None = None) -> Any:
    if rounding_mode is None:
        return _true_div(x, y)
    d = _out_dtype()
    _refuse_integer_division_by_zero(y, d)
    if rounding_mode == "trunc":
        if P.is_float(d):
            return trunc(elementwise(P.div_p, x, y, dtype=d))
        return elementwise(P.div_p, x, y, dtype=d)
    return floor_divide(x, y)


@register(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(x: Any, y: Any) -> Any:
    d = _out_dtype()
    _refuse_integer_division_by_zero(y, d)
    a, b = same_shape(x, y, d)
    return _floor_div_float(a, b) if P.is_float(d) else floor_div_int(a, b)


@register(aten.remainder.Tensor, aten.remainder.Scalar, aten.remainder.Scalar_Tensor)
def remainder(x: Any, y: Any) -> Any:
    """Python's ``%``: the result takes the sign of the divisor."""
    d = _out_dtype()
    _refuse_integer_division_by_zero(y, d)
    a, b = same_shape(x, y, d)
    zero = literal(0, d)
    r = lax.rem(a, b)
    adjust = lax.logical_and(lax.ne(r, zero), lax.ne(lax.lt(r, zero), lax.lt(b, zero)))
    return lax.select(adjust, lax.add(r, b), r)


@register(aten.fmod.Tensor, aten.fmod.Scalar)
def fmod(x: Any, y: Any) -> Any:
    _refuse_integer_division_by_zero(y, _out_dtype())
    return elementwise(P.rem_p, x, y, dtype=_out_dtype())


@register(aten.pow.Tensor_Scalar)
def pow_tensor_scalar(x: Any, exponent: Any) -> Any:
    d = _out_dtype()
    xc = cast(x, d)
    if isinstance(exponent, bool):
        exponent = int(exponent)
    if isinstance(exponent, (int, float)) and float(exponent).is_integer() and abs(exponent) <= 64:
        e = int(exponent)
        if P.is_float(d) or e >= 0:
            return lax.integer_pow(xc, e)
    if exponent == 0.5 and P.is_float(d):
        return lax.sqrt(xc)
    if exponent == -0.5 and P.is_float(d):
        return lax.rsqrt(xc)
    return lax.pow(xc, literal(exponent, d))


@register(aten.pow.Tensor_Tensor)
def pow_tensor_tensor(x: Any, y: Any) -> Any:
    return elementwise(P.pow_p, x, y, dtype=_out_dtype())


@register(aten.pow.Scalar)
def pow_scalar(base: Any, exponent: Any) -> Any:
    return elementwise(P.pow_p, base, exponent, dtype=_out_dtype())


@register(aten.atan2.default)
def atan2(x: Any, y: Any) -> Any:
    """At the origin torch's gradient is 0 (reftrace's rule would give 0/0): the value there comes
    without a gradient, and the differentiated atan2 sees a stand-in point (1, 1)."""
    d = float_dtype(_out_dtype())
    a, b = same_shape(x, y, d)
    zero, one = literal(0, d), literal(1, d)
    origin = lax.logical_and(lax.eq(a, zero), lax.eq(b, zero))
    away = lax.atan2(lax.select(origin, one, a), lax.select(origin, one, b))
    return lax.select(origin, lax.stop_gradient(lax.atan2(a, b)), away)


@register(aten.maximum.default, aten.max.other)
def maximum(x: Any, y: Any) -> Any:
    return elementwise(P.max_p, x, y, dtype=_out_dtype())


@register(aten.minimum.default, aten.min.other)
def minimum(x: Any, y: Any) -> Any:
    return elementwise(P.min_p, x, y, dtype=_out_dtype())


def _fminmax(prim: P.Primitive):
    def rule(x: Any, y: Any) -> Any:
        """max/min ignoring a NaN operand; ties split the gradient, two NaNs give NaN and send it to both."""
        d = _out_dtype()
        a, b = same_shape(x, y, d)
        m = lax.bind(prim, a, b)
        if not P.is_float(d):
            return m
        a_nan, b_nan = lax.ne(a, a), lax.ne(b, b)
        m = lax.select(lax.logical_and(b_nan, lax.bitwise_not(a_nan)), a, m)
        return lax.select(lax.logical_and(a_nan, lax.bitwise_not(b_nan)), b, m)
    return rule


register(aten.fmax.default)(_fminmax(P.max_p))
register(aten.fmin.default)(_fminmax(P.min_p))


# ----------------------------------------------------------------------------- unary math

_FLOAT_UNARY = {
    aten.exp.default: P.exp_p, aten.log.default: P.log_p, aten.log1p.default: P.log1p_p,
    aten.expm1.default: P.expm1_p, aten.sqrt.default: P.sqrt_p, aten.rsqrt.default: P.rsqrt_p,
    aten.sin.default: P.sin_p, aten.cos.default: P.cos_p, aten.tan.default: P.tan_p,
    aten.tanh.default: P.tanh_p, aten.sigmoid.default: P.logistic_p, aten.erf.default: P.erf_p,
    aten.erfc.default: P.erfc_p, aten.erfinv.default: P.erf_inv_p, aten.asin.default: P.asin_p,
    aten.acos.default: P.acos_p, aten.atan.default: P.atan_p, aten.sinh.default: P.sinh_p,
    aten.cosh.default: P.cosh_p, aten.asinh.default: P.asinh_p, aten.acosh.default: P.acosh_p,
    aten.atanh.default: P.atanh_p, aten.lgamma.default: P.lgamma_p,
}


def _float_unary(prim: P.Primitive):
    def rule(x: Any) -> Any:
        return lax.bind(prim, cast(x, float_dtype(_out_dtype())))
    rule.__name__ = prim.name
    return rule


for _op, _prim in _FLOAT_UNARY.items():
    register(_op)(_float_unary(_prim))


def digamma_of(x: Any) -> Any:
    """torch's digamma: ``-inf`` at +0.0 and ``inf`` at -0.0 (``-1 / x``, the pole's sign, with its slope
    ``inf``), where XLA's is NaN. The digamma branch reads 1 at the pole, so its slope there is finite and
    the branch not taken adds 0 to the gradient, not ``0 * inf``."""
    one, pole = literal(1, x.dtype), lax.eq(x, literal(0, x.dtype))
    return lax.select(pole, lax.div(lax.neg(one), x), lax.digamma(lax.select(pole, one, x)))


@register(aten.digamma.default)
def digamma(x: Any) -> Any:
    return digamma_of(cast(x, float_dtype(_out_dtype())))


@register(aten.exp2.default)
def exp2(x: Any) -> Any:
    d = float_dtype(_out_dtype())
    return lax.pow(literal(2, d), cast(x, d))


def _log_base(base: float):
    def rule(x: Any) -> Any:
        d = float_dtype(_out_dtype())
        return lax.div(lax.log(cast(x, d)), literal(np.log(base), d))
    return rule


register(aten.log2.default)(_log_base(2.0))
register(aten.log10.default)(_log_base(10.0))


@register(aten.reciprocal.default)
def reciprocal(x: Any) -> Any:
    d = float_dtype(_out_dtype())
    return lax.div(literal(1, d), cast(x, d))


@register(aten.neg.default)
def neg(x: Any) -> Any:
    return lax.neg(x)


@register(aten.abs.default)
def abs_(x: Any) -> Any:
    return x if P.is_bool(x.dtype) else lax.abs(x)


@register(aten.sign.default, aten.sgn.default)
def sign(x: Any) -> Any:
    """torch's sign of a real float is 0 for NaN and for -0.0 (``(0 < x) - (x < 0)``), where lax's keeps both."""
    if P.is_bool(x.dtype):
        return x
    if not P.is_float(x.dtype):
        return lax.sign(x)
    zero = literal(0, x.dtype)
    return lax.select(lax.logical_or(lax.ne(x, x), lax.eq(x, zero)), zero, lax.sign(x))


def _rounding(prim: P.Primitive):
    def rule(x: Any) -> Any:
        return lax.bind(prim, x) if P.is_float(x.dtype) else x
    return rule


register(aten.floor.default)(_rounding(P.floor_p))
register(aten.ceil.default)(_rounding(P.ceil_p))
register(aten.round.default)(_rounding(P.round_p))  # half to even, like torch


@register(aten.trunc.default, aten.fix.default)
def trunc_rule(x: Any) -> Any:
    return trunc(x)


@register(aten.frac.default)
def frac(x: Any) -> Any:
    return lax.sub(x, trunc(x))


@register(aten.round.decimals)
def round_decimals(x: Any, decimals: int = 0) -> Any:
    if not P.is_float(x.dtype):
        return x
    scale = literal(10.0 ** abs(decimals), x.dtype)
    if decimals < 0:
        return lax.mul(lax.round(lax.div(x, scale)), scale)
    return lax.div(lax.round(lax.mul(x, scale)), scale)


@register(aten.relu.default)
def relu(x: Any) -> Any:
    """``select(x <= 0, 0, x)``: slope 0 at 0, and NaN stays NaN with slope 1, as torch's threshold_backward."""
    if P.is_float(x.dtype):
        return nn.relu(x)
    zero = literal(0, x.dtype)
    return lax.select(lax.le(x, zero), bcast(zero, x.shape), x)


# torch's clamp family at its bounds (x == min or x == max) and at NaN, in float64 eager:
#
#   op                             gradient of x                      of a tensor bound
#   clamp(x, min, max), scalars    1 strictly inside, 0 at the bounds  -
#                                  and at NaN
#   clamp(x, min=t) / clamp_min    as maximum(x, t): 0.5 each on a tie, 1 to both where one is NaN
#   clamp(x, max=t) / clamp_max    as minimum(x, t)
#   clamp(x, t_lo, t_hi)           0.5 / 0.5 on a tie with either bound while t_lo < t_hi; with
#                                  t_lo == t_hi all to x at x == t_lo; t_lo > t_hi: all to t_hi
#   hardtanh, relu6                1 strictly inside, 0 at the bounds, 1 at NaN


def _clamp_scalar_bounds(x: Any, lo: Any, hi: Any) -> Any:
    """torch's value ``min(max(x, lo), hi)``; the gradient passes to ``x`` strictly between the bounds."""
    d = _out_dtype()
    y = bcast_full(cast(x, d), out_aval().shape)
    value, inside = y, None
    for bound, pick, passes in ((lo, lax.max, lax.gt), (hi, lax.min, lax.lt)):
        if bound is None:
            continue
        b = literal(bound, d)
        value = pick(value, b)
        inside = passes(y, b) if inside is None else lax.logical_and(inside, passes(y, b))
    if not P.is_float(d) or inside is None:
        return value
    return lax.select(inside, y, lax.stop_gradient(value))


def _clamp_tensor_bounds(y: Any, lo: Any, hi: Any) -> Any:
    """clamp between two tensor bounds with torch's gradients (see the table above), as selects.

    Ties use max/min, whose rule splits the cotangent; NaN bounds make the value NaN without
    taking the gradient from ``x``; a NaN ``x`` with ``lo > hi`` sends it to both ``x`` and ``hi``.
    """
    d = y.dtype
    nan = literal(np.nan, d)
    ordered, open_ = lax.le(lo, hi), lax.lt(lo, hi)
    below = lax.logical_and(lax.lt(y, lo), ordered)
    above = lax.logical_or(lax.logical_and(lax.gt(y, hi), ordered), lax.gt(lo, hi))
    out = lax.select(lax.logical_or(lax.lt(y, lo), lax.gt(y, hi)), nan, y)  # left only where a bound is NaN
    out = lax.select(lax.logical_and(lax.eq(y, hi), open_), lax.min(y, hi), out)
    out = lax.select(lax.logical_and(lax.eq(y, lo), open_), lax.max(y, lo), out)
    out = lax.select(above, hi, out)
    out = lax.select(below, lo, out)
    out = lax.select(lax.logical_and(lax.ne(y, y), lax.gt(lo, hi)), lax.add(y, hi), out)
    bound_nan = lax.logical_or(lax.ne(lo, lo), lax.ne(hi, hi))
    return lax.select(bound_nan, lax.add(out, nan), out)


@register(aten.clamp.default)
def clamp(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002 - ATen's argument names
    return _clamp_scalar_bounds(x, min, max)


@register(aten.clamp.Tensor)
def clamp_tensor(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002
    if min is None and max is None:
        raise unsupported("clamp needs min or max")
    d = _out_dtype()
    shape = out_aval().shape
    y = bcast_full(cast(x, d), shape)
    lo = None if min is None else bcast(cast(min, d), shape)
    hi = None if max is None else bcast(cast(max, d), shape)
    if hi is None:
        return lax.max(y, lo)
    if lo is None:
        return lax.min(y, hi)
    if not P.is_float(d):
        return lax.min(lax.max(y, lo), hi)
    return _clamp_tensor_bounds(y, lo, hi)


@register(aten.clamp_min.default)
def clamp_min(x: Any, min: Any) -> Any:  # noqa: A002
    return _clamp_scalar_bounds(x, min, None)


@register(aten.clamp_max.default)
def clamp_max(x: Any, max: Any) -> Any:  # noqa: A002
    return _clamp_scalar_bounds(x, None, max)


@register(aten.clamp_min.Tensor)
def clamp_min_tensor(x: Any, min: Any) -> Any:  # noqa: A002
    return clamp_tensor(x, min, None)


@register(aten.clamp_max.Tensor)
def clamp_max_tensor(x: Any, max: Any) -> Any:  # noqa: A002
    return clamp_tensor(x, None, max)


@register(aten.hardtanh.default)
def hardtanh(x: Any, min_val: float = -1.0, max_val: float = 1.0) -> Any:
    """Selects on ``x <= min`` and ``x >= max``: 0 at the bounds, and NaN passes its gradient (torch's)."""
    d = _out_dtype()
    y = bcast_full(cast(x, d), out_aval().shape)
    lo, hi = literal(min_val, d), literal(max_val, d)
    y = lax.select(lax.le(y, lo), lo, y)
    return lax.select(lax.ge(y, hi), hi, y)


# ----------------------------------------------------------------------------- comparisons and logic

def _comparison(prim: P.Primitive):
    def rule(x: Any, y: Any) -> Any:
        return elementwise(prim, x, y, dtype=promote(x, y))
    rule.__name__ = prim.name
    return rule


for _name, _prim in (("eq", P.eq_p), ("ne", P.ne_p), ("lt", P.lt_p), ("le", P.le_p), ("gt", P.gt_p),
                     ("ge", P.ge_p)):
    _packet = getattr(aten, _name)
    register(_packet.Tensor, _packet.Scalar)(_comparison(_prim))


@register(aten.isnan.default)
def isnan(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return lax.full(x.shape, False, np.bool_)
    return lax.ne(x, x)


@register(aten.isinf.default)
def isinf(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return lax.full(x.shape, False, np.bool_)
    return lax.eq(lax.abs(x), literal(np.inf, x.dtype))


@register(aten.isposinf.default)
def isposinf(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return lax.full(x.shape, False, np.bool_)
    return lax.eq(x, literal(np.inf, x.dtype))


@register(aten.isneginf.default)
def isneginf(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return lax.full(x.shape, False, np.bool_)
    return lax.eq(x, literal(-np.inf, x.dtype))


@register(aten.isfinite.default)
def isfinite(x: Any) -> Any:
    if not P.is_float(x.dtype):
        return lax.full(x.shape, True, np.bool_)
    return lax.is_finite(x)


@register(aten.nan_to_num.default)
def nan_to_num(x: Any, nan: float | None = 0.0, posinf: float | None = None, neginf: float | None = None) -> Any:
    if not P.is_float(x.dtype):
        return x
    info = np.finfo(x.dtype)
    nan_v = literal(0.0 if nan is None else nan, x.dtype)
    pos_v = literal(info.max if posinf is None else posinf, x.dtype)
    neg_v = literal(info.min if neginf is None else neginf, x.dtype)
    y = lax.select(lax.ne(x, x), nan_v, x)
    y = lax.select(lax.eq(x, literal(np.inf, x.dtype)), pos_v, y)
    return lax.select(lax.eq(x, literal(-np.inf, x.dtype)), neg_v, y)


@register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(condition: Any, x: Any, y: Any) -> Any:
    d = _out_dtype()
    shape = broadcast_shapes(condition, x, y)
    pred = bcast(to_bool(condition), shape)
    return lax.select(pred, bcast(cast(x, d), shape), bcast(cast(y, d), shape))


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(x: Any, mask: Any, value: Any) -> Any:
    return where(mask, value, x)


@register(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(start: Any, end: Any, weight: Any) -> Any:
    """torch's two-sided formula: ``start + w*(end-start)`` for ``|w| < 0.5``, else ``end - (end-start)*(1-w)``."""
    d = _out_dtype()
    shape = out_aval().shape
    s, e, w = (lax.broadcast_to_rank(cast(v, d), shape) for v in (start, end, weight))
    diff = lax.sub(e, s)
    low = lax.add(s, lax.mul(w, diff))
    high = lax.sub(e, lax.mul(diff, lax.sub(literal(1, d), w)))
    return lax.select(lax.lt(lax.abs(w), literal(0.5, d)), low, high)


@register(aten.addcmul.default)
def addcmul(x: Any, t1: Any, t2: Any, value: Any = 1) -> Any:
    d = _out_dtype()
    prod = elementwise(P.mul_p, t1, t2, dtype=d)
    if value != 1:
        prod = elementwise(P.mul_p, prod, value, dtype=d)
    return elementwise(P.add_p, x, prod, dtype=d)


@register(aten.addcdiv.default)
def addcdiv(x: Any, t1: Any, t2: Any, value: Any = 1) -> Any:
    d = _out_dtype()
    q = elementwise(P.div_p, t1, t2, dtype=d)
    if value != 1:
        q = elementwise(P.mul_p, q, value, dtype=d)
    return elementwise(P.add_p, x, q, dtype=d)


# ----------------------------------------------------------------------------- conversion and identity

@register(aten._to_copy.default, torch.ops.prims.convert_element_type.default)
def to_copy(x: Any, *args: Any, **kwargs: Any) -> Any:
    """dtype conversion (device, layout and memory format do not exist in a graph)."""
    return cast(x, _out_dtype())


@register(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.lift_fresh.default,
          aten.detach.default, aten.contiguous.default, aten.alias_copy.default, aten.detach_copy.default,
          aten.positive.default, aten.resolve_conj.default, aten.resolve_neg.default)
def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """Copies and aliases are the same value in a functional graph."""
    return x


@register(aten.copy.default)
def copy(x: Any, src: Any, non_blocking: bool = False) -> Any:
    """Functional ``copy_``: ``src``'s values in ``x``'s shape and dtype."""
    return lax.broadcast_to_rank(cast(src, x.dtype), x.shape)


@register(aten.fill.Scalar, aten.fill.Tensor)
def fill(x: Any, value: Any) -> Any:
    return lax.broadcast_to_rank(cast(value, x.dtype), x.shape)


@register(aten.hypot.default)
def hypot(x: Any, y: Any) -> Any:
    d = float_dtype(_out_dtype())
    a, b = same_shape(x, y, d)
    return lax.sqrt(lax.add(lax.mul(a, a), lax.mul(b, b)))


@register(aten.xlogy.Tensor)
def xlogy(x: Any, y: Any) -> Any:
    """``x * log(y)``, 0 where ``x == 0`` (unless ``y`` is NaN), as the ``xlogy`` composite: its VJP is
    torch's (``xlogy(g, y)`` in ``x``, so a zero cotangent gives 0 where ``log(y)`` is ``-inf``)."""
    return _x_times_log(nn.xlogy, x, y)


@register(aten.special_xlog1py.default)
def xlog1py(x: Any, y: Any) -> Any:
    """``x * log1p(y)`` as the ``xlog1py`` composite (torch's VJP, as ``xlogy``)."""
    return _x_times_log(nn.xlog1py, x, y)


def _x_times_log(composite: Any, x: Any, y: Any) -> Any:
    d = float_dtype(_out_dtype())
    shape = broadcast_shapes(x, y)
    return composite(bcast_full(cast(x, d), shape), bcast_full(cast(y, d), shape))


@register(aten.special_entr.default)
def entr(x: Any) -> Any:
    """``-x log x`` as the ``entr`` composite: torch's slope ``-(1 + log x)``, +inf at 0 (not ``0 * inf``)."""
    return nn.entr(cast(x, float_dtype(_out_dtype())))


@register(aten.sinc.default)
def sinc(x: Any) -> Any:
    """``sin(pi x) / (pi x)``, 1 at 0 with slope 0 there: the quotient sees a stand-in 1 at 0, so its
    gradient is not 0/0 (torch's decomposition selects after dividing and gets NaN)."""
    d = float_dtype(_out_dtype())
    y = cast(x, d)
    zero = lax.eq(y, literal(0, d))
    product = lax.mul(literal(np.pi, d), lax.select(zero, literal(1, d), y))
    return lax.select(zero, literal(1, d), lax.div(lax.sin(product), product))


@register(aten.copysign.Tensor, aten.copysign.Scalar)
def copysign(x: Any, y: Any) -> Any:
    """``|x|`` with the sign of ``y``; ``-0.0`` counts as negative (its reciprocal is ``-inf``)."""
    d = float_dtype(_out_dtype())
    a, b = same_shape(x, y, d)
    magnitude = lax.abs(a)
    return lax.select(_sign_bit_set(b), lax.neg(magnitude), magnitude)


def _sign_bit_set(x: Any) -> Any:
    """Negatives and ``-0.0`` (whose reciprocal is ``-inf``) of a float tensor; a NaN counts as positive."""
    zero = literal(0, x.dtype)
    return lax.logical_or(lax.lt(x, zero), lax.lt(lax.div(literal(1, x.dtype), x), zero))


@register(aten.signbit.default)
def signbit(x: Any) -> Any:
    """Whether the sign bit is set: negatives and ``-0.0`` (whose reciprocal is ``-inf``). A graph cannot
    read a NaN's sign bit, so every NaN counts as positive (torch: ``signbit(-nan)`` is True)."""
    if P.is_bool(x.dtype) or x.dtype.kind == "u":
        return lax.full(x.shape, False, np.bool_)
    if not P.is_float(x.dtype):
        return lax.lt(x, literal(0, x.dtype))
    return _sign_bit_set(x)


@register(aten.angle.default)
def angle(x: Any) -> Any:
    """The argument of a real number: pi for negatives, 0 otherwise (NaN stays NaN); of a complex
    number, ``atan2(imag, real)``."""
    if P.is_complex(x.dtype):
        return lax.atan2(lax.imag(x), lax.real(x))
    d = float_dtype(_out_dtype())
    y = cast(x, d)
    r = lax.select(lax.lt(y, literal(0, d)), literal(np.pi, d), literal(0, d))
    r = bcast(r, y.shape) if y.ndim else r
    return lax.select(lax.ne(y, y), y, r) if P.is_float(d) else r
