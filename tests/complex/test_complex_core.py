"""Complex numbers in the core: primitives, both backends, and reftrace's VJP convention (PyTorch's:
the cotangent of z is dL/d(re z) + i dL/d(im z)) checked against finite differences, against
``jax.vjp`` under the documented mapping (conjugate the cotangents in and out), and against
torch's double backward for ``vjp(vjp(g))``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
import reftrace.lax as L
import reftrace.numpy as rnp
from reftrace.errors import ArgumentError, ShapeError

RNG = np.random.default_rng(0)


def crandn(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex128)


# Complex-valued functions of one complex array, written twice: reftrace.numpy and jax.numpy.
FUNCTIONS = {
    "holomorphic chain": (lambda z: rnp.exp(z) * rnp.sin(z) / (z * z + 2.0),
                          lambda z: jnp.exp(z) * jnp.sin(z) / (z * z + 2.0)),
    "conj and parts": (lambda z: z * rnp.conj(z) + rnp.real(z) * 1j - rnp.imag(z),
                       lambda z: z * jnp.conj(z) + jnp.real(z) * 1j - jnp.imag(z)),
    "abs": (lambda z: rnp.abs(z) * z + rnp.sqrt(z), lambda z: jnp.abs(z) * z + jnp.sqrt(z)),
    "log, tanh, powers": (lambda z: rnp.log(z) * rnp.tanh(z) + z ** 3 - rnp.sqrt(1.0 / z),
                          lambda z: jnp.log(z) * jnp.tanh(z) + z ** 3 - jnp.sqrt(1.0 / z)),
    "inverse trig": (lambda z: rnp.arcsin(z * 0.3) + rnp.arctan(z * 0.5) + rnp.arccosh(z + 3.0) + rnp.arctanh(z * 0.2),
                     lambda z: jnp.arcsin(z * 0.3) + jnp.arctan(z * 0.5) + jnp.arccosh(z + 3.0) + jnp.arctanh(z * 0.2)),
    "matmul and sum": (lambda z: rnp.sum(rnp.matmul(rnp.matmul(z, rnp.conj(z.T)), z) * z[0], axis=0),
                       lambda z: jnp.sum(jnp.matmul(jnp.matmul(z, jnp.conj(z.T)), z) * z[0], axis=0)),
    "prod and cumsum": (lambda z: rnp.prod(z, axis=1) + rnp.cumsum(z, axis=1)[:, -1],
                        lambda z: jnp.prod(z, axis=1) + jnp.cumsum(z, axis=1)[:, -1]),
    "fft family": (lambda z: rnp.fft.ifft(rnp.fft.fft(z) * z, axis=0)
                   + rnp.fft.rfft(rnp.real(z) * 2.0)[:, :2].sum(axis=1, keepdims=True)
                   + rnp.fft.irfft(z, n=4).sum(axis=1, keepdims=True),
                   lambda z: jnp.fft.ifft(jnp.fft.fft(z) * z, axis=0)
                   + jnp.fft.rfft(jnp.real(z) * 2.0)[:, :2].sum(axis=1, keepdims=True)
                   + jnp.fft.irfft(z, n=4).sum(axis=1, keepdims=True)),
}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _reftrace_vjp(fn, z, ct, backend="jax"):
    joint = rt.vjp(rt.trace(fn, z))
    outs = rt.lower(joint, backend)(z, ct)
    return np.asarray(outs[0]), np.asarray(outs[1])


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_vjp_is_jax_vjp_under_the_conjugate_mapping(name, backend):
    """reftrace's vjp(ct) == conj(jax_vjp(conj(ct))): the two conventions differ by a conjugate."""
    ours, theirs = FUNCTIONS[name]
    z = crandn(3, 4)
    value, jax_vjp = jax.vjp(theirs, z)
    ct = crandn(*value.shape)
    out, grad = _reftrace_vjp(ours, z, ct, backend)
    np.testing.assert_allclose(out, np.asarray(value), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grad, np.conj(np.asarray(jax_vjp(np.conj(ct))[0])), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_jvp_is_jax_jvp(name):
    """Forward mode needs no convention: the tangent of f(z) along t is jax.jvp's."""
    ours, theirs = FUNCTIONS[name]
    z, t = crandn(3, 4), crandn(3, 4)
    _, expected = jax.jvp(theirs, (z,), (t,))
    g = rt.jvp(rt.trace(ours, z))
    got = rt.lower(g)(z, t)
    np.testing.assert_allclose(np.asarray(got[-1]), np.asarray(expected), rtol=1e-9, atol=1e-9)


# Building blocks for random programs: (reftrace.numpy, jax.numpy) pairs on complex arrays of one shape.
UNARY = [(rnp.exp, jnp.exp), (rnp.sin, jnp.sin), (rnp.tanh, jnp.tanh), (rnp.conj, jnp.conj),
         (lambda z: rnp.sqrt(z + 3.0), lambda z: jnp.sqrt(z + 3.0)), (lambda z: z * z, lambda z: z * z),
         (lambda z: rnp.log(z * z + 1.0), lambda z: jnp.log(z * z + 1.0)),
         (lambda z: rnp.abs(z) + 0j, lambda z: jnp.abs(z) + 0j), (lambda z: rnp.real(z) * 1j, lambda z: jnp.real(z) * 1j),
         (lambda z: rnp.fft.fft(z), lambda z: jnp.fft.fft(z)), (lambda z: rnp.cumsum(z, axis=0), lambda z: jnp.cumsum(z, 0)),
         (lambda z: rnp.matmul(z, z), lambda z: jnp.matmul(z, z))]
BINARY = [(lambda a, b: a * b, lambda a, b: a * b), (lambda a, b: a / (b * b + 2.0), lambda a, b: a / (b * b + 2.0)),
          (lambda a, b: a - rnp.conj(b), lambda a, b: a - jnp.conj(b))]


@st.composite
def complex_programs(draw):
    """A random straight-line program over two complex 3x3 inputs: (reftrace fn, jax fn)."""
    steps = draw(st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.integers(0, 100), st.integers(0, 100)),
                          min_size=1, max_size=5))

    def build(lib):
        def fn(a, b):
            values = [a, b]
            for binary, k, i, j in steps:
                if binary:
                    op = BINARY[k % len(BINARY)][lib]
                    values.append(op(values[i % len(values)], values[j % len(values)]))
                else:
                    values.append(UNARY[k % len(UNARY)][lib](values[i % len(values)]))
            return values[-1]
        return fn
    return build(0), build(1)


@given(complex_programs(), st.integers(0, 2**31 - 1))
def test_random_programs_vjp_is_jax_vjp_under_the_mapping(program, seed):
    ours, theirs = program
    rng = np.random.default_rng(seed)
    a, b, ct = ((rng.standard_normal((3, 3)) + 1j * rng.standard_normal((3, 3))) * 0.5 for _ in range(3))
    value, jax_vjp = jax.vjp(theirs, a, b)
    outs = rt.lower(rt.vjp(rt.trace(ours, a, b)))(a, b, ct)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(value), rtol=1e-9, atol=1e-9)
    for got, expected in zip(outs[1:], jax_vjp(np.conj(ct))):
        np.testing.assert_allclose(np.asarray(got), np.conj(np.asarray(expected)), rtol=1e-8, atol=1e-8)


def _real_loss(fn):
    return lambda z: rnp.sum(rnp.abs(fn(z)) ** 2) + rnp.sum(rnp.real(fn(z)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradient_of_a_real_loss_is_d_re_plus_i_d_im(name):
    """For a real loss L, the gradient is dL/dx + i dL/dy: central differences in float64."""
    loss = _real_loss(FUNCTIONS[name][0])
    z = crandn(3, 4)
    _, grad = _reftrace_vjp(loss, z, 1.0)
    f = rt.lower(rt.trace(loss, z))
    eps = 1e-6
    for index in [(0, 0), (1, 2), (2, 3)]:
        for unit in (1.0, 1j):
            dz = np.zeros_like(z)
            dz[index] = eps * unit
            numeric = (float(f(z + dz)[0]) - float(f(z - dz)[0])) / (2 * eps)
            expected = grad[index].real if unit == 1.0 else grad[index].imag
            assert numeric == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sign_of_complex_is_torch_sgn():
    """sign(z) = z / |z| moves along the unit circle; JAX gives it a zero derivative, torch's sgn does
    not: reftrace follows torch (0 at z = 0)."""
    z = crandn(5)
    z[2] = 0
    ct = crandn(5)
    got = _reftrace_vjp(rnp.sign, z, ct)[1]
    zt = torch.tensor(z, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.sgn(zt), zt, torch.tensor(ct))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-12)
    assert got[2] == 0


@given(st.integers(0, 2**31 - 1))
def test_vjp_of_vjp_is_torch_double_backward(seed):
    """``vjp(vjp(g))`` on a complex graph: the Hessian-vector product torch's double backward gives."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(5) + 1j * rng.standard_normal(5)
    w = rng.standard_normal(5) + 1j * rng.standard_normal(5)
    v = rng.standard_normal(5) + 1j * rng.standard_normal(5)

    def loss(z):
        y = rnp.exp(z * w) * rnp.conj(z) + rnp.fft.fft(z) * 0.5
        return rnp.sum(rnp.abs(y) ** 2) + rnp.sum(rnp.real(y * z))

    g = rt.trace(loss, z)
    first = rt.vjp(g)                 # (z, ct) -> (loss, grad)
    second = rt.vjp(first, wrt=[0], nondiff_outputs=[0])  # d<grad, v>/dz
    got = rt.lower(second)(z, 1.0, v)[-1]

    zt = torch.tensor(z, requires_grad=True)
    wt, vt = torch.tensor(w), torch.tensor(v)
    y = torch.exp(zt * wt) * zt.conj() + torch.fft.fft(zt) * 0.5
    lt = (y.abs() ** 2).sum() + (y * zt).real.sum()
    (gt,) = torch.autograd.grad(lt, zt, create_graph=True)
    (ht,) = torch.autograd.grad(gt, zt, vt)
    np.testing.assert_allclose(np.asarray(got), ht.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fft_type, shape, lengths", [
    ("fft", (2, 3, 4), (3, 4)), ("ifft", (3, 5), (5,)), ("rfft", (2, 6), (6,)), ("rfft", (3, 4, 5), (4, 5)),
    ("irfft", (2, 4), (6,)), ("irfft", (2, 3, 3), (3, 5)), ("irfft", (3,), (5,))])
def test_fft_primitive_values_and_adjoint(fft_type, shape, lengths):
    """Each FFT kind matches numpy on both backends, and its VJP is the adjoint: <ct, F x> = <F^T ct, x>
    under Re(sum(conj(a) * b)), the inner product the convention makes VJPs adjoints for."""
    x = crandn(*shape) if fft_type != "rfft" else RNG.standard_normal(shape)
    axes = tuple(range(-len(lengths), 0))
    numpy_fn = {"fft": lambda a: np.fft.fftn(a, axes=axes), "ifft": lambda a: np.fft.ifftn(a, axes=axes),
                "rfft": lambda a: np.fft.rfftn(a, axes=axes),
                "irfft": lambda a: np.fft.irfftn(a, s=lengths, axes=axes)}[fft_type]
    g = rt.trace(lambda a: L.fft(a, fft_type, lengths), x)
    for backend in ("jax", "torch"):
        np.testing.assert_allclose(np.asarray(rt.lower(g, backend)(x)[0]), numpy_fn(x), rtol=1e-10, atol=1e-10)
    y = numpy_fn(x)
    ct = crandn(*y.shape) if np.iscomplexobj(y) else RNG.standard_normal(y.shape)
    _, back = rt.lower(rt.vjp(g))(x, ct)
    lhs = np.real(np.vdot(ct, y))
    rhs = np.real(np.vdot(np.asarray(back), x))
    assert lhs == pytest.approx(rhs, rel=1e-10)


def test_shape_rules_and_promotion():
    z = crandn(2, 3)
    g = rt.trace(lambda z: rnp.abs(z) + rnp.real(z * 2.0) + rnp.angle(z), z)
    assert [v.aval.str_short() for v in g.outputs] == ["f64[2,3]"]
    zf = z.astype(np.complex64)
    g = rt.trace(lambda z, x: z * x + 1j, zf, np.ones(3, np.float32))
    assert g.outputs[0].aval.str_short() == "c64[2,3]"  # NEP 50: complex64 * float32 and a weak complex
    g = rt.trace(lambda z, x: z * x, zf, np.ones(3, np.float64))
    assert g.outputs[0].aval.str_short() == "c128[2,3]"
    with pytest.raises(ShapeError, match="rfft expects a float32/float64 operand"):
        rt.trace(lambda a: L.fft(a, "rfft", (3,)), z)
    with pytest.raises(ShapeError, match="irfft lengths"):
        rt.trace(lambda a: L.fft(a, "irfft", (8,)), z)
    with pytest.raises(ShapeError, match="real: expects a complex operand"):
        rt.trace(lambda a: L.real(a), np.ones(3))
    with pytest.raises(ShapeError):
        rt.trace(lambda a: rnp.less(a, a), z)  # complex numbers have no order


def test_complex_scalars_and_arguments():
    g = rt.trace(lambda z: z * z, np.complex128(1 + 2j))
    assert complex(np.asarray(rt.lower(g)(3j)[0])) == -9
    assert complex(rt.lower(g, "torch")(1 + 1j)[0]) == 2j
    with pytest.raises(ArgumentError, match="expected c128"):
        rt.lower(rt.trace(lambda z: z * 2.0, crandn(2)))(np.ones(2))


def test_complex_graphs_print_and_parse():
    z = crandn(2)
    g = rt.trace(lambda z: rnp.conj(z) * (1.5 - 2j) + rnp.fft.fft(z), z)
    text = str(g)
    assert "c128[2]" in text and "conj" in text and "fft[fft_lengths=(2,) fft_type='fft'] a" in text and "(1.5-2j):c128" in text
    assert rt.parse(text) == g
    joint = rt.vjp(g)
    assert rt.parse(str(joint)) == joint
