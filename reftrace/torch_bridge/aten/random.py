"""Random ATen ops through a functional RNG: every draw reads an explicit key.

torch's random ops read and advance a hidden generator; a reftrace Graph is a pure
function, so capture gives it one extra input instead, a ``u32[2]`` key, always the
**last** graph input (``Captured.key_input``). Draw ``i`` (in graph order) uses
``random_fold_in(key, data=i)``: the same key gives the same values, and different ops
read independent streams. The glue (``aot_function``) feeds a fresh key drawn from
torch's default generator at every call, so ``torch.manual_seed`` makes runs
reproducible; the values differ from eager torch's (a different generator).

Rows here follow ATen's semantics (``native_dropout`` keeps with probability ``1 - p``
and scales by ``1 / (1 - p)``; ``p == 1`` gives zeros), with an explicit ``Generator``
argument ignored: every draw comes from the graph's key. Integer draws (``randint``)
are ``low + floor(u * (high - low))`` on a float64 uniform ``u`` (52 random bits),
uniform up to a relative bias of ``(high - low) / 2**52``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.errors import TracingError
from reftrace.graph import Aval
from reftrace.lax import TracedArray
from reftrace.torch_bridge.aten._common import (aten, bcast_full, broadcast_shapes, cast, literal, out_aval, register,
                                                unsupported)

__all__ = ["KEY_AVAL", "KeyStream", "key_stream"]

KEY_AVAL = Aval((2,), np.dtype(np.uint32))


# ----------------------------------------------------------------------------- the key

class KeyStream:
    """The key input of the graph being captured, made on first use, and the count of draws so far."""

    def __init__(self, builder: Builder) -> None:
        self.builder = builder
        self.key: TracedArray | None = None
        self.draws = 0

    def next_key(self) -> TracedArray:
        """A key no earlier draw of this graph used: ``random_fold_in(key, data=<draw number>)``."""
        if self.key is None:
            self.key = lax.new_input(self.builder, KEY_AVAL)
        data, self.draws = self.draws, self.draws + 1
        return lax.bind(P.random_fold_in_p, self.key, data=data)


_streams: list[KeyStream] = []


@contextlib.contextmanager
def key_stream(builder: Builder) -> Iterator[KeyStream]:
    """Make a KeyStream current while a capture translates ATen ops (the rows below draw from it)."""
    stream = KeyStream(builder)
    _streams.append(stream)
    try:
        yield stream
    finally:
        _streams.pop()


def _next_key() -> TracedArray:
    if not _streams:
        raise TracingError("reftrace bug: a random ATen row ran outside a capture's key_stream; please report it")
    return _streams[-1].next_key()


# ----------------------------------------------------------------------------- draws

def _compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays; every other dtype draws (and does its arithmetic) in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _draw(shape: Sequence[int], dtype: Any, distribution: str) -> TracedArray:
    return lax.bind(P.random_p, _next_key(), shape=tuple(int(d) for d in shape), dtype=np.dtype(dtype),
                    distribution=distribution)


def _uniform(shape: Sequence[int], dtype: Any) -> TracedArray:
    """U[0, 1) of ``dtype`` (a float dtype; 16-bit ones draw their own mantissa bits, never 1.0)."""
    return _draw(shape, dtype, "uniform")


def _normal(shape: Sequence[int], dtype: Any) -> TracedArray:
    """N(0, 1) in ``_compute_dtype(dtype)`` (callers' results are cast to the node's dtype)."""
    return _draw(shape, _compute_dtype(dtype), "normal")


def _affine(z: TracedArray, scale: Any, shift: Any) -> TracedArray:
    """``shift + scale * z`` with ``scale``/``shift`` Python numbers or tensors (broadcast with ``z``)."""
    d = z.dtype
    shape = broadcast_shapes(z, scale, shift)
    out = lax.mul(bcast_full(z, shape), bcast_full(cast(scale, d), shape))
    return lax.add(out, bcast_full(cast(shift, d), shape))


# ----------------------------------------------------------------------------- floats

@register(aten.rand.default, aten.rand.generator, aten.rand_like.default, aten.rand_like.generator)
def rand(*args: Any, **kwargs: Any) -> Any:
    aval = out_aval()
    return _uniform(aval.shape, aval.dtype)


@register(aten.randn.default, aten.randn.generator, aten.randn_like.default, aten.randn_like.generator)
def randn(*args: Any, **kwargs: Any) -> Any:
    aval = out_aval()
    return _normal(aval.shape, aval.dtype)


@register(aten.uniform.default)
def uniform(x: Any, low: float = 0.0, high: float = 1.0, **kwargs: Any) -> Any:
    aval = out_aval()
    u = _uniform(aval.shape, _compute_dtype(aval.dtype))
    return _affine(u, float(high) - float(low), float(low))


@register(aten.normal_functional.default)
def normal_functional(x: Any, mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> Any:
    aval = out_aval()
    return _affine(_normal(aval.shape, aval.dtype), std, mean)


@register(aten.normal.Tensor_Tensor, aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.float_float)
def normal(mean: Any, std: Any = 1.0, *args: Any, **kwargs: Any) -> Any:
    aval = out_aval()
    return _affine(_normal(aval.shape, aval.dtype), std, mean)


@register(aten.log_normal.default)
def log_normal(x: Any, mean: float = 1.0, std: float = 2.0, **kwargs: Any) -> Any:
    aval = out_aval()
    return lax.exp(_affine(_normal(aval.shape, aval.dtype), std, mean))


@register(aten.exponential.default)
def exponential(x: Any, lambd: float = 1.0, **kwargs: Any) -> Any:
    """``-log(1 - u) / lambd``: finite, since ``u < 1``."""
    aval = out_aval()
    u = _uniform(aval.shape, _compute_dtype(aval.dtype))
    return lax.div(lax.neg(lax.log1p(lax.neg(u))), literal(lambd, u.dtype))


@register(aten.cauchy.default)
def cauchy(x: Any, median: float = 0.0, sigma: float = 1.0, **kwargs: Any) -> Any:
    aval = out_aval()
    u = _uniform(aval.shape, _compute_dtype(aval.dtype))
    t = lax.tan(lax.mul(literal(np.pi, u.dtype), lax.sub(u, literal(0.5, u.dtype))))
    return _affine(t, sigma, median)


@register(aten.geometric.default)
def geometric(x: Any, p: float, **kwargs: Any) -> Any:
    """Trials up to the first success: ``ceil(log(1 - u) / log(1 - p))``, at least 1."""
    aval = out_aval()
    d = _compute_dtype(aval.dtype)
    u = _uniform(aval.shape, d)
    k = lax.ceil(lax.div(lax.log1p(lax.neg(u)), literal(np.log1p(-p), d)))
    return lax.max(k, literal(1, d))


# ----------------------------------------------------------------------------- Bernoulli and dropout

@register(aten.bernoulli.default)
def bernoulli(probs: Any, **kwargs: Any) -> Any:
    d = _compute_dtype(probs.dtype)
    return lax.lt(_uniform(probs.shape, d), cast(probs, d))


@register(aten.bernoulli.p)
def bernoulli_p(x: Any, p: float = 0.5, **kwargs: Any) -> Any:
    d = _compute_dtype(out_aval().dtype)
    return lax.lt(_uniform(out_aval().shape, d), literal(p, d))


@register(aten.bernoulli.Tensor)
def bernoulli_tensor(x: Any, p: Any, **kwargs: Any) -> Any:
    shape = out_aval().shape
    d = _compute_dtype(p.dtype)
    return lax.lt(_uniform(shape, d), bcast_full(cast(p, d), shape))


@register(aten.native_dropout.default)
def native_dropout(x: Any, p: float, train: bool | None) -> Any:
    """``(x * mask / (1 - p), mask)`` with ``mask ~ Bernoulli(1 - p)``; the identity and an all-true
    mask outside training (``train=False``) or for ``p == 0``; ``x * 0`` and an all-false mask for ``p == 1``."""
    shape, p = x.shape, float(p)
    if train is False or p == 0.0:
        return x, lax.full(shape, True, np.bool_)
    if p >= 1.0:  # x * 0, as eager (NaN where x is inf or NaN, and the result still carries a gradient)
        return lax.mul(x, literal(0, x.dtype)), lax.full(shape, False, np.bool_)
    d = _compute_dtype(x.dtype)
    keep = lax.lt(_uniform(shape, d), literal(1.0 - p, d))
    scale = lax.select(keep, literal(1.0 / (1.0 - p), x.dtype), literal(0, x.dtype))
    return lax.mul(x, scale), keep


@register(aten.rrelu_with_noise_functional.default)
def rrelu_with_noise(x: Any, noise: Any, lower: float = 0.125, upper: float = 1.0 / 3.0, training: bool = False,
                     generator: Any = None) -> Any:
    """Training: slopes ``r ~ U[lower, upper)`` where ``x <= 0`` (``noise = r`` there, 1 elsewhere)."""
    d = x.dtype
    if not training:
        slope = literal((float(lower) + float(upper)) / 2, d)
        return lax.select(lax.ge(x, literal(0, d)), x, lax.mul(x, slope)), noise
    r = cast(_affine(_uniform(x.shape, _compute_dtype(d)), float(upper) - float(lower), float(lower)), d)
    negative = lax.le(x, literal(0, d))
    return lax.select(negative, lax.mul(x, r), x), lax.select(negative, r, lax.full(x.shape, 1, d))


# ----------------------------------------------------------------------------- integers

def _integers(low: int, high: int) -> TracedArray:
    """Uniform integers in ``[low, high)`` of the node's shape, as int64 (cast to its dtype afterwards)."""
    low, high = int(low), int(high)
    if high <= low:
        raise unsupported(f"empty range [{low}, {high})")
    aval = out_aval()
    f64 = np.dtype(np.float64)
    span = high - low
    u = _uniform(aval.shape, f64)
    k = lax.convert_element_type(lax.floor(lax.mul(u, literal(span, f64))), np.int64)
    k = lax.min(k, literal(span - 1, np.int64))  # rounding can never reach ``span``; stay safe anyway
    return lax.add(k, literal(low, np.int64))


@register(aten.randint.default, aten.randint.generator)
def randint(high: int, size: Any, **kwargs: Any) -> Any:
    return _integers(0, high)


@register(aten.randint.low, aten.randint.low_generator)
def randint_low(low: int, high: int, size: Any, **kwargs: Any) -> Any:
    return _integers(low, high)


@register(aten.randint_like.default, aten.randint_like.generator)
def randint_like(x: Any, high: int, **kwargs: Any) -> Any:
    return _integers(0, high)


@register(aten.randint_like.low_dtype, aten.randint_like.low_generator_dtype)
def randint_like_low(x: Any, low: int, high: int, **kwargs: Any) -> Any:
    return _integers(low, high)


@register(aten.random.to)
def random_to(x: Any, to: int, **kwargs: Any) -> Any:
    return _integers(0, to)
