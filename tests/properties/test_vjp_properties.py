"""Properties of vjp over random programs: reftrace's rules agree with JAX's and with finite differences."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reftrace as rt
from reftrace import lax
from reftrace.primitives import typecheck
from reftrace.primitives import stop_gradient_p
from reftrace.transforms.vjp import vjp
from tests.properties.programs import SMOOTH_OPS, programs
from tests.transforms.test_vjp import check_gradients, hvp_check

# second-order and convolution checks compile bigger graphs: run a fraction of the profile's examples
_FEWER = settings(max_examples=max(4, settings.default.max_examples // 2))


@given(programs(dtype=np.float64))
def test_gradients_match_jax_and_finite_differences(program):
    graph, args = program
    before = hash(graph), graph.eqns
    joint = vjp(graph)
    typecheck(joint)
    assert vjp(graph) == joint                       # deterministic: equal inputs, equal graphs
    assert (hash(graph), graph.eqns) == before       # and the input is untouched
    # finite differences see through stop_gradient, so only JAX can judge those programs
    has_stop = any(e.primitive is stop_gradient_p for e in graph.eqns)
    check_gradients(graph, args, finite_differences=not has_stop, rtol=1e-8, atol=1e-8)


@_FEWER
@given(programs(dtype=np.float64, ops=SMOOTH_OPS, max_steps=4, max_outputs=1))
def test_hessian_vector_products_match_jax(program):
    graph, args = program
    hvp_check(graph, args, rtol=1e-7, atol=1e-8)


@st.composite
def convolutions(draw):
    """Random conv_general_dilated parameters (1 or 2 spatial dims, groups, layouts)."""
    nspatial = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    grouping = draw(st.sampled_from(["feature", "batch"])) if groups > 1 else "feature"
    fgc, bgc = (groups, 1) if grouping == "feature" else (1, groups)
    in_per_group = draw(st.integers(1, 2))
    batch = draw(st.integers(1, 2)) * bgc
    channels = in_per_group * fgc
    out_features = draw(st.integers(1, 2)) * groups
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nspatial))
    lhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nspatial))
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nspatial))
    window = tuple(draw(st.integers(1, 3)) for _ in range(nspatial))
    sizes, padding = [], []
    for k in range(nspatial):
        size = draw(st.integers(1, 7))
        lo, hi = draw(st.integers(-1, 2)), draw(st.integers(-1, 2))
        span = (size - 1) * lhs_dil[k] + 1 + lo + hi - ((window[k] - 1) * rhs_dil[k] + 1)
        if span < 0:  # make sure the output is not empty
            hi -= span
        sizes.append(size)
        padding.append((lo, hi))
    lhs_logical = (batch, channels) + tuple(sizes)
    rhs_logical = (out_features, in_per_group) + window
    nd = nspatial + 2
    lhs_spec, rhs_spec, out_spec = (tuple(draw(st.permutations(range(nd)))) for _ in range(3))
    lhs_shape, rhs_shape = [0] * nd, [0] * nd
    for logical, physical in enumerate(lhs_spec):
        lhs_shape[physical] = lhs_logical[logical]
    for logical, physical in enumerate(rhs_spec):
        rhs_shape[physical] = rhs_logical[logical]
    params = dict(window_strides=strides, padding=tuple(padding), lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                  dimension_numbers=(lhs_spec, rhs_spec, out_spec), feature_group_count=fgc,
                  batch_group_count=bgc)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return tuple(lhs_shape), tuple(rhs_shape), params, rng


@_FEWER
@given(convolutions())
def test_convolution_gradients_match_jax(case):
    lhs_shape, rhs_shape, params, rng = case
    x, w = rng.uniform(-1, 1, lhs_shape), rng.uniform(-1, 1, rhs_shape)
    graph = rt.trace(lambda a, b: lax.conv_general_dilated(a, b, **params), x, w)
    check_gradients(graph, [x, w], rtol=1e-8, atol=1e-10)
