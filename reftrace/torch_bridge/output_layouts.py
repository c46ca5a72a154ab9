"""Outputs laid out in memory as eager lays them out.

A graph value has no strides: the torch backend returns what its last op gives (``x.t().contiguous()``
is a transpose there, the copy being a no-op on values), XLA returns row-major arrays. A caller
that goes on with ``out.view(-1)`` after eager's ``.contiguous()`` would then fail, and a caller
of a channels-last network gets a different memory format. Capture knows each output's eager
strides (functionalization keeps them on the fake tensors); an output whose strides differ is
copied into eager's layout after the call. Outputs eager returns overlapping or with holes
(``expand``, a slice with a step) are left as they come: only a dense layout can be copied into.
"""
from __future__ import annotations

from typing import Sequence

import torch

Layout = tuple[int, tuple[int, ...]]  # (output position, eager's strides)


def dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides when its layout is dense and non-overlapping (one that can be copied into), else None:
    its dimensions longer than 1, ordered by stride, must tile the memory exactly."""
    if t.numel() == 0:
        return None
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return None
        expected *= size
    return tuple(t.stride())


def _same_layout(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Strides equal along every dimension longer than 1 (the others never move an index)."""
    return all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n > 1)


def with_eager_layouts(outputs: Sequence[torch.Tensor], layouts: Sequence[Layout]) -> Sequence[torch.Tensor]:
    """``outputs``, each one listed in ``layouts`` in eager's strides (a copy where they differ;
    autograd records it)."""
    fixed: list[torch.Tensor] | None = None
    for k, strides in layouts:
        t = outputs[k]
        if t.stride() == strides or _same_layout(t, strides):
            continue
        if fixed is None:
            fixed = list(outputs)
        fixed[k] = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)
    return outputs if fixed is None else fixed
