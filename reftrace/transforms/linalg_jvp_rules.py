"""JVP rules of the matrix factorizations: ``linalg_jvp_rules[primitive]``, merged into ``jvp_rules``.

Same signature and conventions as ``jvp_rules`` (its module docstring). Each rule is the transpose
of its rule in ``linalg_vjp_rules`` (torch's formulas), so the symmetric-input conventions agree:
cholesky and eigh differentiate as functions of the Hermitian part (a + a^H) / 2; the helpers that
hold a convention (spectral gaps, eig's solves) are shared with the VJP rules.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.errors import UnsupportedOperatorError
from reftrace.lax import TracedArray
from reftrace.matrices import diag_embed, diagonal, eye_mask, leading, matmul, mH, mT, scale_columns, scale_rows, \
    trailing, triangle
from reftrace.primitives import Primitive
from reftrace.transforms.linalg_vjp_rules import _const, _eig_solve, _spectral_gaps

Tangent = TracedArray | None
JvpRule = Callable[..., tuple[Tangent, ...]]

linalg_jvp_rules: dict[Primitive, JvpRule] = {}


def _jvp_rule(prim: Primitive):
    def deco(rule: JvpRule) -> JvpRule:
        linalg_jvp_rules[prim] = rule
        return rule
    return deco



def _sym(t: TracedArray) -> TracedArray:
    """The Hermitian part (t + t^H) / 2 (the symmetric part of a real t): what cholesky and eigh differentiate."""
    return lax.mul(_const(0.5, t), lax.add(t, mH(t)))


def _real_part(x: TracedArray) -> TracedArray:
    """Re(x) in the real dtype, ``x`` itself when real: eigenvalues and singular values are real."""
    return lax.real(x) if P.is_complex(x.dtype) else x


def _imaginary_part(x: TracedArray) -> TracedArray:
    """i Im(x) = x - Re(x), in x's complex dtype."""
    return lax.sub(x, lax.convert_element_type(lax.real(x), x.dtype))


@_jvp_rule(P.cholesky_p)
def _cholesky_jvp(tangents, primals, outs):
    """dL = L Phi(L^-1 sym(da) L^-H), Phi = lower triangle with the diagonal halved (L^-1 dL has a real
    diagonal, as L's diagonal stays positive)."""
    (t,), (factor,) = tangents, outs
    left = lax.triangular_solve(factor, _sym(t), left_side=True, lower=True, transpose_a=False)
    # X L^H = left: transpose_a is the plain transpose, so solve with conj(L)
    both = lax.triangular_solve(lax.conj_if_complex(factor), left, left_side=False, lower=True, transpose_a=True)
    phi = lax.sub(triangle(both, 0, True), lax.mul(_const(0.5, both), diag_embed(diagonal(both))))
    return (matmul(factor, phi),)


@_jvp_rule(P.triangular_solve_p)
def _triangular_solve_jvp(tangents, primals, outs, *, left_side, lower, transpose_a, unit_diagonal):
    """op(a) x = b gives op(a) dx = db - op(da) x (or dx op(a) = db - x op(da)), da read on a's
    triangle only (the strict one with a unit diagonal). op is the plain transpose, so the rule is
    holomorphic: complex matrices need no conjugates."""
    (t_a, t_b), (a, b), (x,) = tangents, primals, outs
    rhs = t_b
    if t_a is not None:
        t_a = triangle(t_a, (-1 if lower else 1) if unit_diagonal else 0, lower)
        op_t_a = mT(t_a) if transpose_a else t_a
        d_op = lax.neg(matmul(op_t_a, x) if left_side else matmul(x, op_t_a))
        rhs = d_op if rhs is None else lax.add(rhs, d_op)
    return (lax.triangular_solve(a, rhs, left_side=left_side, lower=lower, transpose_a=transpose_a,
                                 unit_diagonal=unit_diagonal),)


def _resize(x: TracedArray, rows: int, cols: int) -> TracedArray:
    """The top-left ``rows`` x ``cols`` block of ``x``, zero-extended where ``x`` is smaller."""
    config = [(0, 0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2], 0), (0, cols - x.shape[-1], 0)]
    return lax.pad(x, _const(0, x), config)


@_jvp_rule(P.lu_p)
def _lu_jvp(tangents, primals, outs):
    """P^T a = L U with L (m, k) unit lower and U (k, n) upper. Complete them to square L~ (m, m) and
    U~ (n, n) with identity blocks; then M = L~^-1 P^T da U~^-1 splits into dL = L~ tril_-1(M) and
    dU = triu(M) U~ (their first k columns / rows), packed like the factors. Holomorphic: the same for
    complex matrices."""
    (t,), (a,), (packed, _, permutation) = tangents, primals, outs
    if a.size == 0:
        return lax.zeros(packed.aval), None, None
    m, n = a.shape[-2:]
    k = min(m, n)
    rows = lax.broadcast_in_dim(lax.convert_element_type(permutation, np.int64), a.shape, tuple(range(a.ndim - 1)))
    permuted = lax.gather(t, rows, a.ndim - 2)                                   # P^T da
    square_lower = _resize(packed, m, m)                        # strictly lower part of L~ (unit diagonal)
    unit_lower = lax.add(triangle(square_lower, -1, True), lax.convert_element_type(
        eye_mask(square_lower.shape), a.dtype))
    square_upper = triangle(_resize(packed, n, n), 0, False)
    if m < n:  # U~ = [U; 0 I]
        beyond = lax.ge(lax.iota(np.int64, (n, n), 0), lax.full((), m, np.int64))
        identity_rows = lax.logical_and(eye_mask(square_upper.shape),
                                        lax.broadcast_in_dim(beyond, square_upper.shape, (a.ndim - 2, a.ndim - 1)))
        square_upper = lax.select(identity_rows, _const(1, a), square_upper)
    left = lax.triangular_solve(square_lower, permuted, left_side=True, lower=True, unit_diagonal=True)
    middle = lax.triangular_solve(square_upper, left, left_side=False, lower=False)
    d_lower = matmul(unit_lower, leading(triangle(middle, -1, True), 1, k))     # (m, k), strictly lower
    d_upper = matmul(leading(triangle(middle, 0, False), 2, k), square_upper)   # (k, n), upper
    return lax.add(_resize(d_lower, m, n), _resize(d_upper, m, n)), None, None


def _qr_tall_jvp(q: TracedArray, r: TracedArray, t: TracedArray) -> tuple[TracedArray, TracedArray]:
    """m >= n: C = Q^H da R^-1 = Omega + dR R^-1 with Omega = Q^H dQ skew-Hermitian and dR R^-1 upper, so
    Omega = tril_-1(C) - tril_-1(C)^H + i Im diag(C), dR = (C - Omega) R, dQ = da R^-1 - Q (C - Omega).
    The imaginary diagonal keeps R's diagonal real, as LAPACK returns it (torch's and JAX's choice)."""
    c = lax.triangular_solve(r, matmul(mH(q), t), left_side=False, lower=False)
    strict = triangle(c, -1, True)
    omega = lax.sub(strict, mH(strict))
    if P.is_complex(c.dtype):
        omega = lax.add(omega, diag_embed(_imaginary_part(diagonal(c))))
    upper_part = lax.sub(c, omega)                                             # C - Omega = dR R^-1
    d_r = matmul(upper_part, r)
    d_q = lax.sub(lax.triangular_solve(r, t, left_side=False, lower=False), matmul(q, upper_part))
    return d_q, d_r


@_jvp_rule(P.qr_p)
def _qr_jvp(tangents, primals, outs, *, full_matrices):
    (t,), (a,), (q, r) = tangents, primals, outs
    rows, cols = a.shape[-2:]
    if full_matrices and rows > cols:
        raise UnsupportedOperatorError("the QR decomposition with complete Q of a tall matrix is not "
                                       "differentiable (as in torch); use mode='reduced'")
    if rows >= cols:
        return _qr_tall_jvp(q, r, t)
    # wide: a = q [x | y] with x square; y = q^H a_y moves with q too
    d_q, d_x = _qr_tall_jvp(q, leading(r, 1, rows), leading(t, 1, rows))
    d_y = lax.add(matmul(mH(d_q), trailing(a, 1, rows)), matmul(mH(q), trailing(t, 1, rows)))
    return d_q, lax.concatenate([d_x, d_y], a.ndim - 1)


@_jvp_rule(P.pinv_p)
def _pinv_jvp(tangents, primals, outs, *, hermitian):
    """The constant-rank derivative (Golub & Pereyra), whose transpose is the VJP's:
    dP = -P da P + P P^H da^H (I - A P) + (I - P A) da^H P^H P."""
    (t, _, _), (a, _, _), (p,) = tangents, primals, outs
    if t is None:
        return (None,)
    tt = mH(t)
    first = lax.neg(matmul(matmul(p, t), p))
    second = matmul(matmul(p, mH(p)), lax.sub(tt, matmul(matmul(tt, a), p)))
    third = matmul(lax.sub(tt, matmul(p, matmul(a, tt))), matmul(mH(p), p))
    return (lax.add(first, lax.add(second, third)),)


@_jvp_rule(P.eigh_p)
def _eigh_jvp(tangents, primals, outs, *, lower):
    """B = V^H sym(da) V: dw = Re diag(B) (real), dV = V (B / E) off the diagonal, E_ij = w_j - w_i. The zero
    diagonal of V^H dV fixes the phases of complex eigenvectors (torch's and JAX's choice)."""
    (t,), (w, v) = tangents, outs
    b = matmul(matmul(mH(v), _sym(t)), v)
    gaps, off = _spectral_gaps(w)
    gaps = lax.convert_element_type(gaps, b.dtype)
    return _real_part(diagonal(b)), matmul(v, lax.select(off, lax.div(b, gaps), _const(0, b)))


@_jvp_rule(P.svd_p)
def _svd_jvp(tangents, primals, outs, *, full_matrices):
    """dP = U^H da V; dS = Re diag(dP) (real); U^H dU = (dP S + S dP^H) / E, V^H dV = (S dP + dP^H S) / E off
    the diagonal (E_ij = s_j^2 - s_i^2), plus the parts of da outside U's / V's column spaces. Complex
    singular vectors have a phase each: torch's choice puts +i Im diag(dP) / 2S on the diagonal of U^H dU
    and -i Im diag(dP) / 2S on V^H dV's. With full matrices only the first min(m, n) singular vectors move
    (the VJP ignores the rest, as torch)."""
    (t,), (a,), (u, s, vh) = tangents, primals, outs
    k = s.shape[-1]
    rows, cols = a.shape[-2:]
    u_k, vh_k = (leading(u, 1, k), leading(vh, 2, k)) if full_matrices else (u, vh)
    v = mH(vh_k)
    t_v = matmul(t, v)
    d_p = matmul(mH(u_k), t_v)
    gaps, off = _spectral_gaps(lax.mul(s, s))
    gaps, s_a = lax.convert_element_type(gaps, a.dtype), lax.convert_element_type(s, a.dtype)

    def over_gaps(x):
        return lax.select(off, lax.div(x, gaps), _const(0, x))

    d_u = matmul(u_k, over_gaps(lax.add(scale_columns(d_p, s_a), scale_rows(s_a, mH(d_p)))))
    d_v = matmul(v, over_gaps(lax.add(scale_rows(s_a, d_p), scale_columns(mH(d_p), s_a))))
    inv_s = lax.div(_const(1, s_a), s_a)
    if P.is_complex(a.dtype):
        phase = lax.mul(_const(0.5, inv_s), lax.mul(_imaginary_part(diagonal(d_p)), inv_s))
        d_u, d_v = lax.add(d_u, scale_columns(u_k, phase)), lax.sub(d_v, scale_columns(v, phase))
    if rows > k:
        d_u = lax.add(d_u, scale_columns(lax.sub(t_v, matmul(u_k, d_p)), inv_s))
    if cols > k:
        t_u = matmul(mH(t), u_k)
        d_v = lax.add(d_v, scale_columns(lax.sub(t_u, matmul(v, mH(d_p))), inv_s))
    d_vh = mH(d_v)
    if full_matrices:
        d_u, d_vh = _resize(d_u, rows, rows), _resize(d_vh, cols, cols)
    return d_u, _real_part(diagonal(d_p)), d_vh


@_jvp_rule(P.eig_p)
def _eig_jvp(tangents, primals, outs):
    """torch's linalg_eig_jvp: dP = V^-1 da V, dl = diag(dP), dX = V (dP / E) off the diagonal
    (E_ij = l_j - l_i), dV = dX - V diag(re diag(V^H dX)) (the columns keep unit norm). A real tangent
    is made complex first."""
    (t,), (l, v) = tangents, outs
    d_p = _eig_solve(v, matmul(lax.convert_element_type(t, v.dtype), v), adjoint=False)
    gaps, off = _spectral_gaps(l)
    d_x = matmul(v, lax.select(off, lax.div(d_p, gaps), _const(0, d_p)))
    norm_change = lax.convert_element_type(lax.real(diagonal(matmul(mH(v), d_x))), v.dtype)
    return diagonal(d_p), lax.sub(d_x, scale_columns(v, norm_change))
