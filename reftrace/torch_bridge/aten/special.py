"""Special functions ATen reaches through torch's prims and decompositions: polygamma, modified
Bessel functions, ``ndtri``, ``erfcx``, ``frexp``, ``nextafter``, ``log_ndtr`` — each written with
``reftrace.lax`` as a series or identity that is accurate in float64.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from reftrace import lax
from reftrace.torch_bridge.aten._common import aten, cast, float_dtype, literal, out_aval, register
from reftrace.torch_bridge.aten.elementwise import digamma_of, same_shape


_BERNOULLI_2K = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)  # B_2, B_4, ..., B_14


def _cot_derivative_polynomial(n: int) -> np.ndarray:
    """Coefficients (lowest first) of P_n with d^n/dx^n cot(pi x) = pi^n P_n(cot(pi x))."""
    p = np.array([0.0, 1.0])  # P_0(c) = c
    for _ in range(n):
        dp = np.polynomial.polynomial.polyder(p)
        p = -np.polynomial.polynomial.polymul([1.0, 0.0, 1.0], dp)
    return p


def polygamma_of(n: int, x: Any) -> Any:
    """psi^(n)(x) for n >= 1 from primitives (so its gradient, psi^(n+1), comes from reftrace's VJP).

    x < 1/2 reflects: psi^(n)(x) = (-1)^n psi^(n)(1 - x) - pi^(n+1) P_n(cot(pi x)). For y >= 1/2
    the recurrence psi^(n)(y) = psi^(n)(y + 8) + (-1)^(n+1) n! sum_k (y + k)^-(n+1) moves to
    z = y + 8, where the asymptotic series with Bernoulli numbers B_2..B_14 is accurate to ~1e-15.
    """
    d = x.dtype
    sign = -1.0 if n % 2 == 0 else 1.0  # (-1)^(n+1)
    reflect = lax.lt(x, literal(0.5, d))
    y = lax.select(reflect, lax.sub(literal(1, d), x), x)
    shift = 8
    acc = None
    for k in range(shift):
        term = lax.integer_pow(lax.add(y, literal(k, d)), -(n + 1))
        acc = term if acc is None else lax.add(acc, term)
    w = lax.div(literal(1, d), lax.add(y, literal(shift, d)))
    series = lax.add(lax.mul(literal(math.factorial(n - 1), d), lax.integer_pow(w, n)),
                     lax.mul(literal(math.factorial(n) / 2, d), lax.integer_pow(w, n + 1)))
    for j, b in enumerate(_BERNOULLI_2K, start=1):
        c = b * math.factorial(2 * j + n - 1) / math.factorial(2 * j)
        series = lax.add(series, lax.mul(literal(c, d), lax.integer_pow(w, 2 * j + n)))
    psi_y = lax.mul(literal(sign, d), lax.add(lax.mul(literal(math.factorial(n), d), acc), series))
    x_safe = lax.select(reflect, x, literal(0.25, d))  # the branch not taken never sees a pole
    cot = lax.div(literal(1, d), lax.tan(lax.mul(literal(np.pi, d), x_safe)))
    poly = None
    for coefficient in reversed(_cot_derivative_polynomial(n)):
        poly = literal(coefficient, d) if poly is None else lax.add(lax.mul(poly, cot), literal(coefficient, d))
    reflected = lax.sub(lax.mul(literal((-1.0) ** n, d), psi_y), lax.mul(literal(np.pi ** (n + 1), d), poly))
    return lax.select(reflect, reflected, psi_y)


@register(aten.polygamma.default)
def polygamma(n: int, x: Any) -> Any:
    y = cast(x, float_dtype(out_aval().dtype))
    if n == 0:
        return digamma_of(y)
    return polygamma_of(int(n), y)


# ----------------------------------------------------------------------------- special functions (torch's prims)
# torch decomposes i0/i1/ndtri/erfcx/frexp/nextafter (and their special_ twins) into these prims.

def _series(terms: int, ratio: Any, d: Any) -> Any:
    """``1 + r(1)(1 + r(2)(1 + ...))`` by Horner, where ``ratio(k)`` is term k over term k-1."""
    acc = literal(1, d)
    for k in range(terms, 0, -1):
        acc = lax.add(literal(1, d), lax.mul(ratio(k), acc))
    return acc


_BESSEL_SWITCH = 30.0  # below: the power series (60 terms); above: the asymptotic series (30 terms)


def _bessel_i(nu: int, x: Any, scaled: bool) -> Any:
    """I_nu(x) for nu in {0, 1} (times exp(-|x|) if ``scaled``).

    |x| <= 30: I_nu(x) = (x/2)^nu sum_k (x^2/4)^k / (k! (k+nu)!), all terms positive.
    |x| > 30: I_nu(x) ~ e^|x| / sqrt(2 pi |x|) sum_k (-1)^k a_k(nu) / |x|^k (I_1 is odd). Each branch
    only ever sees inputs in its own range, so the gradient of the other is never inf * 0.
    """
    d = x.dtype
    a = lax.abs(x)
    small = lax.le(a, literal(_BESSEL_SWITCH, d))
    xs = lax.select(small, x, literal(0, d))
    q = lax.mul(lax.mul(xs, xs), literal(0.25, d))
    power = _series(60, lambda k: lax.div(q, literal(k * (k + nu), d)), d)
    if nu == 1:
        power = lax.mul(lax.mul(xs, literal(0.5, d)), power)
    if scaled:
        power = lax.mul(power, lax.exp(lax.neg(lax.abs(xs))))
    xl = lax.select(small, literal(_BESSEL_SWITCH + 1, d), a)
    mu = 4.0 * nu * nu
    asym = _series(30, lambda k: lax.div(literal(-(mu - (2 * k - 1) ** 2) / (8.0 * k), d), xl), d)
    asym = lax.div(asym, lax.sqrt(lax.mul(literal(2 * np.pi, d), xl)))
    if not scaled:
        asym = lax.mul(asym, lax.exp(xl))
    if nu == 1:
        asym = lax.select(lax.lt(x, literal(0, d)), lax.neg(asym), asym)
    return lax.select(small, power, asym)


def _float_arg(x: Any) -> Any:
    return cast(x, float_dtype(out_aval().dtype))


register(torch.ops.prims.bessel_i0.default)(lambda x: _bessel_i(0, _float_arg(x), False))
register(torch.ops.prims.bessel_i0e.default)(lambda x: _bessel_i(0, _float_arg(x), True))
register(torch.ops.prims.bessel_i1.default)(lambda x: _bessel_i(1, _float_arg(x), False))
register(torch.ops.prims.bessel_i1e.default)(lambda x: _bessel_i(1, _float_arg(x), True))


@register(torch.ops.prims.ndtri.default)
def ndtri(p: Any) -> Any:
    """The standard normal quantile: sqrt(2) erfinv(2p - 1), polished by one Newton step on Phi."""
    p = _float_arg(p)
    d = p.dtype
    x0 = lax.mul(literal(np.sqrt(2.0), d), lax.erf_inv(lax.sub(lax.mul(literal(2, d), p), literal(1, d))))
    finite = lax.is_finite(x0)
    xs = lax.select(finite, x0, literal(0, d))
    cdf = lax.mul(literal(0.5, d), lax.erfc(lax.mul(xs, literal(-np.sqrt(0.5), d))))
    pdf = lax.mul(literal(1 / np.sqrt(2 * np.pi), d), lax.exp(lax.mul(literal(-0.5, d), lax.mul(xs, xs))))
    polished = lax.sub(xs, lax.div(lax.sub(cdf, p), pdf))
    return lax.select(finite, polished, x0)


_ERFCX_SWITCH = 25.0


@register(torch.ops.prims.erfcx.default)
def erfcx(x: Any) -> Any:
    """exp(x^2) erfc(x); above x = 25 (erfc near underflow) the asymptotic series in 1/(2x^2)."""
    x = _float_arg(x)
    d = x.dtype
    large = lax.gt(x, literal(_ERFCX_SWITCH, d))
    xs = lax.select(large, literal(0, d), x)
    direct = lax.mul(lax.exp(lax.mul(xs, xs)), lax.erfc(xs))
    xl = lax.select(large, x, literal(_ERFCX_SWITCH + 1, d))
    inv = lax.div(literal(1, d), lax.mul(literal(2, d), lax.mul(xl, xl)))
    asym = _series(12, lambda k: lax.mul(literal(-(2 * k - 1), d), inv), d)
    asym = lax.div(asym, lax.mul(xl, literal(np.sqrt(np.pi), d)))
    return lax.select(large, asym, direct)


def _exp2_int(e: Any, d: Any) -> Any:
    """2^e for an integer-valued float ``e`` in [-2044, 2046], as two normal-range factors (each exact)."""
    half = lax.floor(lax.mul(e, literal(0.5, d)))
    return lax.pow(literal(2, d), half), lax.pow(literal(2, d), lax.sub(e, half))


def _binade(a: Any, d: Any) -> Any:
    """The exponent e with 2^(e-1) <= a < 2^e for finite a > 0, exactly (log2's guess corrected by one)."""
    e = lax.add(lax.floor(lax.div(lax.log(a), literal(np.log(2.0), d))), literal(1, d))
    s1, s2 = _exp2_int(lax.neg(e), d)
    m = lax.mul(lax.mul(a, s1), s2)
    e = lax.select(lax.ge(m, literal(1, d)), lax.add(e, literal(1, d)), e)
    return lax.select(lax.lt(m, literal(0.5, d)), lax.sub(e, literal(1, d)), e)


@register(torch.ops.prims.frexp.default)
def frexp(x: Any) -> tuple[Any, Any]:
    """x = mantissa * 2^exponent with 0.5 <= |mantissa| < 1; zeros, infinities and NaN keep exponent 0."""
    d = x.dtype
    regular = lax.logical_and(lax.is_finite(x), lax.ne(x, literal(0, d)))
    a = lax.select(regular, lax.abs(x), literal(1, d))
    e = _binade(a, d)
    s1, s2 = _exp2_int(lax.neg(e), d)
    mantissa = lax.select(regular, lax.mul(lax.mul(x, s1), s2), x)
    exponent = lax.select(regular, e, literal(0, d))
    return mantissa, cast(exponent, out_aval(1).dtype)


@register(torch.ops.prims.nextafter.default)
def nextafter(x: Any, y: Any) -> Any:
    """The next float after x toward y: x plus or minus one unit in the last place of x's binade."""
    d = out_aval().dtype
    x, y = same_shape(x, y, d)
    info = np.finfo(d)
    digits = info.nmant + 1
    tiny = literal(float(info.smallest_subnormal), d)
    a = lax.abs(x)
    regular = lax.logical_and(lax.is_finite(x), lax.ne(x, literal(0, d)))
    e = _binade(lax.select(regular, a, literal(1, d)), d)
    away = lax.eq(lax.lt(x, y), lax.gt(x, literal(0, d)))  # moving away from zero
    at_power_of_two = lax.eq(lax.mul(lax.mul(a, _exp2_int(lax.neg(e), d)[0]), _exp2_int(lax.neg(e), d)[1]),
                             literal(0.5, d))
    step_exp = lax.sub(e, literal(digits, d))
    step_exp = lax.select(lax.logical_and(at_power_of_two, lax.bitwise_not(away)),
                          lax.sub(step_exp, literal(1, d)), step_exp)
    s1, s2 = _exp2_int(lax.max(step_exp, literal(float(info.minexp - 1), d)), d)
    ulp = lax.mul(s1, s2)
    ulp = lax.select(lax.lt(step_exp, literal(float(info.minexp - info.nmant), d)), tiny, ulp)
    toward = lax.select(lax.lt(x, y), ulp, lax.neg(ulp))
    stepped = lax.add(x, toward)
    stepped = lax.select(lax.eq(stepped, literal(0, d)), lax.mul(x, literal(0, d)), stepped)  # zero keeps x's sign
    from_zero = lax.select(lax.lt(x, y), tiny, lax.neg(tiny))
    result = lax.select(lax.eq(x, literal(0, d)), from_zero, stepped)
    # from an infinity toward anything else: the largest finite value of its sign
    infinite = lax.logical_and(lax.bitwise_not(lax.is_finite(x)), lax.eq(x, x))
    largest = lax.select(lax.gt(x, literal(0, d)), literal(float(info.max), d), literal(float(-info.max), d))
    result = lax.select(infinite, largest, result)
    result = lax.select(lax.eq(x, y), y, result)
    nan = lax.logical_or(lax.ne(x, x), lax.ne(y, y))
    return lax.select(nan, lax.add(x, y), result)


@register(aten.special_log_ndtr.default)
def log_ndtr(x: Any) -> Any:
    """log Phi(x): log(erfcx(-x/sqrt2)/2) - x^2/2 below -1, log1p(-erfc(x/sqrt2)/2) above.

    Each branch sees only inputs from its own side, so the far tail's gradient is finite
    (torch's decomposition selects between the two and gets 0 * inf there).
    """
    x = _float_arg(x)
    d = x.dtype
    low = lax.lt(x, literal(-1, d))
    xn = lax.select(low, x, literal(-2, d))
    tail = lax.sub(lax.log(lax.mul(erfcx(lax.mul(xn, literal(-np.sqrt(0.5), d))), literal(0.5, d))),
                   lax.mul(literal(0.5, d), lax.mul(xn, xn)))
    xp = lax.select(low, literal(0, d), x)
    body = lax.log1p(lax.mul(literal(-0.5, d), lax.erfc(lax.mul(xp, literal(np.sqrt(0.5), d)))))
    return lax.select(low, tail, body)
