"""Indexing ATen ops, all built on the torch-style ``gather`` / ``scatter`` / ``scatter_add`` primitives.

Advanced indexing (``index``, ``index_put``) linearises the indexed dimensions:
they are moved to the front and merged into one axis, so a single gather or
scatter along axis 0 does the work, whatever the number of index tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace import lax, nn
from reftrace import primitives as P
from reftrace.errors import DataDependentControlFlowError
from reftrace.torch_bridge.aten._common import (SparseLookup, aten, bcast_full, broadcast_shapes, cast, current,
                                                highest, literal, lowest, norm_dim, out_aval, register, unsupported)
from reftrace.torch_bridge.aten.reductions import linalg_vector_norm


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
    """With ``sparse``, the lookup is noted: the graph computes the dense gradient, and the bridge hands
    it back sparse where eager's is (``reftrace.torch_bridge.sparse_gradients``)."""
    if weight.ndim != 2:
        raise unsupported(f"a {weight.ndim}-d weight (aten.embedding takes a 2-d table)")
    out = nn.embedding(weight, cast(indices, np.int64), padding_idx, scale_grad_by_freq)
    if sparse:
        current().sparse_lookups.append(SparseLookup(weight, indices, padding_idx, out))
    return out


@register(aten.embedding_renorm.default)
def embedding_renorm(weight: Any, indices: Any, max_norm: float, norm_type: float) -> Any:
    """``nn.Embedding(max_norm=...)``'s in-place rescaling, as a new table: each row some index names whose
    ``norm_type``-norm exceeds ``max_norm`` is scaled by ``max_norm / (norm + 1e-7)``. As torch's CPU
    kernel: the norm in the table's dtype, the scale in float64, rounded to the table's dtype before it
    multiplies. Only the named rows are read and written (a row named twice is written twice, alike)."""
    k, width = _prod(indices.shape), weight.shape[1]
    flat = lax.reshape(cast(indices, np.int64), (k,))
    rows = take(weight, 0, flat)
    norm = cast(linalg_vector_norm(rows, norm_type, [1]), np.float64)
    limit = literal(max_norm, np.float64)
    scale = lax.div(limit, lax.add(norm, literal(1e-7, np.float64)))
    scaled = lax.mul(rows, lax.broadcast_in_dim(cast(scale, weight.dtype), rows.shape, (0,)))
    rescale = lax.broadcast_in_dim(lax.gt(norm, limit), rows.shape, (0,))
    positions = lax.broadcast_in_dim(flat, (k, width), (0,))
    return lax.scatter(weight, positions, lax.select(rescale, scaled, rows), 0)


@register(aten.gather.default)
def gather(x: Any, dim: int, index: Any, sparse_grad: bool = False) -> Any:
    if index.size == 0:
        return lax.full(out_aval().shape, 0, x.dtype)
    if x.ndim == 0:
        return lax.reshape(x, out_aval().shape)
    return lax.gather(x, cast(index, np.int64), norm_dim(dim, x.ndim))


def _fit_updates(src: Any, index: Any, dtype: Any) -> Any:
    """torch's scatter reads only the leading ``index.shape`` block of ``src``."""
    src = cast(src, dtype)
    if src.ndim == 0:
        return lax.broadcast_to_rank(src, index.shape)
    return lax.slice(src, (0,) * src.ndim, index.shape)


def _as_rank1(x: Any, index: Any, src: Any) -> tuple[Any, Any, Any]:
    """Rank-0 scatters as rank-1 ones (the primitives index along an axis)."""
    return (lax.reshape(x, (1,)), lax.reshape(index, (1,)) if index.ndim == 0 else index,
            lax.reshape(src, (1,)) if lax.is_traced(src) and src.ndim == 0 else src)


def _scatter_with(prim: Any):
    def rule(x: Any, dim: int, index: Any, src: Any) -> Any:
        if index.size == 0:
            return x
        shape = x.shape
        if x.ndim == 0:
            x, index, src = _as_rank1(x, index, src)
        out = prim(x, cast(index, np.int64), _fit_updates(src, index, x.dtype), norm_dim(dim, x.ndim))
        return lax.reshape(out, shape)
    return rule


register(aten.scatter.src, aten.scatter.value)(_scatter_with(lax.scatter))
register(aten.scatter_add.default)(_scatter_with(lax.scatter_add))


def _reduced_scatter(x: Any, dim: int, index: Any, src: Any, reduce: str, include_self: bool) -> Any:
    """``scatter_reduce`` written densely: a mask ``index == j`` over every (contribution, target) pair.

    The mask has ``index.shape[dim] * x.shape[dim]`` entries per column, so the reduction is an
    ordinary reduce_sum/prod/max/min whose VJP is torch's (ties among maxima share the gradient
    equally, self included). Targets no index reaches keep ``x``.
    """
    shape = x.shape
    if x.ndim == 0:
        x, index, src = _as_rank1(x, index, src)
    dim = norm_dim(dim, x.ndim)
    if index.size == 0:
        return lax.reshape(x, shape)
    index = cast(index, np.int64)
    src = _fit_updates(src, index, x.dtype)
    n, ishape = x.shape[dim], index.shape
    grid = ishape[:dim] + (ishape[dim], n) + ishape[dim + 1:]
    placed = tuple(range(dim + 1)) + tuple(range(dim + 2, len(grid)))
    hits = lax.eq(lax.broadcast_in_dim(index, grid, placed), lax.iota(np.int64, grid, dim + 1))
    values = lax.broadcast_in_dim(src, grid, placed)
    region = ishape[:dim] + (n,) + ishape[dim + 1:]
    x_region = lax.slice(x, (0,) * x.ndim, region)
    touched = lax.reduce(P.reduce_or_p, hits, (dim,))
    d = x.dtype
    if reduce in ("sum", "mean"):
        total = lax.reduce_sum(lax.select(hits, values, literal(0, d)), (dim,))
        if include_self:
            total = lax.add(x_region, total)
        if reduce == "sum":
            result = total
        else:
            count = lax.reduce_sum(cast(hits, d), (dim,))
            if include_self:
                count = lax.add(count, literal(1, d))
            count = lax.select(touched, count, literal(1, d))
            result = lax.div(total, count) if P.is_float(d) else _floor_divide(total, count)
    elif reduce == "prod":
        result = lax.reduce_prod(lax.select(hits, values, literal(1, d)), (dim,))
        if include_self:
            result = lax.mul(x_region, result)
    elif reduce in ("amax", "amin"):
        prim = P.reduce_max_p if reduce == "amax" else P.reduce_min_p
        identity = lowest(d) if reduce == "amax" else highest(d)
        candidates = lax.select(hits, values, literal(identity, d))
        if include_self:  # self is one more candidate: ties with it share the gradient too
            own = lax.reshape(x_region, region[:dim] + (1,) + region[dim:])
            candidates = lax.concatenate([candidates, own], dim)
        result = lax.reduce(prim, candidates, (dim,))
    else:
        raise unsupported(f"reduce={reduce!r}")
    updated = lax.select(touched, result, x_region)
    return lax.reshape(_embed(x, updated), shape)


def _floor_divide(a: Any, b: Any) -> Any:
    q, r = lax.div(a, b), lax.rem(a, b)
    zero = literal(0, a.dtype)
    adjust = lax.logical_and(lax.ne(r, zero), lax.ne(lax.lt(r, zero), lax.lt(b, zero)))
    return lax.select(adjust, lax.sub(q, literal(1, a.dtype)), q)


def _embed(x: Any, block: Any) -> Any:
    """``x`` with its leading ``block.shape`` corner replaced by ``block``."""
    if block.shape == x.shape:
        return block
    config = [(0, full - part, 0) for full, part in zip(x.shape, block.shape)]
    spread = lax.pad(block, literal(0, x.dtype), config)
    mask = lax.pad(lax.full(block.shape, True, np.bool_), literal(False, np.bool_), config)
    return lax.select(mask, spread, x)


@register(aten.scatter_reduce.two)
def scatter_reduce(x: Any, dim: int, index: Any, src: Any, reduce: str, include_self: bool = True) -> Any:
    return _reduced_scatter(x, dim, index, src, reduce, include_self)


@register(aten.scatter.reduce, aten.scatter.value_reduce)
def scatter_legacy_reduce(x: Any, dim: int, index: Any, src: Any, *, reduce: str) -> Any:
    """The older ``scatter_(dim, index, src, reduce="add" | "multiply")``: ``scatter_reduce`` with "sum" or
    "prod", the tensor's own values included (a number ``src`` fills the index's shape)."""
    if reduce not in ("add", "multiply"):
        raise unsupported(f"scatter with reduce={reduce!r} (torch takes 'add' or 'multiply')")
    if not lax.is_traced(src):
        src = lax.full(index.shape, src, x.dtype)
    return _reduced_scatter(x, dim, index, src, "sum" if reduce == "add" else "prod", True)


@register(aten.index_reduce.default)
def index_reduce(x: Any, dim: int, index: Any, source: Any, reduce: str, include_self: bool = True) -> Any:
    shape = x.shape
    if x.ndim == 0:
        x, source = lax.reshape(x, (1,)), lax.reshape(cast(source, x.dtype), (1,))
    dim = norm_dim(dim, x.ndim)
    source = cast(source, x.dtype)
    full_index = lax.broadcast_in_dim(lax.reshape(cast(index, np.int64), (index.size,)), source.shape, (dim,))
    return lax.reshape(_reduced_scatter(x, dim, full_index, source, reduce, include_self), shape)


@register(aten.index_fill.int_Tensor, aten.index_fill.int_Scalar)
def index_fill(x: Any, dim: int, index: Any, value: Any) -> Any:
    """``select(position is indexed, value, x)``: a position listed twice is still filled once (as torch's VJP)."""
    if x.ndim == 0:
        return lax.broadcast_to_rank(cast(value, x.dtype), ()) if index.size else x
    dim = norm_dim(dim, x.ndim)
    n, k = x.shape[dim], index.size
    flat = _wrap_negative(lax.reshape(index, (k,)), n)
    listed = lax.eq(lax.broadcast_in_dim(flat, (k, n), (0,)), lax.iota(np.int64, (k, n), 1))
    hit = lax.reduce(P.reduce_or_p, listed, (0,))
    mask = lax.broadcast_in_dim(hit, x.shape, (dim,))
    v = cast(value, x.dtype)
    return lax.select(mask, lax.reshape(v, ()) if lax.is_traced(v) else v, x)


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


# ----------------------------------------------------------------------------- flat and masked positions

@register(aten.take.default)
def take_flat(x: Any, index: Any) -> Any:
    """``x.flatten()[index]`` (negative indices count from the end)."""
    flat = lax.reshape(x, (x.size,))
    positions = lax.reshape(_wrap_negative(index, x.size), (index.size,))
    return lax.reshape(lax.gather(flat, positions, 0), index.shape)


@register(aten.put.default)
def put(x: Any, index: Any, source: Any, accumulate: bool = False) -> Any:
    """``x.flatten()[index] = source`` (``+=`` if ``accumulate``), back in ``x``'s shape."""
    if index.size == 0:
        return x
    flat = lax.reshape(x, (x.size,))
    positions = lax.reshape(_wrap_negative(index, x.size), (index.size,))
    updates = lax.reshape(cast(source, x.dtype), (index.size,))
    prim = lax.scatter_add if accumulate else lax.scatter
    return lax.reshape(prim(flat, positions, updates, 0), x.shape)


@register(aten.masked_scatter.default)
def masked_scatter(x: Any, mask: Any, source: Any) -> Any:
    """The k-th True position (row-major) takes ``source.flatten()[k]``: a running count of the mask picks it."""
    shape = out_aval().shape
    m = lax.reshape(bcast_full(mask, shape), (int(np.prod(shape, dtype=np.int64)),))
    y = bcast_full(cast(x, out_aval().dtype), shape)
    if source.size == 0 or m.shape[0] == 0:
        return y
    taken = lax.sub(lax.cumsum(cast(m, np.int64), 0), literal(1, np.int64))
    taken = lax.select(lax.lt(taken, literal(0, np.int64)), literal(0, np.int64), taken)
    taken = lax.select(lax.gt(taken, literal(source.size - 1, np.int64)), literal(source.size - 1, np.int64), taken)
    values = lax.gather(lax.reshape(cast(source, y.dtype), (source.size,)), taken, 0)
    return lax.select(lax.reshape(m, shape), lax.reshape(values, shape), y)


@register(aten.nonzero_static.default)
def nonzero_static(x: Any, *, size: int, fill_value: int = -1) -> Any:
    """The first ``size`` nonzero positions (row-major) as rows of coordinates, padded with ``fill_value``.

    Each nonzero element is scattered to its rank among the nonzeros; ranks past ``size`` (and the
    zeros) go to one spare slot that is cut off, so no shape depends on the values.
    """
    n = x.size
    out = out_aval()
    nz = lax.reshape(to_bool_tensor(x), (n,))
    rank = lax.sub(lax.cumsum(cast(nz, np.int64), 0), literal(1, np.int64)) if n else lax.full((0,), 0, np.int64)
    keep = lax.logical_and(nz, lax.lt(rank, literal(size, np.int64))) if n else nz
    slot = lax.select(keep, rank, literal(size, np.int64)) if n else rank
    empty = lax.full((size + 1,), -1, np.int64)
    flat = lax.scatter(empty, slot, lax.iota(np.int64, (n,), 0), 0) if n else empty
    flat = lax.slice(flat, (0,), (size,))
    coords = []
    stride = n
    for d in x.shape:
        stride = stride // d if d else 0
        c = lax.rem(lax.div(flat, literal(max(stride, 1), np.int64)), literal(max(d, 1), np.int64))
        coords.append(lax.reshape(c, (size, 1)))
    if not coords:
        return lax.full(out.shape, 0, out.dtype)
    table = lax.concatenate(coords, 1) if len(coords) > 1 else coords[0]
    missing = lax.broadcast_in_dim(lax.lt(flat, literal(0, np.int64)), (size, x.ndim), (0,))
    return cast(lax.select(missing, literal(fill_value, np.int64), table), out.dtype)


def to_bool_tensor(x: Any) -> Any:
    return x if P.is_bool(x.dtype) else lax.ne(x, literal(0, x.dtype))


@register(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(weight: Any, indices: Any, offsets: Any, scale_grad_by_freq: bool = False, mode: int = 0,
                  sparse: bool = False, per_sample_weights: Any = None, include_last_offset: bool = False,
                  padding_idx: int = -1) -> tuple[Any, Any, Any, Any]:
    """Sum / mean / max of ``weight`` rows per bag; bag membership is a (bag, position) mask from the offsets.

    Also torch's bookkeeping outputs: the bag of each index, the bag sizes (mean and max modes)
    and, in max mode, the row that gave each maximum. With ``sparse``, the rows are looked up as
    ``embedding``'s are (see there).
    """
    d = weight.dtype
    idx = cast(indices, np.int64)
    if idx.ndim == 2:  # (bags, length): fixed-size bags
        bags_, length = idx.shape
        idx = lax.reshape(idx, (bags_ * length,))
        starts = literal(np.arange(bags_, dtype=np.int64) * length, np.int64)
        if per_sample_weights is not None:
            per_sample_weights = lax.reshape(per_sample_weights, (bags_ * length,))
    else:
        starts = cast(offsets, np.int64)
        if include_last_offset:
            starts = lax.slice(starts, (0,), (starts.shape[0] - 1,))
    n, bags = idx.shape[0], starts.shape[0]
    ends = lax.concatenate([lax.slice(starts, (1,), (bags,)), literal(np.array([n]), np.int64)], 0) if bags else starts
    if include_last_offset and idx.ndim == 1 and offsets.shape[0]:
        ends = lax.slice(cast(offsets, np.int64), (1,), (offsets.shape[0],))
    grid = (bags, n)
    position = lax.iota(np.int64, grid, 1)
    member = lax.logical_and(lax.le(lax.broadcast_in_dim(starts, grid, (0,)), position),
                             lax.lt(position, lax.broadcast_in_dim(ends, grid, (0,))))
    if padding_idx >= 0:
        member = lax.logical_and(member, lax.broadcast_in_dim(lax.ne(idx, literal(padding_idx, np.int64)), grid, (1,)))
    if sparse:  # one lookup the bridge can hand a sparse gradient back for, as eager does
        rows = nn.embedding(weight, idx)
        current().sparse_lookups.append(SparseLookup(weight, indices, padding_idx, rows))
    else:
        rows = take(weight, 0, idx)                                                 # (n, dim)
    if per_sample_weights is not None:
        rows = lax.mul(rows, lax.broadcast_in_dim(cast(per_sample_weights, d), rows.shape, (0,)))
    counts = lax.reduce_sum(cast(member, np.int64), (1,))
    bag_of = lax.reduce_max(lax.select(lax.le(lax.broadcast_in_dim(starts, grid, (0,)), position),
                                       lax.iota(np.int64, grid, 0), literal(0, np.int64)), (0,)) if bags else \
        lax.full((n,), 0, np.int64)
    dim = weight.shape[1]
    out_shape = out_aval(0).shape
    if mode in (0, 1):
        total = lax.dot_general(cast(member, d), rows, (((1,), (0,)), ((), ())))
        if mode == 0:
            return (total, bag_of, lax.full(out_aval(2).shape, 0, np.int64), lax.full(out_aval(3).shape, 0, np.int64))
        safe = lax.select(lax.eq(counts, literal(0, np.int64)), literal(1, np.int64), counts)
        mean = lax.div(total, lax.broadcast_in_dim(cast(safe, d), out_shape, (0,)))
        return mean, bag_of, counts, counts
    cube = (bags, n, dim)
    inside = lax.broadcast_in_dim(member, cube, (0, 1))
    candidates = lax.select(inside, lax.broadcast_in_dim(rows, cube, (1, 2)), literal(-np.inf, d))
    which = lax.argmax(candidates, 1, np.int64) if n else lax.full((bags, dim), 0, np.int64)   # first maximum
    empty = lax.broadcast_in_dim(lax.eq(counts, literal(0, np.int64)), (bags, dim), (0,))
    picked_row = lax.gather(lax.broadcast_in_dim(idx, (bags, n), (1,)), which, 1) if n else which
    values = lax.gather(candidates, lax.reshape(which, (bags, 1, dim)), 1) if n else lax.full((bags, dim), 0, d)
    values = lax.select(empty, literal(0, d), lax.reshape(values, (bags, dim)))
    return values, bag_of, counts, lax.select(empty, literal(0, np.int64), picked_row)
