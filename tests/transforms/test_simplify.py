"""simplify: dead code, common subexpressions, constant folding, identity forwarding;
values preserved (checked through the JAX backend), joint spec and input graph untouched."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
import reftrace.numpy as rnp
from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.graph import Aval, Graph, Literal
from reftrace.transforms.simplify import FOLD_LIMIT, FOLDABLE, eliminate_dead_code, simplify


def f32(*shape):
    return np.ones(shape, np.float32)


def by_hand(in_avals, body, joint=None):
    """A graph written primitive by primitive: ``body(builder, *inputs) -> outputs``."""
    b = Builder()
    ins = [b.new_var(Aval(s, d)) for s, d in in_avals]
    outs = body(b, *ins)
    return b.build(ins, outs, joint)


def prims(graph):
    return [e.primitive.name for e in graph.eqns]


def jax_values(graph, *args):
    return [np.asarray(v) for v in rt.lower(graph, "jax")(*args)]


def assert_same_values(g1, g2, *args):
    for a, b in zip(jax_values(g1, *args), jax_values(g2, *args), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


KEY = Literal.of(np.array([3, 4], np.uint32))


# ----------------------------------------------------------------------------- dead code

def test_dead_code_is_removed_random_draws_included():
    def body(b, x):
        (unused,) = b.bind(P.exp_p, [x])
        b.bind(P.sin_p, [unused])
        b.bind(P.random_p, [KEY], dict(shape=(3,), dtype=np.dtype(np.float32), distribution="normal"))
        (y,) = b.bind(P.cos_p, [x])
        return [y]
    g = by_hand([((3,), np.float32)], body)
    assert prims(g) == ["exp", "sin", "random", "cos"]
    assert prims(simplify(g)) == ["cos"]
    assert prims(eliminate_dead_code(g)) == ["cos"]


def test_live_equations_all_stay():
    g = rt.trace(lambda x: (rnp.sin(x), rnp.exp(rnp.cos(x))), f32(3))
    assert simplify(g) == g


# ----------------------------------------------------------------------------- common subexpressions

def test_common_subexpressions_are_shared():
    g = rt.trace(lambda x: rnp.cos(x) * rnp.cos(x) + rnp.cos(x) * rnp.cos(x), f32(3))
    assert prims(g) == ["cos", "cos", "mul", "cos", "cos", "mul", "add"]
    s = simplify(g)
    assert prims(s) == ["cos", "mul", "add"]
    cos_out = s.eqns[0].outputs[0]
    assert s.eqns[1].inputs == (cos_out, cos_out)
    assert s.eqns[2].inputs == (s.eqns[1].outputs[0],) * 2
    assert_same_values(g, s, np.linspace(0, 1, 3, dtype=np.float32))


def test_cse_respects_params_and_literal_values():
    g = rt.trace(lambda x: (rnp.sum(x, axis=0), rnp.sum(x, axis=1), rnp.sum(x, axis=0),
                            x * 2.0, x * 3.0, x * 2.0, x * np.float64(2.0).astype(np.float32)), f32(2, 2))
    s = simplify(g)
    assert prims(s) == ["reduce_sum", "reduce_sum", "mul", "mul"]
    assert s.outputs[0] is s.outputs[2] and s.outputs[0] is not s.outputs[1]
    assert s.outputs[3] is s.outputs[5] is s.outputs[6] and s.outputs[3] is not s.outputs[4]


def test_random_draws_with_one_key_are_one_draw():
    params = dict(shape=(4,), dtype=np.dtype(np.float32), distribution="uniform")

    def body(b, key):
        (r1,) = b.bind(P.random_p, [key], params)
        (r2,) = b.bind(P.random_p, [key], params)
        (r3,) = b.bind(P.random_p, [key], dict(params, distribution="normal"))
        (s,) = b.bind(P.add_p, [r1, r2])
        return [s, r3]
    g = by_hand([((2,), np.uint32)], body)
    s = simplify(g)
    assert prims(s) == ["random", "random", "add"]
    assert_same_values(g, s, np.array([7, 9], np.uint32))


# ----------------------------------------------------------------------------- folding

def lit(value, dtype):
    return Literal.of(np.asarray(value, dtype))


def test_literal_chains_fold_into_one_literal():
    def body(b, x):
        (two,) = b.bind(P.add_p, [lit(1.5, np.float32), lit(0.5, np.float32)])
        (neg,) = b.bind(P.neg_p, [two])
        (y,) = b.bind(P.mul_p, [x, neg])
        return [y]
    s = simplify(by_hand([((3,), np.float32)], body))
    assert prims(s) == ["mul"]
    assert s.eqns[0].inputs[1] == lit(-2.0, np.float32)


def test_only_small_results_are_folded():
    def body(b):
        (small,) = b.bind(P.broadcast_in_dim_p, [lit(1.0, np.float32)],
                          dict(shape=(FOLD_LIMIT,), broadcast_dimensions=()))
        (big,) = b.bind(P.broadcast_in_dim_p, [lit(1.0, np.float32)],
                        dict(shape=(FOLD_LIMIT + 1,), broadcast_dimensions=()))
        return [small, big]
    s = simplify(by_hand([], body))
    assert isinstance(s.outputs[0], Literal) and s.outputs[0].shape == (FOLD_LIMIT,)
    assert prims(s) == ["broadcast_in_dim"] and s.outputs[1] == s.eqns[0].outputs[0]


def test_transcendentals_are_not_folded():
    def body(b):
        (c,) = b.bind(P.cos_p, [lit(1.0, np.float32)])
        return [c]
    assert prims(simplify(by_hand([], body))) == ["cos"]


FOLD_CASES = [
    (P.add_p, [[1.5, np.inf, -0.0], [2.25, -np.inf, -0.0]], np.float32, {}),
    (P.sub_p, [[1, -2**31, 5], [3, 1, -7]], np.int32, {}),
    (P.mul_p, [[2**62, 3, -1], [4, 5, 7]], np.int64, {}),
    (P.div_p, [[1.0, 0.0, -3.0], [3.0, 0.0, 0.0]], np.float64, {}),
    (P.div_p, [[-7, 7, -7, 7], [2, -2, -2, 2]], np.int32, {}),
    (P.rem_p, [[-7, 7, -7, 7], [2, -2, -2, 2]], np.int64, {}),
    (P.rem_p, [[-7.5, 7.5], [2.0, -2.0]], np.float32, {}),
    (P.max_p, [[1, -5, 3], [2, -6, 3]], np.int8, {}),
    (P.min_p, [[True, False], [True, True]], np.bool_, {}),
    (P.neg_p, [[1.0, -0.0, np.nan]], np.float64, {}),
    (P.abs_p, [[-3, 4, -2**31]], np.int32, {}),
    (P.sqrt_p, [[2.0, 0.25, -1.0]], np.float32, {}),
    (P.floor_p, [[-1.5, 2.5, -0.0]], np.float64, {}),
    (P.ceil_p, [[-1.5, 2.5]], np.float32, {}),
    (P.not_p, [[True, False]], np.bool_, {}),
    (P.not_p, [[0, 5, -1]], np.int32, {}),
    (P.and_p, [[12, 10], [10, 6]], np.uint8, {}),
    (P.or_p, [[True, False], [False, False]], np.bool_, {}),
    (P.xor_p, [[12, 10], [10, 6]], np.int16, {}),
    (P.lt_p, [[1.0, np.nan, 2.0], [2.0, 1.0, 2.0]], np.float32, {}),
    (P.eq_p, [[1.0, np.nan, -0.0], [1.0, np.nan, 0.0]], np.float64, {}),
    (P.ge_p, [[1, 2, 3], [3, 2, 1]], np.uint32, {}),
    (P.is_finite_p, [[1.0, np.inf, np.nan]], np.float32, {}),
    (P.convert_element_type_p, [[1.7, -1.7, 3.0e9]], np.float64, dict(new_dtype=np.dtype(np.float32))),
    (P.convert_element_type_p, [[1.7, -1.7, 0.0]], np.float32, dict(new_dtype=np.dtype(np.int32))),
    (P.convert_element_type_p, [[0.0, -2.0, np.nan]], np.float32, dict(new_dtype=np.dtype(np.bool_))),
    (P.convert_element_type_p, [[300, -1]], np.int32, dict(new_dtype=np.dtype(np.uint8))),
    (P.reduce_sum_p, [[[1, 2], [2**31 - 1, 4]]], np.int32, dict(axes=(0,))),
    (P.reduce_max_p, [[[1, 2], [3, 4]]], np.int64, dict(axes=(1,))),
    (P.reduce_or_p, [[[True, False], [False, False]]], np.bool_, dict(axes=(0, 1))),
    (P.reshape_p, [[1.0, 2.0, 3.0, 4.0]], np.float32, dict(new_sizes=(2, 2))),
    (P.transpose_p, [[[1, 2, 3], [4, 5, 6]]], np.int32, dict(permutation=(1, 0))),
    (P.broadcast_in_dim_p, [[1.0, 2.0]], np.float64, dict(shape=(3, 2), broadcast_dimensions=(1,))),
    (P.slice_p, [[1, 2, 3, 4, 5]], np.int32, dict(start_indices=(1,), limit_indices=(5,), strides=(2,))),
    (P.rev_p, [[[1, 2], [3, 4]]], np.int32, dict(dimensions=(0, 1))),
    (P.concatenate_p, [[1.0, 2.0], [3.0]], np.float32, dict(dimension=0)),
]


@pytest.mark.parametrize("prim, values, dtype, params", FOLD_CASES,
                         ids=[f"{c[0].name}-{np.dtype(c[2]).name}" for c in FOLD_CASES])
def test_folding_agrees_with_the_jax_backend(prim, values, dtype, params):
    """A folded equation gives bit for bit what the backend computes for the unfolded one."""
    def body(b, *ins):
        return list(b.bind(prim, ins, params))
    operands = [np.asarray(v, dtype) for v in values]
    unfolded = by_hand([(o.shape, o.dtype) for o in operands], body)
    literal = simplify(by_hand([], lambda b: body(b, *[Literal.of(o) for o in operands])))
    assert literal.eqns == () and isinstance(literal.outputs[0], Literal), f"{prim.name} was not folded"
    (expected,) = jax_values(unfolded, *operands)
    got = literal.outputs[0].value
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(np.signbit(got), np.signbit(expected)) if got.dtype.kind == "f" else True


def test_iota_folds():
    def body(b):
        return list(b.bind(P.iota_p, [], dict(dtype=np.dtype(np.int32), shape=(2, 3), dimension=1)))
    s = simplify(by_hand([], body))
    np.testing.assert_array_equal(s.outputs[0].value, [[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("prim, a, b", [
    (P.div_p, [1, 2], [0, 1]),            # integer division by zero: the backend's own definition
    (P.div_p, [-2**31, 4], [-1, 2]),      # INT_MIN / -1 overflows
    (P.rem_p, [1, 2], [1, 0]),
    (P.max_p, [-0.0, 1.0], [0.0, 2.0]),   # float max/min: signed zeros are left to the backend
])
def test_risky_folds_are_declined(prim, a, b):
    dtype = np.float32 if isinstance(a[0], float) else np.int32
    g = by_hand([], lambda bl: list(bl.bind(prim, [lit(a, dtype), lit(b, dtype)])))
    assert prims(simplify(g)) == [prim.name]


def test_out_of_range_float_to_int_is_not_folded():
    g = by_hand([], lambda b: list(b.bind(P.convert_element_type_p, [lit([3e10, 1.0], np.float32)],
                                          dict(new_dtype=np.dtype(np.int32)))))
    assert prims(simplify(g)) == ["convert_element_type"]


def test_every_foldable_primitive_is_a_primitive():
    assert set(FOLDABLE) <= set(P.registry.values())
    assert not ({P.cos_p, P.exp_p, P.random_p, P.dot_general_p} & set(FOLDABLE))


# ----------------------------------------------------------------------------- identities

def test_identities_are_forwarded():
    def body(b, x):
        (r,) = b.bind(P.reshape_p, [x], dict(new_sizes=(2, 3)))
        (c,) = b.bind(P.convert_element_type_p, [r], dict(new_dtype=np.dtype(np.float32)))
        (t,) = b.bind(P.transpose_p, [c], dict(permutation=(0, 1)))
        (bc,) = b.bind(P.broadcast_in_dim_p, [t], dict(shape=(2, 3), broadcast_dimensions=(0, 1)))
        (sl,) = b.bind(P.slice_p, [bc], dict(start_indices=(0, 0), limit_indices=(2, 3), strides=(1, 1)))
        (pd,) = b.bind(P.pad_p, [sl, lit(0.0, np.float32)], dict(padding_config=((0, 0, 0), (0, 0, 0))))
        (rv,) = b.bind(P.rev_p, [pd], dict(dimensions=()))
        (rs,) = b.bind(P.reduce_sum_p, [rv], dict(axes=()))
        (cat,) = b.bind(P.concatenate_p, [rs], dict(dimension=0))
        (y,) = b.bind(P.sin_p, [cat])
        return [y, cat]
    g = by_hand([((2, 3), np.float32)], body)
    s = simplify(g)
    assert prims(s) == ["sin"]
    assert s.eqns[0].inputs == (s.inputs[0],) and s.outputs[1] is s.inputs[0]
    rt.typecheck(s)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert_same_values(g, s, x)


def test_non_identities_and_stop_gradient_stay():
    def body(b, x):
        (r,) = b.bind(P.reshape_p, [x], dict(new_sizes=(3, 2)))
        (t,) = b.bind(P.transpose_p, [x], dict(permutation=(1, 0)))
        (c,) = b.bind(P.convert_element_type_p, [x], dict(new_dtype=np.dtype(np.float64)))
        (sg,) = b.bind(P.stop_gradient_p, [x])  # an identity on values, but not for vjp
        return [r, t, c, sg]
    s = simplify(by_hand([((2, 3), np.float32)], body))
    assert prims(s) == ["reshape", "transpose", "convert_element_type", "stop_gradient"]


# ----------------------------------------------------------------------------- contracts

def test_joint_spec_is_preserved():
    g = rt.trace(lambda x, ct: (rnp.cos(x), ct * rnp.sin(x) * rnp.sin(x), rnp.exp(x) * 0.0 + ct), f32(3), f32(3))
    j = g.replace(joint=(1, 1))
    s = simplify(j)
    assert s.joint == (1, 1) and len(s.inputs) == 2 and len(s.outputs) == 3
    assert prims(s).count("sin") == 1
    jv = rt.vjp(rt.trace(lambda x: rnp.cos(x) * rnp.cos(x), f32(3)))
    assert simplify(jv).joint == jv.joint


def test_input_graph_is_unchanged_and_result_is_new():
    g = rt.trace(lambda x: rnp.cos(x) + rnp.cos(x), f32(3))
    before = (g.inputs, g.eqns, g.outputs, g.joint, hash(g))
    twin = Graph(g.inputs, g.eqns, g.outputs)
    s = simplify(g)
    assert (g.inputs, g.eqns, g.outputs, g.joint, hash(g)) == before and g == twin
    assert s != g and len(s.eqns) < len(g.eqns)


def test_rt_simplify_is_this_function_and_checks_its_argument():
    assert rt.simplify is simplify
    with pytest.raises(rt.ReftraceError):
        simplify(lambda x: x)


# ----------------------------------------------------------------------------- random programs

UNARY = [rnp.cos, rnp.sin, rnp.tanh, rnp.exp, lambda x: x.reshape(-1).reshape(2, 3), lambda x: x.astype(np.float32)]
BINARY = [lambda x, y: x + y, lambda x, y: x * y, lambda x, y: rnp.maximum(x, y),
          lambda x, y: x * 2.0 + (rnp.sum(y, axis=0, keepdims=True) * 0.5)]


@st.composite
def programs(draw):
    steps = draw(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 99), st.integers(0, 99)),
                          min_size=1, max_size=10))
    outputs = draw(st.lists(st.integers(0, 99), min_size=1, max_size=3))
    return steps, outputs


def build(program, num_inputs=2):
    steps, outputs = program

    def fn(*xs):
        pool = list(xs)
        for unary, op, i, k in steps:
            x, y = pool[i % len(pool)], pool[k % len(pool)]
            pool.append(UNARY[op](x) if unary else BINARY[op % len(BINARY)](x, y))
            pool.append(UNARY[op](x) if unary else BINARY[op % len(BINARY)](x, y))  # a duplicate to share
        return tuple(pool[o % len(pool)] for o in outputs)

    return rt.trace(fn, *[np.ones((2, 3), np.float32)] * num_inputs)


@given(programs())
def test_random_programs_keep_their_values(program):
    g = build(program)
    s = simplify(g)
    rt.typecheck(s)
    assert len(s.eqns) <= len(g.eqns) and len(s.inputs) == len(g.inputs) and len(s.outputs) == len(g.outputs)
    assert simplify(s) == s, "simplify is idempotent"
    assert len({(e.primitive, e.params, e.inputs) for e in s.eqns}) == len(s.eqns), "no duplicates remain"
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((2, 3)).astype(np.float32) for _ in g.inputs]
    assert_same_values(g, s, *args)


# ----------------------------------------------------------------------------- slices put back

def test_a_splits_cotangent_becomes_one_concatenation():
    """The VJP of x[..., :4], x[..., 4:8], x[..., 8:] pads each slice's cotangent back to x's size
    and adds them: simplify joins them into one concatenate, with the same bits, and the gradient
    is still jax.grad's."""
    import jax
    import jax.numpy as jnp
    x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)

    def f(x, np_=rnp):
        q, k, v = x[:, :, :4], x[:, :, 4:8], x[:, :, 8:]
        return np_.sum(np_.tanh(q) * np_.sin(k) + np_.cos(v))
    joint = rt.vjp(rt.trace(f, x))
    assert prims(joint).count("pad") == 3
    s = simplify(joint)
    assert prims(s).count("concatenate") == 1 and "pad" not in prims(s) and prims(s).count("add") == 1
    assert_same_values(joint, s, x, np.float32(1.0))
    np.testing.assert_allclose(jax_values(s, x, np.float32(1.0))[1], jax.grad(lambda x: f(x, jnp))(x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranges,joined", [
    (((0, 3), (3, 5)), True),                # adjacent, covering the axis: a concatenation alone
    (((1, 3), (3, 4)), True),                # adjacent inside the axis: pad(concatenate) by (1, 2)
    (((0, 2), (3, 5)), False),               # a gap between them
    (((0, 3), (2, 5)), False),               # overlapping
])
def test_only_adjacent_zero_pads_along_one_axis_are_joined(ranges, joined):
    (a0, a1), (b0, b1) = ranges

    def body(b, x, y):
        zero = Literal.of(np.float32(0))
        (px,) = b.bind(P.pad_p, [x, zero], {"padding_config": ((0, 0, 0), (a0, 6 - a1, 0))})
        (py,) = b.bind(P.pad_p, [y, zero], {"padding_config": ((0, 0, 0), (b0, 6 - b1, 0))})
        return b.bind(P.add_p, [py, px], {})
    g = by_hand([((2, a1 - a0), np.float32), ((2, b1 - b0), np.float32)], body)
    s = simplify(g)
    assert ("concatenate" in prims(s)) == joined and ("add" in prims(s)) != joined
    if joined:
        assert prims(s).count("pad") == (0 if (a0, b1) == (0, 6) else 1)
    rng = np.random.default_rng(1)
    assert_same_values(g, s, *[rng.standard_normal(v.shape).astype(np.float32) for v in g.inputs])


def test_pads_with_a_value_or_interior_padding_are_not_joined():
    def body(b, x, y, value, interior):
        (px,) = b.bind(P.pad_p, [x, Literal.of(np.float32(value))], {"padding_config": ((0, 3, interior),)})
        (py,) = b.bind(P.pad_p, [y, Literal.of(np.float32(0))], {"padding_config": ((3 + 2 * interior, 0, 0),)})
        return b.bind(P.add_p, [px, py], {})
    for value, interior in ((1.0, 0), (0.0, 1), (-0.0, 0)):
        g = by_hand([((3,), np.float32), ((3,), np.float32)], lambda b, x, y: body(b, x, y, value, interior))
        assert "concatenate" not in prims(simplify(g))
