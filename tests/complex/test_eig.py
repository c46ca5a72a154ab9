"""The general eigendecomposition ``eig``: torch.linalg.eig / eigvals through the torch bridge (nop and
xla compilers) give torch's values and, for losses invariant under the eigenvectors' phases, torch's
gradients; gradients also agree with finite differences, ``rt.jvp`` with torch.func.jvp and finite
differences, and ``vjp(vjp(g))`` with torch's double backward. Real and complex matrices, float64."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import reftrace as rt
import reftrace.lax as L
from reftrace.compile import aot_function, nop, xla_compile
from reftrace.errors import ReftraceError, ShapeError

COMPILERS = {"nop": nop, "xla": xla_compile}
KINDS = {"real": torch.float64, "complex": torch.complex128}
N = 4


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _matrix(kind: str, *batch: int, seed: int = 0) -> torch.Tensor:
    """A random matrix; Gaussian ones have well separated eigenvalues (a real one has conjugate pairs)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, N, N, dtype=KINDS[kind], generator=generator)


def _weights(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def eigenvalue_loss(a: torch.Tensor, w_re: torch.Tensor, w_im: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.eigvals(a)
    return (values.real * w_re + values.imag * w_im).sum()


def eigenvector_loss(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reads the eigenvectors only through |V|^2: invariant under V -> V diag(e^{i phi})."""
    _, vectors = torch.linalg.eig(a)
    return (vectors.abs() ** 2 * w).sum()


def both_loss(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eig(a)
    return (vectors.abs() ** 2 * w).sum() + (values.real * w[..., 0, :]).sum() + (values.imag ** 2).sum()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compiler", COMPILERS)
def test_values_match_torch(compiler, kind):
    a = _matrix(kind, 2)
    values, vectors = aot_function(torch.linalg.eig, COMPILERS[compiler])(a)
    only_values = aot_function(torch.linalg.eigvals, COMPILERS[compiler])(a)
    assert values.dtype == vectors.dtype == only_values.dtype == torch.complex128
    want = np.sort_complex(torch.linalg.eigvals(a).numpy())
    np.testing.assert_allclose(np.sort_complex(values.numpy()), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.sort_complex(only_values.numpy()), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.to(vectors.dtype) @ vectors, vectors * values.unsqueeze(-2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.vector_norm(vectors, dim=-2), torch.ones(2, N, dtype=torch.float64))


def test_float32_gives_complex64():
    a = _matrix("real").float()
    values, vectors = aot_function(torch.linalg.eig, nop)(a)
    assert values.dtype == vectors.dtype == torch.complex64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss, compiler", [("eigenvalues", "nop"), ("eigenvectors", "nop"), ("both", "nop"),
                                            ("both", "xla")])  # the rule is one: xla once (its compiles are slow)
def test_gradients_match_torch(loss, compiler, kind):
    fn, extra = {"eigenvalues": (eigenvalue_loss, (_weights(2, N), _weights(2, N, seed=2))),
                 "eigenvectors": (eigenvector_loss, (_weights(2, N, N),)),
                 "both": (both_loss, (_weights(2, N, N),))}[loss]
    a = _matrix(kind, 2, seed=3)
    eager_a, compiled_a = a.clone().requires_grad_(), a.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(eager_a, *extra), eager_a)
    out = aot_function(fn, COMPILERS[compiler])(compiled_a, *extra)
    (got,) = torch.autograd.grad(out, compiled_a)
    torch.testing.assert_close(out, fn(a, *extra), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def _invariant_loss(a):
    """Real, and invariant under the eigenvectors' phases and the eigenpairs' order (for finite differences)."""
    values, vectors = L.eig(a)
    moduli = L.integer_pow(L.abs(vectors), 2)
    rows = L.broadcast_in_dim(L.constant(np.arange(1.0, N + 1), np.float64), (N, N), (0,))
    per_pair = L.reduce_sum(L.mul(moduli, rows), (0,))                         # sum_k k |V_ki|^2
    return L.reduce_sum(L.add(L.mul(L.real(values), per_pair), L.integer_pow(L.imag(values), 2)), (0,))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(kind):
    a = _matrix(kind, seed=4).numpy()
    joint = rt.lower(rt.vjp(rt.trace(_invariant_loss, a)), "torch")
    _, grad = (np.asarray(o) for o in joint(a, 1.0))
    loss = rt.lower(rt.trace(_invariant_loss, a), "torch")
    step = 1e-6
    directions = [1.0] if kind == "real" else [1.0, 1j]  # torch's convention: dL/d(re) + i dL/d(im)
    numeric = np.zeros_like(a)
    for index in np.ndindex(a.shape):
        for direction in directions:
            bump = np.zeros_like(a)
            bump[index] = step * direction
            slope = (float(np.asarray(loss(a + bump)[0])) - float(np.asarray(loss(a - bump)[0]))) / (2 * step)
            numeric[index] += slope * direction
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_matches_torch_and_finite_differences(kind, backend):
    a, t = _matrix(kind, 2, seed=5).numpy(), _matrix(kind, 2, seed=6).numpy()
    forward = rt.lower(rt.jvp(rt.trace(L.eig, a)), backend)
    values, vectors, d_values, d_vectors = (np.asarray(o) for o in forward(a, t))
    (_, torch_vectors), (want_values, want_vectors) = torch.func.jvp(torch.linalg.eig, (torch.tensor(a),),
                                                                       (torch.tensor(t),))
    # LAPACK builds may pick other phases (signs, for real eigenvectors): dV turns with V, V -> V diag(s)
    phases = np.sum(np.conj(torch_vectors.numpy()) * vectors, axis=-2, keepdims=True)
    np.testing.assert_allclose(np.abs(phases), 1.0, rtol=1e-9)
    np.testing.assert_allclose(d_values, want_values.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(d_vectors, want_vectors.numpy() * phases, rtol=1e-9, atol=1e-11)
    # |V|^2 does not depend on the phases LAPACK picks: central differences of it check dV's modulus part
    step = 1e-6
    plus, minus = (torch.linalg.eig(torch.tensor(a + s * t)) for s in (step, -step))
    numeric_values = (plus[0] - minus[0]).numpy() / (2 * step)
    numeric_moduli = ((plus[1].abs() ** 2 - minus[1].abs() ** 2) / (2 * step)).numpy()
    np.testing.assert_allclose(d_values, numeric_values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(2 * np.real(np.conj(vectors) * d_vectors), numeric_moduli, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_second_order_matches_torch_double_backward(kind):
    a = _matrix(kind, seed=7)
    u = _matrix(kind, seed=8)
    w = _weights(N, N, seed=9)

    def loss(x):
        values, vectors = L.eig(x)
        moduli = L.integer_pow(L.abs(vectors), 2)
        return L.add(L.reduce_sum(L.mul(moduli, L.constant(w.numpy(), np.float64)), (0, 1)),
                     L.reduce_sum(L.integer_pow(L.imag(values), 2), (0,)))

    second = rt.vjp(rt.vjp(rt.trace(loss, a.numpy())))
    outs = [np.asarray(o) for o in rt.lower(second, "torch")(a.numpy(), 1.0, 0.0, u.numpy())]
    x = a.clone().requires_grad_()
    values, vectors = torch.linalg.eig(x)
    (grad,) = torch.autograd.grad((vectors.abs() ** 2 * w).sum() + (values.imag ** 2).sum(), x, create_graph=True)
    (hessian_u,) = torch.autograd.grad((grad * u.conj()).real.sum(), x)
    np.testing.assert_allclose(outs[1], grad.detach().numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(outs[2], hessian_u.numpy(), rtol=1e-7, atol=1e-8)


def test_refuses_what_lapack_cannot_decompose():
    with pytest.raises(ShapeError, match="eig: expects square matrices"):
        rt.trace(L.eig, np.zeros((3, 4)))
    with pytest.raises(ShapeError, match="eig: expects float32, float64, complex64 or complex128"):
        rt.trace(L.eig, np.zeros((3, 3), np.float16))
    assert issubclass(ShapeError, ReftraceError)
