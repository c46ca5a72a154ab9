"""Fake quantization, for quantization-aware training: ``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine`` as torch's CPU "cachemask" kernels compute them.

A value is rounded onto the integer grid (``nearbyint(x * (1.0f / scale)) + zero_point``, in float32, or
float64 for a float64 tensor), clamped to ``[quant_min, quant_max]`` and scaled back: ``(q - zero_point) *
scale`` in float32 for the per-tensor kernels, in float64 for the per-channel one, rounded to the tensor's
dtype. Where the grid value is NaN it lands on ``quant_min``; past the int64 range the per-tensor kernels
saturate and the per-channel one (a plain ``static_cast<int64_t>``) lands on ``quant_min`` too. The gradient
is the straight-through estimator the kernels' mask gives: 1 where the grid value was in range, 0 where it
was clamped. The scale and zero point get none, as in torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.torch_bridge.aten._common import aten, cast, literal, norm_dim, register, unsupported


def _fake_quantize(x: Any, scale: Any, zero_point: Any, quant_min: int, quant_max: int, *,
                   per_channel: bool = False) -> tuple[Any, Any]:
    """``scale`` (float32) and ``zero_point`` (integer) broadcast to ``x``'s shape."""
    compute = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    inv_scale = lax.div(literal(1.0, np.float32), scale)  # 1.0f / scale, in float32 as the kernels
    grid = lax.add(lax.round(lax.mul(cast(x, compute), cast(inv_scale, compute))), cast(zero_point, compute))
    low, high = literal(quant_min, compute), literal(quant_max, compute)
    in_range = lax.logical_and(lax.ge(grid, low), lax.le(grid, high))
    off_grid = lax.ne(grid, grid)  # NaN
    if per_channel:  # static_cast<int64_t> of a value past int64's range gives INT64_MIN
        off_grid = lax.logical_or(off_grid, lax.ge(lax.abs(grid), literal(2.0 ** 63, compute)))
    clamped = lax.select(off_grid, low, lax.min(lax.max(grid, low), high))
    product = np.dtype(np.float64) if per_channel else np.dtype(np.float32)
    value = lax.stop_gradient(cast(lax.mul(lax.sub(cast(clamped, product), cast(zero_point, product)),
                                           cast(scale, product)), x.dtype))
    # x - stop_gradient(x) is exactly 0 for finite x: the value is the kernel's, the gradient passes
    passed = lax.add(lax.sub(x, lax.stop_gradient(x)), value)
    return lax.select(in_range, passed, value), in_range


def _scalar_parameter(t: Any, dtype: Any, what: str) -> Any:
    if t.size != 1:
        raise unsupported(f"a per-tensor fake quantization {what} of {t.size} elements (it takes one)")
    return cast(lax.reshape(t, ()), dtype)


@register(aten.fake_quantize_per_tensor_affine_cachemask.default)
def fake_quantize_per_tensor(x: Any, scale: float, zero_point: int, quant_min: int, quant_max: int
                             ) -> tuple[Any, Any]:
    return _fake_quantize(x, literal(np.float32(scale), np.float32), literal(int(zero_point), np.int64),
                          quant_min, quant_max)


@register(aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams.default)
def fake_quantize_per_tensor_tensor_qparams(x: Any, scale: Any, zero_point: Any, fake_quant_enabled: Any,
                                            quant_min: int, quant_max: int) -> tuple[Any, Any]:
    """With ``fake_quant_enabled`` 0 the kernel passes ``x`` through, its mask all true."""
    out, in_range = _fake_quantize(x, _scalar_parameter(scale, np.float32, "scale"),
                                   _scalar_parameter(zero_point, np.int64, "zero point"), quant_min, quant_max)
    enabled = lax.ne(_scalar_parameter(fake_quant_enabled, np.int64, "switch"), literal(0, np.int64))
    on = lax.broadcast_in_dim(enabled, x.shape, ())
    return lax.select(on, out, x), lax.logical_or(in_range, lax.bitwise_not(on))


@register(aten.fake_quantize_per_channel_affine_cachemask.default)
def fake_quantize_per_channel(x: Any, scale: Any, zero_point: Any, axis: int, quant_min: int, quant_max: int
                              ) -> tuple[Any, Any]:
    if zero_point.dtype.kind == "f":
        raise unsupported("per-channel fake quantization with floating-point zero points")
    axis = norm_dim(axis, x.ndim)

    def along(t: Any, dtype: Any) -> Any:
        return lax.broadcast_in_dim(cast(t, dtype), x.shape, (axis,))
    return _fake_quantize(x, along(scale, np.float32), along(zero_point, np.int64), quant_min, quant_max,
                          per_channel=True)
