"""Resampling ATen ops: fractional max pooling (random window starts), antialiased bilinear
upsampling, and 3-D grid sampling, written as gathers with static index tables.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace.torch_bridge.aten._common import aten, cast, literal, out_aval, register, unsupported
from reftrace.torch_bridge.aten.elementwise import trunc
from reftrace.nn.pooling import window_argmax
from reftrace.torch_bridge.aten.nn import per_dim


def _fractional_starts(sample: Any, size: int, kernel: int, out: int, d: Any) -> Any:
    """torch's pseudo-random window starts: int((i + u) * alpha) - int(u * alpha) (C casts truncate toward
    zero), the last at size - k."""
    if out == 1:
        return lax.broadcast_in_dim(lax.full((), size - kernel, np.int64), sample.shape + (1,), ())
    alpha = (size - kernel) / (out - 1)
    i = lax.iota(d, sample.shape + (out - 1,), sample.ndim)
    u = lax.broadcast_in_dim(sample, sample.shape + (out - 1,), tuple(range(sample.ndim)))
    a = literal(alpha, d)
    starts = lax.sub(trunc(lax.mul(lax.add(i, u), a)), trunc(lax.mul(u, a)))
    last = lax.full(sample.shape + (1,), size - kernel, d)
    return cast(lax.concatenate([starts, last], sample.ndim), np.int64)


def _fractional_max_pool(n: int):
    def rule(x: Any, kernel_size: Sequence[int], output_size: Sequence[int], random_samples: Any) -> tuple[Any, Any]:
        """Windows at pseudo-random starts (one uniform sample per batch, channel and dimension); the
        first maximum in the window's scan order wins, as torch's kernel."""
        kernel, out = per_dim(kernel_size, n), per_dim(output_size, n)
        spatial = x.shape[-n:]
        lead = x.shape[:-n]
        unbatched = len(lead) == 1
        samples = cast(random_samples, x.dtype)  # (N, C, n) (N dropped for unbatched input), in x's precision
        if unbatched:
            samples = lax.reshape(samples, lead + (n,))
        flat_len = int(np.prod(spatial))
        flat = lax.reshape(x, lead + (flat_len,))
        # flat input position of every (output cell, kernel offset): sum_d coord_d * stride_d
        cells = tuple(out) + (int(np.prod(kernel)),)
        position = None
        strides = [int(np.prod(spatial[d + 1:])) for d in range(n)]
        offsets = np.array(list(itertools.product(*[range(k) for k in kernel])), dtype=np.int64)  # (K, n)
        for dim in range(n):
            column = n - 1 - dim if n == 2 else dim  # torch's 2-d kernel reads (w, h) samples, the 3-d one (t, h, w)
            u = lax.reshape(lax.slice(samples, (0,) * (samples.ndim - 1) + (column,),
                                      samples.shape[:-1] + (column + 1,)), lead)
            starts = _fractional_starts(u, spatial[dim], kernel[dim], out[dim], x.dtype)  # lead + (out_d,)
            coord = lax.broadcast_in_dim(starts, lead + cells, tuple(range(len(lead))) + (len(lead) + dim,))
            along = lax.broadcast_in_dim(literal(offsets[:, dim], np.int64), lead + cells, (len(lead) + n,))
            term = lax.mul(lax.add(coord, along), literal(strides[dim], np.int64))
            position = term if position is None else lax.add(position, term)
        index = lax.reshape(position, lead + (int(np.prod(cells)),))
        windows = lax.reshape(lax.gather(flat, index, len(lead)), lead + cells)
        which = window_argmax(windows)
        picked = lax.gather(position, lax.reshape(which, which.shape + (1,)), windows.ndim - 1)
        picked = lax.reshape(picked, which.shape)
        values = lax.reshape(lax.gather(flat, lax.reshape(picked, lead + (int(np.prod(out)),)), len(lead)),
                             which.shape)
        return values, picked
    return rule


register(aten.fractional_max_pool2d.default)(_fractional_max_pool(2))
register(aten.fractional_max_pool3d.default)(_fractional_max_pool(3))


def _antialias_weights(size: int, out: int, align_corners: bool, scale: float | None) -> np.ndarray:
    """(out, size) weights of torch's antialiased bilinear resampling: a triangle filter widened by the
    downscaling factor, truncated to the input and normalised per output pixel."""
    if align_corners:
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale else size / out
    support = ratio if ratio >= 1.0 else 1.0    # interp_size / 2 = 1, widened by the ratio when shrinking
    inverse = 1.0 / ratio if ratio >= 1.0 else 1.0
    weights = np.zeros((out, size))
    for i in range(out):
        center = ratio * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), size) - first
        taps = np.array([max(0.0, 1.0 - abs((j + first - center + 0.5) * inverse)) for j in range(count)])
        if taps.sum() != 0:
            taps = taps / taps.sum()
        weights[i, first:first + count] = taps
    return weights


@register(aten._upsample_bilinear2d_aa.default)
def upsample_bilinear2d_aa(x: Any, output_size: Sequence[int], align_corners: bool, scales_h: float | None = None,
                           scales_w: float | None = None) -> Any:
    """Separable: y = W_h x W_w^T per plane, with the weights fixed by the shapes (computed at capture)."""
    (h, w), (oh, ow) = x.shape[-2:], tuple(output_size)
    d = x.dtype
    rows = literal(_antialias_weights(h, oh, align_corners, scales_h), d)     # (oh, h)
    cols = literal(_antialias_weights(w, ow, align_corners, scales_w), d)     # (ow, w)
    y = lax.dot_general(x, cols, (((x.ndim - 1,), (1,)), ((), ())))           # (..., h, ow)
    y = lax.dot_general(y, rows, (((y.ndim - 2,), (1,)), ((), ())))           # (..., ow, oh)
    return lax.transpose(y, tuple(range(y.ndim - 2)) + (y.ndim - 1, y.ndim - 2))


def _grid_coordinate(c: Any, size: int, padding_mode: int, align_corners: bool) -> Any:
    """A normalised grid coordinate in [-1, 1] as an input index, after border/reflection padding."""
    d = c.dtype
    if align_corners:
        x = lax.mul(lax.add(c, literal(1, d)), literal((size - 1) / 2, d))
    else:
        x = lax.div(lax.sub(lax.mul(lax.add(c, literal(1, d)), literal(size, d)), literal(1, d)), literal(2, d))
    if padding_mode == 2:  # reflection: about the edge centres (align_corners) or the outer edges
        low, high = (0.0, 2.0 * (size - 1)) if align_corners else (-1.0, 2.0 * size - 1)
        if low == high:
            x = lax.mul(x, literal(0, d))
        else:
            middle, span = low / 2, (high - low) / 2
            away = lax.abs(lax.sub(x, literal(middle, d)))
            extra = lax.rem(away, literal(span, d))
            flips = lax.floor(lax.div(away, literal(span, d)))
            even = lax.eq(lax.rem(flips, literal(2, d)), literal(0, d))
            x = lax.select(even, lax.add(extra, literal(middle, d)), lax.add(lax.sub(literal(span, d), extra),
                                                                             literal(middle, d)))
    if padding_mode in (1, 2):  # border (and reflection's result): clip into the input
        x = lax.select(lax.lt(x, literal(0, d)), literal(0, d), x)
        x = lax.select(lax.gt(x, literal(size - 1, d)), literal(size - 1, d), x)
    return x


@register(aten.grid_sampler_3d.default)
def grid_sampler_3d(x: Any, grid: Any, interpolation_mode: int, padding_mode: int, align_corners: bool) -> Any:
    """Trilinear (mode 0) or nearest (mode 1) sampling of (N, C, D, H, W) at grid points (x, y, z) in [-1, 1].

    Each of the 8 (or 1) neighbouring voxels is a gather from the flattened volume; neighbours
    outside the input contribute 0 (with border/reflection padding only the weight-0 ones are).
    """
    if interpolation_mode not in (0, 1):
        raise unsupported(f"grid_sampler_3d interpolation mode {interpolation_mode} (torch allows bilinear, nearest)")
    d = out_aval().dtype
    x, grid = cast(x, d), cast(grid, d)
    n, c = x.shape[:2]
    sizes = x.shape[2:]                      # (D, H, W)
    points = grid.shape[1:4]
    count = int(np.prod(points))
    flat = lax.reshape(x, (n, c, int(np.prod(sizes))))
    coords = []
    for axis, size in zip((2, 1, 0), sizes):  # grid[..., 0] is x (W), 1 is y (H), 2 is z (D)
        column = lax.reshape(lax.slice(grid, (0, 0, 0, 0, axis), grid.shape[:4] + (axis + 1,)), (n, count))
        coords.append(_grid_coordinate(column, size, padding_mode, align_corners))
    if interpolation_mode == 1:
        corners = [[(lax.round(v), None) for v in coords]]
    else:
        lows = [lax.floor(v) for v in coords]
        corners = [[(lax.add(low, literal(o, d)) if o else low,
                     lax.sub(v, low) if o else lax.sub(literal(1, d), lax.sub(v, low)))
                    for v, low, o in zip(coords, lows, offset)] for offset in itertools.product((0, 1), repeat=3)]
    total = None
    for corner in corners:
        inside, index, weight = None, None, None
        for (position, w), size in zip(corner, sizes):
            ok = lax.logical_and(lax.ge(position, literal(0, d)), lax.le(position, literal(size - 1, d)))
            inside = ok if inside is None else lax.logical_and(inside, ok)
            safe = cast(lax.select(ok, position, literal(0, d)), np.int64)
            index = safe if index is None else lax.add(lax.mul(index, literal(size, np.int64)), safe)
            if w is not None:
                weight = w if weight is None else lax.mul(weight, w)
        values = lax.gather(flat, lax.broadcast_in_dim(index, (n, c, count), (0, 2)), 2)
        scale = lax.select(inside, weight if weight is not None else literal(1, d), literal(0, d))
        term = lax.mul(values, lax.broadcast_in_dim(scale, (n, c, count), (0, 2)))
        total = term if total is None else lax.add(total, term)
    return lax.reshape(total, (n, c) + tuple(points))
