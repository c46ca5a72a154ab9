"""reftrace.numpy against numpy itself: values, dtypes (NEP 50 promotion), shapes, on both backends."""
import numpy as np
import pytest

import reftrace as rt
import reftrace.numpy as rnp

rng = np.random.default_rng(0)
BACKENDS = ["jax", "torch"]


def run(fn, *args, backend="jax"):
    g = rt.trace(fn, *args)
    rt.typecheck(g)
    outs = rt.lower(g, backend)(*args)
    return [np.asarray(o.numpy() if hasattr(o, "numpy") and not isinstance(o, np.ndarray) else o) for o in outs]


def check(fn_rt, fn_np, *args, backend="jax", rtol=1e-12):
    got = run(fn_rt, *args, backend=backend)
    want = fn_np(*args)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = np.asarray(w)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert g.shape == w.shape, (g.shape, w.shape)
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-12)
        else:
            np.testing.assert_array_equal(g, w)


x64 = rng.standard_normal((3, 4))
y64 = rng.standard_normal((4,))
i32 = rng.integers(-9, 9, (3, 4)).astype(np.int32)
i64_big = np.array([2**62 + 1, -(2**61) - 3, 7], np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn", [
    ("add_bcast", lambda x, y: x + y),
    ("sub_scalar", lambda x, y: 3.0 - x),
    ("mul", lambda x, y: x * y * 2),
    ("div", lambda x, y: x / y),
    ("pow_int", lambda x, y: x ** 3),
    ("pow_float", lambda x, y: abs(x) ** 1.5),
    ("invert_cmp", lambda x, y: ~(x > y)),
    ("where", lambda x, y: x * (x > y) + (x <= 0.5)),
    ("matmul_vec", lambda x, y: x @ y),
])
def test_float64_binary(backend, name, fn):
    np_fn = fn
    check(fn, np_fn, x64, y64, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unary_math(backend):
    pos = np.abs(x64) + 0.1
    for rfn, nfn, arg in [(rnp.exp, np.exp, x64), (rnp.log, np.log, pos), (rnp.sin, np.sin, x64),
                          (rnp.cos, np.cos, x64), (rnp.tan, np.tan, x64), (rnp.tanh, np.tanh, x64),
                          (rnp.sqrt, np.sqrt, pos), (rnp.abs, np.abs, x64), (rnp.log1p, np.log1p, pos),
                          (rnp.expm1, np.expm1, x64), (rnp.sign, np.sign, x64), (rnp.floor, np.floor, x64),
                          (rnp.arctan, np.arctan, x64), (rnp.sinh, np.sinh, x64)]:
        check(rfn, nfn, arg, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_promotion_follows_numpy(backend):
    f32 = x64.astype(np.float32)
    check(lambda a: a * 2.0, lambda a: a * 2.0, f32, backend=backend, rtol=1e-6)        # weak float stays f32
    check(lambda a: a + 1, lambda a: a + 1, i32, backend=backend)                          # weak int stays i32
    check(lambda a: a * 1.5, lambda a: a * 1.5, i32, backend=backend)                      # int * float -> f64
    check(lambda a, b: a + b, lambda a, b: a + b, i32, f32, backend=backend, rtol=1e-6)  # i32 + f32 -> f64
    check(lambda a: a / 2, lambda a: a / 2, i32, backend=backend)                          # true divide -> f64
    check(lambda a: rnp.exp(a), lambda a: np.exp(a), i32, backend=backend)                 # int ufunc -> f64


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_floor_division_and_remainder(backend):
    a = np.array([7, -7, 7, -7, 0], np.int64)
    b = np.array([2, 2, -2, -2, 3], np.int64)
    check(lambda x, y: (x // y, x % y), lambda x, y: (x // y, x % y), a, b, backend=backend)
    fa, fb = a.astype(np.float64) + 0.5, b.astype(np.float64)
    check(lambda x, y: (x // y, x % y), lambda x, y: (x // y, x % y), fa, fb, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_large_values_exact(backend):
    check(lambda a: (a + 1, a * 2, rnp.sum(a), rnp.max(a), -a), lambda a: (a + 1, a * 2, np.sum(a), np.max(a), -a),
          i64_big, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    check(lambda a: (rnp.sum(a, axis=1), rnp.mean(a, axis=0, keepdims=True), rnp.max(a), rnp.min(a, axis=(0, 1)),
                     rnp.prod(a, axis=1), rnp.argmax(a, axis=1), rnp.argmin(a)),
          lambda a: (np.sum(a, axis=1), np.mean(a, axis=0, keepdims=True), np.max(a), np.min(a, axis=(0, 1)),
                     np.prod(a, axis=1), np.argmax(a, axis=1), np.argmin(a)), x64, backend=backend)
    check(lambda a: (rnp.sum(a), rnp.mean(a), rnp.sum(a > 0)), lambda a: (np.sum(a), np.mean(a), np.sum(a > 0)),
          i32, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_functions(backend):
    check(lambda a: (a.T, a.reshape(2, -1), rnp.transpose(a, (1, 0)), rnp.broadcast_to(a[0], (5, 4)),
                     rnp.concatenate([a, a * 2], axis=1), rnp.stack([a, a], axis=1), rnp.expand_dims(a, 1),
                     rnp.squeeze(a[:1])),
          lambda a: (a.T, a.reshape(2, -1), np.transpose(a, (1, 0)), np.broadcast_to(a[0], (5, 4)),
                     np.concatenate([a, a * 2], axis=1), np.stack([a, a], axis=1), np.expand_dims(a, 1),
                     np.squeeze(a[:1])), x64, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", [
    (1,), (-1,), (slice(None, None, -1),), (slice(1, None, 2), slice(None, 3)), (Ellipsis, 2),
    (None, 0, slice(None)), (slice(3, 0, -2), None, -2), (np.array([2, 0, 0, -1]),),
    (slice(None), np.array([[1, 3], [0, 0]])),
])
def test_getitem(backend, key):
    check(lambda a: a[key], lambda a: a[key], x64, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_shapes(backend):
    a, b = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((5, 4, 2))
    check(lambda p, q: p @ q, lambda p, q: p @ q, a, b, backend=backend)
    v = rng.standard_normal(4)
    check(lambda p, q: (q @ p[0, 0].T, p @ q), lambda p, q: (q @ p[0, 0].T, p @ q), a, v, backend=backend)


def test_eager_outside_trace():
    np.testing.assert_allclose(rnp.cos(np.ones(2)), np.cos(np.ones(2)))


def test_python_scalar_outputs_and_multiple_outputs():
    g = rt.trace(lambda a: [a, 2.0], x64)
    outs = rt.lower(g)(x64)
    np.testing.assert_array_equal(outs[0], x64)
    assert float(outs[1]) == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_axis_and_shape_arguments_follow_numpy(backend):
    """Negative axes, numpy integer axes and shapes, empty aranges and ``[]`` indices are numpy's."""
    check(lambda x: (rnp.expand_dims(x, -3), rnp.swapaxes(x, -1, 0), rnp.transpose(x, (-1, 0)),
                     rnp.sum(x, axis=np.int64(-1)), rnp.reshape(x, np.int64(12)), x[[]]),
          lambda x: (np.expand_dims(x, -3), np.swapaxes(x, -1, 0), np.transpose(x, (-1, 0)),
                     np.sum(x, axis=np.int64(-1)), np.reshape(x, np.int64(12)), x[[]]),
          x64, backend=backend)
    check(lambda x: (x, rnp.arange(-2), rnp.arange(np.int32(3), np.int32)),
          lambda x: (x, np.arange(-2), np.arange(np.int32(3), dtype=np.int32)), x64, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iterating_a_traced_array_gives_its_rows(backend):
    check(lambda x: tuple(row * 2 for row in x), lambda x: tuple(row * 2 for row in x), x64, backend=backend)
    check(lambda x: rnp.stack(list(x), axis=1), lambda x: np.stack(list(x), axis=1), x64, backend=backend)
