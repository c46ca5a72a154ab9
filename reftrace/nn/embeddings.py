"""Embedding lookup as a composite, with ATen's backward equation.

``embedding(weight, indices)`` picks rows of a (num_weights, features) table. Its gradient is
eager torch's: occurrences of ``padding_idx`` contribute nothing, and with
``scale_grad_by_freq`` each row's gradient is divided by how often its index occurs in the
batch. The backward equation is ``aten.embedding_dense_backward``'s.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.nn._util import along, cast
from reftrace.transforms.vjp_rules import vjp_rules


def _flat_rows(indices: Any, features: int) -> tuple[Any, int]:
    """The indices as one int64 column broadcast across ``features``: a gather/scatter index."""
    n = int(np.prod(indices.shape, dtype=np.int64))
    flat = lax.reshape(cast(indices, np.int64), (n,))
    return along(flat, (n, features), (0,)), n


def _embedding(weight: Any, indices: Any, *, padding_idx: int, scale_grad_by_freq: bool) -> Any:
    """The rows, with the gradient rules written into the graph so that the decomposition
    differentiates like the composite: padding rows pass through ``stop_gradient``, and a
    frequency-scaled row is ``sg(v) + (v - sg(v)) / count`` (the value v, the gradient 1/count)."""
    rows, n = _flat_rows(indices, weight.shape[1])
    picked = lax.gather(weight, rows, 0)
    if padding_idx >= 0:
        padding = lax.eq(rows, lax.full(rows.shape, padding_idx, np.int64))
        picked = lax.select(padding, lax.stop_gradient(picked), picked)
    if scale_grad_by_freq:
        frozen = lax.stop_gradient(picked)
        counts = _counts(rows, weight.shape[0], picked.dtype)
        picked = lax.add(frozen, lax.div(lax.sub(picked, frozen), counts))
    return lax.reshape(picked, indices.shape + weight.shape[1:])


def _counts(rows: Any, num_weights: int, dtype: Any) -> Any:
    """How often each row's index occurs among the indices, broadcast like ``rows``."""
    n = rows.shape[0]
    column = lax.slice(rows, (0, 0), (n, 1))
    counts = lax.scatter_add(lax.full((num_weights, 1), 0, dtype), column, lax.full((n, 1), 1, dtype), 0)
    return along(lax.reshape(lax.gather(counts, column, 0), (n,)), rows.shape, (0,))


def _embedding_backward(g: Any, indices: Any, *, num_weights: int, padding_idx: int,
                        scale_grad_by_freq: bool) -> Any:
    features = g.shape[-1]
    rows, n = _flat_rows(indices, features)
    g = lax.reshape(g, (n, features))
    d = g.dtype
    if padding_idx >= 0:
        keep = lax.ne(rows, lax.full(rows.shape, padding_idx, np.int64))
        g = lax.select(keep, g, lax.full(g.shape, 0, d))
    if scale_grad_by_freq:
        g = lax.div(g, _counts(rows, num_weights, d))
    return lax.scatter_add(lax.full((num_weights, features), 0, d), rows, g, 0)


embedding_p = define_composite("embedding", _embedding)
embedding_backward_p = define_composite("embedding_backward", _embedding_backward)


def embedding(weight: Any, indices: Any, padding_idx: int = -1, scale_grad_by_freq: bool = False) -> Any:
    """``weight[indices]`` for a 2-D ``weight``; ``padding_idx`` (-1: none) and ``scale_grad_by_freq``
    shape the gradient as ``torch.nn.functional.embedding``'s."""
    return lax.bind(embedding_p, weight, indices, padding_idx=int(padding_idx),
                    scale_grad_by_freq=bool(scale_grad_by_freq))


def _embedding_vjp(cts, primals, outs, *, padding_idx, scale_grad_by_freq):
    weight, indices = primals
    grad = lax.bind(embedding_backward_p, cts[0], indices, num_weights=weight.shape[0], padding_idx=padding_idx,
                    scale_grad_by_freq=scale_grad_by_freq)
    return grad, None


vjp_rules[embedding_p] = _embedding_vjp
