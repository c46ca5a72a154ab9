"""Neural-network ATen ops: activations, normalisation (batch/layer/group), pooling, dropout, and
``reftrace::lstm_layer`` (what capture makes of ``nn.LSTM``) as the ``lstm_layer`` composite.

Pooling windows are strided slices of the padded input stacked on a new trailing
axis; max pooling's indices are torch's (flat position in the input plane, first
maximum in the window's row-major scan order wins) via ``argmax`` over that axis.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Sequence

import numpy as np

from reftrace import lax, nn
from reftrace.nn import pooling
from reftrace.nn.pooling import window_max, windows
from reftrace import primitives as P
from reftrace.errors import UnsupportedOperatorError
from reftrace.torch_bridge.aten._common import (aten, cast, float_dtype, literal, opmath, out_aval,
                                                register, unsupported)
from reftrace.torch_bridge.rnn import lstm_layer_op

# ----------------------------------------------------------------------------- activations


def _f(x: Any) -> Any:
    return cast(x, float_dtype(out_aval().dtype))


def _in_opmath(row: Callable[..., Any]) -> Callable[..., Any]:
    """``row`` computed as torch's CPU kernel computes it: float16/bfloat16 in float32, rounded once at
    the end (rounding ``x + 3`` to bfloat16 first moved ``hardswish``'s kinks: slopes off by 1.5).
    ``row`` takes ``x`` already floating (``row.__wrapped__`` is that inner row)."""
    @functools.wraps(row)
    def wide(x: Any, *args: Any, **kwargs: Any) -> Any:
        x = _f(x)
        d = opmath(x.dtype)
        return row(x, *args, **kwargs) if d == x.dtype else cast(row(cast(x, d), *args, **kwargs), x.dtype)
    return wide


@register(aten.gelu.default)
def gelu(x: Any, approximate: str = "none") -> Any:
    return nn.gelu(_f(x), approximate)


@register(aten.silu.default)
def silu(x: Any) -> Any:
    return nn.silu(_f(x))


def _relu6_of_shift(x: Any) -> Any:
    """``min(max(x + 3, 0), 6)`` as selects: slope 1 strictly inside, and the constants 0 and 6 (no
    gradient) from the bounds on, NaN included (it lands on 6)."""
    d = x.dtype
    shifted = lax.add(x, literal(3, d))
    inside = lax.select(lax.le(shifted, literal(0, d)), literal(0, d), shifted)
    return lax.select(lax.lt(shifted, literal(6, d)), inside, literal(6, d))


@register(aten.hardswish.default)
@_in_opmath
def hardswish(x: Any) -> Any:
    """``x * relu6(x + 3) / 6``: slope 0 up to -3, ``x/3 + 1/2`` inside, 1 from 3 on and at NaN (torch's)."""
    return lax.div(lax.mul(x, _relu6_of_shift(x)), literal(6, x.dtype))


@register(aten.hardsigmoid.default)
@_in_opmath
def hardsigmoid(x: Any) -> Any:
    """``relu6(x + 3) / 6``; its slope is torch's ``1.0f / 6.0f`` strictly inside (-3, 3) only (``nn.hardsigmoid``)."""
    return nn.hardsigmoid(x)


@register(aten.leaky_relu.default)
@_in_opmath
def leaky_relu(x: Any, negative_slope: float = 0.01) -> Any:
    zero = literal(0, x.dtype)
    return lax.select(lax.gt(x, zero), x, lax.mul(x, literal(negative_slope, x.dtype)))


@register(aten.elu.default)
@_in_opmath
def elu(x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Any:
    d = x.dtype
    # torch's elu_backward takes the exponential branch for x <= 0 (0 included), the linear one at NaN;
    # the exponential sees 0 elsewhere, so neither NaN nor a large x (exp overflows) leaks 0 * inf into the gradient
    on_exp = lax.le(x, literal(0, d))
    safe = lax.select(on_exp, x, literal(0, d))
    negative = lax.mul(lax.expm1(lax.mul(safe, literal(input_scale, d))), literal(alpha * scale, d))
    return lax.select(on_exp, negative, lax.mul(x, literal(scale, d)))


@register(aten.celu.default)
def celu(x: Any, alpha: float = 1.0) -> Any:
    """torch's ``celu`` is ``elu(x, alpha, 1, 1 / alpha)``, and so is its backward (its decomposition,
    ``where(x > 0, x, alpha * expm1(x / alpha))``, gives ``0 * inf`` at an infinite or NaN ``x``)."""
    if alpha == 0:
        raise unsupported("celu with alpha=0 (torch raises: alpha cannot be 0)")
    return elu(x, alpha, 1.0, 1.0 / alpha)


@register(aten.softplus.default)
@_in_opmath
def softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    d = x.dtype
    scaled = lax.mul(x, literal(beta, d))
    linear = lax.gt(scaled, literal(threshold, d))
    # the soft branch sees 0 where the linear one is taken: exp of a large x would overflow there, and
    # its gradient, inf / inf, would leak into the select's as 0 * nan (found by reftrace.testing)
    safe = lax.select(linear, literal(0, d), scaled)
    soft = lax.div(lax.log1p(lax.exp(safe)), literal(beta, d))
    return lax.select(linear, x, soft)


@register(aten.mish.default)
@_in_opmath
def mish(x: Any) -> Any:
    return lax.mul(x, lax.tanh(softplus.__wrapped__(x)))


@register(aten.threshold.default)
def threshold(x: Any, threshold: Any, value: Any) -> Any:
    return lax.select(lax.gt(x, literal(threshold, x.dtype)), x, lax.full(x.shape, value, x.dtype))


@register(aten.log_sigmoid_forward.default)
def log_sigmoid_forward(x: Any) -> tuple[Any, Any]:
    x = _f(x)
    d = x.dtype
    out = lax.sub(lax.min(x, literal(0, d)), lax.log1p(lax.exp(lax.neg(lax.abs(x)))))
    buffer = out_aval(1)
    return out, lax.full(buffer.shape, 0, buffer.dtype)


@register(aten._prelu_kernel.default)
def prelu(x: Any, weight: Any) -> Any:
    w = cast(weight, x.dtype)
    if w.shape != x.shape:
        w = lax.broadcast_to_rank(w, x.shape)
    return lax.select(lax.gt(x, literal(0, x.dtype)), x, lax.mul(w, x))


@register(aten.native_dropout.default)
def native_dropout(x: Any, p: float, train: bool | None) -> tuple[Any, Any]:
    if train and p > 0:
        raise UnsupportedOperatorError(
            f"aten::native_dropout with p={p} in training mode draws random numbers, and reftrace has no "
            "functional RNG yet. Capture the model in eval() mode, or use dropout p=0.")
    return x, lax.full(x.shape, True, np.bool_)


# ----------------------------------------------------------------------------- normalisation

@register(aten.native_layer_norm.default)
def native_layer_norm(x: Any, normalized_shape: Sequence[int], weight: Any, bias: Any, eps: float
                      ) -> tuple[Any, Any, Any]:
    return nn.layer_norm(x, weight, bias, normalized_ndim=len(normalized_shape), eps=eps)


@register(aten.native_group_norm.default)
def native_group_norm(x: Any, weight: Any, bias: Any, N: int, C: int, HxW: int, group: int, eps: float
                      ) -> tuple[Any, Any, Any]:
    return nn.group_norm(x, weight, bias, groups=group, eps=eps)


def _batch_norm(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool,
                momentum: float, eps: float) -> tuple[Any, Any, Any, Any, Any]:
    """(out, save_mean, save_rstd, new_running_mean, new_running_var); the last two are None without stats,
    the saved statistics None outside training."""
    if not training:
        return nn.batch_norm_eval(x, running_mean, running_var, weight, bias, eps=eps), None, None, None, None
    outs = nn.batch_norm_train(x, weight, bias, running_mean, running_var, momentum=momentum, eps=eps)
    if len(outs) == 3:
        return (*outs, None, None)
    out, save_mean, save_rstd, new_mean, new_var = outs
    # torch's running statistics carry no gradient (the kernel updates them outside autograd)
    return out, save_mean, save_rstd, lax.stop_gradient(new_mean), lax.stop_gradient(new_var)


def _or_meta_zeros(value: Any, i: int) -> Any:
    """``value`` or, for the statistics torch leaves empty (eval mode), zeros shaped like its meta."""
    aval = out_aval(i)
    if value is None or value.shape != aval.shape:
        return lax.full(aval.shape, 0, aval.dtype)
    return value


@register(aten._native_batch_norm_legit_functional.default)
def batch_norm_functional(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool,
                          momentum: float, eps: float) -> tuple[Any, ...]:
    out, sm, sr, rm, rv = _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    return (out, _or_meta_zeros(sm, 1), _or_meta_zeros(sr, 2),
            rm if rm is not None else running_mean, rv if rv is not None else running_var)


@register(aten._native_batch_norm_legit_no_training.default)
def batch_norm_no_training(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, momentum: float,
                           eps: float) -> tuple[Any, ...]:
    out, *_ = _batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps)
    return out, _or_meta_zeros(None, 1), _or_meta_zeros(None, 2)


@register(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(x: Any, weight: Any, bias: Any, training: bool, momentum: float, eps: float
                        ) -> tuple[Any, ...]:
    out, sm, sr, _, _ = _batch_norm(x, weight, bias, None, None, True, momentum, eps)
    return out, _or_meta_zeros(sm, 1), _or_meta_zeros(sr, 2)


@register(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def native_batch_norm(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool,
                      momentum: float, eps: float) -> tuple[Any, ...]:
    if training and running_mean is not None:
        raise unsupported("batch norm that updates running statistics in place reached the table unfunctionalized")
    out, sm, sr, _, _ = _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    return out, _or_meta_zeros(sm, 1), _or_meta_zeros(sr, 2)


@register(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, momentum: float,
                           eps: float) -> tuple[Any, ...]:
    out, sm, sr, rm, rv = _batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    return out, _or_meta_zeros(sm, 1), _or_meta_zeros(sr, 2), _or_meta_zeros(None, 3), rm, rv


@register(aten._batch_norm_no_update.default)
def batch_norm_no_update(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, momentum: float,
                         eps: float) -> tuple[Any, ...]:
    out, *_ = _batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps)
    return out, _or_meta_zeros(None, 1), _or_meta_zeros(None, 2), _or_meta_zeros(None, 3)


# ----------------------------------------------------------------------------- pooling

def per_dim(values: Any, n: int, default: Sequence[int] | None = None) -> list[int]:
    if values is None or (isinstance(values, (list, tuple)) and len(values) == 0):
        return list(default) if default is not None else [1] * n
    if isinstance(values, int):
        return [values] * n
    values = [int(v) for v in values]
    return values * n if len(values) == 1 else values


def _max_pool(n: int):
    def rule(x: Any, kernel_size: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
             ceil_mode: bool = False) -> tuple[Any, Any]:
        kernel = per_dim(kernel_size, n)
        return pooling.max_pool(x, kernel, per_dim(stride, n, default=kernel), per_dim(padding, n),
                                per_dim(dilation, n), ceil_mode, out_aval(0).shape[-n:])
    return rule


register(aten.max_pool2d_with_indices.default)(_max_pool(2))
register(aten.max_pool3d_with_indices.default)(_max_pool(3))


def _avg_divisor(in_spatial: Sequence[int], out_spatial: Sequence[int], kernel: list[int], stride: list[int],
                 padding: list[int], count_include_pad: bool, divisor_override: int | None) -> np.ndarray:
    """torch's per-output divisor: the window clipped to the padded (or unpadded) input."""
    if divisor_override:
        return np.full(tuple(out_spatial), divisor_override, dtype=np.float64)
    counts = []
    for size, o, k, s, p in zip(in_spatial, out_spatial, kernel, stride, padding):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, size + p)
        padded_len = end - start
        clipped_len = np.minimum(end, size) - np.maximum(start, 0)
        counts.append(padded_len if count_include_pad else clipped_len)
    return np.prod(np.meshgrid(*counts, indexing="ij"), axis=0).astype(np.float64)


def _avg_pool(n: int):
    def rule(x: Any, kernel_size: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
             count_include_pad: bool = True, divisor_override: int | None = None) -> Any:
        kernel = per_dim(kernel_size, n)
        stride_ = per_dim(stride, n, default=kernel)
        padding_ = per_dim(padding, n)
        out_spatial = out_aval().shape[-n:]
        total = None
        for w in windows(x, kernel, stride_, padding_, [1] * n, out_spatial, 0):
            total = w if total is None else lax.add(total, w)
        divisor = _avg_divisor(x.shape[-n:], out_spatial, kernel, stride_, padding_, count_include_pad,
                               divisor_override)
        div = lax.broadcast_in_dim(literal(divisor, x.dtype), total.shape, tuple(range(x.ndim - n, x.ndim)))
        return lax.div(total, div)
    return rule


register(aten.avg_pool1d.default)(_avg_pool(1))
register(aten.avg_pool2d.default)(_avg_pool(2))
register(aten.avg_pool3d.default)(_avg_pool(3))


def _adaptive_avg_pool(n: int):
    def rule(x: Any, output_size: Sequence[int]) -> Any:
        out_spatial = out_aval().shape[-n:]
        y = x
        counts = []
        for j, o in enumerate(out_spatial):
            dim = x.ndim - n + j
            size = x.shape[dim]
            starts = (np.arange(o) * size) // o
            ends = -((-(np.arange(o) + 1) * size) // o)
            mask = np.zeros((size, o), dtype=x.dtype)
            for i, (s, e) in enumerate(zip(starts, ends)):
                mask[s:e, i] = 1
            counts.append((ends - starts).astype(np.float64))
            y = lax.dot_general(y, literal(mask, x.dtype), (((dim,), (0,)), ((), ())))
            y = lax.transpose(y, tuple(range(dim)) + (y.ndim - 1,) + tuple(range(dim, y.ndim - 1)))
        divisor = np.prod(np.meshgrid(*counts, indexing="ij"), axis=0)
        return lax.div(y, lax.broadcast_in_dim(literal(divisor, x.dtype), y.shape, tuple(range(x.ndim - n, x.ndim))))
    return rule


register(aten._adaptive_avg_pool2d.default)(_adaptive_avg_pool(2))
register(aten._adaptive_avg_pool3d.default)(_adaptive_avg_pool(3))
register(aten.adaptive_avg_pool1d.default)(_adaptive_avg_pool(1))


def _adaptive_max_pool(n: int):
    """Windows of uneven length: gather each window's flat positions (short ones repeat their first)."""
    def rule(x: Any, output_size: Sequence[int]) -> tuple[Any, Any]:
        out_spatial = tuple(out_aval(0).shape[-n:])
        in_spatial = x.shape[-n:]
        ranges = []
        for size, o in zip(in_spatial, out_spatial):
            starts = (np.arange(o) * size) // o
            ends = -((-(np.arange(o) + 1) * size) // o)
            ranges.append(list(zip(starts.tolist(), ends.tolist())))
        width = [max(e - s for s, e in r) for r in ranges]
        table = np.zeros(out_spatial + (int(np.prod(width)),), dtype=np.int64)
        for cell in itertools.product(*[range(o) for o in out_spatial]):
            spans = [range(*ranges[d][cell[d]]) for d in range(n)]
            positions = [int(np.ravel_multi_index(p, in_spatial)) for p in itertools.product(*spans)]
            table[cell] = positions + [positions[0]] * (table.shape[-1] - len(positions))
        batch = x.shape[:-n]
        flat = lax.reshape(x, batch + (int(np.prod(in_spatial)),))
        index = lax.broadcast_in_dim(literal(table.reshape(-1), np.int64), batch + (table.size,), (len(batch),))
        windows_ = lax.reshape(lax.gather(flat, index, len(batch)), batch + table.shape)
        last = windows_.ndim - 1
        values, which = window_max(windows_)
        operand = lax.broadcast_in_dim(literal(table, np.int64), batch + table.shape,
                                       tuple(range(len(batch), len(batch) + n + 1)))
        picked = lax.gather(operand, lax.reshape(which, which.shape + (1,)), last)
        return values, lax.reshape(picked, which.shape)
    return rule


register(aten.adaptive_max_pool2d.default)(_adaptive_max_pool(2))
register(aten.adaptive_max_pool3d.default)(_adaptive_max_pool(3))


# ----------------------------------------------------------------------------- attention

@register(aten._scaled_dot_product_flash_attention_for_cpu.default)
def flash_attention_cpu(query: Any, key: Any, value: Any, dropout_p: float = 0.0, is_causal: bool = False, *,
                        attn_mask: Any = None, scale: float | None = None) -> tuple[Any, Any]:
    """(softmax(q k^T * scale + mask) v, logsumexp of the scores): torch's CPU flash kernel, without dropout,
    as the ``attention`` composite.

    torch's own decomposition returns the attention weights in place of the logsumexp.
    """
    if dropout_p:
        raise unsupported(f"dropout_p={dropout_p} (the CPU flash kernel draws its own random numbers)")
    d = out_aval(0).dtype
    q, k, v = cast(query, d), cast(key, d), cast(value, d)
    heads = q.shape[1]
    if k.shape[1] != heads:  # grouped-query attention: each key/value head serves consecutive query heads
        k, v = (_repeat_heads(t, heads // t.shape[1]) for t in (k, v))
    mask = None
    if attn_mask is not None:
        mask = lax.broadcast_to_rank(attn_mask, q.shape[:3] + k.shape[2:3])
        mask = (lax.select(mask, lax.full(mask.shape, 0, d), lax.full(mask.shape, -np.inf, d))
                if P.is_bool(mask.dtype) else cast(mask, d))
    out, lse = nn.dot_product_attention(q, k, v, mask, causal=is_causal, scale=scale)
    return out, cast(lax.stop_gradient(lse), out_aval(1).dtype)


def _repeat_heads(t: Any, times: int) -> Any:
    b, h, s, e = t.shape
    y = lax.broadcast_in_dim(t, (b, h, times, s, e), (0, 1, 3, 4))
    return lax.reshape(y, (b, h * times, s, e))


@register(lstm_layer_op._opoverload)
def lstm_layer(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, reverse: bool
               ) -> tuple[Any, Any, Any]:
    return nn.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
