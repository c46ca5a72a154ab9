"""ATen ops that make new values: constants (full, zeros, empty...), ranges, triangles.

New values are literals broadcast to the node's shape, so a graph never holds an
uninitialised buffer: ``empty`` is zeros (torch leaves the contents unspecified).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._mode_utils import no_dispatch

from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.torch_dtypes import tensor_to_numpy, torch_dtype
from reftrace.torch_bridge.aten._common import aten, cast, current, literal, out_aval, register


def _filled(value: Any):
    def rule(*args: Any, **kwargs: Any) -> Any:
        aval = out_aval()
        return lax.full(aval.shape, value, aval.dtype)
    return rule


register(aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.empty.memory_format,
         aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default,
         aten.new_empty_strided.default, aten.empty_permuted.default)(_filled(0))
register(aten.ones.default, aten.ones_like.default, aten.new_ones.default)(_filled(1))


@register(aten.full.default)
def full(size: Any, fill_value: Any, **kwargs: Any) -> Any:
    return _full(fill_value)


@register(aten.full_like.default)
def full_like(x: Any, fill_value: Any, **kwargs: Any) -> Any:
    return _full(fill_value)


@register(aten.new_full.default)
def new_full(x: Any, size: Any, fill_value: Any, **kwargs: Any) -> Any:
    return _full(fill_value)


@register(aten.scalar_tensor.default)
def scalar_tensor(s: Any, **kwargs: Any) -> Any:
    return _full(s)


def _full(value: Any) -> Any:
    aval = out_aval()
    if lax.is_traced(value):  # a 0-d tensor fill value
        return lax.broadcast_to_rank(cast(value, aval.dtype), aval.shape)
    return lax.full(aval.shape, value, aval.dtype)


def _range(start: Any, step: Any) -> Any:
    """``start + i * step`` for ``i`` in ``range(n)``, computed in 64 bits then cast (as torch's CPU kernel)."""
    aval = out_aval()
    n = aval.shape[0]
    exact_int = P.is_int(aval.dtype) and all(isinstance(v, (int, np.integer)) for v in (start, step))
    wide = np.dtype(np.int64) if exact_int else np.dtype(np.float64)
    i = lax.iota(wide, (n,), 0)
    if step != 1:
        i = lax.mul(i, literal(step, wide))
    if start != 0:
        i = lax.add(i, literal(start, wide))
    return cast(i, aval.dtype)


@register(aten.arange.default)
def arange(end: Any, **kwargs: Any) -> Any:
    return _range(0, 1)


@register(aten.arange.start)
def arange_start(start: Any, end: Any, **kwargs: Any) -> Any:
    return _range(start, 1)


@register(aten.arange.start_step)
def arange_start_step(start: Any, end: Any, step: Any = 1, **kwargs: Any) -> Any:
    return _range(start, step)


@register(aten.linspace.default, aten.logspace.default)
def spaced(start: Any, end: Any, steps: int, base: float | None = None, **kwargs: Any) -> Any:
    """Evaluated by torch's own CPU kernel while capturing, as a constant (its arguments are numbers): the
    kernel's fused multiply-adds, counting from either end, give values a per-op formula does not (the
    middle of ``linspace(-1, 1, 7)`` is -3e-8 in float32 and 6e-17 in float64, not 0)."""
    node = current()
    extra = () if base is None else (base,)
    with no_dispatch():
        values = node.op(start, end, steps, *extra, dtype=torch_dtype(out_aval().dtype), device="cpu")
        return lax.constant(tensor_to_numpy(values))


@register(torch.ops.prims.iota.default)
def iota(length: int, *, start: Any, step: Any, **kwargs: Any) -> Any:
    return _range(start, step)


def _triangle(keep_lower: bool):
    def rule(x: Any, diagonal: int = 0) -> Any:
        rows, cols = x.shape[-2:]
        r = lax.iota(np.int64, (rows, cols), 0)
        c = lax.iota(np.int64, (rows, cols), 1)
        offset = lax.sub(c, r)
        d = literal(diagonal, np.int64)
        mask = lax.le(offset, d) if keep_lower else lax.ge(offset, d)
        mask = lax.broadcast_to_rank(mask, x.shape)
        return lax.select(mask, x, lax.full(x.shape, 0, x.dtype))
    return rule


register(aten.tril.default)(_triangle(True))
register(aten.triu.default)(_triangle(False))


@register(aten.eye.default, aten.eye.m)
def eye(n: int, m: int | None = None, **kwargs: Any) -> Any:
    aval = out_aval()
    r = lax.iota(np.int64, aval.shape, 0)
    c = lax.iota(np.int64, aval.shape, 1)
    return cast(lax.eq(r, c), aval.dtype)


def _triangle_indices(which: Any):
    def rule(row: int, col: int, offset: int = 0, **kwargs: Any) -> Any:
        aval = out_aval()
        return literal(np.stack(which(row, offset, col)).astype(aval.dtype).reshape(aval.shape), aval.dtype)
    return rule


register(aten.triu_indices.default)(_triangle_indices(np.triu_indices))
register(aten.tril_indices.default)(_triangle_indices(np.tril_indices))
