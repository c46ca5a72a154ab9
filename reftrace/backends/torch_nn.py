"""Torch lowerings of the composites in ``reftrace.nn``: each one ATen kernel, as eager torch runs it.

Rows of ``reftrace.backends.torch_rules.torch_rules``; like every rule there they run both
eagerly and on FX proxies. A row returns ``NotImplemented`` for operands its kernel does not
take, and the composite then runs as its decomposition. Each composite's decomposition is its meaning, and
``tests/backends/test_composites.py`` checks every row here against it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reftrace.backends.torch_dtypes import torch_dtype
from reftrace.backends.torch_rules import _t, aval_of, device_type, torch_rules
from reftrace.nn import activations as A
from reftrace.nn.attention import attention_backward_p, attention_p
from reftrace.nn.ctc import ctc_loss_backward_p, ctc_loss_p
from reftrace.nn.rnn import lstm_layer_backward_p, lstm_layer_p
from reftrace.nn.convolution import conv_input_grad_p, conv_weight_grad_p, convolution_p
from reftrace.nn.pooling import max_pool_backward_p, max_pool_p
from reftrace.nn.embeddings import embedding_backward_p, embedding_p
from reftrace.nn.dense import linear_p
from reftrace.nn.losses import (binary_cross_entropy_backward_p, binary_cross_entropy_p, nll_loss_backward_p,
                                nll_loss_p)
from reftrace.nn import norms as N
from reftrace.nn._util import statistics_dtype
from reftrace.nn.special import entr_p, xlog1py_p, xlogy_p
from reftrace.nn.vector_norms import vector_norm_p

aten = torch.ops.aten


def _optional(operands: tuple[Any, ...], *present: bool) -> list[Any]:
    values, it = [], iter(operands)
    for here in present:
        values.append(_t(next(it)) if here else None)
    return values


def _statistics(out: Any, x: Any, parameters: tuple[Any, ...]) -> tuple[Any, Any]:
    """A normalization kernel's saved mean and rstd in the composite's dtype (``statistics_dtype``): a
    half-precision kernel may return float32 statistics on some devices."""
    dtype = statistics_dtype(aval_of(x).dtype, [aval_of(p).dtype for p in parameters])
    return tuple(s.to(torch_dtype(dtype)) if dtype.itemsize < 4 else s for s in (out[1], out[2]))


# ----------------------------------------------------------------------------- activations

torch_rules[A.relu_p] = lambda x: torch.relu(_t(x))
torch_rules[xlogy_p] = lambda x, y: torch.xlogy(_t(x), _t(y))
torch_rules[xlog1py_p] = lambda x, y: torch.special.xlog1py(_t(x), _t(y))
torch_rules[entr_p] = lambda x: torch.special.entr(_t(x))
torch_rules[A.relu_backward_p] = lambda g, y: aten.threshold_backward(_t(g), _t(y), 0)
torch_rules[A.gelu_p] = lambda x, *, approximate: aten.gelu(_t(x), approximate=approximate)
torch_rules[A.gelu_backward_p] = lambda g, x, *, approximate: aten.gelu_backward(_t(g), _t(x),
                                                                                 approximate=approximate)
torch_rules[A.silu_p] = lambda x: aten.silu(_t(x))
torch_rules[A.silu_backward_p] = lambda g, x: aten.silu_backward(_t(g), _t(x))
torch_rules[A.hardsigmoid_p] = lambda x: aten.hardsigmoid(_t(x))
torch_rules[A.hardsigmoid_backward_p] = lambda g, x: aten.hardsigmoid_backward(_t(g), _t(x))
torch_rules[A.softmax_p] = lambda x, *, axis: aten._softmax(_t(x), axis, False)
torch_rules[A.log_softmax_p] = lambda x, *, axis: aten._log_softmax(_t(x), axis, False)
torch_rules[A.softmax_backward_p] = lambda g, y, *, axis: aten._softmax_backward_data(
    _t(g), _t(y), axis, torch_dtype(aval_of(y).dtype))
torch_rules[A.log_softmax_backward_p] = lambda g, y, *, axis: aten._log_softmax_backward_data(
    _t(g), _t(y), axis, torch_dtype(aval_of(y).dtype))


torch_rules[linear_p] = lambda x, w, b: torch.addmm(_t(b), _t(x), _t(w))
torch_rules[embedding_p] = lambda w, idx, *, padding_idx, scale_grad_by_freq: aten.embedding(
    _t(w), _t(idx), padding_idx, scale_grad_by_freq)
torch_rules[embedding_backward_p] = lambda g, idx, *, num_weights, padding_idx, scale_grad_by_freq: (
    aten.embedding_dense_backward(_t(g), _t(idx), num_weights, padding_idx, scale_grad_by_freq))


# ----------------------------------------------------------------------------- norms

def _layer_norm(x: Any, *affine: Any, normalized_ndim: int, eps: float, has_weight: bool, has_bias: bool
                ) -> tuple[Any, Any, Any]:
    weight, bias = _optional(affine, has_weight, has_bias)
    shape = list(aval_of(x).shape[aval_of(x).ndim - normalized_ndim:])
    out = aten.native_layer_norm(_t(x), shape, weight, bias, eps)
    return out[0], *_statistics(out, x, affine)


def _layer_norm_backward(g: Any, x: Any, mean: Any, rstd: Any, *affine: Any, normalized_ndim: int,
                         has_weight: bool, has_bias: bool) -> tuple[Any, ...]:
    weight, bias = _optional(affine, has_weight, has_bias)
    shape = list(aval_of(x).shape[aval_of(x).ndim - normalized_ndim:])
    grads = aten.native_layer_norm_backward(_t(g), _t(x), shape, _t(mean), _t(rstd), weight, bias,
                                            [True, has_weight, has_bias])
    return (grads[0], *([grads[1]] if has_weight else []), *([grads[2]] if has_bias else []))


def _group_sizes(x: Any) -> tuple[int, int, int]:
    """(N, C, spatial size) of an (N, C, *spatial) operand, as ``native_group_norm`` takes them."""
    shape = aval_of(x).shape
    return shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))


def _group_norm(x: Any, *affine: Any, groups: int, eps: float, has_weight: bool, has_bias: bool
                ) -> tuple[Any, Any, Any]:
    weight, bias = _optional(affine, has_weight, has_bias)
    out = aten.native_group_norm(_t(x), weight, bias, *_group_sizes(x), groups, eps)
    return out[0], *_statistics(out, x, affine)


def _group_norm_backward(g: Any, x: Any, mean: Any, rstd: Any, *affine: Any, groups: int, has_weight: bool,
                         has_bias: bool) -> tuple[Any, ...]:
    weight, _ = _optional(affine, has_weight, has_bias)
    grads = aten.native_group_norm_backward(_t(g), _t(x), _t(mean), _t(rstd), weight, *_group_sizes(x), groups,
                                            [True, has_weight, has_bias])
    return (grads[0], *([grads[1]] if has_weight else []), *([grads[2]] if has_bias else []))


def _batch_norm_train(x: Any, *rest: Any, eps: float, momentum: float, has_weight: bool, has_bias: bool,
                      has_running_stats: bool) -> tuple[Any, ...]:
    weight, bias, running_mean, running_var = _optional(rest, has_weight, has_bias, has_running_stats,
                                                        has_running_stats)
    if not has_running_stats:
        out = aten.native_batch_norm(_t(x), weight, bias, None, None, True, momentum, eps)
        return out[0], *_statistics(out, x, rest)
    out = aten._native_batch_norm_legit_functional(_t(x), weight, bias, running_mean, running_var, True,
                                                   momentum, eps)
    return out[0], *_statistics(out, x, rest), out[3], out[4]


def _batch_norm_eval(x: Any, running_mean: Any, running_var: Any, *affine: Any, eps: float, has_weight: bool,
                     has_bias: bool) -> Any:
    weight, bias = _optional(affine, has_weight, has_bias)
    return aten._native_batch_norm_legit_no_training(_t(x), weight, bias, _t(running_mean), _t(running_var),
                                                     0.0, eps)[0]


def _batch_norm_backward(g: Any, x: Any, mean: Any, stat: Any, *affine: Any, eps: float, training: bool,
                         has_weight: bool, has_bias: bool) -> tuple[Any, ...]:
    weight, bias = _optional(affine, has_weight, has_bias)
    saved = [_t(mean), _t(stat)] if training else [None, None]
    running = [None, None] if training else [_t(mean), _t(stat)]
    grads = aten.native_batch_norm_backward(_t(g), _t(x), weight, *running, *saved, training, eps,
                                            [True, has_weight, has_bias])
    return (grads[0], *([grads[1]] if has_weight else []), *([grads[2]] if has_bias else []))


torch_rules[N.layer_norm_p] = _layer_norm
torch_rules[N.layer_norm_backward_p] = _layer_norm_backward
torch_rules[N.group_norm_p] = _group_norm
torch_rules[N.group_norm_backward_p] = _group_norm_backward
torch_rules[N.batch_norm_train_p] = _batch_norm_train
torch_rules[N.batch_norm_eval_p] = _batch_norm_eval
torch_rules[N.batch_norm_backward_p] = _batch_norm_backward


# ----------------------------------------------------------------------------- attention
# torch's CPU flash kernels (the ones eager SDPA runs on CPU)

def _flash_takes(q: Any, v: Any) -> bool:
    """The CPU flash kernels run on the CPU, with one head size for queries and values."""
    return aval_of(q).shape[-1] == aval_of(v).shape[-1] and device_type(q) == "cpu"


def _attention(q: Any, k: Any, v: Any, *mask: Any, causal: bool, scale: float, has_mask: bool) -> Any:
    if not _flash_takes(q, v):
        return NotImplemented
    out = aten._scaled_dot_product_flash_attention_for_cpu(_t(q), _t(k), _t(v), 0.0, causal,
                                                           attn_mask=_t(mask[0]) if has_mask else None, scale=scale)
    return out[0], out[1]


def _attention_backward(g: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *mask: Any, causal: bool, scale: float,
                        has_mask: bool) -> Any:
    if not _flash_takes(q, v):
        return NotImplemented
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(g), _t(q), _t(k), _t(v), _t(out), _t(lse), 0.0, causal, attn_mask=_t(mask[0]) if has_mask else None,
        scale=scale)
    return grads[0], grads[1], grads[2]


torch_rules[attention_p] = _attention
torch_rules[attention_backward_p] = _attention_backward


# ----------------------------------------------------------------------------- losses

def _nll_loss(logp: Any, target: Any, *weight: Any, reduction: int, ignore_index: int, has_weight: bool
              ) -> tuple[Any, Any]:
    out = aten.nll_loss_forward(_t(logp), _t(target), _t(weight[0]) if has_weight else None, reduction,
                                ignore_index)
    return out[0], out[1]


def _nll_loss_backward(g: Any, logp: Any, target: Any, *rest: Any, reduction: int, ignore_index: int,
                       has_weight: bool) -> Any:
    weight, total = (_t(rest[0]), rest[1]) if has_weight else (None, rest[0])
    return aten.nll_loss_backward(_t(g), _t(logp), _t(target), weight, reduction, ignore_index, _t(total))


torch_rules[nll_loss_p] = _nll_loss
torch_rules[nll_loss_backward_p] = _nll_loss_backward
torch_rules[binary_cross_entropy_p] = lambda p, t, *w, reduction, has_weight: aten.binary_cross_entropy(
    _t(p), _t(t), _t(w[0]) if has_weight else None, reduction)
torch_rules[binary_cross_entropy_backward_p] = lambda g, p, t, *w, reduction, has_weight: (
    aten.binary_cross_entropy_backward(_t(g), _t(p), _t(t), _t(w[0]) if has_weight else None, reduction))


def _ctc_kernel_takes(lp: Any) -> bool:
    """ATen's CTC kernels are float32/float64 only (a half-precision loss runs as the decomposition)."""
    return aval_of(lp).dtype in (np.float32, np.float64)


def _ctc_loss(lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    if not _ctc_kernel_takes(lp):
        return NotImplemented
    nll = aten._ctc_loss(_t(lp), _t(targets), _t(il), _t(tl), blank, zero_infinity)[0]
    # ``_ctc_loss`` leaves an impossible alignment's inf for ``ctc_loss`` to zero (its backward zeroes the gradient)
    return torch.where(nll == float("inf"), torch.zeros_like(nll), nll) if zero_infinity else nll


def _ctc_loss_backward(g: Any, lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    if not _ctc_kernel_takes(lp):
        return NotImplemented
    operands = (_t(lp), _t(targets), _t(il), _t(tl))
    nll, log_alpha = aten._ctc_loss(*operands, blank, zero_infinity)  # what the backward kernel reads
    return aten._ctc_loss_backward(_t(g), *operands, nll, log_alpha, blank, zero_infinity)


torch_rules[ctc_loss_p] = _ctc_loss
torch_rules[ctc_loss_backward_p] = _ctc_loss_backward


# ----------------------------------------------------------------------------- recurrent layers

_LSTM_MODE = 2  # oneDNN's cell kinds: RNN_RELU 0, RNN_TANH 1, LSTM 2, GRU 3


def _takes_onednn(x: Any) -> bool:
    """Whether eager would run oneDNN's fused layer here: float32, on the CPU, in a torch with oneDNN (and
    not an empty sequence, which oneDNN refuses)."""
    aval = aval_of(x)
    return (aval.dtype == np.float32 and aval.size > 0 and device_type(x) == "cpu"
            and torch.backends.mkldnn.is_available())


def _lstm_layer(x: Any, h0: Any, c0: Any, *weights: Any, reverse: bool) -> Any:
    if not _takes_onednn(x):
        return NotImplemented
    hidden = aval_of(h0).shape[1]
    # oneDNN reads its operands' memory as contiguous (a batch-first sequence comes transposed)
    x, h0, c0, *weights = (_t(a).contiguous() for a in (x, h0, c0, *weights))
    out = aten.mkldnn_rnn_layer(x, *weights, h0, c0, reverse, [], _LSTM_MODE, hidden, 1, True, False, False, False)
    return out[0], out[1], out[2]


@torch.library.custom_op("reftrace::onednn_lstm_layer_backward", mutates_args=())
def onednn_lstm_layer_backward(g_ys: torch.Tensor, g_h: torch.Tensor, g_c: torch.Tensor, x: torch.Tensor,
                               h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                               b_ih: torch.Tensor, b_hh: torch.Tensor, reverse: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """The gradients of one LSTM layer (x, h0, c0, then the weights) by oneDNN's backward, after its
    forward again for the workspace the backward reads: one op, so that the forward runs with
    gradients on (oneDNN writes no workspace otherwise, and a backward runs with them off)."""
    hidden = h0.shape[1]
    weights = (w_ih, w_hh, b_ih, b_hh)
    with torch.enable_grad():
        out, hy, cy, workspace = aten.mkldnn_rnn_layer(x, *weights, h0, c0, reverse, [], _LSTM_MODE, hidden, 1, True,
                                                       False, False, True)
    grads = aten.mkldnn_rnn_layer_backward(x, *weights, h0, c0, out, hy, cy, g_ys, g_h, g_c, reverse, _LSTM_MODE,
                                           hidden, 1, True, True, False, [], False, workspace)
    return grads[0], grads[5], grads[6], grads[1], grads[2], grads[3], grads[4]


@onednn_lstm_layer_backward.register_fake
def _onednn_lstm_layer_backward_shapes(g_ys: torch.Tensor, g_h: torch.Tensor, g_c: torch.Tensor, *primals: torch.Tensor,
                                       reverse: bool) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(p) for p in primals)


def _lstm_layer_backward(g_ys: Any, g_h: Any, g_c: Any, x: Any, h0: Any, c0: Any, *weights: Any, reverse: bool
                         ) -> Any:
    if not _takes_onednn(x):
        return NotImplemented
    # called through ``torch.ops`` (the overload packet): TorchScript cannot look up ``.default``
    grads = torch.ops.reftrace.onednn_lstm_layer_backward(
        *(_t(a).contiguous() for a in (g_ys, g_h, g_c, x, h0, c0, *weights)), reverse)
    return tuple(grads[k] for k in range(7))  # indexed: an FX proxy does not unpack


torch_rules[lstm_layer_p] = _lstm_layer
torch_rules[lstm_layer_backward_p] = _lstm_layer_backward


# ----------------------------------------------------------------------------- convolution
# torch.convNd with the bias fused, and aten.convolution_backward for each gradient (to_fx merges
# the two calls of one convolution into one, what eager's autograd runs); operands of zero size run
# as the decomposition.

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _conv_takes(*operands: Any) -> bool:
    avals = [aval_of(v) for v in operands]
    return 1 <= avals[0].ndim - 2 <= 3 and all(a.size for a in avals)


def _convolution(x: Any, w: Any, *bias: Any, stride, padding, dilation, groups, has_bias) -> Any:
    if not _conv_takes(x, w):
        return NotImplemented
    return _CONV[aval_of(x).ndim - 2](_t(x), _t(w), _t(bias[0]) if has_bias else None, list(stride), list(padding),
                                      list(dilation), groups)


def _convolution_backward(g: Any, x: Any, w: Any, which: int, *, stride, padding, dilation, groups) -> Any:
    mask = [which == 0, which == 1, False]
    return aten.convolution_backward(g, x, w, None, list(stride), list(padding), list(dilation), False,
                                     [0] * len(stride), groups, mask)[which]


def _conv_input_grad(g: Any, w: Any, *, input_shape, **params: Any) -> Any:
    """The input's own values are not read, only its shape: an uninitialised tensor stands in."""
    if not _conv_takes(g, w) or 0 in input_shape:
        return NotImplemented
    g = _t(g)
    return _convolution_backward(g, g.new_empty(list(input_shape)), _t(w), 0, **params)


def _conv_weight_grad(g: Any, x: Any, *, weight_shape, **params: Any) -> Any:
    if not _conv_takes(g, x) or 0 in weight_shape:
        return NotImplemented
    g = _t(g)
    return _convolution_backward(g, _t(x), g.new_empty(list(weight_shape)), 1, **params)


torch_rules[convolution_p] = _convolution
torch_rules[conv_input_grad_p] = _conv_input_grad
torch_rules[conv_weight_grad_p] = _conv_weight_grad


# ----------------------------------------------------------------------------- max pooling

_MAX_POOL = {2: (aten.max_pool2d_with_indices, aten.max_pool2d_with_indices_backward),
             3: (aten.max_pool3d_with_indices, aten.max_pool3d_with_indices_backward)}


def _pool_takes(x: Any, kernel: tuple[int, ...]) -> bool:
    aval = aval_of(x)
    return len(kernel) in _MAX_POOL and aval.ndim in (len(kernel) + 1, len(kernel) + 2) and aval.size > 0 \
        and aval.dtype.kind == "f"


def _max_pool(x: Any, *, kernel, stride, padding, dilation, ceil_mode, out_spatial) -> Any:
    if not _pool_takes(x, kernel):
        return NotImplemented
    forward, _ = _MAX_POOL[len(kernel)]
    out = forward(_t(x), list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    return out[0], out[1]


def _max_pool_backward(g: Any, x: Any, indices: Any, *, kernel, stride, padding, dilation, ceil_mode,
                       out_spatial) -> Any:
    if not _pool_takes(x, kernel):
        return NotImplemented
    _, backward = _MAX_POOL[len(kernel)]
    return backward(_t(g), _t(x), list(kernel), list(stride), list(padding), list(dilation), ceil_mode, _t(indices))


torch_rules[max_pool_p] = _max_pool
torch_rules[max_pool_backward_p] = _max_pool_backward


def _vector_norm(x: Any, *, ord: float, axes: tuple[int, ...]) -> Any:  # noqa: A002 - torch's name
    return torch.linalg.vector_norm(_t(x), ord, dim=list(axes) if axes else None)


torch_rules[vector_norm_p] = _vector_norm
