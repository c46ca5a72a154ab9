"""ReLU, GELU, SiLU, hard sigmoid, softmax and log-softmax as composites, with composite backward equations.

The backward equations (``relu_backward``, ``gelu_backward``, ``silu_backward``, ``softmax_backward``,
``log_softmax_backward``) are ATen's: torch lowers each to its one kernel. They have no VJP rule of their own, so
second derivatives go through their decompositions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import accumulation_dtype, along, cast, const, other_axes
from reftrace.transforms.vjp_rules import vjp_rules

_SQRT_HALF = float(np.sqrt(0.5))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_TANH_CUBIC = 0.044715


# ----------------------------------------------------------------------------- relu

def _relu(x: Any) -> Any:
    """``select(x <= 0, 0, x)``: NaN stays NaN."""
    zero = const(0, x.dtype)
    return lax.select(lax.le(x, zero), along(zero, x.shape, ()), x)


def _relu_backward(g: Any, y: Any) -> Any:
    """The cotangent where the output is positive (or NaN): slope 0 at 0, 1 at NaN, as torch's
    ``threshold_backward``. It reads the output, which the next layer keeps anyway, rather
    than a saved mask."""
    zero = const(0, y.dtype)
    return lax.select(lax.le(y, zero), along(zero, g.shape, ()), g)


relu_p = define_composite("relu", _relu)
relu_backward_p = define_composite("relu_backward", _relu_backward)


def relu(x: Any) -> Any:
    """``max(x, 0)`` with torch's conventions: gradient 0 at 0, NaN passes with gradient 1."""
    return lax.bind(relu_p, x)


vjp_rules[relu_p] = lambda cts, primals, outs: (lax.bind(relu_backward_p, cts[0], outs[0]),)


# ----------------------------------------------------------------------------- gelu

def _gelu(x: Any, *, approximate: str) -> Any:
    d = x.dtype
    half = lax.mul(const(0.5, d), x)
    if approximate == "tanh":
        inner = lax.mul(const(_SQRT_2_OVER_PI, d), lax.add(x, lax.mul(const(_TANH_CUBIC, d), lax.integer_pow(x, 3))))
        return lax.mul(half, lax.add(const(1, d), lax.tanh(inner)))
    return lax.mul(half, lax.add(const(1, d), lax.erf(lax.mul(x, const(_SQRT_HALF, d)))))


def _gelu_backward(g: Any, x: Any, *, approximate: str) -> Any:
    d = x.dtype
    one, half = const(1, d), const(0.5, d)
    if approximate == "tanh":
        inner = lax.mul(const(_SQRT_2_OVER_PI, d), lax.add(x, lax.mul(const(_TANH_CUBIC, d), lax.integer_pow(x, 3))))
        t = lax.tanh(inner)
        d_inner = lax.mul(const(_SQRT_2_OVER_PI, d),
                          lax.add(one, lax.mul(const(3 * _TANH_CUBIC, d), lax.mul(x, x))))
        slope = lax.add(lax.mul(half, lax.add(one, t)),
                        lax.mul(lax.mul(half, x), lax.mul(lax.sub(one, lax.mul(t, t)), d_inner)))
    else:
        cdf = lax.mul(half, lax.add(one, lax.erf(lax.mul(x, const(_SQRT_HALF, d)))))
        pdf = lax.mul(const(_INV_SQRT_2PI, d), lax.exp(lax.mul(const(-0.5, d), lax.mul(x, x))))
        slope = lax.add(cdf, lax.mul(x, pdf))
    return lax.mul(g, slope)


gelu_p = define_composite("gelu", _gelu)
gelu_backward_p = define_composite("gelu_backward", _gelu_backward)


def gelu(x: Any, approximate: str = "none") -> Any:
    """x * Phi(x) (``approximate="tanh"``: the tanh approximation), as ``torch.nn.functional.gelu``."""
    if approximate not in ("none", "tanh"):
        from reftrace.errors import ArgumentError
        raise ArgumentError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return lax.bind(gelu_p, x, approximate=approximate)


def _gelu_vjp(cts, primals, outs, *, approximate):
    return (lax.bind(gelu_backward_p, cts[0], primals[0], approximate=approximate),)


vjp_rules[gelu_p] = _gelu_vjp


# ----------------------------------------------------------------------------- silu

def _in_float32_if_half(fn: Any) -> Any:
    """``fn`` computed as torch's CPU kernels compute it: float16/bfloat16 in float32, rounded once."""
    def wrapped(*operands: Any) -> Any:
        acc = accumulation_dtype(operands[0].dtype)
        return cast(fn(*(cast(v, acc) for v in operands)), operands[0].dtype)
    return wrapped


def _silu_of(x: Any) -> Any:
    """``x / (1 + exp(-x))``, torch's formula (``x * sigmoid(x)`` rounds differently)."""
    return lax.div(x, lax.add(const(1, x.dtype), lax.exp(lax.neg(x))))


def _silu_backward_of(g: Any, x: Any) -> Any:
    """``g * s * (1 + x * (1 - s))`` with ``s = 1 / (1 + exp(-x))``, ``silu_backward``'s formula."""
    one = const(1, x.dtype)
    s = lax.div(one, lax.add(one, lax.exp(lax.neg(x))))
    return lax.mul(lax.mul(g, s), lax.add(one, lax.mul(x, lax.sub(one, s))))


silu_p = define_composite("silu", _in_float32_if_half(_silu_of))
silu_backward_p = define_composite("silu_backward", _in_float32_if_half(_silu_backward_of))


def silu(x: Any) -> Any:
    """``x * sigmoid(x)`` (swish), as ``torch.nn.functional.silu``."""
    return lax.bind(silu_p, x)


vjp_rules[silu_p] = lambda cts, primals, outs: (lax.bind(silu_backward_p, cts[0], primals[0]),)


# ----------------------------------------------------------------------------- hard sigmoid

_ONE_SIXTH_IN_FLOAT32 = float(np.float32(1) / np.float32(6))
"""torch's ``hardsigmoid_backward`` slope, ``1.0f / 6.0f``: a float32 constant in its float64 kernel too."""


def _inside_hard_range(x: Any) -> Any:
    """``-3 < x < 3``, where the hard sigmoid has a slope (torch's: none at -3, 3 and NaN)."""
    d = x.dtype
    return lax.logical_and(lax.gt(x, const(-3, d)), lax.lt(x, const(3, d)))


def _hardsigmoid(x: Any) -> Any:
    """``min(max(x + 3, 0), 6) / 6`` (torch's kernel: NaN stays NaN), differentiable strictly inside (-3, 3)."""
    d = x.dtype
    value = lax.div(lax.min(lax.max(lax.add(x, const(3, d)), const(0, d)), const(6, d)), const(6, d))
    return lax.select(_inside_hard_range(x), value, lax.stop_gradient(value))


def _hardsigmoid_backward(g: Any, x: Any) -> Any:
    """``g / 6`` as torch's kernel computes it (``g * (1.0f / 6.0f)``) strictly inside (-3, 3), else 0 (NaN too)."""
    zero = along(const(0, x.dtype), x.shape, ())
    return lax.select(_inside_hard_range(x), lax.mul(g, const(_ONE_SIXTH_IN_FLOAT32, x.dtype)), zero)


hardsigmoid_p = define_composite("hardsigmoid", _hardsigmoid)
hardsigmoid_backward_p = define_composite("hardsigmoid_backward", _hardsigmoid_backward)


def hardsigmoid(x: Any) -> Any:
    """``relu6(x + 3) / 6`` with torch's gradient: ``1.0f / 6.0f`` strictly inside (-3, 3), else 0 (NaN too)."""
    return lax.bind(hardsigmoid_p, x)


vjp_rules[hardsigmoid_p] = lambda cts, primals, outs: (lax.bind(hardsigmoid_backward_p, cts[0], primals[0]),)


# ----------------------------------------------------------------------------- softmax, log_softmax

def _stable_shift(x: Any, axis: int) -> Any:
    """x minus its max along ``axis`` (infinite maxima replaced by 0, so all -inf rows stay NaN-free)."""
    m = lax.reduce_max(x, (axis,))
    m = lax.select(lax.is_finite(m), m, lax.full(m.shape, 0, m.dtype))
    return lax.sub(x, along(m, x.shape, other_axes(x.ndim, (axis,))))


def _row_sum(x: Any, axis: int) -> Any:
    """The sum along ``axis``, broadcast back to ``x``'s shape."""
    return along(lax.reduce_sum(x, (axis,)), x.shape, other_axes(x.ndim, (axis,)))


def _softmax(x: Any, *, axis: int) -> Any:
    e = lax.exp(_stable_shift(x, axis))
    return lax.div(e, _row_sum(e, axis))


def _log_softmax(x: Any, *, axis: int) -> Any:
    shifted = _stable_shift(x, axis)
    return lax.sub(shifted, lax.log(_row_sum(lax.exp(shifted), axis)))


def _softmax_backward(g: Any, y: Any, *, axis: int) -> Any:
    return lax.mul(y, lax.sub(g, _row_sum(lax.mul(g, y), axis)))


def _log_softmax_backward(g: Any, y: Any, *, axis: int) -> Any:
    return lax.sub(g, lax.mul(lax.exp(y), _row_sum(g, axis)))


softmax_p = define_composite("softmax", _softmax)
log_softmax_p = define_composite("log_softmax", _log_softmax)
softmax_backward_p = define_composite("softmax_backward", _softmax_backward)
log_softmax_backward_p = define_composite("log_softmax_backward", _log_softmax_backward)


def softmax(x: Any, axis: int) -> Any:
    """exp(x) / sum(exp(x)) along ``axis`` (a non-negative axis of a rank >= 1 floating ``x``)."""
    return lax.bind(softmax_p, x, axis=axis)


def log_softmax(x: Any, axis: int) -> Any:
    """x - logsumexp(x) along ``axis``."""
    return lax.bind(log_softmax_p, x, axis=axis)


def _softmax_vjp(cts, primals, outs, *, axis):
    return (lax.bind(softmax_backward_p, cts[0], outs[0], axis=axis),)


def _log_softmax_vjp(cts, primals, outs, *, axis):
    return (lax.bind(log_softmax_backward_p, cts[0], outs[0], axis=axis),)


vjp_rules[softmax_p] = _softmax_vjp
vjp_rules[log_softmax_p] = _log_softmax_vjp
