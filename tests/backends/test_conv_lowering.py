"""The torch lowering's fast paths for convolutions agree with the JAX backend.

Input-dilated convs (the input gradients of strided convs) run as ``conv_transpose`` and
weight-gradient convs (``_conv_vjp``'s rhs cotangent) as ``aten.convolution_backward`` in
``torch_conv``; they must equal lax's semantics, and fall back where the pattern does not fit.
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reftrace as rt
import reftrace.backends.torch_conv as torch_conv
from reftrace import lax
from reftrace.backends.torch import to_fx
from reftrace.compile import aot_function


def _agree(fn, *args):
    try:
        g = rt.trace(fn, *args)
    except rt.ShapeError:
        return False
    if 0 in g.outputs[0].shape:
        return False
    want = np.asarray(rt.lower(g, "jax")(*args)[0])
    got = rt.lower(g, "torch")(*args)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    return True


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(torch_conv, name)

    def spy(*a, **k):
        out = original(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(torch_conv, name, spy)
    return calls


def test_input_dilated_convs_as_conv_transpose(monkeypatch):
    calls = _count_calls(monkeypatch, "_as_conv_transpose")
    rng = np.random.default_rng(0)
    checked = 0
    for s, d, g, k, lo, hi in itertools.product([2, 3], [1, 2], [1, 2], [1, 3], [0, 2, 4], [0, 1, 3]):
        x, w = rng.standard_normal((2, 2 * g, 5, 4)), rng.standard_normal((2 * g, 2, k, k))
        checked += _agree(lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), ((lo, hi), (lo, hi)), lhs_dilation=(s, s), rhs_dilation=(d, d), feature_group_count=g),
            x, w)
    assert checked > 50 and sum(calls) > 20  # the fast path ran, and fell back where it must


# ----------------------------------------------------------------------------- weight gradients

def _grads_agree(x, w, **conv):
    """Both cotangents of ``conv_general_dilated(x, w, **conv)``, torch lowering vs JAX, in float64.

    Returns whether the torch code computes one with ``convolution_backward``; None when the
    conv is invalid or empty."""
    fn = lambda x, w: lax.conv_general_dilated(x, w, **conv)  # noqa: E731
    try:
        g = rt.trace(fn, x, w)
    except rt.ShapeError:
        return None
    if 0 in g.outputs[0].shape:
        return None
    joint = rt.vjp(g)
    args = (x, w, np.random.default_rng(1).standard_normal(g.outputs[0].shape))
    want = rt.lower(joint, "jax")(*args)
    gm = to_fx(joint)
    got = gm(*[torch.from_numpy(a) for a in args])
    for a, b in zip(want, got, strict=True):
        assert b.shape == a.shape
        np.testing.assert_allclose(b.numpy(), np.asarray(a), rtol=1e-10, atol=1e-10)
    return "convolution_backward" in gm.code


def test_weight_gradients_2d():
    """Strides, dilations, groups, non-square kernels, odd sizes whose last rows no window reads
    (the output size floors), asymmetric and negative padding."""
    rng = np.random.default_rng(0)
    taken = fell_back = 0
    for s, d, g, lo, extra in itertools.product([1, 3], [1, 2], [1, 2], [0, 2], [-1, 0, 1, 3]):
        hi = lo + extra
        x, w = rng.standard_normal((2, 2 * g, 7, 8)), rng.standard_normal((3 * g, 2, 3, 2))
        fast = _grads_agree(x, w, window_strides=(s, 1), padding=((lo, hi), (1, 1)), rhs_dilation=(d, 1),
                            feature_group_count=g)
        if fast is None:
            continue
        consistent = (7 + 2 * lo - d * 2 - 1) // s == (7 + lo + hi - d * 2 - 1) // s
        assert fast == consistent  # taken exactly when torch's output-size formula holds
        taken += fast
        fell_back += not fast
    assert taken > 20 and fell_back > 20


@pytest.mark.parametrize("x_shape, w_shape, conv", [
    # 1d: stride 3 (the last input rows are unused), dilation, padding
    ((2, 3, 11), (4, 3, 3), dict(window_strides=(3,), padding=((2, 2),), rhs_dilation=(2,))),
    # 1d depthwise (groups == channels), channel multiplier 2
    ((3, 4, 9), (8, 1, 2), dict(window_strides=(2,), padding=((1, 1),), feature_group_count=4)),
    # 2d depthwise, non-square kernel, mixed strides and dilations
    ((2, 3, 8, 9), (3, 1, 3, 2), dict(window_strides=(2, 3), padding=((1, 1), (0, 0)), rhs_dilation=(1, 2),
                                      feature_group_count=3)),
    # 3d: strides, dilation, padding, groups, non-cubic kernel
    ((2, 4, 5, 6, 7), (6, 2, 3, 1, 2), dict(window_strides=(2, 1, 3), padding=((1, 1), (0, 0), (2, 2)),
                                            rhs_dilation=(1, 1, 2), feature_group_count=2)),
    # NHWC / HWIO / NHWC with groups
    ((2, 9, 8, 4), (3, 2, 2, 6), dict(window_strides=(2, 3), padding=((1, 1), (2, 2)), rhs_dilation=(2, 1),
                                      feature_group_count=2, dimension_numbers=((0, 3, 1, 2), (3, 2, 0, 1),
                                                                                (0, 3, 1, 2)))),
    # NWC / WIO / NCW (output layout differs from the input's)
    ((2, 10, 3), (3, 3, 5), dict(window_strides=(2,), padding=((1, 1),),
                                 dimension_numbers=((0, 2, 1), (2, 1, 0), (0, 1, 2)))),
])
def test_weight_gradients_take_convolution_backward(x_shape, w_shape, conv):
    rng = np.random.default_rng(0)
    assert _grads_agree(rng.standard_normal(x_shape), rng.standard_normal(w_shape), **conv) is True


@pytest.mark.parametrize("x_shape, w_shape, conv", [
    # the padding gives more output rows than torch's formula for the low padding
    ((1, 2, 6, 6), (2, 2, 3, 3), dict(window_strides=(1, 1), padding=((0, 2), (1, 1)))),
    # negative low padding
    ((1, 2, 6, 6), (2, 2, 3, 3), dict(window_strides=(2, 1), padding=((-1, 1), (1, 1)))),
    # input dilation (a transposed conv's weight gradient)
    ((1, 2, 4, 4), (2, 2, 3, 3), dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2))),
    # batch groups in the forward conv: feature groups in its weight gradient
    ((4, 3, 5, 5), (4, 3, 2, 2), dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), batch_group_count=2)),
    # a CNHW forward: its weight gradient's operands have batch before feature, as forward convs do
    ((3, 2, 6, 6), (4, 3, 3, 3), dict(window_strides=(2, 2), padding=((1, 1), (1, 1)),
                                      dimension_numbers=((1, 0, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)))),
])
def test_weight_gradients_fall_back(x_shape, w_shape, conv):
    rng = np.random.default_rng(0)
    assert _grads_agree(rng.standard_normal(x_shape), rng.standard_normal(w_shape), **conv) is False


def test_forward_convs_stay_direct():
    """A forward conv also computes ``sum x * w``; it must stay one convNd (the faster one)."""
    rng = np.random.default_rng(0)
    for dn in [((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3)), ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))]:
        x = rng.standard_normal((2, 4, 6, 6) if dn[0][1] == 1 else (2, 6, 6, 4))
        w = rng.standard_normal((5, 4, 3, 3) if dn[1][0] == 0 else (3, 3, 4, 5))
        g = rt.trace(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                           dimension_numbers=dn), x, w)
        code = to_fx(g).code
        assert "conv2d" in code and "convolution_backward" not in code
        assert _agree(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
                      x, w)


@pytest.mark.parametrize("conv, x_shape, w_shape, kw", [
    (F.conv1d, (2, 4, 13), (6, 2, 3), dict(stride=3, padding=2, dilation=2, groups=2)),
    (F.conv2d, (2, 3, 11, 8), (4, 3, 3, 2), dict(stride=(2, 3), padding=(1, 2), dilation=(2, 1))),
    (F.conv2d, (1, 4, 9, 9), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),  # depthwise
    (F.conv3d, (1, 4, 7, 6, 5), (2, 2, 3, 2, 1), dict(stride=(2, 1, 2), padding=(1, 0, 1), groups=2)),
])
def test_torch_bridge_weight_gradients(conv, x_shape, w_shape, kw):
    """Through ``aot_function``: gradients equal eager torch's in float64, the backward calls
    convolution_backward, and the generated module is scriptable."""
    backward_code = []

    def scripted(gm, _):
        backward_code.append(gm.code)
        return torch.jit.script(gm)

    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w: conv(x, w, **kw).sin().sum()  # noqa: E731
    compiled = aot_function(fn, lambda gm, _: gm, scripted)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(fn(x, w), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert "convolution_backward" in backward_code[0]


def test_weight_gradient_follows_the_inputs_device():
    """The code creates no tensor of its own device: meta inputs give meta gradients."""
    x, w = np.ones((2, 4, 9, 8)), np.ones((6, 2, 3, 2))
    joint = rt.vjp(rt.trace(lambda x, w: lax.conv_general_dilated(x, w, (2, 1), ((1, 1), (2, 2)), rhs_dilation=(1, 2),
                                                                   feature_group_count=2), x, w))
    gm = to_fx(joint)
    assert "convolution_backward" in gm.code
    outs = gm(*[torch.empty(v.aval.shape, dtype=torch.float64, device="meta") for v in joint.inputs])
    assert [(o.device.type, tuple(o.shape)) for o in outs] == [("meta", v.aval.shape) for v in joint.outputs]
