"""Backends against numpy: every primitive on the JAX backend, the torch FX backend and eager torch.

float64 is compared tightly (rtol 1e-12), float32 loosely; integers exactly, with int64
values beyond 2**53 where the op allows. Graphs are built one primitive at a time with
``lax.bind`` so each case pins one lowering rule.
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.jax import lower_jax
from reftrace.composite import is_composite
from reftrace.backends.jax_rules import jax_rules
from reftrace.backends.torch import eval_torch, lower_torch, to_fx
from reftrace.backends.torch_dtypes import numpy_dtype, torch_dtype
from reftrace.backends.torch_rules import dot_general_equation, torch_rules

F64, F32, I64, I32, BOOL = np.float64, np.float32, np.int64, np.int32, np.bool_
BIG = 2**60  # int64 values far beyond float64's 2**53 integer range


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def op(prim, **params):
    """A function binding one primitive (the graph under test has exactly that equation)."""
    def f(*args):
        return lax.bind(prim, *args, **params)
    return f


def tolerance(dtype) -> dict:
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-12, atol=1e-13)
    return dict(rtol=2e-5, atol=1e-6)


def scripted(graph):
    """to_fx -> torch.jit.script -> torch.jit.freeze."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        return torch.jit.freeze(torch.jit.script(to_fx(graph)).eval())


BACKENDS = {
    "jax": lambda graph, args: [np.asarray(r) for r in lower_jax(graph)(*args)],
    "torch": lambda graph, args: [r.numpy() for r in lower_torch(graph)(*args)],
    "torch-eager": lambda graph, args: [r.numpy() for r in eval_torch(graph, *args)],
    "torchscript": lambda graph, args: [r.numpy() for r in scripted(graph)(
        *[torch.as_tensor(np.asarray(a)) for a in args])],
}
DEFAULT_BACKENDS = ("jax", "torch", "torch-eager")


def assert_close(got, want, dtype, what: str, tol: dict | None = None) -> None:
    want = np.asarray(want)
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(got, want, err_msg=what, equal_nan=True, **(tol or tolerance(dtype)))
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def check(fn, args, reference, tol: dict | list | None = None, labels=None, backends=DEFAULT_BACKENDS):
    """Trace ``fn``, run the backends, compare each output with ``reference(*args)``.

    Output dtypes and shapes must be exactly the graph's (no silent downcasts). ``tol``
    may be one dict or one per output; ``labels`` name the outputs in failure messages.
    """
    graph = rt.trace(fn, *args)
    want = reference(*args)
    want = want if isinstance(want, tuple) else (want,)
    tols = tol if isinstance(tol, list) else [tol] * len(want)
    labels = labels or [f"output {i}" for i in range(len(want))]
    for backend in backends:
        outs = BACKENDS[backend](graph, args)
        assert len(outs) == len(want) == len(graph.outputs)
        for got, w, aval, t, label in zip(outs, want, graph.out_avals, tols, labels):
            what = f"{backend}: {label} of a graph with {len(graph.eqns)} equations"
            assert got.dtype == aval.dtype and got.shape == aval.shape, (what, got.dtype, got.shape)
            assert_close(got, w, aval.dtype, what, t)
    return graph


def test_every_primitive_has_both_lowerings():
    """Core primitives have both; composites run as their decompositions where a backend has no fused
    lowering, and every composite has a fused torch one (the ATen kernel)."""
    prims = set(P.registry.values())
    core = {p for p in prims if not is_composite(p)}
    assert prims <= set(torch_rules), sorted(p.name for p in prims - set(torch_rules))
    assert core <= set(jax_rules), sorted(p.name for p in core - set(jax_rules))


def test_dtype_maps_round_trip():
    for name in ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
                 "complex64", "complex128", "uint32"]:
        assert numpy_dtype(torch_dtype(np.dtype(name))) == np.dtype(name)
    import ml_dtypes
    assert torch_dtype(ml_dtypes.bfloat16) is torch.bfloat16
    assert numpy_dtype(torch.float64) == np.float64
    with pytest.raises(rt.UnsupportedOperatorError):
        torch_dtype(np.dtype("datetime64[s]"))


# ----------------------------------------------------------------------------- elementwise

def _uniform(lo, hi, halves=False):
    def make(dtype, r):
        x = r.uniform(lo, hi, (3, 4))
        if halves:  # exact ties: round must go half to even
            x.flat[:6] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
        return x.astype(dtype)
    return make


UNARY = {
    "exp": (np.exp, _uniform(-3, 3)), "log": (np.log, _uniform(0.1, 5)),
    "log1p": (np.log1p, _uniform(-0.5, 3)), "expm1": (np.expm1, _uniform(-2, 2)),
    "tanh": (np.tanh, _uniform(-3, 3)), "logistic": (lambda x: 1 / (1 + np.exp(-x)), _uniform(-5, 5)),
    "sin": (np.sin, _uniform(-4, 4)), "cos": (np.cos, _uniform(-4, 4)), "tan": (np.tan, _uniform(-1.2, 1.2)),
    "asin": (np.arcsin, _uniform(-0.95, 0.95)), "acos": (np.arccos, _uniform(-0.95, 0.95)),
    "atan": (np.arctan, _uniform(-5, 5)), "sinh": (np.sinh, _uniform(-3, 3)), "cosh": (np.cosh, _uniform(-3, 3)),
    "asinh": (np.arcsinh, _uniform(-5, 5)), "acosh": (np.arccosh, _uniform(1.1, 5)),
    "atanh": (np.arctanh, _uniform(-0.9, 0.9)), "sqrt": (np.sqrt, _uniform(0.1, 5)),
    "rsqrt": (lambda x: 1 / np.sqrt(x), _uniform(0.1, 5)), "cbrt": (np.cbrt, _uniform(-5, 5)),
    "erf": (sp.erf, _uniform(-3, 3)), "erfc": (sp.erfc, _uniform(-3, 3)),
    "erf_inv": (sp.erfinv, _uniform(-0.95, 0.95)), "lgamma": (sp.gammaln, _uniform(0.1, 8)),
    "digamma": (sp.digamma, _uniform(0.1, 8)), "floor": (np.floor, _uniform(-5, 5, True)),
    "ceil": (np.ceil, _uniform(-5, 5, True)), "round": (np.round, _uniform(-5, 5, True)),
    "neg": (np.negative, _uniform(-5, 5)), "sign": (np.sign, _uniform(-5, 5, True)),
    "abs": (np.abs, _uniform(-5, 5)),
}
# float64 special functions: XLA's erf_inv/lgamma/digamma approximations are good to ~1e-13..1e-11
LOOSER_F64 = {"erf_inv": dict(rtol=1e-9, atol=1e-12), "lgamma": dict(rtol=1e-10, atol=1e-12),
              "digamma": dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [F64, F32])
def test_unary_float(dtype):
    """All float unary primitives in one graph (one XLA compile), each on its own domain."""
    names = sorted(UNARY)
    r = rng(1)
    xs = [UNARY[n][1](dtype, r) for n in names]
    tols = [LOOSER_F64.get(n) if dtype == F64 else None for n in names]
    check(lambda *xs: tuple(lax.bind(P.registry[n], x) for n, x in zip(names, xs)), xs,
          lambda *xs: tuple(UNARY[n][0](x.astype(F64)).astype(dtype) for n, x in zip(names, xs)), tols, names)


def test_integer_unary_ops_are_exact_beyond_2_53():
    x = np.array([BIG + 1, -BIG - 3, 0, 7, -1], I64)
    check(op(P.neg_p), (x,), np.negative)
    check(op(P.abs_p), (x,), np.abs)
    check(op(P.sign_p), (x,), np.sign)
    check(op(P.not_p), (x,), np.invert)
    check(op(P.not_p), (np.array([True, False]),), np.logical_not)
    check(op(P.integer_pow_p, y=3), (np.array([2**20 + 1, -5, 3], I64),), lambda x: x ** 3)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sign_keeps_nan_and_signed_zeros_on_every_backend(dtype):
    """lax's sign, whatever the backend: NaN stays NaN and -0.0 stays -0.0 (``torch.sgn`` gives 0 for
    both; the torch bridge's ``aten.sign`` asks for that explicitly)."""
    x = np.array([np.nan, -0.0, 0.0, -np.inf, 2.5, -1e-30], dtype)
    check(op(P.sign_p), (x,), np.sign)
    from reftrace.backends.jax import lower_jax
    from reftrace.backends.torch import lower_torch
    g = rt.trace(lambda a: lax.sign(a), x)
    for got in (np.asarray(lower_jax(g)(x)[0]), lower_torch(g)(torch.from_numpy(x))[0].numpy()):
        np.testing.assert_array_equal(np.signbit(got), [False, True, False, True, False, True])
        assert np.isnan(got[0])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_integer_pow_and_is_finite(dtype):
    x = rng(2).uniform(-2, 2, (5,)).astype(dtype)
    for y in (0, 1, 2, 3, -2, 5):
        check(op(P.integer_pow_p, y=y), (x,), lambda x, y=y: (x.astype(F64) ** y).astype(dtype))
    z = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], dtype)
    check(op(P.is_finite_p), (z,), np.isfinite)


def _trunc_div(x, y):
    if x.dtype.kind == "f":
        return x / y
    q = np.abs(x) // np.abs(y)
    return np.where((x < 0) != (y < 0), -q, q).astype(x.dtype)


BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _trunc_div, "rem": np.fmod,
    "pow": np.power, "max": np.maximum, "min": np.minimum, "atan2": np.arctan2,
    "and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal,
}


def _binary_operands(name, dtype, r):
    shape = (3, 4)
    if dtype == BOOL:
        return r.random(shape) < 0.5, r.random(shape) < 0.5
    if np.dtype(dtype).kind == "i":
        if name == "pow":
            return r.integers(-4, 5, shape).astype(dtype), r.integers(0, 6, shape).astype(dtype)
        if name == "mul":
            return r.integers(-2**30, 2**30, shape).astype(dtype), r.integers(-2**20, 2**20, shape).astype(dtype)
        big = BIG if dtype == I64 else 2**30
        x = r.integers(-big, big, shape).astype(dtype)
        y = r.integers(-1000, 1000, shape).astype(dtype)
        y[y == 0] = 7
        y[0, :2] = x[0, :2]  # some equal pairs for the comparisons
        return x, y
    x = r.uniform(0.1 if name == "pow" else -3, 3, shape).astype(dtype)
    y = r.uniform(-3, 3, shape).astype(dtype)
    y[0, :2] = x[0, :2]
    if name in ("max", "min"):
        x[1, 1] = np.nan  # NaN propagates, as lax.max/min
    return x, y


def _binary_dtypes(name):
    kinds = {"add": "fi", "sub": "fi", "mul": "fi", "div": "fi", "rem": "fi", "pow": "fi", "atan2": "f",
             "and": "ib", "or": "ib", "xor": "ib"}.get(name, "fib")
    return ([F64, F32] if "f" in kinds else []) + ([I64, I32] if "i" in kinds else []) + \
        ([BOOL] if "b" in kinds else [])


@pytest.mark.parametrize("dtype", [F64, F32, I64, I32, BOOL])
def test_binary(dtype):
    """Every binary primitive taking ``dtype``, in one graph.

    Rank-0 operands broadcast on either side (torch: 0-d tensors), and rank-0 literals
    ``a``/``b`` on either side become Python scalars or ``torch.tensor`` calls in FX.
    """
    names = [n for n in sorted(BINARY) if dtype in _binary_dtypes(n)]
    operands = [_binary_operands(n, dtype, rng(3)) for n in names]
    args = [a for x, y in operands for a in (x, y, np.array(x[0, 1]), np.array(y[0, 2]))]
    literals = [(np.array(x.flat[5]), np.array(y.flat[7])) for x, y in operands]

    def fn(*args):
        outs = []
        for k, n in enumerate(names):
            x, y, x0, y0 = args[4 * k:4 * k + 4]
            prim = P.registry[n]
            a, b = literals[k]
            outs += [lax.bind(prim, x, y), lax.bind(prim, x, y0), lax.bind(prim, x0, y),
                     lax.bind(prim, x, b), lax.bind(prim, a, y), lax.bind(prim, a, b)]
        return tuple(outs)

    def reference(*args):
        outs = []
        for k, n in enumerate(names):
            x, y, x0, y0 = args[4 * k:4 * k + 4]
            ref = BINARY[n]
            a, b = literals[k]
            outs += [ref(x, y), ref(x, np.broadcast_to(y0, x.shape)), ref(np.broadcast_to(x0, y.shape), y),
                     ref(x, np.broadcast_to(b, x.shape)), ref(np.broadcast_to(a, y.shape), y), ref(a, b)]
        return tuple(outs)
    labels = [f"{n}({v})" for n in names for v in ("x, y", "x, y0", "x0, y", "x, lit", "lit, y", "lit, lit")]
    # XLA compiles each op separately (slow); the literal variants matter most to torch's FX emission
    check(fn, args, reference, labels=labels,
          backends=(("jax",) if dtype == I64 else ()) + ("torch", "torch-eager", "torchscript"))
    if dtype != I64:
        check(lambda *args: tuple(lax.bind(P.registry[n], args[4 * k], args[4 * k + 3]) for k, n in enumerate(names)),
              args, lambda *args: tuple(BINARY[n](args[4 * k], np.broadcast_to(args[4 * k + 3], args[4 * k].shape))
                                        for k, n in enumerate(names)), labels=names, backends=("jax",))


def test_int64_literals_beyond_2_53_stay_exact():
    x = np.array([1, -2, 3], I64)
    c = np.array(BIG + 12345, I64)
    g = check(lambda x: lax.bind(P.add_p, x, c), (x,), lambda x: x + c, backends=tuple(BACKENDS))
    assert str(BIG + 12345) in to_fx(g).code
    check(lambda x: lax.bind(P.broadcast_in_dim_p, c, shape=(2, 3), broadcast_dimensions=()), (x,),
          lambda x: np.full((2, 3), c))
    check(lambda x: lax.bind(P.eq_p, lax.bind(P.add_p, x, c), np.array(BIG + 12346, I64)), (x,),
          lambda x: x + c == BIG + 12346)


def test_select():
    r = rng(5)
    pred = r.random((3, 4)) < 0.5
    for dtype in (F64, I64, BOOL):
        x, y = _binary_operands("eq", dtype, r)
        check(op(P.select_p), (pred, x, y), np.where)
    x = r.standard_normal((3, 4))
    t, f = np.array(1.5), np.array(-2.0)
    check(lambda p, x: lax.bind(P.select_p, p, x, f), (pred, x), lambda p, x: np.where(p, x, f))
    check(lambda p, x: lax.bind(P.select_p, p, t, x), (pred, x), lambda p, x: np.where(p, t, x))
    check(lambda p: lax.bind(P.select_p, p, t, f), (pred,), lambda p: np.where(p, t, f))
    check(lambda p, x: (lax.bind(P.select_p, p, x, f), lax.bind(P.select_p, p, t, x), lax.bind(P.select_p, p, t, f),
                        lax.bind(P.select_p, np.array(True), x, x * 0)), (pred, x),
          lambda p, x: (np.where(p, x, f), np.where(p, t, x), np.where(p, t, f), x),
          backends=("torch", "torchscript"))


@pytest.mark.parametrize("src,dst", [(F64, I64), (F64, F32), (I64, F64), (F64, BOOL), (BOOL, F32),
                                     (I64, I32), (F32, F64), (I32, I64), (BOOL, I64)])
def test_convert_element_type(src, dst):
    r = rng(6)
    if src == BOOL:
        x = r.random((6,)) < 0.5
    elif np.dtype(src).kind == "i":
        x = np.array([BIG + 1, -BIG - 1, 3, 0, -7, 2**31 - 1] if src == I64 else [1, -2, 0, 5, 7, -9], src)
        if dst == I32:
            x = np.array([1, -2, 0, 5, 7, -9], src)
    else:
        x = np.array([-3.7, -0.5, 0.0, 0.4, 2.5, 1e3], src)  # float -> int truncates toward zero
    check(op(P.convert_element_type_p, new_dtype=np.dtype(dst)), (x,), lambda x: x.astype(dst))


def test_stop_gradient_is_identity():
    x = rng(7).standard_normal((3,))
    check(op(P.stop_gradient_p), (x,), lambda x: x)


# ----------------------------------------------------------------------------- reductions

REDUCE = {"reduce_sum": np.sum, "reduce_prod": np.prod, "reduce_max": np.max, "reduce_min": np.min,
          "reduce_and": np.all, "reduce_or": np.any}


@pytest.mark.parametrize("name,dtype", [(n, d) for n in ("reduce_sum", "reduce_prod", "reduce_max", "reduce_min")
                                        for d in (F64, F32, I64, I32)] + [("reduce_and", BOOL), ("reduce_or", BOOL),
                                                                           ("reduce_max", BOOL)])
def test_reductions(name, dtype):
    r = rng(8)
    shape = (2, 3, 4)
    if dtype == BOOL:
        x = r.random(shape) < (0.8 if name == "reduce_and" else 0.15)
    elif np.dtype(dtype).kind == "i":
        hi = {"reduce_prod": 4, "reduce_sum": BIG // 64 if dtype == I64 else 2**24}.get(name, BIG)
        x = r.integers(-hi, hi, shape).astype(dtype)
    else:
        x = r.uniform(0.5, 1.5, shape).astype(dtype)
    ref = REDUCE[name]
    kwargs = {"dtype": dtype} if name in ("reduce_sum", "reduce_prod") else {}
    all_axes = [(1,), (0, 2), (0, 1, 2)]
    check(lambda x: tuple(lax.bind(P.registry[name], x, axes=a) for a in all_axes), (x,),
          lambda x: tuple(ref(x, axis=a, **kwargs) for a in all_axes))


def test_reduce_over_empty_axis_gives_identity():
    x = np.zeros((2, 0, 3))
    check(op(P.reduce_max_p, axes=(1,)), (x,), lambda x: np.full((2, 3), -np.inf))
    check(op(P.reduce_min_p, axes=(1,)), (x,), lambda x: np.full((2, 3), np.inf))
    check(op(P.reduce_sum_p, axes=(1,)), (x,), lambda x: np.zeros((2, 3)))
    check(op(P.reduce_prod_p, axes=(1,)), (x,), lambda x: np.ones((2, 3)))
    xi = np.zeros((2, 0), I32)
    check(op(P.reduce_max_p, axes=(1,)), (xi,), lambda x: np.full((2,), np.iinfo(I32).min, I32))


@pytest.mark.parametrize("index_dtype", [I64, I32])
@pytest.mark.parametrize("axis", [0, 1])
def test_argmax_argmin_first_occurrence(axis, index_dtype):
    x = rng(9).integers(0, 3, (5, 6)).astype(I64)  # many ties
    f = x.astype(F64)
    f[2, 3] = f[4, 1] = np.nan  # NaN counts as the extremum, first one wins (numpy, lax, torch)
    b = x == 1
    params = dict(axis=axis, index_dtype=np.dtype(index_dtype))
    check(lambda x, f, b: tuple(lax.bind(p, a, **params) for p in (P.argmax_p, P.argmin_p) for a in (x, f, b)),
          (x, f, b), lambda x, f, b: tuple(r(a, axis=axis).astype(index_dtype) for r in (np.argmax, np.argmin)
                                           for a in (x, f, b)))


def _scan(ufunc_accumulate, x, axis, reverse):
    if reverse:
        return np.flip(ufunc_accumulate(np.flip(x, axis), axis=axis), axis)
    return ufunc_accumulate(x, axis=axis)


@pytest.mark.parametrize("dtype", [F64, F32, I64, I32])
def test_cumulative(dtype):
    r = rng(10)
    x = (r.uniform(0.5, 1.5, (4, 5)) if np.dtype(dtype).kind == "f" else r.integers(-3, 4, (4, 5))).astype(dtype)
    big = x.copy()
    if dtype == I64:
        big = big + BIG // 8
    cases = [(P.cumsum_p, lambda a, axis: np.cumsum(a, axis=axis, dtype=dtype), True),
             (P.cumprod_p, lambda a, axis: np.cumprod(a, axis=axis, dtype=dtype), False),
             (P.cummax_p, np.maximum.accumulate, True), (P.cummin_p, np.minimum.accumulate, True)]
    variants = [(p, f, b, axis, reverse) for p, f, b in cases for axis in (0, 1) for reverse in (False, True)]
    check(lambda x, big: tuple(lax.bind(p, big if b else x, axis=axis, reverse=rev)
                               for p, _, b, axis, rev in variants), (x, big),
          lambda x, big: tuple(_scan(f, big if b else x, axis, rev) for _, f, b, axis, rev in variants),
          labels=[f"{p.name}(axis={axis}, reverse={rev})" for p, _, _, axis, rev in variants])


# ----------------------------------------------------------------------------- shape ops

def test_broadcast_in_dim_reshape_transpose():
    r = rng(11)
    x = r.standard_normal((3, 1))
    check(op(P.broadcast_in_dim_p, shape=(2, 3, 4), broadcast_dimensions=(1, 2)), (x,),
          lambda x: np.broadcast_to(x[None], (2, 3, 4)))
    check(op(P.broadcast_in_dim_p, shape=(3, 2), broadcast_dimensions=(0, 1)), (x,),
          lambda x: np.broadcast_to(x, (3, 2)))
    s = np.array(2.5)
    check(op(P.broadcast_in_dim_p, shape=(2, 3), broadcast_dimensions=()), (s,), lambda s: np.full((2, 3), s))
    check(lambda: lax.full((2, 2), 7, I64), (), lambda: np.full((2, 2), 7, I64))
    y = r.standard_normal((2, 3, 4)).astype(F32)
    check(op(P.reshape_p, new_sizes=(4, 6)), (y,), lambda y: y.reshape(4, 6))
    check(op(P.reshape_p, new_sizes=()), (y[:1, :1, :1],), lambda y: y.reshape(()))
    check(op(P.transpose_p, permutation=(2, 0, 1)), (y,), lambda y: y.transpose(2, 0, 1))


@pytest.mark.parametrize("start,limit,strides", [((0, 0), (4, 5), (1, 1)), ((1, 2), (4, 5), (2, 2)),
                                                 ((3, 0), (3, 5), (1, 3)), ((0, 1), (4, 4), (3, 1))])
def test_slice(start, limit, strides):
    x = np.arange(20, dtype=I64).reshape(4, 5) + BIG
    check(op(P.slice_p, start_indices=start, limit_indices=limit, strides=strides), (x,),
          lambda x: x[tuple(slice(s, l, t) for s, l, t in zip(start, limit, strides))])


def numpy_pad(x, value, config):
    """lax.pad in numpy: interior padding, then lo/hi (negative crops)."""
    for d, (lo, hi, interior) in enumerate(config):
        n = x.shape[d]
        if interior and n:
            shape = list(x.shape)
            shape[d] = n + (n - 1) * interior
            y = np.full(shape, value, x.dtype)
            idx = [slice(None)] * x.ndim
            idx[d] = slice(None, None, interior + 1)
            y[tuple(idx)] = x
            x = y
        widths = [(0, 0)] * x.ndim
        widths[d] = (max(lo, 0), max(hi, 0))
        x = np.pad(x, widths, constant_values=value)
        idx = [slice(None)] * x.ndim
        idx[d] = slice(-min(lo, 0), x.shape[d] + min(hi, 0))
        x = x[tuple(idx)]
    return x


PAD_CONFIGS = [
    ((1, 2, 0), (0, 0, 0)), ((-1, 1, 0), (2, -2, 0)), ((0, 0, 2), (1, -1, 1)),
    ((-3, 2, 1), (0, 0, 3)), ((-4, -3, 2), (-1, 0, 0)), ((0, 0, 0), (-5, 3, 0)),
]


@pytest.mark.parametrize("config", PAD_CONFIGS)
@pytest.mark.parametrize("dtype", [F64, I64, BOOL])
def test_pad(config, dtype):
    r = rng(12)
    x = (r.random((3, 4)) < 0.5 if dtype == BOOL else r.integers(1, 100, (3, 4)) + (BIG if dtype == I64 else 0)
         ).astype(dtype)
    value = np.array(True if dtype == BOOL else -7, dtype)
    backends = DEFAULT_BACKENDS + (("torchscript",) if dtype != F64 else ())
    # a literal padding value (a Python scalar in torch) and a traced one (torch.where on a padded mask)
    check(lambda x, v: (lax.bind(P.pad_p, x, value, padding_config=config),
                        lax.bind(P.pad_p, x, v, padding_config=config)), (x, value), lambda x, v: (numpy_pad(x, value, config), numpy_pad(x, v, config)), backends=backends)


@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3), st.integers(0, 2)), min_size=2, max_size=2),
       st.integers(0, 3), st.integers(1, 4))
def test_pad_property(config, n, m):
    """Torch pad lowering vs numpy on random configs (the JAX backend is pinned by test_pad)."""
    x = np.arange(n * m, dtype=F64).reshape(n, m) + 1
    config = tuple(config)
    if any(lo + hi + d + max(0, d - 1) * i < 0 for (lo, hi, i), d in zip(config, x.shape)):
        return
    check(lambda x: lax.bind(P.pad_p, x, np.array(0.5), padding_config=config), (x,),
          lambda x: numpy_pad(x, 0.5, config), backends=("torch", "torch-eager"))


def test_concatenate_rev_iota():
    r = rng(13)
    xs = [r.standard_normal((2, k)) for k in (1, 3, 2)]
    check(op(P.concatenate_p, dimension=1), xs, lambda *xs: np.concatenate(xs, axis=1))
    y = r.integers(0, 9, (3, 4, 2)).astype(I64) + BIG
    check(op(P.rev_p, dimensions=(0, 2)), (y,), lambda y: np.flip(y, (0, 2)))
    for dtype, shape, dim in ((I32, (5,), 0), (F64, (3, 4), 1), (I64, (2, 3, 2), 0)):
        check(lambda: lax.bind(P.iota_p, dtype=np.dtype(dtype), shape=shape, dimension=dim), (),
              lambda: np.broadcast_to(np.arange(shape[dim], dtype=dtype).reshape(
                  [shape[dim] if i == dim else 1 for i in range(len(shape))]), shape))


def test_array_literals_become_buffers():
    c = np.arange(6, dtype=F64).reshape(2, 3) / 7
    g = check(lambda x: lax.bind(P.mul_p, x, c), (np.ones((2, 3)),), lambda x: x * c)
    gm = to_fx(g)
    buffers = dict(gm.named_buffers())
    assert list(buffers) == ["_literal_0"]
    np.testing.assert_array_equal(buffers["_literal_0"].numpy(), c)
    # literal graph outputs (rank 0 and arrays) come back as tensors
    g2 = rt.trace(lambda x: (x, np.float32(2.5), np.arange(3)), np.ones(2, F32))
    outs = lower_torch(g2)(np.ones(2, F32))
    assert outs[1].dtype == torch.float32 and outs[1].item() == 2.5
    assert outs[2].dtype == torch.int64 and outs[2].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- contractions

DOT_CASES = [  # (lhs shape, rhs shape, dimension_numbers, numpy einsum)
    ((3, 4), (4, 5), (((1,), (0,)), ((), ())), "ij,jk->ik"),
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), "bij,bjk->bik"),
    ((4, 3), (5, 4), (((0,), (1,)), ((), ())), "ji,kj->ik"),
    ((3,), (4,), (((), ()), ((), ())), "i,j->ij"),
    ((2, 3, 4), (4, 3, 5), (((1, 2), (1, 0)), ((), ())), "aij,jik->ak"),
    ((3, 2, 4), (2, 4, 3), (((2,), (1,)), ((1, 0), (0, 2))), "ibj,bji->bi"),
]


@pytest.mark.parametrize("dtype", [F64, F32, I64])
@pytest.mark.parametrize("lshape,rshape,dn,eq", DOT_CASES)
def test_dot_general(lshape, rshape, dn, eq, dtype):
    r = rng(14)
    if dtype == I64:
        x, y = r.integers(-1000, 1000, lshape), r.integers(-2**40, 2**40, rshape)
    else:
        x, y = r.standard_normal(lshape), r.standard_normal(rshape)
    x, y = x.astype(dtype), y.astype(dtype)
    check(op(P.dot_general_p, dimension_numbers=dn, preferred_element_type=None), (x, y),
          lambda x, y: np.einsum(eq, x, y))


def test_dot_general_equation_and_preferred_element_type():
    assert dot_general_equation(3, 3, (((2,), (1,)), ((0,), (0,)))) == "abc,acd->abd"
    assert dot_general_equation(2, 2, (((1,), (0,)), ((), ()))) == "ab,bc->ac"
    x = rng(15).integers(-100, 100, (3, 4)).astype(np.int8)
    check(op(P.dot_general_p, dimension_numbers=(((1,), (1,)), ((), ())), preferred_element_type=np.dtype(I32)),
          (x, x), lambda x, y: x.astype(I32) @ y.astype(I32).T)
    f = rng(15).standard_normal((3, 4)).astype(F32)
    check(op(P.dot_general_p, dimension_numbers=(((1,), (0,)), ((), ())), preferred_element_type=np.dtype(F64)),
          (f, f.T.copy()), lambda x, y: x.astype(F64) @ y.astype(F64))


def numpy_conv(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, fgc=1, bgc=1):
    """conv_general_dilated on (N, C, *S) x (O, I, *K) by explicit windows, in float64."""
    nsp = lhs.ndim - 2
    config = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
    x = numpy_pad(lhs.astype(F64), 0.0, config)
    w = rhs.astype(F64)
    n, o = x.shape[0], w.shape[0]
    out_sp = [max(0, (x.shape[2 + k] - ((w.shape[2 + k] - 1) * rhs_dilation[k] + 1)) // strides[k] + 1)
              for k in range(nsp)]
    out = np.zeros((n // bgc, o) + tuple(out_sp))
    groups = max(fgc, bgc)
    cin, og = w.shape[1], o // groups
    for g in range(groups):
        xs = x[g * (n // bgc):(g + 1) * (n // bgc)] if bgc > 1 else x[:, g * cin:(g + 1) * cin]
        for koff in itertools.product(*[range(k) for k in w.shape[2:]]):
            idx = tuple(slice(koff[k] * rhs_dilation[k], koff[k] * rhs_dilation[k] + (out_sp[k] - 1) * strides[k] + 1,
                              strides[k]) for k in range(nsp))
            patch = xs[(slice(None), slice(None)) + idx]
            out[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", patch, w[(slice(g * og, (g + 1) * og),
                                                                                  slice(None)) + koff])
    return out


CONV_CASES = [  # lhs (N,C,*S), rhs (O,I,*K), strides, padding, lhs_dil, rhs_dil, fgc, bgc
    ((2, 3, 7), (4, 3, 3), (1,), ((0, 0),), (1,), (1,), 1, 1),
    ((2, 4, 9), (6, 2, 3), (2,), ((2, 1),), (1,), (2,), 2, 1),
    ((2, 3, 6, 5), (4, 3, 3, 2), (1, 2), ((1, 1), (0, -1)), (1, 1), (1, 1), 1, 1),
    ((1, 2, 5, 5), (3, 2, 2, 3), (1, 1), ((-1, 2), (1, 1)), (2, 1), (1, 2), 1, 1),
    ((4, 2, 5, 4), (6, 2, 2, 2), (1, 1), ((0, 0), (1, 0)), (1, 1), (1, 1), 1, 2),
    ((6, 3, 5), (6, 3, 2), (2,), ((1, 1),), (3,), (1,), 1, 3),
    ((2, 6, 4, 4), (6, 1, 3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 6, 1),  # depthwise
    ((1, 2, 4, 3, 4), (2, 2, 2, 1, 2), (1, 1, 2), ((0, 0), (1, 0), (0, 1)), (1, 2, 1), (1, 1, 1), 1, 1),
    ((2, 3), (4, 3), (), (), (), (), 1, 1),  # no spatial dims: a matmul
    ((1, 1, 3), (1, 1, 5), (1,), ((0, 0),), (1,), (1,), 1, 1),  # window larger than input: empty output
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_against_numpy_windows(case, dtype):
    lshape, rshape, strides, padding, ld, rd, fgc, bgc = case
    r = rng(16)
    x, w = r.standard_normal(lshape).astype(dtype), r.standard_normal(rshape).astype(dtype)
    fn = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, ld, rd, None, fgc, bgc)  # noqa: E731
    check(fn, (x, w), lambda x, w: numpy_conv(x, w, strides, padding, ld, rd, fgc, bgc).astype(dtype),
          backends=tuple(BACKENDS) if dtype == F64 else ("torch", "torch-eager"))


@pytest.mark.parametrize("dn", [((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),   # NHWC, HWIO, NHWC
                                ((1, 0, 2, 3), (0, 1, 3, 2), (3, 1, 0, 2)),   # CNHW, OIWH, out permuted
                                ((0, 1, 2, 3), (1, 0, 2, 3), (0, 1, 2, 3))])  # IOHW kernel
def test_conv_dimension_numbers(dn):
    """Layouts are permutations of NCHW/OIHW: transpose, convolve in NCHW, transpose back."""
    lhs_spec, rhs_spec, out_spec = dn
    r = rng(17)
    x_nchw, w_oihw = r.standard_normal((2, 4, 5, 6)), r.standard_normal((6, 2, 3, 2))
    x = np.transpose(x_nchw, np.argsort(lhs_spec))
    w = np.transpose(w_oihw, np.argsort(rhs_spec))
    assert x.transpose(lhs_spec).shape == x_nchw.shape
    args = ((2, 1), ((1, 0), (2, 1)), (1, 1), (2, 1), dn, 2, 1)
    want = numpy_conv(x_nchw, w_oihw, (2, 1), ((1, 0), (2, 1)), (1, 1), (2, 1), 2, 1)
    check(lambda x, w: lax.conv_general_dilated(x, w, *args), (x, w),
          lambda x, w: np.moveaxis(want, range(4), out_spec))


def test_conv_matches_torch_functional():
    """Forward conv and transposed conv (lhs_dilation) against torch.nn.functional."""
    r = rng(18)
    x, w = r.standard_normal((2, 4, 7, 6)), r.standard_normal((6, 2, 3, 2))
    check(lambda x, w: lax.conv_general_dilated(x, w, (2, 1), ((1, 1), (0, 0)), None, (1, 2), None, 2), (x, w),
          lambda x, w: F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, (2, 1), (1, 0), (1, 2), 2).numpy())
    # conv_transpose2d(x, wt, stride s, padding p) == conv(x, flip(wt)^T, lhs_dilation=s, padding k-1-p)
    wt = r.standard_normal((4, 3, 3, 3))  # (in, out, kh, kw)
    s, p, k = 2, 1, 3
    w_conv = np.flip(wt, (2, 3)).transpose(1, 0, 2, 3).copy()
    check(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((k - 1 - p, k - 1 - p),) * 2, (s, s)),
          (x, w_conv), lambda x, w: F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(wt), None, s, p).numpy())


@given(st.integers(1, 3), st.integers(1, 2), st.integers(-1, 2), st.integers(-1, 2), st.integers(1, 2),
       st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (1, 2)]))
def test_conv_property(stride, kernel, lo, hi, ld, rd, groups):
    """Torch conv lowering vs numpy windows on random configs (JAX is pinned by the fixed cases)."""
    fgc, bgc = groups
    r = rng(19)
    x = r.standard_normal((2 * bgc, 2 * fgc, 6))
    w = r.standard_normal((2 * fgc * bgc, 2, kernel))
    fn = lambda x, w: lax.conv_general_dilated(x, w, (stride,), ((lo, hi),), (ld,), (rd,), None, fgc, bgc)  # noqa
    check(fn, (x, w), lambda x, w: numpy_conv(x, w, (stride,), ((lo, hi),), (ld,), (rd,), fgc, bgc),
          backends=("torch", "torch-eager"))


# ----------------------------------------------------------------------------- indexing

def _grid(indices, axis):
    grids = list(np.indices(indices.shape, sparse=True))
    grids[axis] = indices
    return tuple(grids)


@pytest.mark.parametrize("index_dtype", [I64, I32])
@pytest.mark.parametrize("axis", [0, 1])
def test_gather(axis, index_dtype):
    r = rng(20)
    x = r.standard_normal((4, 5))
    idx = r.integers(0, x.shape[axis], (4, 5)).astype(index_dtype)
    check(op(P.gather_p, axis=axis), (x, idx), lambda x, i: np.take_along_axis(x, i.astype(I64), axis))
    small = idx[:3, :3]  # torch semantics: indices may be smaller than the operand off the axis
    check(op(P.gather_p, axis=axis), (x, small), lambda x, i: x[_grid(i, axis)])
    xi = r.integers(-BIG, BIG, (4, 5))
    check(op(P.gather_p, axis=axis), (xi, idx), lambda x, i: np.take_along_axis(x, i.astype(I64), axis))


@pytest.mark.parametrize("axis", [0, 1])
def test_scatter_add_with_duplicates(axis):
    r = rng(21)
    x = r.standard_normal((4, 5))
    idx = r.integers(0, 2, (3, 4))  # many duplicates
    upd = r.standard_normal((3, 4))

    def ref(x, i, u):
        out = x.copy()
        np.add.at(out, _grid(i, axis), u)
        return out
    check(op(P.scatter_add_p, axis=axis), (x, idx, upd), ref)
    xi, ui = r.integers(-BIG, BIG, (4, 5)), r.integers(-1000, 1000, (3, 4))
    check(op(P.scatter_add_p, axis=axis), (xi, idx.astype(I32), ui), ref)


@pytest.mark.parametrize("axis", [0, 1])
def test_scatter_unique_indices(axis):
    r = rng(22)
    x = r.standard_normal((4, 5))
    other = 1 - axis
    idx = np.stack([r.permutation(x.shape[axis])[:3] for _ in range(x.shape[other])], axis=other)
    upd = r.standard_normal(idx.shape)

    def ref(x, i, u):
        out = x.copy()
        out[_grid(i, axis)] = u
        return out
    check(op(P.scatter_p, axis=axis), (x, idx, upd), ref)


# ----------------------------------------------------------------------------- sorting

def _stable_sort_reference(descending):
    """numpy's stable argsort with torch's order: NaN above +inf, -0.0 tied with 0.0, ties keep order."""
    def ref(x):
        key = np.where(x == 0, 0, x) if x.dtype.kind == "f" else x
        if x.dtype.kind == "f":
            nan = np.isnan(x)
            key = np.where(nan, 0, key)
            if descending:
                order = np.lexsort((-key, ~nan), axis=-1) if x.ndim == 1 else np.stack(
                    [np.lexsort((-k, ~n)) for k, n in zip(key, nan)])
            else:
                order = np.lexsort((key, nan), axis=-1) if x.ndim == 1 else np.stack(
                    [np.lexsort((k, n)) for k, n in zip(key, nan)])
        else:
            order = np.argsort(~key if descending else key, axis=-1, kind="stable")  # ~ reverses ints and bools
        return np.take_along_axis(x, order, -1), order.astype(I64)
    return ref


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32, I64, BOOL])
def test_sort_is_stable_with_torch_nan_order(descending, dtype):
    r = rng(31)
    if dtype == BOOL:
        x = r.random((3, 9)) < 0.5
    elif np.dtype(dtype).kind == "i":
        x = r.integers(-3, 3, (3, 9)).astype(dtype)
        x[0, :2] = [np.iinfo(dtype).min, np.iinfo(dtype).max]
    else:
        x = r.integers(-3, 3, (3, 9)).astype(dtype)  # many ties
        x[0, :5] = [np.nan, -0.0, np.inf, -np.inf, np.nan]
    fn = op(P.sort_p, axis=1, descending=descending, index_dtype=np.dtype(I64))
    check(fn, (x,), _stable_sort_reference(descending), backends=DEFAULT_BACKENDS + ("torchscript",))
    t = torch.sort(torch.from_numpy(x), dim=1, descending=descending, stable=True)
    np.testing.assert_array_equal(_stable_sort_reference(descending)(x)[1], t.indices.numpy())


def test_sort_along_a_leading_axis_and_int32_indices():
    x = rng(32).standard_normal((5, 4))
    fn = op(P.sort_p, axis=0, descending=True, index_dtype=np.dtype(I32))
    check(fn, (x,), lambda x: (-np.sort(-x, axis=0), np.argsort(-x, axis=0, kind="stable").astype(I32)))


# ----------------------------------------------------------------------------- linear algebra

def _spd(r, batch, n):
    a = r.standard_normal(batch + (n, n))
    return a @ np.swapaxes(a, -1, -2) + n * np.eye(n)


def test_cholesky_reads_the_lower_triangle():
    r = rng(33)
    a = _spd(r, (2,), 4)
    noisy = a + np.triu(r.standard_normal((2, 4, 4)), 1)  # the upper triangle is never read
    check(lax.cholesky, (noisy,), lambda a: np.linalg.cholesky(np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)),
          backends=DEFAULT_BACKENDS + ("torchscript",))


@pytest.mark.parametrize("left_side", [True, False])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("unit_diagonal", [False, True])
def test_triangular_solve(left_side, lower, transpose_a, unit_diagonal):
    r = rng(34)
    a = r.standard_normal((2, 4, 4)) + 4 * np.eye(4)  # the other triangle is garbage, never read
    b = r.standard_normal((2, 4, 3) if left_side else (2, 3, 4))

    def ref(a, b):
        t = np.tril(a) if lower else np.triu(a)
        if unit_diagonal:
            t = t * (1 - np.eye(4)) + np.eye(4)
        t = np.swapaxes(t, -1, -2) if transpose_a else t
        return np.linalg.solve(t, b) if left_side else np.swapaxes(
            np.linalg.solve(np.swapaxes(t, -1, -2), np.swapaxes(b, -1, -2)), -1, -2)
    fn = lambda a, b: lax.triangular_solve(a, b, left_side=left_side, lower=lower, transpose_a=transpose_a,  # noqa
                                           unit_diagonal=unit_diagonal)
    check(fn, (a, b), ref, tol=dict(rtol=1e-10, atol=1e-12))


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 5), (5, 3)])
def test_lu_matches_lapack_pivoting(shape):
    import scipy.linalg
    a = rng(35).standard_normal(shape)

    def ref(a):
        batch = a.reshape((-1,) + a.shape[-2:])
        outs = [scipy.linalg.lu_factor(m) for m in batch]
        lu = np.stack([o[0] for o in outs]).reshape(a.shape)
        piv = np.stack([o[1] for o in outs]).astype(I32).reshape(a.shape[:-2] + (min(a.shape[-2:]),))
        perm = []
        for m in batch:
            p, _, _ = scipy.linalg.lu(m)
            perm.append(np.argmax(p, axis=0))
        return lu, piv, np.stack(perm).astype(I32).reshape(a.shape[:-1])
    check(lax.lu, (a,), ref, tol=dict(rtol=1e-10, atol=1e-12), backends=DEFAULT_BACKENDS + ("torchscript",))


@pytest.mark.parametrize("shape", [(2, 5, 3), (4, 4), (3, 5)])
@pytest.mark.parametrize("full_matrices", [False, True])
def test_qr(shape, full_matrices):
    a = rng(36).standard_normal(shape)
    mode = "complete" if full_matrices else "reduced"
    check(lambda a: lax.qr(a, full_matrices), (a,), lambda a: tuple(np.linalg.qr(a, mode=mode)),
          tol=dict(rtol=1e-10, atol=1e-12))


def test_eigh_and_svd_up_to_the_sign_of_each_vector():
    r = rng(37)
    s = r.standard_normal((2, 4, 4))
    s = s + np.swapaxes(s, -1, -2)
    g = rt.trace(lambda a: lax.eigh(a), s)
    for backend in DEFAULT_BACKENDS:
        w, v = BACKENDS[backend](g, (s,))
        np.testing.assert_allclose(w, np.linalg.eigvalsh(s), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v @ (w[..., None] * np.swapaxes(v, -1, -2)), s, atol=1e-12)
        np.testing.assert_allclose(np.abs(v), np.abs(np.linalg.eigh(s)[1]), atol=1e-10)
    for shape, full in [((2, 5, 3), False), ((3, 5), True), ((4, 4), False)]:
        a = r.standard_normal(shape)
        g = rt.trace(lambda a: lax.svd(a, full), a)
        for backend in DEFAULT_BACKENDS:
            u, sv, vh = BACKENDS[backend](g, (a,))
            np.testing.assert_allclose(sv, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
            k = sv.shape[-1]
            np.testing.assert_allclose((u[..., :k] * sv[..., None, :]) @ vh[..., :k, :], a, atol=1e-12)
            np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, np.broadcast_to(np.eye(u.shape[-1]), u.shape[:-2]
                                       + (u.shape[-1],) * 2), atol=1e-12)


def test_pinv_cuts_small_singular_values():
    r = rng(38)
    a = r.standard_normal((2, 5, 2)) @ r.standard_normal((2, 2, 3))  # rank 2
    atol, rtol = np.zeros(2), np.full(2, 1e-10)
    check(op(P.pinv_p, hermitian=False), (a, atol, rtol), lambda a, *_: np.linalg.pinv(a, rcond=1e-10),
          tol=dict(rtol=1e-8, atol=1e-10))
    s = a[:, :3, :] @ np.swapaxes(a[:, :3, :], -1, -2)  # symmetric, rank 2
    check(op(P.pinv_p, hermitian=True), (s, atol, rtol), lambda s, *_: np.linalg.pinv(s, rcond=1e-10, hermitian=True),
          tol=dict(rtol=1e-8, atol=1e-10))


# ----------------------------------------------------------------------------- random

@pytest.mark.parametrize("dtype", [F32, F64])
def test_random_uniform_matches_jax_bit_for_bit(dtype):
    key = np.array([0, 42], np.uint32)
    g = rt.trace(op(P.random_p, shape=(64, 33), dtype=np.dtype(dtype), distribution="uniform"), key)
    (t,), (j,) = lower_torch(g)(key), lower_jax(g)(key)
    np.testing.assert_array_equal(t.numpy(), np.asarray(j))
    u = t.numpy()
    assert u.dtype == dtype and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    key2 = np.array([7, 2**32 - 1], np.uint32)
    assert not np.array_equal(lower_torch(g)(key2)[0].numpy(), u)
    np.testing.assert_array_equal(lower_torch(g)(key2)[0].numpy(), np.asarray(lower_jax(g)(key2)[0]))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_random_normal_matches_jax(dtype):
    key = np.array([3, 1], np.uint32)
    g = rt.trace(op(P.random_p, shape=(4000,), dtype=np.dtype(dtype), distribution="normal"), key)
    (t,), (j,) = lower_torch(g)(key), lower_jax(g)(key)
    np.testing.assert_allclose(t.numpy(), np.asarray(j), rtol=1e-5 if dtype == F32 else 1e-9, atol=1e-6)
    z = t.numpy()
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
