"""Matrix helpers written with ``reftrace.lax``, batched over leading dimensions.

The linear-algebra VJP rules and the torch bridge's linalg rows both need the
transpose of the last two dimensions, batched matmul, triangles and diagonals;
they live here once. Everything is made of primitives, so it differentiates.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax


def mT(x: Any) -> Any:  # noqa: N802 - torch's name for it
    """Swap the last two dimensions."""
    return lax.transpose(x, tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2))


def mH(x: Any) -> Any:  # noqa: N802 - torch's name for it
    """The conjugate transpose of the last two dimensions (``mT`` for real matrices)."""
    return lax.conj_if_complex(mT(x))


def matmul(a: Any, b: Any) -> Any:
    """Batched ``a @ b`` for operands with equal batch dimensions."""
    batch = tuple(range(a.ndim - 2))
    return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))


def triangle(x: Any, k: int = 0, lower: bool = True) -> Any:
    """``tril(x, k)`` if ``lower`` else ``triu(x, k)``."""
    rows, cols = x.shape[-2:]
    offset = lax.sub(lax.iota(np.int64, (rows, cols), 1), lax.iota(np.int64, (rows, cols), 0))
    bound = lax.full((), k, np.int64)
    keep = lax.le(offset, bound) if lower else lax.ge(offset, bound)
    keep = lax.broadcast_in_dim(keep, x.shape, (x.ndim - 2, x.ndim - 1))
    return lax.select(keep, x, lax.full((), 0, x.dtype))


def eye_mask(shape: tuple[int, ...]) -> Any:
    """Boolean identity over the last two dimensions of ``shape`` (which need not be square)."""
    rows, cols = shape[-2:]
    eye = lax.eq(lax.iota(np.int64, (rows, cols), 0), lax.iota(np.int64, (rows, cols), 1))
    return lax.broadcast_in_dim(eye, tuple(shape), (len(shape) - 2, len(shape) - 1))


def eye(shape: tuple[int, ...], dtype: Any) -> Any:
    return lax.convert_element_type(eye_mask(tuple(shape)), dtype)


def diagonal(x: Any) -> Any:
    """The main diagonal of square matrices: (..., n, n) -> (..., n)."""
    return lax.reduce_sum(lax.select(eye_mask(x.shape), x, lax.full((), 0, x.dtype)), (x.ndim - 1,))


def diag_embed(v: Any) -> Any:
    """(..., n) -> (..., n, n) with ``v`` on the diagonal."""
    shape = v.shape + v.shape[-1:]
    spread = lax.broadcast_in_dim(v, shape, tuple(range(v.ndim)))
    return lax.select(eye_mask(shape), spread, lax.full((), 0, v.dtype))


def scale_columns(x: Any, v: Any) -> Any:
    """``x @ diag(v)``."""
    return lax.mul(x, lax.broadcast_in_dim(v, x.shape, tuple(range(v.ndim - 1)) + (x.ndim - 1,)))


def scale_rows(v: Any, x: Any) -> Any:
    """``diag(v) @ x``."""
    return lax.mul(x, lax.broadcast_in_dim(v, x.shape, tuple(range(v.ndim - 1)) + (x.ndim - 2,)))


def leading(x: Any, axis_from_end: int, n: int) -> Any:
    """The first ``n`` entries of dimension ``-axis_from_end``."""
    limit = list(x.shape)
    limit[x.ndim - axis_from_end] = n
    return lax.slice(x, (0,) * x.ndim, limit)


def trailing(x: Any, axis_from_end: int, start: int) -> Any:
    """Dimension ``-axis_from_end`` from ``start`` on."""
    begin = [0] * x.ndim
    begin[x.ndim - axis_from_end] = start
    return lax.slice(x, begin, x.shape)
