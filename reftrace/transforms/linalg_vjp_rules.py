"""VJP rules of the matrix factorizations: ``linalg_vjp_rules[primitive]``, merged into ``vjp_rules``.

cholesky, triangular_solve, lu, qr, pinv, eigh, svd and eig. Same signature and conventions as
``vjp_rules`` (its module docstring). The formulas are torch's (linalg backward functions), so
gradients agree with torch.autograd even where a factorization's derivative is a convention
(symmetric inputs of cholesky/eigh). For complex matrices they are the adjoints under
Re tr(X^H Y) (PyTorch's convention, docs/complex.md): every transpose of the real formula is a
conjugate transpose, plus the terms the complex gauges add. ``linalg_jvp_rules`` holds their
transposes.
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

Cotangent = TracedArray | None
VjpRule = Callable[..., tuple[Cotangent, ...]]

linalg_vjp_rules: dict[Primitive, VjpRule] = {}


def _vjp_rule(prim: Primitive):
    def deco(rule: VjpRule) -> VjpRule:
        linalg_vjp_rules[prim] = rule
        return rule
    return deco


def _const(value: float, like: TracedArray) -> TracedArray:
    """A rank-0 constant of ``like``'s dtype (rank-0 operands broadcast in elementwise ops)."""
    return lax.constant(value, like.dtype)


def _zeros_if_none(ct: Cotangent, like: TracedArray) -> TracedArray:
    return lax.zeros(like.aval) if ct is None else ct


def _as_dtype_of(x: TracedArray, like: TracedArray) -> TracedArray:
    """``x`` (a real factor: singular values, eigenvalues, gaps) in ``like``'s (maybe complex) dtype."""
    return x if x.dtype == like.dtype else lax.convert_element_type(x, like.dtype)


def _solve_adjoint(a: TracedArray, b: TracedArray, *, left_side: bool, lower: bool,
                   unit_diagonal: bool = False) -> TracedArray:
    """x with a^H x = b (left_side) or x a^H = b, for triangular ``a``: a^H is the transpose of conj(a)."""
    return lax.triangular_solve(lax.conj_if_complex(a), b, left_side=left_side, lower=lower, transpose_a=True,
                                unit_diagonal=unit_diagonal)


@_vjp_rule(P.cholesky_p)
def _cholesky_vjp(cts, primals, outs):
    """torch's cholesky_backward: ct_a = L^-H M L^-1, M = (X + tril_-1(X)^H) / 2, X = tril(L^H ct)
    (for real matrices the symmetric part of L^-T Phi(L^T ct) L^-1, Phi halving the diagonal)."""
    (ct,), (factor,) = cts, outs
    x = triangle(matmul(mH(factor), ct), 0, True)
    m = lax.mul(_const(0.5, x), lax.add(x, mH(triangle(x, -1, True))))
    left = _solve_adjoint(factor, m, left_side=True, lower=True)
    return (lax.triangular_solve(factor, left, left_side=False, lower=True, transpose_a=False),)


@_vjp_rule(P.triangular_solve_p)
def _triangular_solve_vjp(cts, primals, outs, *, left_side, lower, transpose_a, unit_diagonal):
    """ct_b solves the adjoint system; ct_a = -(ct_b x^H) (or its transpose), kept on a's triangle."""
    (ct,), (a, _), (x,) = cts, primals, outs
    ct_b = lax.triangular_solve(lax.conj_if_complex(a), ct, left_side=left_side, lower=lower,
                                transpose_a=not transpose_a, unit_diagonal=unit_diagonal)
    ct_op = lax.neg(matmul(ct_b, mH(x)) if left_side else matmul(mH(x), ct_b))
    ct_a = mT(ct_op) if transpose_a else ct_op
    ct_a = triangle(ct_a, (-1 if lower else 1) if unit_diagonal else 0, lower)
    return ct_a, ct_b


def _lu_square_vjp(unit_lower, upper, ct_l, ct_u):
    """P^T a = L U (square): ct = L^-H (tril_-1(L^H ct_L) + triu(ct_U U^H)) U^-H."""
    inner = lax.add(triangle(matmul(mH(unit_lower), ct_l), -1, True), triangle(matmul(ct_u, mH(upper)), 0, False))
    left = _solve_adjoint(unit_lower, inner, left_side=True, lower=True, unit_diagonal=True)
    return _solve_adjoint(upper, left, left_side=False, lower=False)


@_vjp_rule(P.lu_p)
def _lu_vjp(cts, primals, outs):
    """a = P L U. Square: the formula of ``_lu_square_vjp``. Wide (m < n): U = [U1 U2] with U2 = L^-1 (P^T a)_2,
    which sends L^-H ct_U2 to a's right block and -L^-H ct_U2 U2^H to L. Tall (m > n): L = [L1; L2] with
    L2 = (P^T a)_2 U^-1, which sends ct_L2 U^-H to a's bottom block and -L2^H ct_L2 U^-H to U."""
    ct = cts[0]
    (a,), (packed, _, permutation) = primals, outs
    if ct is None or a.size == 0:
        return (None if ct is None else lax.zeros(a.aval),)
    m, n = a.shape[-2:]
    k = min(m, n)
    unit_lower = lax.add(triangle(leading(packed, 1, k), -1, True), lax.convert_element_type(
        eye_mask(a.shape[:-2] + (m, k)), a.dtype))
    upper = triangle(leading(leading(packed, 1, k), 2, k), 0, False)
    ct_l = triangle(leading(ct, 1, k), -1, True)
    ct_u = triangle(leading(leading(ct, 1, k), 2, k), 0, False)
    if m == n:
        moved = _lu_square_vjp(unit_lower, upper, ct_l, ct_u)
    elif m < n:
        ct_u2, u2 = trailing(ct, 1, k), trailing(packed, 1, k)
        back = _solve_adjoint(unit_lower, ct_u2, left_side=True, lower=True, unit_diagonal=True)
        ct_l = lax.sub(ct_l, triangle(matmul(back, mH(u2)), -1, True))
        moved = lax.concatenate([_lu_square_vjp(unit_lower, upper, ct_l, ct_u), back], a.ndim - 1)
    else:
        l1, l2 = leading(unit_lower, 2, k), trailing(unit_lower, 2, k)
        ct_l1, ct_l2 = leading(ct_l, 2, k), trailing(ct_l, 2, k)
        back = _solve_adjoint(upper, ct_l2, left_side=False, lower=False)
        ct_u = lax.sub(ct_u, triangle(matmul(mH(l2), back), 0, False))
        moved = lax.concatenate([_lu_square_vjp(l1, upper, ct_l1, ct_u), back], a.ndim - 2)
    rows = lax.broadcast_in_dim(lax.convert_element_type(permutation, np.int64), a.shape, tuple(range(a.ndim - 1)))
    return (lax.scatter(lax.zeros(a.aval), rows, moved, a.ndim - 2),)


def _real_diagonal(x: TracedArray) -> TracedArray:
    """``x`` with its diagonal replaced by the diagonal's real part (``x`` itself for real matrices)."""
    if not P.is_complex(x.dtype):
        return x
    real_diag = diag_embed(lax.convert_element_type(lax.real(diagonal(x)), x.dtype))
    return lax.select(eye_mask(x.shape), real_diag, x)


def _qr_tall_vjp(q, r, ct_q, ct_r):
    """m >= n (torch's linalg_qr_backward): ct_a = (ct_q + q S) r^-H, X = triu(ct_r r^H - q^H ct_q) and
    S = X + X^H with the real part of X's diagonal on its diagonal (R's diagonal is real)."""
    x = triangle(lax.sub(matmul(ct_r, mH(r)), matmul(mH(q), ct_q)), 0, False)
    s = _real_diagonal(lax.sub(lax.add(x, mH(x)), diag_embed(diagonal(x))))
    return _solve_adjoint(r, lax.add(ct_q, matmul(q, s)), left_side=False, lower=False)


@_vjp_rule(P.qr_p)
def _qr_vjp(cts, primals, outs, *, full_matrices):
    (a,), (q, r) = primals, outs
    ct_q, ct_r = _zeros_if_none(cts[0], q), _zeros_if_none(cts[1], r)
    rows, cols = a.shape[-2:]
    if full_matrices and rows > cols:
        raise UnsupportedOperatorError("the QR decomposition with complete Q of a tall matrix is not "
                                       "differentiable (as in torch); use mode='reduced'")
    if rows >= cols:
        return (_qr_tall_vjp(q, r, ct_q, ct_r),)
    # wide: a = q [x | y] with x square; y = q^H a_y contributes through q
    x = leading(r, 1, rows)
    ct_x = leading(ct_r, 1, rows)
    ct_y, a_y = trailing(ct_r, 1, rows), trailing(a, 1, rows)
    ct_q = lax.add(ct_q, matmul(a_y, mH(ct_y)))
    return (lax.concatenate([_qr_tall_vjp(q, x, ct_q, ct_x), matmul(q, ct_y)], a.ndim - 1),)


@_vjp_rule(P.pinv_p)
def _pinv_vjp(cts, primals, outs, *, hermitian):
    """Golub & Pereyra's constant-rank derivative (torch's pinv_backward), written as a VJP:
    ct_a = -P^H g P^H + (I - A P) g^H P P^H + P^H P g^H (I - P A)."""
    (g,), (a, _, _), (p,) = cts, primals, outs
    ph, gh = mH(p), mH(g)
    first = lax.neg(matmul(matmul(ph, g), ph))
    left_residual = lax.sub(gh, matmul(matmul(a, p), gh))                # (I - A P) g^H
    right_residual = lax.sub(gh, matmul(gh, matmul(p, a)))               # g^H (I - P A)
    ct_a = lax.add(first, lax.add(matmul(left_residual, matmul(p, ph)), matmul(matmul(ph, p), right_residual)))
    return ct_a, None, None


def _spectral_gaps(w: TracedArray) -> tuple[TracedArray, TracedArray]:
    """(E, off) with E[..., i, j] = w[j] - w[i] (1 on the diagonal) and the off-diagonal mask."""
    shape = w.shape + w.shape[-1:]
    batch = tuple(range(w.ndim - 1))
    gaps = lax.sub(lax.broadcast_in_dim(w, shape, batch + (w.ndim,)),
                   lax.broadcast_in_dim(w, shape, batch + (w.ndim - 1,)))
    eye = eye_mask(shape)
    return lax.select(eye, _const(1, w), gaps), lax.bitwise_not(eye)


@_vjp_rule(P.eigh_p)
def _eigh_vjp(cts, primals, outs, *, lower):
    """ct_a = V (diag(ct_w) + skew(V^H ct_V) / E) V^H with skew(M) = (M - M^H)/2, E_ij = w_j - w_i."""
    ct_w, ct_v = cts
    w, v = outs
    inner = _as_dtype_of(diag_embed(_zeros_if_none(ct_w, w)), v)
    if ct_v is not None:
        m = matmul(mH(v), ct_v)
        skew = lax.mul(_const(0.5, m), lax.sub(m, mH(m)))
        gaps, off = _spectral_gaps(w)
        inner = lax.add(inner, lax.select(off, lax.div(skew, _as_dtype_of(gaps, m)), _const(0, m)))
    return (matmul(matmul(v, inner), mH(v)),)


@_vjp_rule(P.svd_p)
def _svd_vjp(cts, primals, outs, *, full_matrices):
    """torch's svd_backward: U [skew(U^H gU)/E S + S skew(V^H gV)/E + diag(gS)] V^H, plus the parts of
    gU / gV outside the column spaces of U / V; for complex matrices, with both gU and gV, also
    diag(U^H gU - (U^H gU)^H) / (2 S) (the phase gauge). With full matrices only the first min(m, n)
    singular vectors are differentiated (torch ignores the rest)."""
    (a,), (u, s, vh) = primals, outs
    ct_u, ct_s, ct_vh = cts
    k = s.shape[-1]
    rows, cols = a.shape[-2:]
    if full_matrices:
        u, vh = leading(u, 1, k), leading(vh, 2, k)
        ct_u = None if ct_u is None else leading(ct_u, 1, k)
        ct_vh = None if ct_vh is None else leading(ct_vh, 2, k)
    v = mH(vh)
    inner = _as_dtype_of(diag_embed(_zeros_if_none(ct_s, s)), u)
    real_gaps, off = _spectral_gaps(lax.mul(s, s))
    gaps, s_like_u = _as_dtype_of(real_gaps, u), _as_dtype_of(s, u)

    def skew(x, ct):
        m = matmul(mH(x), ct)
        return lax.sub(m, mH(m))

    def over_gaps(m):
        return lax.select(off, lax.div(m, gaps), _const(0, m))

    inv_s = lax.div(_const(1, s_like_u), s_like_u)
    skew_u = None if ct_u is None else skew(u, ct_u)
    if ct_u is not None:
        inner = lax.add(inner, scale_columns(over_gaps(skew_u), s_like_u))
    if ct_vh is not None:
        inner = lax.add(inner, scale_rows(s_like_u, over_gaps(skew(v, mH(ct_vh)))))
    if P.is_complex(a.dtype) and ct_u is not None and ct_vh is not None:
        inner = lax.add(inner, diag_embed(lax.mul(diagonal(skew_u), lax.mul(_const(0.5, inv_s), inv_s))))
    ct_a = matmul(matmul(u, inner), vh)
    if ct_u is not None and rows > k:
        outside = lax.sub(ct_u, matmul(u, matmul(mH(u), ct_u)))
        ct_a = lax.add(ct_a, matmul(scale_columns(outside, inv_s), vh))
    if ct_vh is not None and cols > k:
        outside = lax.sub(ct_vh, matmul(matmul(ct_vh, v), vh))
        ct_a = lax.add(ct_a, matmul(u, scale_rows(inv_s, outside)))
    return (ct_a,)


def _eig_solve(v: TracedArray, b: TracedArray, *, adjoint: bool) -> TracedArray:
    """V^-1 b, or V^-H b with ``adjoint``, for square ``v`` through its LU factors (V[perm] = L U).
    Made of lu / triangular_solve / gather / scatter, so it differentiates again."""
    packed, _, permutation = lax.lu(v)
    rows = lax.broadcast_in_dim(lax.convert_element_type(permutation, np.int64), b.shape, tuple(range(b.ndim - 1)))
    if not adjoint:  # L U x = b[perm]; the solves read packed's strict lower (unit L) and upper (U) triangles
        y = lax.triangular_solve(packed, lax.gather(b, rows, b.ndim - 2), left_side=True, lower=True,
                                 unit_diagonal=True)
        return lax.triangular_solve(packed, y, left_side=True, lower=False)
    # V^H = U^H L^H P^T: solve U^H y = b, then L^H z = y, then x = P z (x[perm] = z); X^H = transpose of conj(X)
    conj_packed = lax.conj_if_complex(packed)
    y = lax.triangular_solve(conj_packed, b, left_side=True, lower=False, transpose_a=True)
    z = lax.triangular_solve(conj_packed, y, left_side=True, lower=True, transpose_a=True, unit_diagonal=True)
    return lax.scatter(lax.zeros(z.aval), rows, z, b.ndim - 2)


@_vjp_rule(P.eig_p)
def _eig_vjp(cts, primals, outs):
    """torch's linalg_eig_backward (arXiv:1701.00392 eq. 4.77, with unit-norm eigenvectors):
    ct_a = V^-H (diag(ct_l) + (V^H ct_V - V^H V diag(re diag(V^H ct_V))) / conj(E)) V^H off the diagonal,
    E_ij = l_j - l_i; its real part for a real ``a``. The eigenvectors are unique up to a phase, so only
    losses invariant under V -> V diag(e^{i phi}) have a gradient: torch raises where Im diag(V^H ct_V) is
    not ~0; reftrace does not check (a graph cannot branch on values) and drops that component instead,
    keeping only ct_l on the diagonal (torch keeps i Im diag(V^H ct_V) there when ct_l is absent, which its
    check asserts is ~0). This makes the rule the exact transpose of the JVP's."""
    (a,), (l, v) = primals, outs
    ct_l, ct_v = cts
    vh = mH(v)
    inner = diag_embed(_zeros_if_none(ct_l, l))
    if ct_v is not None:
        m = matmul(vh, ct_v)
        phase = lax.convert_element_type(lax.real(diagonal(m)), m.dtype)
        m = lax.sub(m, matmul(vh, scale_columns(v, phase)))           # onto unit-norm columns' tangents
        gaps, off = _spectral_gaps(lax.conj(l))
        inner = lax.select(off, lax.div(m, gaps), inner)
    ct_a = _eig_solve(v, matmul(inner, vh), adjoint=True)
    return (ct_a if P.is_complex(a.dtype) else lax.real(ct_a),)
