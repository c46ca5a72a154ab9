"""View and layout ATen ops: reshape family, expand, permute, slice/select, split, cat/stack, pad, flip...

In a functional graph a view is just a new value; torch's meta gives the output
shape, so the reshape family needs no shape arithmetic of its own.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace.torch_bridge.aten._common import (aten, bcast_full, cast, current, literal, norm_dim, norm_dims,
                                                out_aval, register, unsupported)


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default,
          aten._reshape_alias.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
          aten.unsqueeze.default, aten.squeeze_copy.default, aten.squeeze_copy.dim, aten.squeeze_copy.dims,
          aten.unsqueeze_copy.default, aten.flatten.using_ints, aten.unflatten.int, aten._reshape_copy.default)
def reshape(x: Any, *args: Any, **kwargs: Any) -> Any:
    return lax.reshape(x, out_aval().shape)


@register(aten.expand.default, aten.expand_copy.default, aten.broadcast_to.default)
def expand(x: Any, size: Sequence[int], implicit: bool = False) -> Any:
    return bcast_full(x, out_aval().shape)


@register(aten.permute.default, aten.permute_copy.default)
def permute(x: Any, dims: Sequence[int]) -> Any:
    return lax.transpose(x, [norm_dim(d, x.ndim) for d in dims])


@register(aten.transpose.int, aten.transpose_copy.int)
def transpose(x: Any, dim0: int, dim1: int) -> Any:
    if x.ndim < 2:
        return x
    perm = list(range(x.ndim))
    a, b = norm_dim(dim0, x.ndim), norm_dim(dim1, x.ndim)
    perm[a], perm[b] = perm[b], perm[a]
    return lax.transpose(x, perm)


@register(aten.t.default, aten.t_copy.default, aten.numpy_T.default)
def t(x: Any) -> Any:
    return lax.transpose(x, tuple(reversed(range(x.ndim))))


def slice_dim(x: Any, dim: int, start: int, end: int, step: int = 1) -> Any:
    starts, limits, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
    starts[dim], limits[dim], strides[dim] = start, end, step
    return lax.slice(x, starts, limits, strides)


@register(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_(x: Any, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> Any:
    dim = norm_dim(dim, x.ndim)
    n = x.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else end
    if start < 0:
        start += n
    if end < 0:
        end += n
    start = min(max(start, 0), n)
    end = min(max(end, start), n)
    if step < 1:
        raise unsupported(f"slice step must be positive, got {step}")
    return slice_dim(x, dim, start, end, step)


@register(aten.narrow.default)
def narrow(x: Any, dim: int, start: int, length: int) -> Any:
    dim = norm_dim(dim, x.ndim)
    start = start + x.shape[dim] if start < 0 else start
    return slice_dim(x, dim, start, start + length)


@register(aten.select.int, aten.select_copy.int)
def select(x: Any, dim: int, index: int) -> Any:
    dim = norm_dim(dim, x.ndim)
    n = x.shape[dim]
    index = index + n if index < 0 else index
    return lax.reshape(slice_dim(x, dim, index, index + 1), x.shape[:dim] + x.shape[dim + 1:])


@register(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided(x: Any, size: Sequence[int], stride: Sequence[int], storage_offset: int | None = None) -> Any:
    """A view of ``x``'s storage; supported when ``x`` is contiguous (then it is a gather of constant indices)."""
    meta = current().in_vals[0]
    if meta is None or not meta.is_contiguous() or meta.storage_offset() != 0:
        raise unsupported("as_strided of a tensor that is not contiguous is not a plain view of its values")
    index = _strided_index(size, stride, storage_offset, x.size)
    flat = lax.reshape(x, (x.size,))
    if index.size == x.size and np.array_equal(index.ravel(), np.arange(x.size)):
        return lax.reshape(x, size)
    picked = lax.gather(flat, literal(index.ravel(), np.int64), 0)
    return lax.reshape(picked, index.shape)


def _strided_index(size: Sequence[int], stride: Sequence[int], storage_offset: int | None, numel: int
                   ) -> np.ndarray:
    """The flat storage position of every element of an ``as_strided`` view of a contiguous tensor."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    index = np.full(size, int(storage_offset or 0), dtype=np.int64)
    for d, (n, st) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[d] = n
        index = index + (np.arange(n, dtype=np.int64) * st).reshape(shape)
    if index.size and (index.min() < 0 or index.max() >= max(numel, 1)):
        raise unsupported(f"as_strided addresses elements outside the {numel} of its input")
    return index


def _split(x: Any, sizes: Sequence[int], dim: int) -> list[Any]:
    dim = norm_dim(dim, x.ndim)
    out, start = [], 0
    for s in sizes:
        out.append(slice_dim(x, dim, start, start + s))
        start += s
    return out


@register(aten.split_with_sizes.default, aten.split_with_sizes_copy.default, aten.unsafe_split_with_sizes.default)
def split_with_sizes(x: Any, split_sizes: Sequence[int], dim: int = 0) -> list[Any]:
    return _split(x, split_sizes, dim)


@register(aten.split.Tensor, aten.split_copy.Tensor, aten.unsafe_split.Tensor)
def split(x: Any, split_size: int, dim: int = 0) -> list[Any]:
    n = x.shape[norm_dim(dim, x.ndim)]
    if split_size <= 0:
        raise unsupported(f"split size must be positive, got {split_size}")
    sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
    return _split(x, sizes or [0], dim)


@register(aten.unbind.int, aten.unbind_copy.int)
def unbind(x: Any, dim: int = 0) -> list[Any]:
    dim = norm_dim(dim, x.ndim)
    return [select(x, dim, i) for i in range(x.shape[dim])]


@register(aten.cat.default)
def cat(tensors: Sequence[Any], dim: int = 0) -> Any:
    aval = out_aval()
    # torch skips legacy 1-D empty tensors whatever the other operands' rank
    parts = [cast(t, aval.dtype) for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]
    if not parts:
        return lax.full(aval.shape, 0, aval.dtype)
    return lax.concatenate(parts, norm_dim(dim, parts[0].ndim))


@register(aten.stack.default)
def stack(tensors: Sequence[Any], dim: int = 0) -> Any:
    aval = out_aval()
    dim = dim % (tensors[0].ndim + 1)
    parts = [lax.reshape(cast(t, aval.dtype), t.shape[:dim] + (1,) + t.shape[dim:]) for t in tensors]
    return lax.concatenate(parts, dim)


@register(aten.constant_pad_nd.default)
def constant_pad_nd(x: Any, pad: Sequence[int], value: Any = 0) -> Any:
    config = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        config[x.ndim - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]), 0)
    return lax.pad(x, cast(value, x.dtype), config)


@register(aten.flip.default)
def flip(x: Any, dims: Sequence[int]) -> Any:
    return lax.rev(x, norm_dims(list(dims), x.ndim) if dims else ())


@register(aten.repeat.default)
def repeat(x: Any, repeats: Sequence[int]) -> Any:
    """Tile: broadcast to interleaved ``(r0, s0, r1, s1, ...)`` then merge each pair."""
    repeats = [int(r) for r in repeats]
    shape = (1,) * (len(repeats) - x.ndim) + tuple(x.shape)
    y = lax.reshape(x, shape)
    interleaved = [d for pair in zip(repeats, shape) for d in pair]
    y = lax.broadcast_in_dim(y, interleaved, [2 * i + 1 for i in range(len(shape))])
    return lax.reshape(y, [r * s for r, s in zip(repeats, shape)])


@register(aten.roll.default)
def roll(x: Any, shifts: Sequence[int], dims: Sequence[int] = ()) -> Any:
    if not dims:
        flat = lax.reshape(x, (x.size,))
        return lax.reshape(roll(flat, shifts, [0]), x.shape)
    for shift, dim in zip(shifts, dims):
        dim = norm_dim(dim, x.ndim)
        n = x.shape[dim]
        s = shift % n if n else 0
        if s:
            x = lax.concatenate([slice_dim(x, dim, n - s, n), slice_dim(x, dim, 0, n - s)], dim)
    return x


@register(aten.unfold.default)
def unfold(x: Any, dimension: int, size: int, step: int) -> Any:
    """Sliding windows along ``dimension``, each window a new trailing axis."""
    if x.ndim == 0:
        return lax.reshape(x, (1,))
    dim = norm_dim(dimension, x.ndim)
    count = (x.shape[dim] - size) // step + 1
    windows = []
    for k in range(size):
        w = slice_dim(x, dim, k, k + (count - 1) * step + 1, step)
        windows.append(lax.reshape(w, w.shape + (1,)))
    return lax.concatenate(windows, x.ndim)


@register(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(x: Any, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Any:
    a, b = norm_dim(dim1, x.ndim), norm_dim(dim2, x.ndim)
    rest = [i for i in range(x.ndim) if i not in (a, b)]
    y = lax.transpose(x, rest + [a, b])
    rows, cols = y.shape[-2:]
    n = out_aval().shape[-1]
    r0, c0 = (0, offset) if offset >= 0 else (-offset, 0)
    flat = lax.reshape(y, y.shape[:-2] + (rows * cols,))
    if n == 0:
        return lax.full(out_aval().shape, 0, x.dtype)
    start = r0 * cols + c0
    return slice_dim(flat, flat.ndim - 1, start, start + (n - 1) * (cols + 1) + 1, cols + 1)



# ----------------------------------------------------------------------------- scatters into views
# Functionalization turns a write into a view (``y[1:] = v``, ``y.diagonal().zero_()``) into these.

def _place(x: Any, src: Any, dim: int, start: int, step: int) -> Any:
    """``x`` with positions ``start, start+step, ...`` along ``dim`` replaced by ``src`` (interior padding)."""
    src = cast(src, x.dtype)
    m = src.shape[dim]
    if m == 0:
        return x
    last = start + (m - 1) * step
    config = [(0, 0, 0)] * x.ndim
    config[dim] = (start, x.shape[dim] - last - 1, step - 1)
    spread = lax.pad(src, literal(0, x.dtype), config)
    mask = lax.pad(lax.full(src.shape, True, np.bool_), literal(False, np.bool_), config)
    return lax.select(mask, spread, x)


@register(aten.slice_scatter.default)
def slice_scatter(x: Any, src: Any, dim: int = 0, start: int | None = None, end: int | None = None,
                  step: int = 1) -> Any:
    dim = norm_dim(dim, x.ndim)
    n = x.shape[dim]
    start = 0 if start is None else (start + n if start < 0 else start)
    return _place(x, src, dim, min(max(start, 0), n), step)


@register(aten.select_scatter.default)
def select_scatter(x: Any, src: Any, dim: int, index: int) -> Any:
    dim = norm_dim(dim, x.ndim)
    index = index + x.shape[dim] if index < 0 else index
    return _place(x, lax.reshape(cast(src, x.dtype), x.shape[:dim] + (1,) + x.shape[dim + 1:]), dim, index, 1)


@register(aten.diagonal_scatter.default)
def diagonal_scatter(x: Any, src: Any, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Any:
    a, b = norm_dim(dim1, x.ndim), norm_dim(dim2, x.ndim)
    rest = [i for i in range(x.ndim) if i not in (a, b)]
    order = rest + [a, b]
    y = lax.transpose(x, order)
    rows, cols = y.shape[-2:]
    r = lax.iota(np.int64, (rows, cols), 0)
    c = lax.iota(np.int64, (rows, cols), 1)
    on_diagonal = lax.eq(lax.sub(c, r), literal(offset, np.int64))
    # src's last axis runs along the diagonal: spread it over the rows (or columns) it meets
    src = cast(src, x.dtype)
    n = src.shape[-1]
    r0 = max(-offset, 0)  # the diagonal's first row
    along_rows = lax.pad(src, literal(0, x.dtype), [(0, 0, 0)] * (src.ndim - 1) + [(r0, rows - r0 - n, 0)])
    spread = lax.broadcast_in_dim(along_rows, y.shape, tuple(range(y.ndim - 2)) + (y.ndim - 2,))
    mask = lax.broadcast_in_dim(on_diagonal, y.shape, (y.ndim - 2, y.ndim - 1))
    out = lax.select(mask, spread, y)
    return lax.transpose(out, tuple(order.index(i) for i in range(x.ndim)))


@register(aten.as_strided_scatter.default)
def as_strided_scatter(x: Any, src: Any, size: Sequence[int], stride: Sequence[int],
                       storage_offset: int | None = None) -> Any:
    meta = current().in_vals[0]
    if meta is None or not meta.is_contiguous() or meta.storage_offset() != 0:
        raise unsupported("as_strided_scatter into a tensor that is not contiguous")
    index = _strided_index(size, stride, storage_offset, x.size)
    flat = lax.reshape(x, (x.size,))
    updates = lax.reshape(cast(src, x.dtype), (index.size,))
    return lax.reshape(lax.scatter(flat, literal(index.ravel(), np.int64), updates, 0), x.shape)
