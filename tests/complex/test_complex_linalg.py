"""Complex linear algebra through the torch bridge: values and gradients equal eager torch's
(conjugate Wirtinger, docs/complex.md) on both backends, for every factorization and the functions
built on them; losses of eigen/singular vectors are phase-invariant, as torch requires. Gradients of
a real loss are also checked against central finite differences, and a model with complex linear
algebra trains with Adam exactly as eagerly."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from reftrace.compile import aot_function, aot_module, nop, xla_compile

COMPILERS = {"nop": nop, "xla": xla_compile}


def _crandn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g, dtype=torch.double),
                         torch.randn(shape, generator=g, dtype=torch.double))


def _hermitian_pd(n: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    a = _crandn(*batch, n, n, seed=1)
    return a @ a.mH + n * torch.eye(n, dtype=torch.cdouble)


def _phase_free(v: torch.Tensor) -> torch.Tensor:
    """|v|^2 entrywise: unchanged by a phase on each column (what a loss of eigenvectors may read)."""
    return (v * v.conj()).real


CASES = {
    "inv": (lambda a: torch.linalg.inv(a), lambda: [_crandn(2, 4, 4)]),
    "det": (lambda a: torch.linalg.det(a), lambda: [_crandn(3, 3)]),
    "slogdet": (lambda a: torch.linalg.slogdet(a), lambda: [_crandn(2, 4, 4)]),
    "solve": (lambda a, b: torch.linalg.solve(a, b), lambda: [_crandn(4, 4), _crandn(4, 2, seed=2)]),
    "solve_triangular": (lambda a, b: torch.linalg.solve_triangular(a.triu() + 4 * torch.eye(4), b, upper=True,
                                                                   left=False),
                         lambda: [_crandn(4, 4), _crandn(3, 4, seed=2)]),
    "triangular_solve(transpose)": (lambda a, b: torch.triangular_solve(b, a.tril() + 4 * torch.eye(3), upper=False,
                                                                       transpose=True)[0],
                                    lambda: [_crandn(3, 3), _crandn(3, 2, seed=2)]),
    "cholesky(upper)": (lambda a: torch.linalg.cholesky(a, upper=True), lambda: [_hermitian_pd(4, (2,))]),
    "cholesky_solve": (lambda a, b: torch.cholesky_solve(b, torch.linalg.cholesky(a)),
                       lambda: [_hermitian_pd(3), _crandn(3, 2, seed=2)]),
    "cholesky_inverse": (lambda a: torch.cholesky_inverse(torch.linalg.cholesky(a)), lambda: [_hermitian_pd(3)]),
    "lu (square, wide, tall)": (lambda a, b, c: torch.linalg.lu(a) + torch.linalg.lu(b)[1:] + torch.linalg.lu(c)[1:],
                                lambda: [_crandn(4, 4), _crandn(3, 5, seed=2), _crandn(5, 3, seed=3)]),
    "lu_solve(adjoint)": (lambda a, b: torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b, adjoint=True),
                          lambda: [_crandn(4, 4), _crandn(4, 2, seed=2)]),
    "qr (tall, wide)": (lambda a, b: torch.linalg.qr(a) + torch.linalg.qr(b),
                        lambda: [_crandn(5, 3), _crandn(3, 5, seed=2)]),
    "eigh": (lambda a: (lambda w, v: (w, _phase_free(v)))(*torch.linalg.eigh(a + a.mH)), lambda: [_crandn(4, 4)]),
    "svd (tall)": (lambda a: (lambda u, s, vh: (s, _phase_free(u), _phase_free(vh), u @ vh))(
        *torch.linalg.svd(a, full_matrices=False)), lambda: [_crandn(5, 3)]),
    "svd (wide)": (lambda a: (lambda u, s, vh: (s, u @ torch.diag(s).to(a.dtype) @ vh, u[:, :1] @ vh[:1]))(
        *torch.linalg.svd(a, full_matrices=False)), lambda: [_crandn(3, 5)]),
    "pinv, hermitian pinv": (lambda a, b: (torch.linalg.pinv(a), torch.linalg.pinv(b + b.mH, hermitian=True)),
                             lambda: [_crandn(4, 3), _crandn(3, 3, seed=2)]),
    "matrix functions": (lambda a, b: (torch.linalg.matrix_norm(a, "nuc"), torch.linalg.cond(a),
                                       torch.linalg.polar(a)[0],
                                       torch.linalg.matrix_power(b, -2)),
                         lambda: [_crandn(3, 3), _crandn(3, 3, seed=2)]),
    "householder_product, ormqr": (lambda a, tau, c: (torch.linalg.householder_product(a, tau),
                                                      torch.ormqr(a, tau, c, left=False, transpose=True)),
                                   lambda: [_crandn(4, 3), _crandn(3, seed=2), _crandn(2, 4, seed=3)]),
}


def _outputs(value):
    return [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if v.is_floating_point()
            or v.is_complex()]


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_equal_eager(name, compiler):
    fn, make = CASES[name]
    args = make()
    eager_args = [a.clone().requires_grad_() for a in args]
    ours_args = [a.clone().requires_grad_() for a in args]
    expected, got = _outputs(fn(*eager_args)), _outputs(aot_function(fn, COMPILERS[compiler])(*ours_args))
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    cts = [_crandn(*e.shape, seed=10 + i) if e.is_complex() else torch.randn_like(e) for i, e in enumerate(expected)]
    torch.autograd.backward([e for e in expected if e.requires_grad], [c for e, c in zip(expected, cts)
                                                                       if e.requires_grad])
    torch.autograd.backward([g for g in got if g.requires_grad], [c for g, c in zip(got, cts) if g.requires_grad])
    for a, b in zip(ours_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["inv", "eigh", "svd (tall)", "qr (tall, wide)", "cholesky(upper)", "slogdet"])
def test_gradient_of_a_real_loss_is_finite_differences_of_re_and_im(name):
    """dL/d(re a) + i dL/d(im a), by central differences of the eager forward: the convention itself."""
    fn, make = CASES[name]
    args = make()
    if name == "cholesky(upper)":
        fn = (lambda f: lambda a: f((a + a.mH) / 2))(fn)  # differences must stay Hermitian positive definite

    def loss(*xs):
        return sum((o.abs() ** 2).sum() if o.is_complex() else (o * 0.7).sum() for o in _outputs(fn(*xs)))

    ours_args = [a.clone().requires_grad_() for a in args]
    loss_value = aot_function(lambda *xs: loss(*xs), nop)(*ours_args)
    loss_value.backward()
    a0, rest = args[0], args[1:]
    eps = 1e-6
    expected = torch.zeros_like(a0)
    flat = expected.view(-1)
    for i in range(a0.numel()):
        for unit in (1, 1j):
            step = torch.zeros_like(a0).view(-1)
            step[i] = eps * unit
            up = loss(a0 + step.view_as(a0), *rest).item()
            down = loss(a0 - step.view_as(a0), *rest).item()
            flat[i] += (up - down) / (2 * eps) * unit
    torch.testing.assert_close(ours_args[0].grad, expected, rtol=1e-5, atol=1e-5)


class UnitaryMixer(torch.nn.Module):
    """A complex layer whose weight is the Q of a QR decomposition, followed by a Hermitian solve."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = torch.nn.Parameter(_crandn(4, 4, seed=5))
        self.shift = torch.nn.Parameter(_crandn(4, 4, seed=6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, _ = torch.linalg.qr(self.raw)
        h = self.shift @ self.shift.mH + 4 * torch.eye(4, dtype=torch.cdouble)
        y = torch.linalg.solve(h, (x @ q).mT).mT
        return torch.linalg.eigvalsh(y.mH @ y) + torch.linalg.svdvals(y).sum()


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
def test_adam_training_through_complex_factorizations_matches_eager(compiler):
    model = UnitaryMixer()
    eager = copy.deepcopy(model)
    compiled = aot_module(model, COMPILERS[compiler])
    opt, eager_opt = torch.optim.Adam(model.parameters(), 1e-2), torch.optim.Adam(eager.parameters(), 1e-2)
    x = _crandn(6, 4, seed=7)
    target = torch.linspace(0.5, 2.0, 4, dtype=torch.double)
    for _ in range(4):
        for m, optimizer in ((compiled, opt), (eager, eager_opt)):
            optimizer.zero_grad()
            loss = ((m(x) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    assert np.isfinite(float(loss))
