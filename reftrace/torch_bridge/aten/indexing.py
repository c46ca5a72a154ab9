"""Indexing ATen ops, all built on the torch-style ``gather`` / ``scatter`` / ``scatter_add`` primitives.

Advanced indexing (``index``, ``index_put``) linearises the indexed dimensions:
they are moved to the front and merged into one axis, so a single gather or
scatter along axis 0 does the work, whatever the number of index tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.errors import DataDependentControlFlowError
from reftrace.torch_bridge.aten._common import (aten, bcast_full, broadcast_shapes, cast, literal, norm_dim,
                                                out_aval, register, unsupported)


def _prod(xs: Sequence[int]) -> int:
    return int(np.prod(xs, dtype=np.int64))


def take(x: Any, axis: int, index: Any) -> Any:
    """``x`` indexed along ``axis`` by an integer tensor: the index's dims replace ``axis``."""
    ishape = index.shape
    n = _prod(ishape)
    flat = lax.reshape(cast(index, np.int64), (n,))
    rest = x.shape[:axis] + x.shape[axis + 1:]
    xt = lax.transpose(x, (axis,) + tuple(i for i in range(x.ndim) if i != axis))
    full_index = lax.broadcast_in_dim(flat, (n,) + rest, (0,))
    picked = lax.reshape(lax.gather(xt, full_index, 0), ishape + rest)
    k = len(ishape)
    perm = tuple(range(k, k + axis)) + tuple(range(k)) + tuple(range(k + axis, k + len(rest)))
    return lax.transpose(picked, perm)


def _wrap_negative(index: Any, n: int) -> Any:
    index = cast(index, np.int64)
    return lax.select(lax.lt(index, literal(0, np.int64)), lax.add(index, literal(n, np.int64)), index)


@register(aten.index_select.default)
def index_select(x: Any, dim: int, index: Any) -> Any:
    if x.ndim == 0:
        return lax.reshape(x, out_aval().shape)
    return lax.reshape(take(x, norm_dim(dim, x.ndim), index), out_aval().shape)


@register(aten.embedding.default)
def embedding(weight: Any, indices: Any, padding_idx: int = -1, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> Any:
    return take(weight, 0, indices)


@register(aten.gather.default)
def gather(x: Any, dim: int, index: Any, sparse_grad: bool = False) -> Any:
    if x.ndim == 0:
        return lax.reshape(x, out_aval().shape)
    return lax.gather(x, cast(index, np.int64), norm_dim(dim, x.ndim))


def _fit_updates(src: Any, index: Any, dtype: Any) -> Any:
    """torch's scatter reads only the leading ``index.shape`` block of ``src``."""
    src = cast(src, dtype)
    if src.ndim == 0:
        return lax.broadcast_to_rank(src, index.shape)
    return lax.slice(src, (0,) * src.ndim, index.shape)


@register(aten.scatter.src, aten.scatter.value)
def scatter(x: Any, dim: int, index: Any, src: Any) -> Any:
    return lax.scatter(x, cast(index, np.int64), _fit_updates(src, index, x.dtype), norm_dim(dim, x.ndim))


@register(aten.scatter_add.default)
def scatter_add(x: Any, dim: int, index: Any, src: Any) -> Any:
    return lax.scatter_add(x, cast(index, np.int64), _fit_updates(src, index, x.dtype), norm_dim(dim, x.ndim))


@register(aten.scatter_reduce.two)
def scatter_reduce(x: Any, dim: int, index: Any, src: Any, reduce: str, include_self: bool = True) -> Any:
    if reduce != "sum":
        raise unsupported(f"scatter_reduce with reduce={reduce!r} (only 'sum' is mapped)")
    dim = norm_dim(dim, x.ndim)
    index = cast(index, np.int64)
    if not include_self:
        x = lax.scatter(x, index, lax.full(index.shape, 0, x.dtype), dim)
    return lax.scatter_add(x, index, _fit_updates(src, index, x.dtype), dim)


@register(aten.index_add.default)
def index_add(x: Any, dim: int, index: Any, source: Any, alpha: Any = 1) -> Any:
    dim = norm_dim(dim, x.ndim)
    source = cast(source, x.dtype)
    if alpha != 1:
        source = lax.mul(source, literal(alpha, x.dtype))
    full_index = lax.broadcast_in_dim(cast(index, np.int64), source.shape, (dim,))
    return lax.scatter_add(x, full_index, source, dim)


class _Advanced:
    """The geometry of ``x[indices]`` with integer index tensors (None = the whole dimension)."""

    def __init__(self, x: Any, indices: Sequence[Any]) -> None:
        indices = list(indices) + [None] * (x.ndim - len(indices))
        self.adv = [i for i, t in enumerate(indices) if t is not None]
        if not self.adv:
            raise unsupported("an index with no index tensors")
        if any(P.is_bool(indices[i].dtype) for i in self.adv):
            raise DataDependentControlFlowError(
                f"indexing with a boolean mask makes the output size depend on tensor values ({x.shape}); "
                "use torch.where instead")
        self.rest = [i for i in range(x.ndim) if i not in self.adv]
        tensors = [_wrap_negative(indices[i], x.shape[i]) for i in self.adv]
        self.bshape = broadcast_shapes(*tensors)
        linear = None
        for i, t in zip(self.adv, tensors):
            t = bcast_full(t, self.bshape)
            linear = t if linear is None else lax.add(lax.mul(linear, literal(x.shape[i], np.int64)), t)
        self.linear = linear
        self.adv_sizes = [x.shape[i] for i in self.adv]
        self.rest_sizes = tuple(x.shape[i] for i in self.rest)
        # torch puts the index dims where the indexed dims were when those are adjacent, else first
        adjacent = self.adv == list(range(self.adv[0], self.adv[-1] + 1))
        self.lead = self.adv[0] if adjacent else 0
        nb = len(self.bshape)
        k = self.lead
        # from (bshape, rest) order to torch's result order
        self.perm = tuple(range(nb, nb + k)) + tuple(range(nb)) + tuple(range(nb + k, nb + len(self.rest)))

    def flat_operand(self, x: Any) -> Any:
        xt = lax.transpose(x, self.adv + self.rest)
        return lax.reshape(xt, (_prod(self.adv_sizes),) + self.rest_sizes)

    def unflatten_operand(self, flat: Any, shape: Sequence[int]) -> Any:
        y = lax.reshape(flat, tuple(self.adv_sizes) + self.rest_sizes)
        order = self.adv + self.rest
        return lax.transpose(y, tuple(order.index(i) for i in range(len(shape))))

    def full_index(self) -> Any:
        n = _prod(self.bshape)
        flat = lax.reshape(self.linear, (n,))
        return lax.broadcast_in_dim(flat, (n,) + self.rest_sizes, (0,))


@register(aten.index.Tensor, aten._unsafe_index.Tensor)
def index(x: Any, indices: Sequence[Any]) -> Any:
    geo = _Advanced(x, indices)
    picked = lax.gather(geo.flat_operand(x), geo.full_index(), 0)
    picked = lax.reshape(picked, tuple(geo.bshape) + geo.rest_sizes)
    return lax.transpose(picked, geo.perm)


def _masked_put(x: Any, position: int, mask: Any, values: Any, accumulate: bool) -> Any:
    """``x[..., mask] = v`` with a boolean mask and a single value: a select, no data-dependent shapes."""
    if values.size != 1:
        raise DataDependentControlFlowError(
            "index_put with a boolean mask and more than one value depends on how many entries are True; "
            "use torch.where instead")
    v = lax.reshape(cast(values, x.dtype), ())
    m = lax.broadcast_in_dim(mask, x.shape, tuple(range(position, position + mask.ndim)))
    if accumulate:
        return lax.add(x, lax.select(m, v, lax.full((), 0, x.dtype)))
    return lax.select(m, v, x)


@register(aten.index_put.default, aten._unsafe_index_put.default)
def index_put(x: Any, indices: Sequence[Any], values: Any, accumulate: bool = False) -> Any:
    present = [i for i, t in enumerate(indices) if t is not None]
    if len(present) == 1 and P.is_bool(indices[present[0]].dtype):
        return _masked_put(x, present[0], indices[present[0]], values, accumulate)
    geo = _Advanced(x, indices)
    torch_order = [(tuple(geo.bshape) + geo.rest_sizes)[p] for p in geo.perm]
    v = bcast_full(cast(values, x.dtype), torch_order)
    inverse = tuple(geo.perm.index(i) for i in range(len(geo.perm)))
    v = lax.transpose(v, inverse)
    v = lax.reshape(v, (_prod(geo.bshape),) + geo.rest_sizes)
    prim = lax.scatter_add if accumulate else lax.scatter
    flat = prim(geo.flat_operand(x), geo.full_index(), v, 0)
    return geo.unflatten_operand(flat, x.shape)
