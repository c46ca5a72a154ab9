"""Complex-number ATen ops: the real/complex views, conjugation, polar form and the FFT kernels.

torch's ``fft.*`` functions (and ``stft``/``istft``) reach the dispatcher as three kernels,
``_fft_r2c``, ``_fft_c2c`` and ``_fft_c2r``, over a list of dims with a normalisation mode
(0: none, 1: 1/sqrt(n), 2: 1/n). Each becomes one ``fft`` primitive over trailing axes
(the dims are moved there and back) and a scale. Views (``view_as_real``, ``_conj``,
``real``) are values here: the capture's functionalisation has already turned writes through
them into writes to their bases.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.torch_bridge.aten._common import (aten, bcast_full, broadcast_shapes, cast, literal, norm_dim, out_aval,
                                                register, unsupported)


# ----------------------------------------------------------------------------- views and parts

@register(aten.view_as_real.default, aten.view_as_real_copy.default)
def view_as_real(x: Any) -> Any:
    parts = [lax.reshape(part, x.shape + (1,)) for part in (lax.real(x), lax.imag(x))]
    return lax.concatenate(parts, x.ndim)


@register(aten.view_as_complex.default, aten.view_as_complex_copy.default)
def view_as_complex(x: Any) -> Any:
    if x.ndim == 0 or x.shape[-1] != 2:
        raise unsupported(f"view_as_complex needs a last dimension of size 2, got shape {x.shape}")
    return lax.complex(*(_last_index(x, k) for k in (0, 1)))


def _last_index(x: Any, k: int) -> Any:
    start = (0,) * (x.ndim - 1) + (k,)
    limit = x.shape[:-1] + (k + 1,)
    return lax.reshape(lax.slice(x, start, limit), x.shape[:-1])


@register(aten.real.default)
def real(x: Any) -> Any:
    return lax.real(x) if P.is_complex(x.dtype) else x


@register(aten.imag.default)
def imag(x: Any) -> Any:
    if not P.is_complex(x.dtype):
        raise unsupported(f"imag of a real tensor ({x.dtype}) is an error in torch too")
    return lax.imag(x)


@register(aten._conj.default, aten.conj_physical.default, aten._conj_physical.default, aten._conj_copy.default)
def conj(x: Any) -> Any:
    return lax.conj(x) if P.is_complex(x.dtype) else x


@register(aten.resolve_conj.default, aten.resolve_neg.default)
def resolve(x: Any) -> Any:
    """Materialising a lazy conjugate or negation: the value is already what it shows."""
    return x


@register(aten._neg_view.default, aten._neg_view_copy.default)
def neg_view(x: Any) -> Any:
    return lax.neg(x)


@register(aten.complex.default)
def complex_(re: Any, im: Any) -> Any:
    shape = broadcast_shapes(re, im)
    dtype = P.real_dtype(out_aval().dtype)
    return lax.complex(bcast_full(cast(re, dtype), shape), bcast_full(cast(im, dtype), shape))


@register(aten.polar.default)
def polar(magnitude: Any, angle: Any) -> Any:
    shape = broadcast_shapes(magnitude, angle)
    dtype = P.real_dtype(out_aval().dtype)
    r, theta = bcast_full(cast(magnitude, dtype), shape), bcast_full(cast(angle, dtype), shape)
    return lax.complex(lax.mul(r, lax.cos(theta)), lax.mul(r, lax.sin(theta)))


# ----------------------------------------------------------------------------- FFT kernels

def _to_trailing(x: Any, dims: Sequence[int]) -> tuple[Any, tuple[int, ...]]:
    """``x`` with ``dims`` moved to the end in the order given, and the permutation used."""
    dims = [norm_dim(int(d), x.ndim) for d in dims]
    if len(set(dims)) != len(dims):
        raise unsupported(f"repeated FFT dims {dims}")
    perm = tuple(d for d in range(x.ndim) if d not in dims) + tuple(dims)
    return lax.transpose(x, perm), perm


def _from_trailing(y: Any, perm: Sequence[int]) -> Any:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return lax.transpose(y, tuple(inverse))


def _normalized(y: Any, n: int, normalization: int, unnormalized_scale: float = 1.0) -> Any:
    """``y`` (an unnormalised transform times ``1 / unnormalized_scale``) scaled for ATen's mode."""
    factor = {0: 1.0, 1: 1 / math.sqrt(n), 2: 1 / n}.get(int(normalization))
    if factor is None:
        raise unsupported(f"unknown FFT normalization mode {normalization}")
    factor *= unnormalized_scale
    if factor == 1.0:
        return y
    return lax.mul(y, literal(factor, y.dtype))


def _float_part(x: Any) -> Any:
    dtype = P.real_dtype(out_aval().dtype)
    if dtype not in (np.float32, np.float64):
        raise unsupported(f"FFTs of {dtype} (reftrace's FFTs run in float32/float64)")
    return cast(x, dtype)


@register(aten._fft_r2c.default)
def fft_r2c(x: Any, dim: Sequence[int], normalization: int, onesided: bool) -> Any:
    x, perm = _to_trailing(_float_part(x), dim)
    lengths = x.shape[x.ndim - len(dim):]
    n = math.prod(lengths)
    if onesided:
        y = lax.fft(x, "rfft", lengths)
    else:
        y = lax.fft(lax.complex(x, literal(0, x.dtype)), "fft", lengths)
    return _from_trailing(_normalized(y, n, normalization), perm)


@register(aten._fft_c2c.default)
def fft_c2c(x: Any, dim: Sequence[int], normalization: int, forward: bool) -> Any:
    if not dim:
        return x
    x, perm = _to_trailing(cast(x, out_aval().dtype), dim)
    lengths = x.shape[x.ndim - len(dim):]
    n = math.prod(lengths)
    if forward:
        y = _normalized(lax.fft(x, "fft", lengths), n, normalization)
    else:  # the primitive's ifft divides by n; ATen's mode says what to divide by
        y = _normalized(lax.fft(x, "ifft", lengths), n, normalization, unnormalized_scale=n)
    return _from_trailing(y, perm)


@register(aten._fft_c2r.default)
def fft_c2r(x: Any, dim: Sequence[int], normalization: int, last_dim_size: int) -> Any:
    x, perm = _to_trailing(cast(x, P.complex_dtype(out_aval().dtype)), dim)
    bins = int(last_dim_size) // 2 + 1
    if x.shape[-1] != bins:  # ATen reads the first bins (torch pads before calling, but be exact)
        if x.shape[-1] > bins:
            x = lax.slice(x, (0,) * x.ndim, x.shape[:-1] + (bins,))
        else:
            x = lax.pad(x, literal(0, x.dtype), [(0, 0, 0)] * (x.ndim - 1) + [(0, bins - x.shape[-1], 0)])
    lengths = tuple(x.shape[x.ndim - len(dim):-1]) + (int(last_dim_size),)
    n = math.prod(lengths)
    y = lax.fft(x, "irfft", lengths)
    return _from_trailing(_normalized(y, n, normalization, unnormalized_scale=n), perm)
