"""Forward mode through the linear-algebra primitives on complex matrices: ``rt.jvp`` equals ``jax.jvp``
of the jax.lax.linalg / jnp.linalg function (forward mode has no convention to choose). Where complex
eigenvectors or singular vectors carry a free phase, the quantities compared are phase-free (eigenvalues,
singular values, V diag(w) V^H, |U|, rank-one projectors), the rules' phase choice is checked against
torch's forward AD after aligning phases, and a finite difference checks a composed program."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.func import jvp as torch_jvp

import reftrace as rt
import reftrace.lax as L
from reftrace.primitives import typecheck

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def crandn(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex128)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def random_like(x: np.ndarray) -> np.ndarray:
    return crandn(*x.shape) if np.iscomplexobj(x) else randn(*x.shape)


def hermitian(*shape: int, complex_: bool = True) -> np.ndarray:
    """A Hermitian (symmetric when real) matrix with eigenvalues at least 2 apart."""
    q = np.linalg.qr(crandn(*shape) if complex_ else randn(*shape))[0]
    w = np.linspace(-3.0, 4.0, shape[-1]) + 0.1 * RNG.uniform(size=shape[:-1])
    return (q * w[..., None, :]) @ np.conj(np.swapaxes(q, -1, -2))


def hpd(*shape: int, complex_: bool = True) -> np.ndarray:
    """Hermitian positive definite: x x^H + n I."""
    x = crandn(*shape) if complex_ else randn(*shape)
    return x @ np.conj(np.swapaxes(x, -1, -2)) + shape[-1] * np.eye(shape[-1])


def ours(fn: Callable[..., Any], args: Sequence[np.ndarray], tangents: Sequence[np.ndarray], backend: str = "jax"
         ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """reftrace's (outs, out_tangents) of ``fn`` at ``args`` along ``tangents``; the jvp graph typechecks and
    every tangent has its output's aval (real tangents for eigenvalues and singular values)."""
    graph = rt.trace(fn, *args)
    forward = rt.jvp(graph)
    typecheck(forward)
    assert [o.aval for o in forward.outputs] == [o.aval for o in graph.outputs] * 2
    results = [np.asarray(r) for r in rt.lower(forward, backend)(*args, *tangents)]
    n = len(graph.outputs)
    return results[:n], results[n:]


def theirs(fn: Callable[..., Any], args: Sequence[np.ndarray], tangents: Sequence[np.ndarray]
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    outs, out_tangents = jax.jvp(fn, tuple(jnp.asarray(a) for a in args), tuple(jnp.asarray(t) for t in tangents))
    as_list = (lambda x: list(x) if isinstance(x, (tuple, list)) else [x])
    return [np.asarray(o) for o in as_list(outs)], [np.asarray(t) for t in as_list(out_tangents)]


def close(got: np.ndarray, want: np.ndarray, what: str, tol: float = 1e-9) -> None:
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def mh(x: np.ndarray) -> np.ndarray:
    return np.conj(np.swapaxes(x, -1, -2))


def d_outer(x: np.ndarray, dx: np.ndarray, y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The tangent of the outer products x_j y_j^H of matching columns, stacked along the last axis."""
    return dx[..., :, None, :] * np.conj(y[..., None, :, :]) + x[..., :, None, :] * np.conj(dy[..., None, :, :])


def herm(x: Any) -> Any:
    return (x + jnp.conj(jnp.swapaxes(x, -1, -2))) / 2


# ----------------------------------------------------------------------------- one primitive at a time

@pytest.mark.parametrize("complex_", [True, False])
def test_cholesky(complex_):
    """Against jnp.linalg.cholesky, which differentiates the Hermitian part of the tangent, as reftrace does."""
    a = hpd(2, 4, 4, complex_=complex_)
    t = random_like(a)                                          # any direction: both read its Hermitian part
    (factor,), (d_factor,) = ours(L.cholesky, [a], [t])
    (want,), (d_want,) = theirs(jnp.linalg.cholesky, [a], [t])
    close(factor, want, "L")
    close(d_factor, d_want, "dL")
    assert np.allclose(np.imag(np.diagonal(d_factor, axis1=-2, axis2=-1)), 0)  # L's diagonal stays real


TRIANGULAR = [(True, True, False, False), (False, False, True, True), (True, False, True, False),
              (False, True, False, True), (True, True, True, False)]


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("left, lower, transpose, unit", TRIANGULAR)
def test_triangular_solve(complex_, left, lower, transpose, unit):
    """transpose_a is the plain transpose: jax's conjugate_a=False."""
    rnd = crandn if complex_ else randn
    tri = np.tril(rnd(2, 4, 4)) + 3 * np.eye(4)
    a = tri if lower else np.swapaxes(tri, -1, -2)
    b = rnd(2, 4, 3) if left else rnd(2, 3, 4)
    ta, tb = random_like(a), random_like(b)                    # a full tangent: both read a's triangle only
    kw = dict(left_side=left, lower=lower, transpose_a=transpose, unit_diagonal=unit)
    (x,), (dx,) = ours(lambda a, b: L.triangular_solve(a, b, **kw), [a, b], [ta, tb])
    (want,), (d_want,) = theirs(lambda a, b: jax.lax.linalg.triangular_solve(a, b, conjugate_a=False, **kw),
                                [a, b], [ta, tb])
    close(x, want, "x")
    close(dx, d_want, "dx")


def test_conjugate_transpose_solve():
    """L^H x = b written as transpose_a on conj(L): jax's conjugate_a=True."""
    tri, b = np.tril(crandn(3, 3)) + 3 * np.eye(3), crandn(3, 2)
    ta, tb = crandn(3, 3), crandn(3, 2)
    (x,), (dx,) = ours(lambda a, b: L.triangular_solve(L.conj(a), b, transpose_a=True), [tri, b], [ta, tb])
    (want,), (d_want,) = theirs(lambda a, b: jax.lax.linalg.triangular_solve(
        a, b, left_side=True, lower=True, transpose_a=True, conjugate_a=True), [tri, b], [ta, tb])
    close(x, want, "x")
    close(dx, d_want, "dx")


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 5), (5, 3)])
def test_lu(complex_, shape):
    a = crandn(*shape) if complex_ else randn(*shape)
    t = random_like(a)
    (packed, _, permutation), (d_packed, _, _) = ours(L.lu, [a], [t])
    (want, _, want_permutation), (d_want, _, _) = theirs(jax.lax.linalg.lu, [a], [t])
    np.testing.assert_array_equal(permutation, want_permutation)
    close(packed, want, "packed")
    close(d_packed, d_want, "d packed")


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 3), (4, 4)])
def test_qr_tall_and_square(complex_, shape):
    """Against jnp.linalg.qr (JAX differentiates square and tall matrices only)."""
    a = crandn(*shape) if complex_ else randn(*shape)
    t = random_like(a)
    (q, r), (d_q, d_r) = ours(L.qr, [a], [t])
    (want_q, want_r), (d_want_q, d_want_r) = theirs(jnp.linalg.qr, [a], [t])
    close(q, want_q, "Q")
    close(r, want_r, "R")
    close(d_q, d_want_q, "dQ")
    close(d_r, d_want_r, "dR")
    omega = mh(q) @ d_q
    close(omega, -mh(omega), "Q^H dQ is skew-Hermitian")
    assert np.allclose(np.imag(np.diagonal(d_r, axis1=-2, axis2=-1)), 0)  # R's diagonal stays real


@pytest.mark.parametrize("full_matrices", [False, True])
def test_qr_wide_against_torch(full_matrices):
    """JAX refuses wide QR; torch's forward AD differentiates it (complete Q of a wide matrix is the reduced)."""
    a, t = crandn(2, 3, 5), crandn(2, 3, 5)
    (q, r), (d_q, d_r) = ours(lambda a: L.qr(a, full_matrices=full_matrices), [a], [t])
    (want_q, want_r), (d_want_q, d_want_r) = torch_jvp(lambda a: torch.linalg.qr(a), (torch.tensor(a),),
                                                       (torch.tensor(t),))
    close(q, want_q.numpy(), "Q")
    close(r, want_r.numpy(), "R")
    close(d_q, d_want_q.numpy(), "dQ")
    close(d_r, d_want_r.numpy(), "dR")


def _phases(ours_vectors: np.ndarray, their_vectors: np.ndarray) -> np.ndarray:
    """The unit phases z with ours = theirs diag(z), column by column (asserted)."""
    z = np.sum(np.conj(their_vectors) * ours_vectors, axis=-2)
    np.testing.assert_allclose(np.abs(z), 1, atol=1e-9)
    close(ours_vectors, their_vectors * z[..., None, :], "the same vectors up to phases")
    return z


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("lower", [True, False])
def test_eigh(complex_, lower):
    """Against jnp.linalg.eigh (which differentiates the Hermitian part of the tangent, as reftrace does)."""
    a = hermitian(2, 4, 4, complex_=complex_)
    t = random_like(a)
    (w, v), (d_w, d_v) = ours(lambda a: L.eigh(a, lower=lower), [a], [t])
    (want_w, want_v), (d_want_w, d_want_v) = theirs(lambda a: jnp.linalg.eigh(a, UPLO="L" if lower else "U"),
                                                    [a], [t])
    assert w.dtype == d_w.dtype == np.float64
    close(w, want_w, "w")
    close(d_w, d_want_w, "dw")
    # phase-free: d(V diag(w) V^H) is the Hermitian part of the tangent; d(v_j v_j^H) for each j
    d_rebuilt = (d_v * w[..., None, :]) @ mh(v) + (v * d_w[..., None, :]) @ mh(v) + (v * w[..., None, :]) @ mh(d_v)
    close(d_rebuilt, (t + mh(t)) / 2, "d(V diag(w) V^H)")
    close(d_outer(v, d_v, v, d_v), d_outer(want_v, d_want_v, want_v, d_want_v), "d(v_j v_j^H)")
    # the phase choice: diag(V^H dV) = 0 (torch's and JAX's), so dV turns with V
    close(np.diagonal(mh(v) @ d_v, axis1=-2, axis2=-1), np.zeros(w.shape), "diag(V^H dV)")
    z = _phases(v, want_v)
    close(d_v, d_want_v * z[..., None, :], "dV (phases aligned)")


def _svd_phase_free(u: np.ndarray, s: np.ndarray, vh: np.ndarray, d_u: np.ndarray, d_s: np.ndarray,
                    d_vh: np.ndarray) -> dict[str, np.ndarray]:
    """Tangents of phase-free functions of an SVD: s, U diag(s) V^H, |U|, |V|, u_j u_j^H, u_j v_j^H."""
    v, d_v = mh(vh), mh(d_vh)
    return {"ds": d_s,
            "d(U S V^H)": (d_u * s[..., None, :]) @ vh + (u * d_s[..., None, :]) @ vh + (u * s[..., None, :]) @ d_vh,
            "d|U|": np.real(np.conj(u) * d_u) / np.abs(u), "d|V|": np.real(np.conj(v) * d_v) / np.abs(v),
            "d(u_j u_j^H)": d_outer(u, d_u, u, d_u), "d(v_j v_j^H)": d_outer(v, d_v, v, d_v),
            "d(u_j v_j^H)": d_outer(u, d_u, v, d_v)}


SVD_SHAPES = [(2, 5, 3), (4, 4), (3, 5)]


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("shape", SVD_SHAPES)
def test_svd_against_jax(complex_, shape):
    """JAX fixes the vectors' phases differently (all of it on U): compare the phase-free tangents."""
    a = crandn(*shape) if complex_ else randn(*shape)
    t = random_like(a)
    (u, s, vh), (d_u, d_s, d_vh) = ours(L.svd, [a], [t])
    (want_u, want_s, want_vh), (d_want_u, d_want_s, d_want_vh) = theirs(
        lambda a: jnp.linalg.svd(a, full_matrices=False), [a], [t])
    assert s.dtype == d_s.dtype == np.float64
    close(s, want_s, "s")
    got = _svd_phase_free(u, s, vh, d_u, d_s, d_vh)
    want = _svd_phase_free(want_u, want_s, want_vh, d_want_u, d_want_s, d_want_vh)
    for name in got:
        close(got[name], want[name], name)
    close(got["d(U S V^H)"], t, "d(U S V^H) = dA")
    if not complex_:  # real singular vectors have no phase left: the tangents themselves agree
        close(d_u, d_want_u, "dU")
        close(d_vh, d_want_vh, "dVh")


@pytest.mark.parametrize("shape", SVD_SHAPES)
def test_svd_phase_choice_is_torchs(shape):
    """torch's forward AD at the same matrix: equal tangents once the vectors' phases are aligned, and its
    split of the phase term: Im diag(U^H dU) = Im diag(dP) / 2s = -Im diag(V^H dV)."""
    a, t = crandn(*shape), crandn(*shape)
    (u, s, vh), (d_u, d_s, d_vh) = ours(L.svd, [a], [t])
    outs, tangents = torch_jvp(lambda a: torch.linalg.svd(a, full_matrices=False), (torch.tensor(a),),
                               (torch.tensor(t),))
    want_u, want_s, want_vh = (x.numpy() for x in outs)
    d_want_u, d_want_s, d_want_vh = (x.numpy() for x in tangents)
    close(s, want_s, "s")
    close(d_s, d_want_s, "ds")
    z = _phases(u, want_u)
    close(_phases(mh(vh), mh(want_vh)), z, "V turns with U")
    close(d_u, d_want_u * z[..., None, :], "dU (phases aligned)")
    close(d_vh, d_want_vh * np.conj(z)[..., :, None], "dVh (phases aligned)")
    im_dp = np.imag(np.diagonal(mh(u) @ t @ mh(vh), axis1=-2, axis2=-1))
    close(np.imag(np.diagonal(mh(u) @ d_u, axis1=-2, axis2=-1)), im_dp / (2 * s), "Im diag(U^H dU)")
    close(np.imag(np.diagonal(vh @ mh(d_vh), axis1=-2, axis2=-1)), -im_dp / (2 * s), "Im diag(V^H dV)")


@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 5)])
def test_svd_full_matrices(shape):
    """Complete singular vectors: the first min(m, n) move as the reduced ones, the rest do not (torch)."""
    a, t = crandn(*shape), crandn(*shape)
    k = min(shape[-2:])
    (_, _, _), (d_u, d_s, d_vh) = ours(L.svd, [a], [t])
    (_, _, _), (d_full_u, d_full_s, d_full_vh) = ours(lambda a: L.svd(a, full_matrices=True), [a], [t])
    close(d_full_s, d_s, "ds")
    close(d_full_u[..., :k], d_u, "dU, first k")
    close(d_full_vh[..., :k, :], d_vh, "dVh, first k")
    assert not np.any(d_full_u[..., k:]) and not np.any(d_full_vh[..., k:, :])


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 5), (4, 4)])
def test_pinv(complex_, shape):
    a = crandn(*shape) if complex_ else randn(*shape)
    t = random_like(a)
    batch = shape[:-2]
    atol, rtol = np.zeros(batch), np.full(batch, 1e-10)
    (p,), (d_p,) = ours(lambda a: L.pinv(a, atol, rtol), [a], [t])
    (want,), (d_want,) = theirs(lambda a: jnp.linalg.pinv(a, rtol=1e-10), [a], [t])
    close(p, want, "P")
    close(d_p, d_want, "dP")


def test_pinv_hermitian():
    """A Hermitian tangent: jnp.linalg.pinv(hermitian=True) differentiates the tangent's Hermitian part,
    reftrace (as torch) the tangent as given; they agree on Hermitian directions."""
    a, t = hermitian(4, 4), np.asarray(herm(crandn(4, 4)))
    (p,), (d_p,) = ours(lambda a: L.pinv(a, np.array(0.0), np.array(1e-10), hermitian=True), [a], [t])
    (want,), (d_want,) = theirs(lambda a: jnp.linalg.pinv(a, rtol=1e-10, hermitian=True), [a], [t])
    close(p, want, "P")
    close(d_p, d_want, "dP")


def test_pinv_rank_deficient_is_finite():
    """Rank 2: the constant-rank formula stays finite where an SVD's derivative divides by zero."""
    a, t = crandn(5, 2) @ crandn(2, 4), crandn(5, 4)
    (p,), (d_p,) = ours(lambda a: L.pinv(a, np.array(0.0), np.array(1e-10)), [a], [t])
    assert np.all(np.isfinite(d_p))
    # along a rank-preserving direction (the tangent of a curve of rank-2 matrices) it is the derivative
    x, y, dx, dy = crandn(5, 2), crandn(2, 4), crandn(5, 2), crandn(2, 4)
    (_,), (d_p,) = ours(lambda a: L.pinv(a, np.array(0.0), np.array(1e-10)), [x @ y], [dx @ y + x @ dy])
    h = 1e-6
    fd = (np.linalg.pinv((x + h * dx) @ (y + h * dy)) - np.linalg.pinv((x - h * dx) @ (y - h * dy))) / (2 * h)
    close(d_p, fd, "dP against a finite difference", tol=1e-6)


# ----------------------------------------------------------------------------- a composed program

def _composed(z: Any, b: Any) -> tuple[Any, ...]:
    """Every primitive once, with phase-free outputs; z is (4, 3) complex, b (3, 2) complex."""
    import reftrace.numpy as rnp
    gram = rnp.matmul(rnp.conj(z.T), z) + 3.0 * np.eye(3)                 # Hermitian positive definite
    factor = L.cholesky(gram)
    x = L.triangular_solve(factor, b, left_side=True, lower=True)
    packed, _, _ = L.lu(gram + z[:3])
    q, r = L.qr(z)
    w, v = L.eigh(gram)
    u, s, vh = L.svd(z)
    p = L.pinv(z, np.array(0.0), np.array(1e-10))
    spectral = rnp.matmul(v * (w * w), rnp.conj(v.T))                      # V diag(w^2) V^H
    rank_one = u[:, :1] * vh[:1, :]                                        # u_1 v_1^H
    return (rnp.matmul(factor, x), packed, rnp.matmul(q, rnp.exp(r)), spectral, rank_one * rnp.sum(s),
            rnp.matmul(p, z) * s[0] + rnp.abs(vh))


def _composed_numpy(z: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same with numpy/scipy, for finite differences."""
    import scipy.linalg as sl
    gram = z.conj().T @ z + 3.0 * np.eye(3)
    factor = np.linalg.cholesky(gram)
    x = sl.solve_triangular(factor, b, lower=True)
    packed = sl.lu_factor(gram + z[:3])[0]
    q, r = np.linalg.qr(z)
    w, v = np.linalg.eigh(gram)
    u, s, vh = np.linalg.svd(z, full_matrices=False)
    p = np.linalg.pinv(z)
    return (factor @ x, packed, q @ np.exp(r), (v * w * w) @ v.conj().T, u[:, :1] * vh[:1, :] * s.sum(),
            p @ z * s[0] + np.abs(vh))


def test_composed_program_against_finite_differences():
    z, b, t_z, t_b = crandn(4, 3), crandn(3, 2), crandn(4, 3), crandn(3, 2)
    outs, tangents = ours(_composed, [z, b], [t_z, t_b])
    for got, want in zip(outs, _composed_numpy(z, b)):
        close(got, want, "value", tol=1e-8)
    h = 1e-6
    plus, minus = _composed_numpy(z + h * t_z, b + h * t_b), _composed_numpy(z - h * t_z, b - h * t_b)
    for j, (got, up, down) in enumerate(zip(tangents, plus, minus)):
        close(got, (up - down) / (2 * h), f"output {j}", tol=1e-6)
