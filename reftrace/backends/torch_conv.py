"""Torch lowering of ``conv_general_dilated``: one ``torch.convNd``, with fast forms for the
convolutions a VJP makes (input gradients of strided convs as ``conv_transpose``, weight gradients
as ``convolution_backward``). Rows of ``reftrace.backends.torch_rules.torch_rules``; written, like
every rule there, to run both eagerly and on FX proxies.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from reftrace import primitives as P
from reftrace.backends.torch_dtypes import torch_dtype
from reftrace.backends.torch_rules import _py, _t, aval_of, pad_with_scalar, torch_rules
from reftrace.errors import UnsupportedOperatorError
from reftrace.primitives import is_float


_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _permute_unless_identity(x: Any, perm: Sequence[int]) -> Any:
    return x if list(perm) == list(range(len(perm))) else x.permute(list(perm))


def _conv(lhs: Any, rhs: Any, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count) -> Any:
    """lax.conv_general_dilated as one torch.convNd on (N, C, spatial...) operands.

    Layouts are permuted to torch's. Symmetric non-negative padding goes to torch's
    ``padding``; input dilation and any other (possibly negative) padding become one
    explicit zero pad. ``batch_group_count`` folds batch groups into channels and runs a
    conv with that many channel groups. Weight gradients and input-dilated convs (input
    gradients of strided convs) have faster forms, tried first.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    la, ra = aval_of(lhs), aval_of(rhs)
    nspatial = la.ndim - 2
    if nspatial > 3:
        raise UnsupportedOperatorError(f"conv_general_dilated with {nspatial} spatial dims has no torch "
                                       "lowering (torch convolutions have 1 to 3)")
    out_shape = P.conv_output_shape(la.shape, ra.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count)
    dtype = torch_dtype(la.dtype)
    if 0 in out_shape or la.shape[lhs_spec[1]] == 0:
        return torch.zeros(list(out_shape), dtype=dtype)
    weight_grad = _as_weight_gradient(lhs, rhs, out_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, batch_group_count)
    if weight_grad is not None:
        return weight_grad
    x = _permute_unless_identity(_t(lhs), lhs_spec)
    w = _permute_unless_identity(_t(rhs), rhs_spec)
    x_shape = [la.shape[d] for d in lhs_spec]
    transposed = _as_conv_transpose(x, w, x_shape, [ra.shape[d] for d in rhs_spec], window_strides, padding,
                                    lhs_dilation, rhs_dilation, feature_group_count, batch_group_count)
    if transposed is not None:
        return _permute_unless_identity(transposed, [int(i) for i in np.argsort(out_spec)])
    conv_padding = [0] * max(nspatial, 1)
    if all(lo == hi >= 0 for lo, hi in padding) and all(d == 1 for d in lhs_dilation):
        conv_padding, padding = [lo for lo, _ in padding] or [0], [(0, 0)] * nspatial  # torch pads itself
    config = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in zip(padding, lhs_dilation)]
    if any(c != (0, 0, 0) for c in config):
        x = pad_with_scalar(x, x_shape, _py(np.zeros((), la.dtype)), config)
        x_shape = x_shape[:2] + [n + (n - 1) * (d - 1) + lo + hi if n else lo + hi
                                 for n, d, (lo, hi) in zip(x_shape[2:], lhs_dilation, padding)]
    strides, dilation = list(window_strides), list(rhs_dilation)
    if nspatial == 0:  # a conv without spatial dims is a conv over one unit spatial dim
        x, w, strides, dilation = x.unsqueeze(-1), w.unsqueeze(-1), [1], [1]
        x_shape = x_shape + [1]
    groups = feature_group_count
    if batch_group_count > 1:
        n, c, b = x_shape[0], x_shape[1], batch_group_count
        x = x.reshape([b, n // b] + x_shape[1:]).transpose(0, 1).reshape([n // b, b * c] + x_shape[2:])
        groups = b
    y = _CONV[max(nspatial, 1)](x, w, None, strides, conv_padding, dilation, groups)
    if nspatial == 0:
        y = y.squeeze(-1)
    return _permute_unless_identity(y, [int(i) for i in np.argsort(out_spec)])


def _as_conv_transpose(x: Any, w: Any, x_shape: Sequence[int], w_shape: Sequence[int], window_strides, padding,
                       lhs_dilation, rhs_dilation, groups: int, batch_group_count: int) -> Any:
    """An input-dilated conv (the input gradient of a strided conv) as ``torch.conv_transposeNd``.

    ``conv_transpose(x, v, stride=s, padding=p, output_padding=op, dilation=d)`` correlates the
    s-dilated input, padded by ``d(k-1) - p`` (plus ``op`` on the high side), with ``v`` flipped
    and its channel axes swapped. So a conv with ``lhs_dilation = s`` and padding ``(lo, hi)``
    is one with ``p = d(k-1) - lo`` and ``op = hi - lo``, when those are in torch's range; this
    avoids materialising the dilated input. Returns None when the pattern does not apply.
    """
    nspatial = len(x_shape) - 2
    if not (1 <= nspatial <= 3) or all(s == 1 for s in lhs_dilation) or batch_group_count != 1:
        return None
    if any(st != 1 for st in window_strides):
        return None
    conv_pad, out_pad = [], []
    for k, (lo, hi), s, d in zip(w_shape[2:], padding, lhs_dilation, rhs_dilation):
        p, op = d * (k - 1) - lo, hi - lo
        if p < 0 or not 0 <= op < max(s, d):
            return None
        conv_pad.append(p)
        out_pad.append(op)
    o, c_per_group = w_shape[0], w_shape[1]
    spatial = list(w_shape[2:])
    v = w.reshape([groups, o // groups, c_per_group] + spatial).transpose(1, 2)
    v = v.reshape([groups * c_per_group, o // groups] + spatial).flip(list(range(2, 2 + nspatial)))
    return _CONV_TRANSPOSE[nspatial](x, v, None, list(lhs_dilation), conv_pad, out_pad, groups,
                                     list(rhs_dilation))


_CONV_TRANSPOSE = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


def _as_weight_gradient(lhs: Any, rhs: Any, out_shape: Sequence[int], window_strides: Sequence[int],
                        padding: Sequence[tuple[int, int]], lhs_dilation: Sequence[int],
                        rhs_dilation: Sequence[int], dimension_numbers: Any, feature_group_count: int,
                        batch_group_count: int) -> Any:
    """A weight-gradient conv (``_conv_vjp``'s rhs cotangent) as ``aten.convolution_backward``.

    For a forward conv with stride s, padding p, dilation d and g groups, that cotangent is
    ``conv(x, ct)`` with x's batch and feature roles swapped, the output cotangent ct as the
    kernel (its batch as in-features), ``window_strides = d``, ``rhs_dilation = s`` and
    ``batch_group_count = g``: ``out[c, o, j] = sum_{n,t} x[n, c, j*d + t*s - lo] ct[n, o, t]``,
    which is torch's weight gradient. As a plain conv its kernel is the whole cotangent dilated
    by s, which torch runs on a slow generic kernel; convolution_backward uses the backend's
    weight-gradient kernel (what ``torch.nn.grad.conv2d_weight`` calls). Returns None when the
    pattern does not apply.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    la, ra = aval_of(lhs), aval_of(rhs)
    nspatial = la.ndim - 2
    if (not 1 <= nspatial <= 3 or feature_group_count != 1 or any(ld != 1 for ld in lhs_dilation)
            or not is_float(la.dtype)):
        return None
    # Any conv is some weight gradient, but a forward conv is faster as itself (about 2x on CPU).
    # The layouts tell them apart: a weight gradient's lhs and rhs are activations (the forward
    # input and the output cotangent) with batch and feature roles swapped, so their batch axis
    # comes after the feature axis; a forward conv on NC.../N...C operands has it first.
    if lhs_spec[0] < lhs_spec[1] or rhs_spec[0] < rhs_spec[1]:
        return None
    x_sizes = [la.shape[d] for d in lhs_spec[2:]]
    o_sizes = [ra.shape[d] for d in rhs_spec[2:]]
    k_sizes = [out_shape[d] for d in out_spec[2:]]
    stride, dilation, pad = list(rhs_dilation), list(window_strides), [lo for lo, _ in padding]
    # convolution_backward requires o to be the forward's output size for input x, kernel k. Then
    # the high padding does not matter: torch reads x at j*d + t*s - p <= x - 1 + p, inside its
    # padded range; this conv reads the same indices, inside its own padded input (its output
    # has size k); both read zeros outside [0, x), and a negative high padding only crops
    # positions no window reads.
    for x, o, k, s, d, p in zip(x_sizes, o_sizes, k_sizes, stride, dilation, pad):
        if x == 0 or p < 0 or o != (x + 2 * p - d * (k - 1) - 1) // s + 1:
            return None
    inp = _permute_unless_identity(_t(lhs), [lhs_spec[1], lhs_spec[0], *lhs_spec[2:]])  # (N, C, x...)
    grad = _permute_unless_identity(_t(rhs), [rhs_spec[1], rhs_spec[0], *rhs_spec[2:]])  # (N, O, o...)
    groups = batch_group_count
    weight_size = [ra.shape[rhs_spec[0]], la.shape[lhs_spec[0]] // groups, *k_sizes]  # (O, C/g, k...)
    # Only the weight's shape is read. A full uninitialised tensor, not torch.nn.grad's expanded
    # 1-element one: CPU kernels copy a stride-0 weight to a contiguous one first.
    weight = grad.new_empty(weight_size)
    dw = torch.ops.aten.convolution_backward(grad, inp, weight, None, stride, pad, dilation, False,
                                             [0] * nspatial, groups, [False, True, False])[1]
    # this conv's output in torch order is (C/g, O, k...): dw with its first two axes swapped
    swap = [1, 0, *range(2, nspatial + 2)]
    return _permute_unless_identity(dw, [swap[int(i)] for i in np.argsort(out_spec)])


torch_rules[P.conv_general_dilated_p] = _conv
