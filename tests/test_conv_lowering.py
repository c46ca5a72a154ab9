"""The torch lowering's fast paths for convolutions agree with the JAX backend.

Input-dilated convs (the input gradients of strided convs) run as ``conv_transpose`` in
``torch_rules``; they must equal lax's semantics, and fall back where the pattern does not fit.
"""
import itertools

import numpy as np

import reftrace as rt
import reftrace.backends.torch_rules as torch_rules
from reftrace import lax


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
    original = getattr(torch_rules, name)

    def spy(*a, **k):
        out = original(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(torch_rules, name, spy)
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
