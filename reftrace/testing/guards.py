"""Distances to the points where a program line stops being smooth.

A vocabulary entry with a kink (relu at 0, max at a tie, a comparison at equality) records a
guard expression built from these helpers; the oracle evaluates it after the line runs and
rejects inputs that come too close (``reftrace.testing.cases``). At a kink, eager and any
compiler may legitimately disagree (subgradients, rounding on either side), so programs are
kept away from kinks instead of judged there.
"""
from __future__ import annotations

from typing import Sequence

import torch


def near(x: torch.Tensor, *points: float) -> torch.Tensor:
    """Signed distances of ``x``'s entries to each of ``points``."""
    x = x.detach()
    return torch.cat([(x - p).reshape(-1) for p in points])


def gap(x: torch.Tensor, dims: Sequence[int] | None = None) -> torch.Tensor:
    """For a max/min over ``dims`` (all when ``None``): the gap between the two largest and the two
    smallest entries of each reduced group (infinite for a group of one)."""
    x = x.detach()
    if x.dim() == 0:
        return torch.full((1,), float("inf"), dtype=x.dtype)
    dims = list(range(x.dim())) if dims is None else [d % x.dim() for d in dims]
    keep = [d for d in range(x.dim()) if d not in dims]
    groups = x.permute(*keep, *dims).reshape(-1, max(1, _numel(x, dims)))
    if groups.shape[-1] < 2:
        return torch.full((1,), float("inf"), dtype=x.dtype)
    ordered = groups.sort(dim=-1).values
    return torch.cat([(ordered[:, -1] - ordered[:, -2]).reshape(-1), (ordered[:, 1] - ordered[:, 0]).reshape(-1)])


def _numel(x: torch.Tensor, dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n
