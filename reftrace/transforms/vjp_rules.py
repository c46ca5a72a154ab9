"""VJP rules: ``vjp_rules[primitive]``, reftrace's own table of derivatives.

Every rule has one signature::

    rule(cts, primals, outs, **params) -> tuple[TracedArray | None, ...]

- ``cts``: one cotangent per output of the equation; ``None`` is a symbolic zero
  (a rule is only called when at least one is not ``None``).
- ``primals``: the equation's operands, ``outs``: its outputs, both as
  ``TracedArray`` values of the joint graph being built (a Literal operand is a
  ``TracedArray`` holding that Literal), so rules may reuse ``exp x`` and friends.
- ``params``: the equation's parameters, as keywords.
- returns one cotangent per operand, ``None`` for "zero / not differentiable".
  Returning a cotangent for an operand that needs none is harmless: ``vjp``
  drops backward equations whose results are never used.

Rules are written with ``reftrace.lax`` only, so everything they emit is made of
primitives that themselves have rules here: ``vjp(vjp(g))`` needs nothing extra.
Choices at non-differentiable points are listed in docs/autodiff.md.

Complex values follow PyTorch's convention (docs/complex.md): the cotangent of a complex
value is ``dL/d(re) + i dL/d(im)``, so a rule is the adjoint under ``Re(sum(conj(a) * b))``:
a holomorphic ``f`` gives ``ct * conj(f'(x))``, a product ``ct * conj(other)``. Rules
conjugate with ``lax.conj_if_complex``, which leaves real values alone.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.composite import is_composite
from reftrace.graph import Aval
from reftrace.lax import TracedArray
from reftrace.primitives import Primitive, is_float
from reftrace.transforms.linalg_vjp_rules import linalg_vjp_rules

Cotangent = TracedArray | None
VjpRule = Callable[..., tuple[Cotangent, ...]]

vjp_rules: dict[Primitive, VjpRule] = {}
vjp_rules.update(linalg_vjp_rules)  # the matrix factorizations: transforms/linalg_vjp_rules.py


# ----------------------------------------------------------------------------- small helpers

def _const(value: float, like: TracedArray) -> TracedArray:
    """A rank-0 constant of ``like``'s dtype (rank-0 operands broadcast in elementwise ops)."""
    return lax.constant(value, like.dtype)


def _unbroadcast(ct: TracedArray, aval: Any) -> TracedArray:
    """Sum a cotangent back to a rank-0 operand that an elementwise op broadcast."""
    if aval.ndim == 0 and ct.ndim > 0:
        return lax.reduce_sum(ct, tuple(range(ct.ndim)))
    return ct


def _as_float(mask: TracedArray, like: TracedArray) -> TracedArray:
    return lax.convert_element_type(mask, like.dtype)


def _nothing(cts: Sequence[Cotangent], primals: Sequence[TracedArray], outs: Sequence[TracedArray],
             **params: Any) -> tuple[Cotangent, ...]:
    """Zero cotangent for every operand: piecewise-constant or non-float primitives."""
    return (None,) * len(primals)


def _register(prims: Sequence[Primitive] | Primitive):
    prims = (prims,) if isinstance(prims, Primitive) else tuple(prims)

    def deco(rule: VjpRule) -> VjpRule:
        for p in prims:
            vjp_rules[p] = rule
        return rule
    return deco


# ----------------------------------------------------------------------------- elementwise unary

def _unary(prim: Primitive, derivative: Callable[[TracedArray, TracedArray], TracedArray]) -> None:
    """``ct_x = ct * conj(f'(x))``; ``derivative(x, out)`` may use the forward output."""
    def rule(cts, primals, outs, **params):
        (ct,), (x,), (out,) = cts, primals, outs
        return (lax.mul(ct, lax.conj_if_complex(derivative(x, out))),)
    rule.__name__ = f"{prim.name}_vjp"
    vjp_rules[prim] = rule


def _fused_unary(prim: Primitive, backward: Callable[[TracedArray, TracedArray], TracedArray],
                 widened: Sequence[str] = ("float16", "bfloat16")) -> None:
    """For primitives whose torch backward is one fused kernel: ``backward(ct, out)`` is that kernel's
    formula, in its order of operations (``sigmoid_backward``: ``ct * (1 - y) * y``), and in the
    ``widened`` dtypes (by name) it is computed in float32 and rounded once, as the kernel does (rounding
    ``1 - y*y`` to bfloat16 first moved the gradient). Complex values take ``_unary``'s conjugate."""
    def rule(cts, primals, outs, **params):
        (ct,), (x,), (out,) = cts, primals, outs
        if P.is_complex(x.dtype):
            return (lax.mul(ct, lax.conj(backward(lax.full(out.shape, 1, out.dtype), out))),)
        if np.dtype(x.dtype).name not in widened:
            return (backward(ct, out),)
        wide = np.dtype(np.float32)
        grad = backward(lax.convert_element_type(ct, wide), lax.convert_element_type(out, wide))
        return (lax.convert_element_type(grad, x.dtype),)
    rule.__name__ = f"{prim.name}_vjp"
    vjp_rules[prim] = rule


def _one_minus_square(x: TracedArray) -> TracedArray:
    return lax.sub(_const(1, x), lax.mul(x, x))


def _trigamma(x: TracedArray) -> TracedArray:
    """psi'(x) from primitives: recurrence to z = y + 8, then the asymptotic series.

    For x < 0.5, reflection: psi'(x) = pi^2 / sin^2(pi x) - psi'(1 - x). The sine
    only ever sees a safe stand-in where the reflection is not chosen, so the
    second derivative has no 0 * inf from the branch not taken.
    """
    reflect = lax.lt(x, _const(0.5, x))
    y = lax.select(reflect, lax.sub(_const(1, x), x), x)  # y >= 0.5
    acc = None
    for k in range(8):
        term = lax.integer_pow(lax.add(y, _const(k, x)), -2)
        acc = term if acc is None else lax.add(acc, term)
    w = lax.div(_const(1, x), lax.add(y, _const(8, x)))
    w2 = lax.mul(w, w)
    poly = _const(7 / 6, x)  # Bernoulli numbers B_2k for the w^(2k+1) terms, B_14 first
    for c in (-691 / 2730, 5 / 66, -1 / 30, 1 / 42, -1 / 30, 1 / 6):
        poly = lax.add(_const(c, x), lax.mul(w2, poly))
    series = lax.add(lax.add(w, lax.mul(_const(0.5, x), w2)), lax.mul(lax.mul(w, w2), poly))
    psi1_y = lax.add(acc, series)
    x_safe = lax.select(reflect, x, _const(0.25, x))
    s = lax.sin(lax.mul(_const(math.pi, x), x_safe))
    reflected = lax.sub(lax.div(_const(math.pi ** 2, x), lax.mul(s, s)), psi1_y)
    return lax.select(reflect, reflected, psi1_y)


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)

_unary(P.exp_p, lambda x, out: out)
_register(P.log_p)(lambda cts, primals, outs: (lax.div(cts[0], lax.conj_if_complex(primals[0])),))  # torch's order
_register(P.log1p_p)(lambda cts, primals, outs: (  # torch's order: ct / conj(x + 1)
    lax.div(cts[0], lax.conj_if_complex(lax.add(primals[0], _const(1, primals[0])))),))
_unary(P.expm1_p, lambda x, out: lax.add(out, _const(1, x)))
# torch's tanh_backward kernel fuses ``y*y`` into the subtraction (one rounding): float32 gradients can be an ulp
# off eager's. A composite would match it, but would put a composite into the vjp of a decomposed graph
_fused_unary(P.tanh_p, lambda ct, y: lax.mul(ct, _one_minus_square(y)))
# sigmoid_backward widens bfloat16 only: its float16 kernel rounds after each operation
_fused_unary(P.logistic_p, lambda ct, y: lax.mul(lax.mul(ct, lax.sub(_const(1, y), y)), y),
             widened=("bfloat16",))
_unary(P.sin_p, lambda x, out: lax.cos(x))
_unary(P.cos_p, lambda x, out: lax.neg(lax.sin(x)))
_unary(P.tan_p, lambda x, out: lax.add(_const(1, x), lax.mul(out, out)))
_unary(P.asin_p, lambda x, out: lax.rsqrt(_one_minus_square(x)))
_unary(P.acos_p, lambda x, out: lax.neg(lax.rsqrt(_one_minus_square(x))))
_unary(P.atan_p, lambda x, out: lax.div(_const(1, x), lax.add(_const(1, x), lax.mul(x, x))))
_unary(P.sinh_p, lambda x, out: lax.cosh(x))
_unary(P.cosh_p, lambda x, out: lax.sinh(x))
_unary(P.asinh_p, lambda x, out: lax.rsqrt(lax.add(lax.mul(x, x), _const(1, x))))
_unary(P.acosh_p, lambda x, out: (  # torch's: rsqrt(x² - 1) on reals (finite below -1, where acosh is NaN, so a
    # masked-out term gives 0); the product of the two roots on complex, the principal branch
    lax.mul(lax.rsqrt(lax.sub(x, _const(1, x))), lax.rsqrt(lax.add(x, _const(1, x)))) if P.is_complex(x.dtype)
    else lax.rsqrt(lax.sub(lax.mul(x, x), _const(1, x)))))
_unary(P.atanh_p, lambda x, out: lax.div(_const(1, x), _one_minus_square(x)))
_unary(P.cbrt_p, lambda x, out: lax.mul(_const(1 / 3, x), lax.integer_pow(out, -2)))
_unary(P.erf_p, lambda x, out: lax.mul(_const(_TWO_OVER_SQRT_PI, x), lax.exp(lax.neg(lax.mul(x, x)))))
_unary(P.erfc_p, lambda x, out: lax.mul(_const(-_TWO_OVER_SQRT_PI, x), lax.exp(lax.neg(lax.mul(x, x)))))
_unary(P.erf_inv_p, lambda x, out: lax.mul(_const(1 / _TWO_OVER_SQRT_PI, x), lax.exp(lax.mul(out, out))))
_unary(P.lgamma_p, lambda x, out: lax.digamma(x))
_unary(P.digamma_p, lambda x, out: _trigamma(x))


# Where torch's derivative formula is a few ATen ops, the rule is written in that formula's order of
# operations, so that a graph run by torch (``nop``) rounds as eager's backward does in float32.


@_register(P.sqrt_p)
def _sqrt_vjp(cts, primals, outs):
    """``ct / (2 * sqrt(x))`` (sqrt'(0) = inf)."""
    (ct,), (out,) = cts, outs
    return (lax.div(ct, lax.conj_if_complex(lax.mul(_const(2, out), out))),)


@_register(P.rsqrt_p)
def _rsqrt_vjp(cts, primals, outs):
    """``(-0.5 * ct) * rsqrt(x)**3``."""
    (ct,), (out,) = cts, outs
    return (lax.mul(lax.mul(ct, _const(-0.5, ct)), lax.conj_if_complex(lax.integer_pow(out, 3))),)


@_register(P.abs_p)
def _abs_vjp(cts, primals, outs):
    """``ct * sign(x)``: abs'(0) = 0, and 0 at NaN (a masked-out L1 term with a NaN target), as torch's
    ``sgn``; a complex ``x`` gets the real ``ct`` along ``x / |x|``."""
    (ct,), (x,) = cts, primals
    if P.is_complex(x.dtype):
        return (lax.mul(lax.complex(ct, _const(0, ct)), lax.sign(x)),)
    return (lax.mul(ct, lax.select(lax.ne(x, x), _const(0, x), lax.sign(x))),)


@_register(P.sign_p)
def _sign_vjp(cts, primals, outs):
    """Piecewise constant on reals. On complex ``s = x / |x|`` moves only along the unit circle: the
    cotangent's component tangent to it, over ``|x|`` (0 at 0, as torch's ``sgn``)."""
    (ct,), (x,), (s,) = cts, primals, outs
    if not P.is_complex(x.dtype):
        return (None,)
    r = lax.abs(x)
    radial = lax.real(lax.mul(lax.conj(s), ct))              # Re(conj(s) ct): the part along s
    tangent = lax.sub(ct, lax.mul(lax.complex(radial, _const(0, radial)), s))
    zero = lax.eq(r, _const(0, r))
    safe_r = lax.select(zero, _const(1, r), r)
    scaled = lax.div(tangent, lax.complex(safe_r, _const(0, safe_r)))
    return (lax.select(zero, _const(0, scaled), scaled),)


@_register(P.neg_p)
def _neg_vjp(cts, primals, outs):
    return (lax.neg(cts[0]),)


@_register(P.integer_pow_p)
def _integer_pow_vjp(cts, primals, outs, *, y):
    (ct,), (x,) = cts, primals
    if y == 0:
        return (None,)
    if y == 1:
        return (ct,)
    slope = x if y == 2 else lax.integer_pow(x, y - 1)
    return (lax.mul(ct, lax.conj_if_complex(lax.mul(_const(y, x), slope))),)


# Piecewise constant: derivative zero almost everywhere (and zero at the jumps, as JAX and torch).
_register((P.floor_p, P.ceil_p, P.round_p))(_nothing)
# Operate on bool/int only; never reached by a float cotangent but listed so the table is total.
_register((P.not_p, P.and_p, P.or_p, P.xor_p))(_nothing)
# Non-differentiable: bool/int outputs, random draws, and the explicit gradient stop.
_register(P.COMPARISONS + (P.is_finite_p, P.argmax_p, P.argmin_p, P.iota_p, P.random_p, P.random_fold_in_p,
                           P.reduce_and_p, P.reduce_or_p, P.stop_gradient_p))(_nothing)


# ----------------------------------------------------------------------------- elementwise binary

def _binary(prim: Primitive, partials: Callable[..., tuple[Cotangent, Cotangent]]) -> None:
    """``partials(ct, x, y, out) -> (ct_x, ct_y)``; rank-0 operands get their cotangent summed."""
    def rule(cts, primals, outs, **params):
        (ct,), (x, y), (out,) = cts, primals, outs
        ct_x, ct_y = partials(ct, x, y, out)
        return (None if ct_x is None else _unbroadcast(ct_x, x.aval),
                None if ct_y is None else _unbroadcast(ct_y, y.aval))
    rule.__name__ = f"{prim.name}_vjp"
    vjp_rules[prim] = rule


def _pow_partials(ct, x, y, out):
    # d/dx: y * x^(y-1), but 0 where y == 0 (so 0^0 has slope 0, not nan). d/dy: out * log x with a
    # log(1) stand-in at x == 0 for y >= 0 (slope 0, not 0 * -inf); at x == 0 with y < 0 it stays
    # inf * log(0) = -inf, torch's value (JAX puts the stand-in there too and gets inf * 0 = nan).
    # Complex: the same with conjugated slopes, the stand-in wherever x == 0 (no order on complex y).
    zero, one = _const(0, x), _const(1, x)
    slope_x = lax.select(lax.eq(y, zero), zero, lax.mul(y, lax.pow(x, lax.sub(y, one))))
    x_zero = lax.eq(x, zero)
    flat_at_zero = x_zero if P.is_complex(x.dtype) else lax.logical_and(x_zero, lax.ge(y, zero))
    log_x = lax.log(lax.select(flat_at_zero, one, x))
    conj = lax.conj_if_complex
    return lax.mul(ct, conj(slope_x)), lax.mul(ct, conj(lax.mul(out, log_x)))


def _choice_weight(a: TracedArray, b: TracedArray, b_wins: Callable) -> TracedArray:
    """0 where ``b`` is chosen, 0.5 on a tie, 1 otherwise: JAX and torch split ties equally, and a NaN
    operand (the result is NaN) sends the whole cotangent to both, as torch does (JAX sends none)."""
    one = _const(1, a)
    not_lost = lax.select(lax.eq(a, b), _const(0.5, a), one)
    return lax.select(b_wins(b, a), _const(0, a), not_lost)


def _rem_partials(ct, x, y, out):
    quotient = lax.div(x, y)
    truncated = lax.mul(lax.sign(quotient), lax.floor(lax.abs(quotient)))
    return ct, lax.neg(lax.mul(ct, truncated))


def _div_partials(ct, x, y, out):
    # torch's order: ct / conj(y) and -ct * conj((x / y) / y), without squaring y
    return lax.div(ct, lax.conj_if_complex(y)), lax.neg(lax.mul(ct, lax.conj_if_complex(lax.div(out, y))))


def _atan2_partials(ct, x, y, out):
    scaled = lax.div(ct, lax.add(lax.mul(x, x), lax.mul(y, y)))
    return lax.mul(scaled, y), lax.neg(lax.mul(scaled, x))


_binary(P.add_p, lambda ct, x, y, out: (ct, ct))
_binary(P.sub_p, lambda ct, x, y, out: (ct, lax.neg(ct)))
_binary(P.mul_p, lambda ct, x, y, out: (lax.mul(ct, lax.conj_if_complex(y)), lax.mul(ct, lax.conj_if_complex(x))))
_binary(P.div_p, _div_partials)
_binary(P.rem_p, _rem_partials)
_binary(P.pow_p, _pow_partials)
_binary(P.atan2_p, _atan2_partials)
_binary(P.max_p, lambda ct, x, y, out: (lax.mul(ct, _choice_weight(x, y, lax.gt)),
                                         lax.mul(ct, _choice_weight(y, x, lax.gt))))
_binary(P.min_p, lambda ct, x, y, out: (lax.mul(ct, _choice_weight(x, y, lax.lt)),
                                         lax.mul(ct, _choice_weight(y, x, lax.lt))))


@_register(P.select_p)
def _select_vjp(cts, primals, outs):
    (ct,), (pred, on_true, on_false) = cts, primals
    zero = _const(0, ct)
    return (None,
            _unbroadcast(lax.select(pred, ct, zero), on_true.aval),
            _unbroadcast(lax.select(pred, zero, ct), on_false.aval))


@_register(P.convert_element_type_p)
def _convert_vjp(cts, primals, outs, *, new_dtype):
    """Real to complex embeds (the cotangent's real part flows back); complex to real keeps the real
    part (the cotangent comes back as a real part); to or from integers/bool: piecewise constant."""
    (ct,), (x,) = cts, primals
    if not (P.is_inexact(x.dtype) and P.is_inexact(new_dtype)):
        return (None,)
    if P.is_complex(ct.dtype) and not P.is_complex(x.dtype):
        ct = lax.real(ct)
    elif P.is_complex(x.dtype) and not P.is_complex(ct.dtype):
        ct = lax.convert_element_type(ct, P.real_dtype(x.dtype))
        ct = lax.complex(ct, _const(0, ct))
    return (lax.convert_element_type(ct, x.dtype),)


# ----------------------------------------------------------------------------- complex numbers

@_register(P.real_p)
def _real_vjp(cts, primals, outs):
    return (lax.complex(cts[0], _const(0, cts[0])),)


@_register(P.imag_p)
def _imag_vjp(cts, primals, outs):
    return (lax.complex(_const(0, cts[0]), cts[0]),)


@_register(P.conj_p)
def _conj_vjp(cts, primals, outs):
    return (lax.conj(cts[0]),)


@_register(P.complex_p)
def _complex_vjp(cts, primals, outs):
    (ct,), (re, im) = cts, primals
    return _unbroadcast(lax.real(ct), re.aval), _unbroadcast(lax.imag(ct), im.aval)


def _scale(x: TracedArray, factor: float) -> TracedArray:
    return x if factor == 1 else lax.mul(x, _const(factor, x))


@_register(P.fft_p)
def _fft_vjp(cts, primals, outs, *, fft_type, fft_lengths):
    """The adjoints of the DFT matrices F (under Re(sum(conj(a) b))): F^H = n * ifft for ``fft``,
    F / n for ``ifft``; ``rfft`` keeps the first half, so its adjoint zero-pads, applies F^H and
    keeps the real part; ``irfft`` (y = Re(sum_k w_k X_k e^(2 pi i k n / N)) / N, w_k = 2 for the
    bins that stand for a conjugate pair, else 1) has adjoint w * rfft(ct) / N."""
    (ct,), (x,) = cts, primals
    n = math.prod(fft_lengths)
    if fft_type == "fft":
        return (_scale(lax.fft(ct, "ifft", fft_lengths), n),)
    if fft_type == "ifft":
        return (_scale(lax.fft(ct, "fft", fft_lengths), 1 / n),)
    if fft_type == "rfft":
        last = fft_lengths[-1]
        full = lax.pad(ct, _const(0, ct), [(0, last - ct.shape[-1] if d == ct.ndim - 1 else 0, 0)
                                            for d in range(ct.ndim)])
        return (lax.real(_scale(lax.fft(full, "ifft", fft_lengths), n)),)
    last = fft_lengths[-1]
    bins = x.shape[-1]
    paired = np.full((bins,), 2.0)
    paired[0] = 1.0
    if last % 2 == 0:
        paired[-1] = 1.0
    weights = lax.constant(paired / n, P.real_dtype(x.dtype))
    spectrum = lax.fft(ct, "rfft", fft_lengths)
    return (lax.mul(spectrum, lax.broadcast_in_dim(lax.complex(weights, _const(0, weights)),
                                                   spectrum.shape, (spectrum.ndim - 1,))),)


# ----------------------------------------------------------------------------- reductions

def _kept_dims(ndim: int, axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d not in axes)


def _expand_reduced(v: TracedArray, shape: tuple[int, ...], axes: Sequence[int]) -> TracedArray:
    """Broadcast a reduction's result back over the reduced ``axes``."""
    return lax.broadcast_in_dim(v, shape, _kept_dims(len(shape), axes))


@_register(P.reduce_sum_p)
def _reduce_sum_vjp(cts, primals, outs, *, axes):
    return (_expand_reduced(cts[0], primals[0].shape, axes),)


@_register((P.reduce_max_p, P.reduce_min_p))
def _reduce_choose_vjp(cts, primals, outs, *, axes):
    """The cotangent is split equally among the positions equal to the result (ties); a NaN result
    (NaN propagates) is split among the NaNs, as torch's ``max()``."""
    (ct,), (x,), (out,) = cts, primals, outs
    result = _expand_reduced(out, x.shape, axes)
    chosen = lax.eq(x, result)
    if is_float(x.dtype):
        chosen = lax.logical_or(chosen, lax.logical_and(lax.ne(x, x), lax.ne(result, result)))
    chosen = _as_float(chosen, x)
    count = lax.reduce_sum(chosen, axes)
    return (lax.mul(chosen, _expand_reduced(lax.div(ct, count), x.shape, axes)),)


def _exclusive_cumprod(x: TracedArray, axis: int, reverse: bool) -> TracedArray:
    """Product of the elements strictly before (after, if ``reverse``) each one along ``axis``."""
    shift = (-1, 1, 0) if reverse else (1, -1, 0)
    config = tuple(shift if d == axis else (0, 0, 0) for d in range(x.ndim))
    return lax.bind(P.cumprod_p, lax.pad(x, _const(1, x), config), axis=axis, reverse=reverse)


@_register(P.reduce_prod_p)
def _reduce_prod_vjp(cts, primals, outs, *, axes):
    """d prod / d x_i = product of all the other elements, formed without dividing (zero-safe)."""
    (ct,), (x,) = cts, primals
    if x.size == 0:
        return (lax.zeros(x.aval),)
    kept = _kept_dims(x.ndim, axes)
    perm = kept + tuple(axes)
    moved = lax.transpose(x, perm)
    kept_shape = tuple(x.shape[d] for d in kept)
    flat = lax.reshape(moved, kept_shape + (int(np.prod([x.shape[a] for a in axes])),))
    last = flat.ndim - 1
    others = lax.mul(_exclusive_cumprod(flat, last, False), _exclusive_cumprod(flat, last, True))
    ct_flat = lax.mul(lax.conj_if_complex(others), lax.broadcast_in_dim(ct, flat.shape, tuple(range(len(kept)))))
    ct_moved = lax.reshape(ct_flat, moved.shape)
    return (lax.transpose(ct_moved, _inverse_permutation(perm)),)


@_register(P.cumsum_p)
def _cumsum_vjp(cts, primals, outs, *, axis, reverse):
    return (lax.cumsum(cts[0], axis, not reverse),)


def _pairwise(v: TracedArray, axis: int, along: int) -> TracedArray:
    """Insert a new axis so ``v`` (indexed along ``axis``) becomes [.., k, i, ..]: ``along`` 0 puts
    v's axis on k (position ``axis``), ``along`` 1 puts it on i (position ``axis + 1``)."""
    n = v.shape[axis]
    shape = v.shape[:axis] + (n, n) + v.shape[axis + 1:]
    dims = tuple(range(axis)) + (axis + along,) + tuple(range(axis + 2, v.ndim + 1))
    return lax.broadcast_in_dim(v, shape, dims)


def _pair_masks(x: TracedArray, axis: int) -> tuple[TracedArray, TracedArray]:
    """Boolean (k == i) and (k <= i) over the [.., k, i, ..] grid of ``_pairwise``."""
    n = x.shape[axis]
    shape = x.shape[:axis] + (n, n) + x.shape[axis + 1:]
    k = lax.iota(np.int32, shape, axis)
    i = lax.iota(np.int32, shape, axis + 1)
    return lax.eq(k, i), lax.le(k, i)


def _forward_only(rule_fn):
    """Write a cumulative rule for ``reverse=False``; the reverse case flips, applies, flips back."""
    def rule(cts, primals, outs, *, axis, reverse):
        (ct,), (x,), (out,) = cts, primals, outs
        if x.shape[axis] == 0:
            return (lax.zeros(x.aval),)
        if reverse:
            ct, x, out = (lax.rev(v, (axis,)) for v in (ct, x, out))
        ct_x = rule_fn(ct, x, out, axis)
        return (lax.rev(ct_x, (axis,)) if reverse else ct_x,)
    rule.__name__ = rule_fn.__name__
    return rule


@_register(P.cumprod_p)
@_forward_only
def _cumprod_vjp(ct, x, out, axis):
    """ct_x[k] = sum_{i>=k} ct[i] * prod_{j<=i, j!=k} x[j], zero-safe (no division).

    The n x n grid of partial products is a cumprod of x with x[k] replaced by 1 on row k:
    O(n^2) work along ``axis``, chosen for exactness with zeros (see docs/autodiff.md).
    """
    diagonal, lower = _pair_masks(x, axis)
    one = _const(1, x)
    partial = lax.bind(P.cumprod_p, lax.select(diagonal, one, _pairwise(x, axis, 1)),
                       axis=axis + 1, reverse=False)
    weighted = lax.select(lower, lax.mul(lax.conj_if_complex(partial), _pairwise(ct, axis, 1)), _const(0, x))
    return lax.reduce_sum(weighted, (axis + 1,))


@_register((P.cummax_p, P.cummin_p))
@_forward_only
def _cumchoose_vjp(ct, x, out, axis):
    """out[i] = max(x[:i+1]); ct[i] is split equally among the k <= i with x[k] == out[i]."""
    _, lower = _pair_masks(x, axis)
    hit = lax.logical_and(lower, lax.eq(_pairwise(x, axis, 0), _pairwise(out, axis, 1)))
    hit = _as_float(hit, x)
    count = lax.reduce_sum(hit, (axis,))  # per i, >= 1
    share = _pairwise(lax.div(ct, count), axis, 1)
    return lax.reduce_sum(lax.mul(hit, share), (axis + 1,))


@_register(P.sort_p)
def _sort_vjp(cts, primals, outs, *, axis, descending, index_dtype):
    """Values are ``x`` permuted along ``axis``: send each cotangent back to where it came from."""
    ct, _ = cts
    (x,), (_, indices) = primals, outs
    if ct is None:
        return (None,)
    return (lax.scatter_add(lax.zeros(x.aval), indices, ct, axis),)


# ----------------------------------------------------------------------------- shape ops

def _inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@_register(P.broadcast_in_dim_p)
def _broadcast_in_dim_vjp(cts, primals, outs, *, shape, broadcast_dimensions):
    (ct,), (x,) = cts, primals
    summed = [d for d in range(len(shape)) if d not in broadcast_dimensions]
    summed += [od for d, od in zip(x.shape, broadcast_dimensions) if d == 1 and shape[od] != 1]
    return (lax.reshape(lax.reduce_sum(ct, summed), x.shape),)


@_register(P.reshape_p)
def _reshape_vjp(cts, primals, outs, *, new_sizes):
    return (lax.reshape(cts[0], primals[0].shape),)


@_register(P.transpose_p)
def _transpose_vjp(cts, primals, outs, *, permutation):
    return (lax.transpose(cts[0], _inverse_permutation(permutation)),)


@_register(P.rev_p)
def _rev_vjp(cts, primals, outs, *, dimensions):
    return (lax.rev(cts[0], dimensions),)


@_register(P.slice_p)
def _slice_vjp(cts, primals, outs, *, start_indices, limit_indices, strides):
    """Put the cotangent back where the slice took it: zero padding, interior for strides."""
    (ct,), (x,) = cts, primals
    config = []
    for d, n, start, stride in zip(x.shape, ct.shape, start_indices, strides):
        covered = n + max(0, n - 1) * (stride - 1)
        config.append((start, d - start - covered, stride - 1))
    return (lax.pad(ct, _const(0, ct), config),)


@_register(P.pad_p)
def _pad_vjp(cts, primals, outs, *, padding_config):
    """Undo lo/hi (negative ones crop, so undoing them pads zeros back), then step over interior."""
    (ct,), (x, _) = cts, primals
    unpadded = lax.pad(ct, _const(0, ct), tuple((-lo, -hi, 0) for lo, hi, _ in padding_config))
    ct_x = lax.slice(unpadded, (0,) * x.ndim, unpadded.shape, tuple(i + 1 for _, _, i in padding_config))
    everything = tuple(range(ct.ndim))
    ct_value = lax.sub(lax.reduce_sum(ct, everything), lax.reduce_sum(ct_x, everything))
    return ct_x, ct_value


@_register(P.concatenate_p)
def _concatenate_vjp(cts, primals, outs, *, dimension):
    (ct,) = cts
    pieces, offset = [], 0
    for x in primals:
        start = tuple(offset if d == dimension else 0 for d in range(ct.ndim))
        limit = tuple(offset + x.shape[d] if d == dimension else ct.shape[d] for d in range(ct.ndim))
        pieces.append(lax.slice(ct, start, limit))
        offset += x.shape[dimension]
    return tuple(pieces)


# ----------------------------------------------------------------------------- contractions

@_register(P.dot_general_p)
def _dot_general_vjp(cts, primals, outs, *, dimension_numbers, preferred_element_type):
    """Each operand's cotangent is ``ct`` contracted with the other operand over the other's
    free dimensions, then transposed into the operand's own dimension order."""
    (ct,), (lhs, rhs) = cts, primals
    if preferred_element_type is not None and ct.dtype != lhs.dtype:
        ct = lax.convert_element_type(ct, lhs.dtype)
    (lc, rc), (lb, rb) = dimension_numbers
    lhs, rhs = lax.conj_if_complex(lhs), lax.conj_if_complex(rhs)  # complex: ct contracted with conj(other)
    return (_dot_operand_ct(ct, rhs, lhs.ndim, lc, lb, rc, rb, first=True),
            _dot_operand_ct(ct, lhs, rhs.ndim, rc, rb, lc, lb, first=False))


def _dot_operand_ct(ct, other, ndim, contract, batch, other_contract, other_batch, first):
    """Cotangent of the operand with ``ndim`` dims and ``contract``/``batch`` dims; ``other`` is the
    other operand. ``ct``'s dims are batch, lhs free, rhs free (``first``: we are the lhs)."""
    other_free = [d for d in range(other.ndim) if d not in other_contract and d not in other_batch]
    free = [d for d in range(ndim) if d not in contract and d not in batch]
    nb = len(batch)
    start = nb + len(free) if first else nb
    ct_other_free = tuple(range(start, start + len(other_free)))
    product = lax.dot_general(ct, other, ((ct_other_free, tuple(other_free)), (tuple(range(nb)), tuple(other_batch))))
    # product dims: batch, our free dims (ct keeps them in order), then the other's contracting dims in increasing order
    source = list(batch) + free + [contract[list(other_contract).index(d)] for d in sorted(other_contract)]
    return lax.transpose(product, tuple(source.index(d) for d in range(ndim)))


def _move_group_factor(x: TracedArray, src: int, dst: int, groups: int) -> TracedArray:
    """Split axis ``src`` as (groups, rest) and merge the groups factor into axis ``dst`` as its
    major part. Rank and the position of every axis are unchanged; only two sizes change."""
    shape = list(x.shape)
    split = shape[:src] + [groups, shape[src] // groups] + shape[src + 1:]
    y = lax.reshape(x, split)
    # labels of the split array's axes: original axis t -> t (src keeps the 'rest' part), 'g' for groups
    labels = list(range(src)) + ["g"] + list(range(src, len(shape)))
    order = [lab for lab in labels if lab != "g"]
    order.insert(order.index(dst), "g")
    y = lax.transpose(y, tuple(labels.index(lab) for lab in order))
    merged = list(shape)
    merged[src] = shape[src] // groups
    merged[dst] = shape[dst] * groups
    return lax.reshape(y, merged)


def _dilated(size: int, dilation: int) -> int:
    return 0 if size == 0 else (size - 1) * dilation + 1


def _swap_first_two(spec: Sequence[int]) -> tuple[int, ...]:
    return (spec[1], spec[0]) + tuple(spec[2:])


@_register(P.conv_general_dilated_p)
def _conv_vjp(cts, primals, outs, **params):
    """Both cotangents are convolutions again (see docs/autodiff.md for the derivation)."""
    (ct,), (lhs, rhs) = cts, primals
    lhs, rhs = lax.conj_if_complex(lhs), lax.conj_if_complex(rhs)  # complex: ct convolved with conj(other)
    return conv_lhs_cotangent(ct, rhs, lhs.shape, **params), conv_rhs_cotangent(ct, lhs, rhs.shape, **params)


def _conv_sizes(ct_shape, lhs_shape, rhs_shape, window_strides, lhs_dilation, rhs_dilation, dimension_numbers):
    """Dilated spatial sizes of the input, the kernel and the output (stride-dilated)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    spatial = range(len(window_strides))
    x_dil = [_dilated(lhs_shape[lhs_spec[2 + k]], lhs_dilation[k]) for k in spatial]
    w_dil = [_dilated(rhs_shape[rhs_spec[2 + k]], rhs_dilation[k]) for k in spatial]
    o_dil = [_dilated(ct_shape[out_spec[2 + k]], window_strides[k]) for k in spatial]
    return x_dil, w_dil, o_dil


def conv_lhs_cotangent(ct: TracedArray, rhs: TracedArray, lhs_shape: Sequence[int], *, window_strides, padding,
                       lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                       batch_group_count) -> TracedArray:
    """The cotangent of a convolution's input (of shape ``lhs_shape``): correlate the
    stride-dilated cotangent with the spatially reversed kernel, whose in/out feature roles
    are swapped (groups moved from the out- to the in-feature axis)."""
    lhs_aval = Aval(tuple(lhs_shape), ct.dtype)
    if 0 in lhs_shape or rhs.size == 0 or ct.size == 0:
        return lax.zeros(lhs_aval)
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x_dil, w_dil, o_dil = _conv_sizes(ct.shape, lhs_shape, rhs.shape, window_strides, lhs_dilation, rhs_dilation,
                                      dimension_numbers)
    groups = max(feature_group_count, batch_group_count)
    kernel = rhs
    if groups > 1:
        kernel = _move_group_factor(kernel, rhs_spec[0], rhs_spec[1], groups)
    kernel = lax.rev(kernel, tuple(rhs_spec[2:]))
    lhs_pad = []
    for k, (lo, _) in enumerate(padding):
        before = w_dil[k] - 1 - lo
        lhs_pad.append((before, x_dil[k] + w_dil[k] - 1 - o_dil[k] - before))
    ct_lhs = lax.conv_general_dilated(
        ct, kernel, window_strides=lhs_dilation, padding=lhs_pad, lhs_dilation=window_strides,
        rhs_dilation=rhs_dilation, dimension_numbers=(out_spec, _swap_first_two(rhs_spec), lhs_spec),
        feature_group_count=groups, batch_group_count=1)
    if batch_group_count > 1:
        ct_lhs = _move_group_factor(ct_lhs, lhs_spec[1], lhs_spec[0], batch_group_count)
    return ct_lhs


def conv_rhs_cotangent(ct: TracedArray, lhs: TracedArray, rhs_shape: Sequence[int], *, window_strides, padding,
                       lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                       batch_group_count) -> TracedArray:
    """The cotangent of a convolution's kernel (of shape ``rhs_shape``): correlate the input
    (batch and feature roles swapped) with the cotangent as kernel; feature groups become
    batch groups and vice versa."""
    if 0 in rhs_shape or lhs.size == 0 or ct.size == 0:
        return lax.zeros(Aval(tuple(rhs_shape), ct.dtype))
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x_dil, w_dil, o_dil = _conv_sizes(ct.shape, lhs.shape, rhs_shape, window_strides, lhs_dilation, rhs_dilation,
                                      dimension_numbers)
    rhs_pad = [(lo, o_dil[k] + w_dil[k] - 1 - x_dil[k] - lo) for k, (lo, _) in enumerate(padding)]
    return lax.conv_general_dilated(
        lhs, ct, window_strides=rhs_dilation, padding=rhs_pad, lhs_dilation=lhs_dilation,
        rhs_dilation=window_strides,
        dimension_numbers=(_swap_first_two(lhs_spec), _swap_first_two(out_spec), _swap_first_two(rhs_spec)),
        feature_group_count=batch_group_count, batch_group_count=feature_group_count)


# ----------------------------------------------------------------------------- indexing

@_register(P.gather_p)
def _gather_vjp(cts, primals, outs, *, axis):
    (ct,), (operand, indices) = cts, primals
    return lax.scatter_add(lax.zeros(operand.aval), indices, ct, axis), None


@_register(P.scatter_add_p)
def _scatter_add_vjp(cts, primals, outs, *, axis):
    (ct,), (_, indices, _) = cts, primals
    return ct, None, lax.gather(ct, indices, axis)


@_register(P.scatter_p)
def _scatter_vjp(cts, primals, outs, *, axis):
    """Overwritten operand positions get zero; every update gets the cotangent at its target
    (with duplicate indices all duplicates get it, as torch; the forward winner is unspecified)."""
    (ct,), (_, indices, updates) = cts, primals
    return lax.scatter(ct, indices, lax.zeros(updates.aval), axis), None, lax.gather(ct, indices, axis)


def missing_rules() -> list[str]:
    """Names of registered core primitives without a VJP rule (empty when the table is total); a
    composite without one is differentiated through its decomposition."""
    return sorted(name for name, p in P.registry.items() if p not in vjp_rules and not is_composite(p))
