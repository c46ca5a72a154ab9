"""``with_zero_inputs``: a graph linear in some inputs, specialized to some of them being zero."""
from __future__ import annotations

import numpy as np
import pytest

import reftrace as rt
from reftrace import lax
from reftrace.backends.jax import lower_jax
from reftrace.backends.torch import lower_torch
from reftrace.errors import ArgumentError
from reftrace.transforms.zeros import with_zero_inputs


def _backward_like(s, c1, c2):
    """Linear in (c1, c2); ``s`` holds an infinite slope."""
    return (lax.add(lax.mul(c1, s), lax.mul(c2, np.float64(2.0))),  # a sum with a zero term
            lax.mul(c1, s),  # zero
            lax.sub(lax.mul(c1, s), c2),  # minus the other term
            lax.select(lax.gt(s, np.float64(1.0)), c1, c2))  # zeros read explicitly


def test_zero_terms_are_left_out_not_multiplied():
    s, ones = np.array([np.inf, 1.0, -3.0]), np.ones(3)
    graph = rt.trace(_backward_like, s, ones, ones)
    specialized = with_zero_inputs(graph, linear_inputs=[1, 2], zero_inputs=[1])
    rt.typecheck(specialized)
    assert len(specialized.inputs) == 2
    want = [2 * ones, 0 * ones, -ones, np.where(s > 1, 0.0, 1.0)]
    for run in (lambda: lower_jax(specialized)(s, ones), lambda: [t.numpy() for t in lower_torch(specialized)(
            *(__import__("torch").from_numpy(a) for a in (s, ones)))]):
        for got, w in zip(run(), want):
            np.testing.assert_array_equal(np.asarray(got), w)  # no NaN from 0 * inf
    # the same graph run on an explicit zero gives NaN where s is infinite
    assert np.isnan(np.asarray(lower_jax(graph)(s, 0 * ones, ones)[0])[0])


def test_zero_inputs_must_be_linear_inputs():
    graph = rt.trace(_backward_like, np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(ArgumentError, match="linear inputs"):
        with_zero_inputs(graph, linear_inputs=[2], zero_inputs=[1])


@pytest.mark.parametrize("zero", [0, 1])
def test_a_kept_term_broadcasts_to_the_sums_shape(zero):
    """``a + b`` with ``b`` of rank 0 (elementwise ops broadcast it): when ``a`` is the zero, the sum is
    ``b`` broadcast to ``a``'s shape, not ``b`` itself; likewise ``0 - b``."""
    a, b = np.array([1.0, 2.0, 3.0]), np.array(5.0)
    graph = rt.trace(lambda a, b: (lax.add(a, b), lax.sub(b, a) if zero else lax.sub(a, b)), a, b)
    specialized = with_zero_inputs(graph, linear_inputs=[0, 1], zero_inputs=[zero])
    rt.typecheck(specialized)
    args = [a, b][1 - zero:2 - zero]
    za, zb = (0 * a, b) if zero == 0 else (a, 0 * b)
    want = [za + zb, zb - za if zero else za - zb]
    for got, w in zip(lower_jax(specialized)(*args), want):
        assert np.asarray(got).shape == (3,)
        np.testing.assert_array_equal(np.asarray(got), w)
