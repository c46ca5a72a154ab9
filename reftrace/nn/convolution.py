"""Convolution (torch's layout and parameters) as a composite, with its input and weight
gradients as composites too.

As core primitives, a biased convolution is a ``conv_general_dilated``, a broadcast and an
``add`` (one more pass over the output), and its input gradient is a convolution of the
cotangent with the flipped, feature-swapped kernel (a flip and a layout change per step).
Eager torch runs one convolution with the bias fused, and ``convolution_backward`` for the
gradients; the composites here carry exactly those calls. Their decompositions are the core
convolution and the VJP rule of ``conv_general_dilated`` (``conv_lhs_cotangent``,
``conv_rhs_cotangent``), so every backend without a fused rule computes the same values.
"""
from __future__ import annotations

from typing import Any, Sequence

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import along
from reftrace.transforms.vjp_rules import conv_lhs_cotangent, conv_rhs_cotangent, vjp_rules


def _core_params(ndim: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int) -> dict[str, Any]:
    """The ``conv_general_dilated`` parameters of a torch convolution on rank-``ndim`` operands."""
    spec = tuple(range(ndim))
    return dict(window_strides=tuple(stride), padding=tuple((p, p) for p in padding),
                lhs_dilation=(1,) * (ndim - 2), rhs_dilation=tuple(dilation), dimension_numbers=(spec, spec, spec),
                feature_group_count=groups, batch_group_count=1)


def _convolution(x: Any, w: Any, *bias: Any, stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], groups: int, has_bias: bool) -> Any:
    y = lax.conv_general_dilated(x, w, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                 feature_group_count=groups)
    return lax.add(y, along(bias[0], y.shape, (1,))) if has_bias else y


def _conv_input_grad(g: Any, w: Any, *, input_shape: tuple[int, ...], stride: tuple[int, ...],
                     padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Any:
    return conv_lhs_cotangent(g, w, input_shape, **_core_params(g.ndim, stride, padding, dilation, groups))


def _conv_weight_grad(g: Any, x: Any, *, weight_shape: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Any:
    return conv_rhs_cotangent(g, x, weight_shape, **_core_params(g.ndim, stride, padding, dilation, groups))


convolution_p = define_composite("convolution", _convolution, compute_intensive=True)
conv_input_grad_p = define_composite("conv_input_grad", _conv_input_grad, compute_intensive=True)
conv_weight_grad_p = define_composite("conv_weight_grad", _conv_weight_grad, compute_intensive=True)


def convolution(x: Any, w: Any, bias: Any = None, *, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int = 1) -> Any:
    """torch's ``convolution`` (not transposed): ``x`` (N, C, *spatial), ``w`` (O, C/groups, *kernel),
    optional ``bias`` (O,), symmetric zero ``padding`` per spatial dim."""
    n = x.ndim - 2
    params = dict(stride=_ints(stride, n), padding=_ints(padding, n), dilation=_ints(dilation, n), groups=int(groups))
    if bias is None:
        return lax.bind(convolution_p, x, w, has_bias=False, **params)
    return lax.bind(convolution_p, x, w, bias, has_bias=True, **params)


def _ints(values: Sequence[int], n: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != n:
        from reftrace.errors import ShapeError
        raise ShapeError(f"convolution: {len(values)} values {values} for {n} spatial dims")
    return values


def _convolution_vjp(cts, primals, outs, *, stride, padding, dilation, groups, has_bias):
    (g,), (x, w, *_) = cts, primals
    x, w = lax.conj_if_complex(x), lax.conj_if_complex(w)  # complex: the adjoint (docs/complex.md)
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dx = lax.bind(conv_input_grad_p, g, w, input_shape=x.shape, **common)
    dw = lax.bind(conv_weight_grad_p, g, x, weight_shape=w.shape, **common)
    if not has_bias:
        return dx, dw
    return dx, dw, lax.reduce_sum(g, (0,) + tuple(range(2, g.ndim)))


vjp_rules[convolution_p] = _convolution_vjp
