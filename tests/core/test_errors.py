"""Bad input to a public verb raises a ReftraceError subclass whose message names the cause.

Each case pins the exception class *and* a piece of the message that names what was wrong
(the argument, the shape, the dtype) or what to do, so a raw TypeError/ValueError from deep
inside, or a vague message, fails here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import reftrace as rt
import reftrace.numpy as rnp
from reftrace.errors import (ArgumentError, DataDependentControlFlowError, PartitionError, ShapeError,
                             TracingError)
from reftrace.transforms.policies import MinCut

X23 = np.arange(6.0).reshape(2, 3)
F32_23 = np.ones((2, 3), np.float32)


def cos_graph():
    return rt.trace(lambda x: rnp.cos(x), F32_23)


def int32_scalar_graph():
    return rt.trace(lambda i: i + 1, np.array(1, np.int32))


def trace23(fn):
    return lambda: rt.trace(fn, X23)


# (id, thunk, exception class, regex the message must match)
CASES = [
    # ---- rt.trace: the function, its arguments, its outputs
    ("trace-string-output", lambda: rt.trace(lambda x: "hello", np.ones(3)), TracingError,
     r"output 0 is a str; rt\.trace outputs must be arrays"),
    ("trace-none-output", lambda: rt.trace(lambda x: None, np.ones(3)), TracingError, r"output 0 is a NoneType"),
    ("trace-nested-output", lambda: rt.trace(lambda x: ((x, x), x), np.ones(3)), TracingError,
     r"output 0 is a tuple.*flat tuple/list of arrays"),
    ("trace-string-argument", lambda: rt.trace(lambda x: x, "abc"), ArgumentError,
     r"argument 0 is str 'abc', not an array"),
    ("trace-none-argument", lambda: rt.trace(lambda x: x, None), ArgumentError, r"argument 0 is NoneType"),
    ("trace-extended-complex-argument", lambda: rt.trace(lambda x: x * 2, np.ones(3, np.clongdouble)),
     ArgumentError, r"input 0 has dtype complex256, which a graph cannot hold; graphs hold bool, integer, floating "
                    r"and complex64/complex128 arrays"),
    ("trace-extended-complex-second-argument", lambda: rt.trace(lambda x, y: x, np.ones(3),
                                                                np.ones(2, np.clongdouble)),
     ArgumentError, r"input 1 has dtype complex256, which a graph cannot hold"),
    ("trace-datetime-argument", lambda: rt.trace(lambda x: x, np.array(["2020-01-01"], "datetime64[D]")),
     ArgumentError, r"input 0 has dtype datetime64\[D\].*bool, integer, floating and complex64/complex128"),
    ("trace-int-beyond-int64", lambda: rt.trace(lambda x: x, 2**70), ArgumentError,
     r"Python int 1180591620717411303424, which does not fit int64"),
    ("trace-ragged-list", lambda: rt.trace(lambda x: x, [[1], [1, 2]]), ArgumentError,
     r"argument 0 \(list\) is not a numeric array"),
    ("trace-not-callable", lambda: rt.trace(3, np.ones(3)), ArgumentError, r"expects a function first.*got int"),
    ("trace-a-graph", lambda: rt.trace(cos_graph(), F32_23), ArgumentError, r"already traced.*rt\.lower"),
    ("trace-too-few-arguments", lambda: rt.trace(lambda x, y: x, X23), ArgumentError,
     r"cannot take 1 example argument.*'y'"),
    ("trace-too-many-arguments", lambda: rt.trace(lambda x: x, X23, X23), ArgumentError,
     r"cannot take 2 example argument"),
    ("trace-keyword", lambda: rt.trace(lambda x: x, X23, foo=1), ArgumentError, r"keyword arguments \['foo'\]"),
    # ---- Python conversions of traced values name the conversion
    ("float-of-traced", trace23(lambda x: float(x[0, 0])), DataDependentControlFlowError,
     r"^float\(x\) on a traced f64\[\]"),
    ("int-of-traced", trace23(lambda x: int(x[0, 0])), DataDependentControlFlowError, r"^int\(x\) on a traced f64\[\]"),
    ("bool-of-traced", trace23(lambda x: 1 if x[0, 0] > 0 else 0), DataDependentControlFlowError,
     r"truth value of a traced bool\[\]"),
    ("index-of-traced", trace23(lambda x: range(x[0, 0])), DataDependentControlFlowError,
     r"Python index .* traced f64\[\]"),
    ("complex-of-traced", trace23(lambda x: complex(x[0, 0])), DataDependentControlFlowError,
     r"^complex\(x\) on a traced"),
    ("len-of-rank0", trace23(lambda x: len(x[0, 0])), ArgumentError, r"len\(\) of a rank-0 traced f64\[\]"),
    ("iterate-rank0", trace23(lambda x: [r for r in x[0, 0]]), ArgumentError, r"iteration over a rank-0"),
    ("numpy-function-on-traced", trace23(lambda x: np.cos(x)), TracingError,
     r"traced f64\[2,3\] cannot become a concrete numpy array"),
    # ---- reftrace.numpy: axes, shapes, dtypes, indices
    ("sum-axis-out-of-range", trace23(lambda x: rnp.sum(x, axis=5)), ShapeError,
     r"sum: axis 5 is out of bounds for an array of rank 2"),
    ("sum-axis-string", trace23(lambda x: rnp.sum(x, axis="a")), ArgumentError, r"sum: axis must be .* got str"),
    ("mean-repeated-axis", trace23(lambda x: rnp.mean(x, axis=(0, 0))), ShapeError, r"mean: repeated axis"),
    ("argmax-axis", trace23(lambda x: rnp.argmax(x, axis=-3)), ShapeError, r"argmax: axis -3 is out of bounds"),
    ("argmax-empty", lambda: rt.trace(lambda x: rnp.argmax(x), np.ones(0)), ShapeError, r"argmax: axis 0 .* empty"),
    ("sum-extended-complex-dtype", trace23(lambda x: rnp.sum(x, dtype=np.clongdouble)), ArgumentError,
     r"sum: dtype has dtype complex256, which a graph cannot hold"),
    ("astype-unknown-dtype", trace23(lambda x: x.astype("foo")), ArgumentError, r"astype: dtype: 'foo' is not a dtype"),
    ("multiply-by-extended-complex", trace23(lambda x: x * np.ones(3, np.clongdouble)), ArgumentError,
     r"an operand has dtype complex256, which a graph cannot hold"),
    ("less-on-complex", trace23(lambda x: x * 1j < x), ShapeError, r"less: not supported for dtype complex128"),
    ("add-string", trace23(lambda x: x + "a"), ArgumentError, r"operands must be arrays or numbers, got str"),
    ("expand-dims-axis", trace23(lambda x: rnp.expand_dims(x, 7)), ShapeError, r"expand_dims: axis 7 is out of bounds"),
    ("swapaxes-axis", trace23(lambda x: rnp.swapaxes(x, 0, 5)), ShapeError, r"swapaxes: axis 5 is out of bounds"),
    ("transpose-axis", trace23(lambda x: rnp.transpose(x, (0, 5))), ShapeError, r"transpose: axis 5 is out of bounds"),
    ("transpose-not-permutation", trace23(lambda x: rnp.transpose(x, (0,))), ShapeError,
     r"axes \(0,\) are not a permutation"),
    ("squeeze-non-unit", trace23(lambda x: rnp.squeeze(x, 0)), ShapeError,
     r"squeeze: axis 0 of shape \(2, 3\) has size 2"),
    ("reshape-string-dim", trace23(lambda x: rnp.reshape(x, (2, "a"))), ArgumentError,
     r"reshape: a shape must be an int or a tuple of ints"),
    ("reshape-size", trace23(lambda x: rnp.reshape(x, (4,))), ShapeError, r"reshape: cannot reshape \(2, 3\)"),
    ("zeros-string-dim", trace23(lambda x: rnp.zeros((2, "a"))), ArgumentError, r"zeros: a shape must be"),
    ("zeros-negative", trace23(lambda x: rnp.zeros(-1)), ShapeError, r"zeros: negative dimension"),
    ("arange-float", trace23(lambda x: rnp.arange(2.5)), ArgumentError, r"arange: n must be an int.*2\.5"),
    ("broadcast-to", trace23(lambda x: rnp.broadcast_to(x, (3,))), ShapeError, r"cannot broadcast \(2, 3\) to \(3,\)"),
    ("where-shapes", trace23(lambda x: rnp.where(np.ones(4, bool), x, x)), ShapeError,
     r"could not be broadcast together with shapes \[\(4,\), \(2, 3\)"),
    ("stack-empty", trace23(lambda x: rnp.stack([])), ArgumentError, r"stack needs at least one array"),
    ("stack-shapes", trace23(lambda x: rnp.stack([x, x[0]])), ShapeError, r"stack: arrays must have one shape"),
    ("concatenate-ranks", trace23(lambda x: rnp.concatenate([x, x[0]])), ShapeError, r"different ranks"),
    ("index-float", trace23(lambda x: x[1.5]), ArgumentError, r"unsupported index 1\.5 \(float\)"),
    ("index-bool-mask", trace23(lambda x: x[np.array([True, False])]), ArgumentError,
     r"boolean-mask indexing is not supported.*rnp\.where"),
    ("index-float-array", trace23(lambda x: x[np.array([0.0])]), ArgumentError, r"must hold integers, got float64"),
    ("index-slice-float", trace23(lambda x: x[0.5:]), ArgumentError, r"slice .* not an int or None"),
    ("index-out-of-range", trace23(lambda x: x[2]), ShapeError, r"index 2 is out of bounds for axis 0 with size 2"),
    ("int-to-negative-power", lambda: rt.trace(lambda i: i ** -1, np.arange(3)), ArgumentError,
     r"power: integers to negative integer powers are not allowed"),
    ("python-int-wraps-int32", lambda: rt.trace(lambda i: i + 2**40, np.arange(3, dtype=np.int32)), ArgumentError,
     r"a Python int operand 1099511627776 does not fit int32"),
    ("python-int-beyond-int64", lambda: rt.trace(lambda i: i + 2**70, np.arange(3)), ArgumentError,
     r"a Python int operand \(1180591620717411303424\) does not fit int64 or uint64"),
    ("full-value-out-of-range", trace23(lambda x: rnp.full(2, 2**40, np.int32)), ArgumentError,
     r"full: the fill value 1099511627776 does not fit int32"),
    ("asarray-unknown-dtype", trace23(lambda x: rnp.asarray(x, "foo")), ArgumentError, r"asarray: dtype: 'foo'"),
    # ---- reftrace.lax (strict, primitive level)
    ("lax-transpose-short", trace23(lambda x: rt.lax.transpose(x, (0,))), ShapeError,
     r"transpose: permutation \(0,\) has 1 axes for an array of rank 2"),
    ("lax-convert-extended-complex", trace23(lambda x: rt.lax.convert_element_type(x, np.clongdouble)),
     ArgumentError, r"convert_element_type: new dtype has dtype complex256, which a graph cannot hold"),
    ("lax-full-string", trace23(lambda x: rt.lax.full((2,), "a", np.float32)), ArgumentError,
     r"full: the fill value must be a number of dtype float32, got str"),
    ("lax-dot-dimension-numbers", trace23(lambda x: rt.lax.dot_general(x, x, ((1,), (1,)))), ArgumentError,
     r"dot_general: dimension_numbers must be \(\(lhs_contracting"),
    ("lax-integer-pow-float", trace23(lambda x: rt.lax.integer_pow(x, 2.5)), ArgumentError,
     r"integer_pow: the exponent must be a Python int, got float"),
    # ---- rt.vjp
    ("vjp-not-a-graph", lambda: rt.vjp("g"), ArgumentError, r"vjp expects a reftrace Graph, got str"),
    ("vjp-partition", lambda: rt.vjp(rt.partition(rt.vjp(cos_graph()))), ArgumentError,
     r"pass p\.forward or p\.backward"),
    ("vjp-wrt-string", lambda: rt.vjp(cos_graph(), wrt="a"), ArgumentError, r"wrt must be an int or a sequence"),
    ("vjp-wrt-out-of-range", lambda: rt.vjp(cos_graph(), wrt=1), ArgumentError,
     r"wrt index 1 is not an input index \(the graph has 1 inputs\)"),
    ("vjp-nondiff-float", lambda: rt.vjp(cos_graph(), nondiff_outputs=0.5), ArgumentError,
     r"nondiff_outputs must be an int or a sequence"),
    # ---- rt.partition / rt.simplify
    ("partition-not-joint", lambda: rt.partition(cos_graph()), PartitionError, r"needs a joint graph.*rt\.vjp"),
    ("partition-policy-arity", lambda: rt.partition(rt.vjp(cos_graph()), lambda: True), PartitionError,
     r"must take one argument, the equation"),
    ("partition-mincut-ban", lambda: rt.partition(rt.vjp(cos_graph()), MinCut(banned=3)), PartitionError,
     r"MinCut\(banned=\.\.\.\) must be a callable"),
    ("simplify-none", lambda: rt.simplify(None), ArgumentError, r"simplify expects a reftrace Graph, got NoneType"),
    # ---- rt.lower and calling a lowered graph (both backends run below)
    ("lower-a-function", lambda: rt.lower(lambda x: x, "jax"), ArgumentError, r"rt\.trace\(fn, \*example_arrays\)"),
    ("lower-backend", lambda: rt.lower(cos_graph(), "tf"), ArgumentError, r"unknown backend 'tf'"),
]


@pytest.mark.parametrize("thunk, cls, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_reftrace_error(thunk, cls, message):
    with pytest.raises(cls, match=message) as info:
        thunk()
    assert isinstance(info.value, rt.ReftraceError)


def test_vjp_takes_one_int_for_wrt_and_nondiff_outputs_like_argnums():
    g = rt.trace(lambda x, y: (x * y, x + y), np.ones(2), np.ones(2))
    assert rt.vjp(g, wrt=1) == rt.vjp(g, wrt=[1])
    assert rt.vjp(g, wrt=np.int64(1)) == rt.vjp(g, wrt=(1,))
    assert rt.vjp(g, nondiff_outputs=0) == rt.vjp(g, nondiff_outputs=(0,))
    assert len(rt.vjp(g, wrt=1).outputs) == 3  # two outputs, one gradient


def test_traced_arrays_iterate_over_rows():
    g = rt.trace(lambda x: [r * 2 for r in x], X23)
    assert [o.shape for o in g.outputs] == [(3,), (3,)]


# ---- calling a lowered graph: the same checks and the same messages on both backends

BACKENDS = ["jax", "torch"]
CALL_CASES = [
    ("keyword", lambda f: f(x=F32_23), cos_graph,
     r"takes positional arguments only \(f32\[2,3\]\); got keyword argument\(s\) x"),
    ("count", lambda f: f(), cos_graph, r"takes 1 arguments \(f32\[2,3\]\), got 0"),
    ("shape", lambda f: f(np.ones((3, 2), np.float32)), cos_graph,
     r"argument 0 .*: expected f32\[2,3\], got a numpy array f32\[3,2\]"),
    ("dtype", lambda f: f(np.ones((2, 3))), cos_graph,
     r"argument 0 .*: expected f32\[2,3\], got a numpy array f64\[2,3\]"),
    ("tensor-dtype", lambda f: f(torch.ones(2, 3, dtype=torch.float64)), cos_graph,
     r"expected f32\[2,3\], got a torch tensor f64\[2,3\]"),
    ("list", lambda f: f([[1.0] * 3] * 2), cos_graph, r"argument 0 .* is a list; pass a numpy array, a torch tensor"),
    ("string", lambda f: f("abc"), cos_graph, r"argument 0 .* is a str"),
    ("complex", lambda f: f(np.ones((2, 3), np.complex64)), cos_graph,
     r"argument 0 .*: expected f32\[2,3\], got a numpy array c64\[2,3\]"),
    ("int-too-big", lambda f: f(2**40), int32_scalar_graph,
     r"argument 0 .*: 1099511627776 does not fit int32 \(range -2147483648\.\.2147483647\)"),
    ("int-negative-unsigned", lambda f: f(-1), lambda: rt.trace(lambda u: u, np.array(1, np.uint8)),
     r"argument 0 .*: -1 does not fit uint8"),
    ("float-overflows", lambda f: f(1e39), lambda: rt.trace(lambda x: x, np.array(1, np.float32)),
     r"argument 0 .*: 1e\+39 overflows float32"),
    ("int-overflows-float", lambda f: f(10**400), lambda: rt.trace(lambda x: x, np.array(1.0)),
     r"argument 0 .*: 1000000\d* overflows float64"),
    ("float-into-int", lambda f: f(1.5), int32_scalar_graph, r"expected i32\[\], got a Python float \(1\.5\)"),
    ("bool-into-int", lambda f: f(True), int32_scalar_graph, r"expected i32\[\], got a Python bool"),
    ("scalar-into-array", lambda f: f(1.0), cos_graph, r"expected f32\[2,3\], got a Python float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, make_graph, message", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_lowered_graphs_check_arguments_alike(backend, call, make_graph, message):
    f = rt.lower(make_graph(), backend)
    with pytest.raises(ArgumentError, match=message):
        call(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_at_the_edge_of_the_range_are_accepted(backend):
    (lo,) = rt.lower(int32_scalar_graph(), backend)(-(2**31))
    assert int(np.asarray(lo)) == -(2**31) + 1
    f = rt.lower(rt.trace(lambda x: x, np.array(1, np.float32)), backend)
    assert np.isinf(np.asarray(f(float("inf"))[0]))  # inf and nan are float values, not overflow
    assert np.isnan(np.asarray(f(float("nan"))[0]))
