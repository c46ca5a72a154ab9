"""rt.cost: the FLOP model per primitive, a graph's and a partition's costs, and recomputation
measured from the partition alone agreeing with an independent count (forward + backward - joint)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
import reftrace.numpy as rnp
from reftrace import lax
from reftrace.composite import decompose
from reftrace.transforms.cost import eqn_flops, graph_flops, recompute_flops
from tests.transforms.test_optimal import build, programs
from tests.transforms.test_partition import f64


def only_eqn(fn, *args):
    g = rt.trace(fn, *args)
    assert len(g.eqns) == 1, g
    return g.eqns[0]


def test_dot_general_is_two_flops_per_multiply_add():
    x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
    assert eqn_flops(only_eqn(lambda x, w: x @ w, x, w)) == 2 * 8 * 4 * 16
    batched = only_eqn(lambda a, b: lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))),
                       np.ones((3, 5, 7), np.float32), np.ones((3, 7, 2), np.float32))
    assert eqn_flops(batched) == 2 * (3 * 5 * 2) * 7


def test_convolution_is_two_flops_per_kernel_tap_and_input_channel():
    x, k = np.ones((2, 3, 10, 10), np.float32), np.ones((6, 3, 3, 3), np.float32)
    conv = only_eqn(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0))), x, k)
    out = conv.outputs[0]
    assert out.shape == (2, 6, 8, 8)
    assert eqn_flops(conv) == 2 * out.size * 3 * 3 * 3


def test_elementwise_reductions_and_data_movement():
    x = np.ones((4, 5), np.float32)
    assert eqn_flops(only_eqn(rnp.tanh, x)) == 20
    assert eqn_flops(only_eqn(lambda x: x * x, x)) == 20
    assert eqn_flops(only_eqn(lambda x: rnp.sum(x, axis=1), x)) == 20      # one per input element
    assert eqn_flops(only_eqn(lambda x: x.T, x)) == 0                      # data movement is free
    assert eqn_flops(only_eqn(lambda x: rnp.reshape(x, (20,)), x)) == 0
    assert eqn_flops(only_eqn(lambda x: lax.integer_pow(x, 5), x)) == 3 * 20  # x*x, (x^2)^2, x^4 * x


def test_a_composite_costs_its_decomposition():
    x, gamma, beta = f64(4, 8), f64(8, seed=1), f64(8, seed=2)
    g = rt.trace(lambda x, g, b: rt.nn.layer_norm(x, g, b, normalized_ndim=1, eps=1e-5), x, gamma, beta)
    assert [e.primitive.name for e in g.eqns] == ["layer_norm"]
    assert eqn_flops(g.eqns[0]) == graph_flops(decompose(g)) > 0


def test_graph_cost():
    g = rt.trace(lambda x: rnp.cos(rnp.cos(x)), np.ones(3, np.float32))
    c = rt.cost(g)
    assert (c.flops, c.bytes_accessed) == (6, 2 * (12 + 12))
    assert c.peak_bytes == 12 + 12 + 12    # the input, cos x (until the second cos has run) and the output
    assert (c.saved_bytes, c.activation_bytes, c.recompute_flops) == (0, 0, 0)


def test_partition_costs_of_the_design_example():
    j = rt.vjp(rt.trace(lambda x: rnp.cos(rnp.cos(x)), np.ones(3, np.float32)))
    default, mincut = rt.cost(rt.partition(j, "default")), rt.cost(rt.partition(j, "mincut"))
    # default saves -sin(cos a) and -sin(a): 24 activation bytes, nothing recomputed
    assert (default.saved_bytes, default.activation_bytes, default.recompute_flops) == (24, 24, 0)
    # mincut saves the input (free) and repeats `cos a` (3 FLOPs); sin/neg only ever run in the backward
    assert (mincut.saved_bytes, mincut.activation_bytes, mincut.recompute_flops) == (12, 0, 3)
    assert mincut.flops == default.flops + 3
    # peak, default: forward a,b=cos a,c,d=sin b,e=-d,f=sin a,g=-f -> 60 at g; backward: a, c, ct (36) +
    # e, g (24) + one product at a time (12) = 72
    assert default.peak_bytes == 72


def test_cost_rejects_other_values():
    with pytest.raises(rt.ArgumentError, match="Graph or a Partition"):
        rt.cost("default")


@given(programs(), st.integers(0, 2**16))
def test_recomputation_is_forward_plus_backward_minus_the_joint(program, seed):
    """For any policy, the FLOPs matched as repeats equal the extra work over the joint graph:
    every joint equation runs in the forward, the backward, or both."""
    j = rt.vjp(build(program))

    def coin(eqn):
        return hash((seed, eqn.outputs[0].id)) % 3 != 0
    for policy in ("default", "mincut", coin, rt.optimal(0)):
        try:
            p = rt.partition(j, policy)
        except rt.PartitionError:  # a budget of 0 with a random draw to save
            continue
        extra = graph_flops(p.forward) + graph_flops(p.backward) - graph_flops(rt.simplify(j))
        assert recompute_flops(p) == extra
        c = rt.cost(p)
        assert c.activation_bytes == p.saved_activation_bytes
        assert c.saved_bytes == p.saved_bytes
        assert c.peak_bytes >= max(rt.cost(p.forward).peak_bytes, c.saved_bytes)
