"""``reftrace.numpy.fft``: numpy's FFT functions on traced arrays, each one ``fft`` primitive.

numpy's conventions: ``axis=-1`` (``axes`` = the last ``len(s)`` axes, or all), ``n``/``s``
crop or zero-pad the input along those axes first, and ``norm`` is ``"backward"`` (the
inverse divides by n), ``"ortho"`` (both by sqrt(n)) or ``"forward"`` (the forward divides).
Real input to a complex transform is promoted (float64 for integers, as numpy).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.errors import ArgumentError, ShapeError

__all__ = ["fft", "ifft", "rfft", "irfft", "fftn", "ifftn", "rfftn", "irfftn", "fft2", "ifft2", "rfft2", "irfft2"]


def _as(x: Any, dtype: Any) -> Any:
    """``x`` (traced, or an array/number made a constant) converted to ``dtype``."""
    if not lax.is_traced(x):
        x = lax.constant(np.asarray(x))
    return lax.convert_element_type(x, lax.check_dtype(dtype, "reftrace.numpy.fft: input"))


def _complex(x: Any) -> Any:
    dtype = lax.aval_of(x).dtype
    return _as(x, P.complex_dtype(dtype if P.is_inexact(dtype) else np.float64))


def _real(x: Any, fn: str) -> Any:
    dtype = lax.aval_of(x).dtype
    if P.is_complex(dtype):
        raise ArgumentError(f"reftrace.numpy.fft.{fn}: the input must be real, got {dtype.name}")
    return _as(x, dtype if P.is_float(dtype) else np.float64)


def _axis(axis: Any, ndim: int, fn: str) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, (bool, np.bool_)):
        raise ArgumentError(f"reftrace.numpy.fft.{fn}: axis must be an int, got {type(axis).__name__} {axis!r:.40}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"reftrace.numpy.fft.{fn}: axis {axis} is out of bounds for an array of rank {ndim}")
    return int(axis) % ndim


def _axes(x: Any, s: Sequence[int] | None, axes: Sequence[int] | None, fn: str) -> tuple[int, ...]:
    if axes is None:
        axes = range(x.ndim - len(s), x.ndim) if s is not None else range(x.ndim)
    axes = tuple(_axis(a, x.ndim, fn) for a in axes)
    if len(set(axes)) != len(axes):
        raise ArgumentError(f"reftrace.numpy.fft.{fn}: repeated axes {axes}")
    if s is not None and len(s) != len(axes):
        raise ArgumentError(f"reftrace.numpy.fft.{fn}: s={tuple(s)} and axes={axes} differ in length")
    return axes


def _resize(x: Any, axis: int, n: int) -> Any:
    """Crop or zero-pad ``x`` along ``axis`` to ``n`` entries (numpy's ``n``)."""
    size = x.shape[axis]
    if n < 1:
        raise ArgumentError(f"reftrace.numpy.fft: invalid number of points {n}")
    if n < size:
        return lax.slice(x, (0,) * x.ndim, tuple(n if d == axis else x.shape[d] for d in range(x.ndim)))
    if n > size:
        return lax.pad(x, lax.constant(0, x.dtype), [(0, n - size if d == axis else 0, 0) for d in range(x.ndim)])
    return x


def _scale(y: Any, n: int, norm: str | None, inverse: bool) -> Any:
    """The primitive's own scaling is numpy's ``"backward"``; rescale for the other modes."""
    if norm in (None, "backward"):
        return y
    if norm not in ("ortho", "forward"):
        raise ArgumentError(f"reftrace.numpy.fft: norm must be 'backward', 'ortho' or 'forward', got {norm!r}")
    factor = math.sqrt(n) if norm == "ortho" else float(n)
    factor = factor if inverse else 1 / factor
    return lax.mul(y, lax.constant(factor, P.real_dtype(y.dtype) if not P.is_complex(y.dtype) else y.dtype))


def _transform(x: Any, kind: str, s: Sequence[int] | None, axes: Sequence[int] | None, norm: str | None,
               fn: str) -> Any:
    x = _real(x, fn) if kind == "rfft" else _complex(x)
    axes = _axes(x, s, axes, fn)
    if kind == "irfft":
        lengths = list(s) if s is not None else [x.shape[a] for a in axes[:-1]] + [2 * (x.shape[axes[-1]] - 1)]
        sizes = lengths[:-1] + [lengths[-1] // 2 + 1]
    else:
        lengths = list(s) if s is not None else [x.shape[a] for a in axes]
        sizes = lengths
    for a, n in zip(axes, sizes):
        x = _resize(x, a, int(n))
    perm = tuple(d for d in range(x.ndim) if d not in axes) + axes
    inverse_perm = tuple(perm.index(d) for d in range(x.ndim))
    y = lax.fft(lax.transpose(x, perm), kind, lengths)
    return lax.transpose(_scale(y, math.prod(lengths), norm, kind in ("ifft", "irfft")), inverse_perm)


def fft(x: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> Any:
    return _transform(x, "fft", None if n is None else [n], [axis], norm, "fft")


def ifft(x: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> Any:
    return _transform(x, "ifft", None if n is None else [n], [axis], norm, "ifft")


def rfft(x: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> Any:
    return _transform(x, "rfft", None if n is None else [n], [axis], norm, "rfft")


def irfft(x: Any, n: int | None = None, axis: int = -1, norm: str | None = None) -> Any:
    return _transform(x, "irfft", None if n is None else [n], [axis], norm, "irfft")


def fftn(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] | None = None, norm: str | None = None) -> Any:
    return _transform(x, "fft", s, axes, norm, "fftn")


def ifftn(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] | None = None, norm: str | None = None) -> Any:
    return _transform(x, "ifft", s, axes, norm, "ifftn")


def rfftn(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] | None = None, norm: str | None = None) -> Any:
    return _transform(x, "rfft", s, axes, norm, "rfftn")


def irfftn(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] | None = None, norm: str | None = None) -> Any:
    return _transform(x, "irfft", s, axes, norm, "irfftn")


def fft2(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] = (-2, -1), norm: str | None = None) -> Any:
    return fftn(x, s, axes, norm)


def ifft2(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] = (-2, -1), norm: str | None = None) -> Any:
    return ifftn(x, s, axes, norm)


def rfft2(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] = (-2, -1), norm: str | None = None) -> Any:
    return rfftn(x, s, axes, norm)


def irfft2(x: Any, s: Sequence[int] | None = None, axes: Sequence[int] = (-2, -1), norm: str | None = None) -> Any:
    return irfftn(x, s, axes, norm)
