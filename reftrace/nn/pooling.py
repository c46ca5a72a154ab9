"""Max pooling as a composite (forward: values and torch's flat indices; backward: the cotangent
scattered to those indices), and the window helpers the torch bridge's pooling rows share.

As core primitives, a max pool is one strided slice of the padded input per window offset, a
concatenation, an argmax and gathers, and its gradient runs back through all of them (pads and
slices per offset); eager torch runs one ``max_pool2d_with_indices`` kernel and one
``max_pool2d_with_indices_backward``. The composites carry those calls; their decompositions are
the window formulation (the meaning) and a scatter-add of the cotangent at the indices.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.composite import define_composite
from reftrace.transforms.vjp_rules import vjp_rules


def lowest(dtype: Any) -> Any:
    """The identity of max: -inf for floats, the minimum for integers, False for bool."""
    dtype = np.dtype(dtype)
    if P.is_float(dtype):
        return -np.inf
    if P.is_bool(dtype):
        return False
    return np.iinfo(dtype).min


def windows(x: Any, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            out_spatial: Sequence[int], pad_value: Any) -> list[Any]:
    """One strided slice of the padded input per window offset (row-major over the kernel)."""
    n = len(kernel)
    batch = x.ndim - n
    config = [(0, 0, 0)] * batch
    for size, k, s, p, dil, o in zip(x.shape[batch:], kernel, stride, padding, dilation, out_spatial):
        needed = (o - 1) * s + dil * (k - 1) + 1
        config.append((p, max(needed - size - p, 0), 0))
    padded = lax.pad(x, lax.constant(pad_value, x.dtype), config)
    result = []
    for offset in itertools.product(*[range(k) for k in kernel]):
        start = [0] * batch + [o * dil for o, dil in zip(offset, dilation)]
        limit = list(x.shape[:batch]) + [st + (o - 1) * s + 1 for st, o, s in zip(start[batch:], out_spatial, stride)]
        result.append(lax.slice(padded, start, limit, [1] * batch + list(stride)))
    return result


def stack_last(xs: list[Any]) -> Any:
    return lax.concatenate([lax.reshape(w, w.shape + (1,)) for w in xs], xs[0].ndim)


def window_argmax(stacked: Any) -> Any:
    """Position of the max over the trailing window axis as torch's pooling kernels scan a window
    (``val > best || isnan(val)``): the first maximum, or the last NaN if there is one."""
    last = stacked.ndim - 1
    which = lax.argmax(stacked, last, np.int64)
    if not P.is_float(stacked.dtype):
        return which
    nan = lax.ne(stacked, stacked)
    last_nan = lax.reduce_max(lax.select(nan, lax.iota(np.int64, stacked.shape, last),
                                         lax.full(stacked.shape, -1, np.int64)), (last,))
    return lax.select(lax.ge(last_nan, lax.full(last_nan.shape, 0, np.int64)), last_nan, which)


def window_max(stacked: Any) -> tuple[Any, Any]:
    """(max, its position) over the trailing window axis, the max gathered at that position.

    So the whole gradient goes to the one input element whose index torch returns (a reduce_max
    would split it among ties).
    """
    which = window_argmax(stacked)
    values = lax.gather(stacked, lax.reshape(which, which.shape + (1,)), stacked.ndim - 1)
    return lax.reshape(values, which.shape), which


def _max_pool(x: Any, *, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
              dilation: tuple[int, ...], ceil_mode: bool, out_spatial: tuple[int, ...]) -> tuple[Any, Any]:
    n = len(kernel)
    stacked = stack_last(windows(x, kernel, stride, padding, dilation, out_spatial, lowest(x.dtype)))
    values, which = window_max(stacked)
    # table[..., k] = flat input position read by window offset k at each output position
    in_spatial = x.shape[-n:]
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    grids = np.meshgrid(*[np.arange(o) for o in out_spatial], indexing="ij")
    table = np.zeros(tuple(out_spatial) + (len(offsets),), dtype=np.int64)
    for j, off in enumerate(offsets):
        flat = np.zeros(tuple(out_spatial), dtype=np.int64)
        for dim in range(n):
            coord = grids[dim] * stride[dim] - padding[dim] + off[dim] * dilation[dim]
            flat = flat * in_spatial[dim] + coord
        table[..., j] = flat
    batch_shape = tuple(x.shape[:-n])
    operand = lax.broadcast_in_dim(lax.constant(table), batch_shape + table.shape,
                                   tuple(range(len(batch_shape), len(batch_shape) + n + 1)))
    picked = lax.gather(operand, lax.reshape(which, which.shape + (1,)), operand.ndim - 1)
    return values, lax.reshape(picked, which.shape)


def _max_pool_backward(g: Any, x: Any, indices: Any, *, kernel: tuple[int, ...], **params: Any) -> Any:
    """The cotangent added at each output's flat input index (overlapping windows accumulate)."""
    n = len(kernel)
    batch_shape = tuple(x.shape[:-n])
    flat_in = int(np.prod(x.shape[-n:], dtype=np.int64))
    flat_out = int(np.prod(g.shape[-n:], dtype=np.int64))
    zeros = lax.full(batch_shape + (flat_in,), 0, g.dtype)
    summed = lax.scatter_add(zeros, lax.reshape(indices, batch_shape + (flat_out,)),
                             lax.reshape(g, batch_shape + (flat_out,)), len(batch_shape))
    return lax.reshape(summed, x.shape)


max_pool_p = define_composite("max_pool", _max_pool, multiple_results=True)
max_pool_backward_p = define_composite("max_pool_backward", _max_pool_backward)


def max_pool(x: Any, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             ceil_mode: bool, out_spatial: Sequence[int]) -> tuple[Any, Any]:
    """(values, flat indices) of torch's ``max_poolNd_with_indices`` over the trailing
    ``len(kernel)`` axes; ``out_spatial`` is the output's spatial shape (what ``ceil_mode`` gives)."""
    return lax.bind(max_pool_p, x, kernel=tuple(int(k) for k in kernel), stride=tuple(int(s) for s in stride),
                    padding=tuple(int(p) for p in padding), dilation=tuple(int(d) for d in dilation),
                    ceil_mode=bool(ceil_mode), out_spatial=tuple(int(o) for o in out_spatial))


def _max_pool_vjp(cts, primals, outs, **params):
    if cts[0] is None:  # only the integer indices had a cotangent: nothing flows back
        return (None,)
    return (lax.bind(max_pool_backward_p, cts[0], primals[0], outs[1], **params),)


vjp_rules[max_pool_p] = _max_pool_vjp
