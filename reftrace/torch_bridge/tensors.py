"""Small tensor helpers shared by the autograd glue and the compilers (so neither imports the other)."""
from __future__ import annotations

from typing import Sequence

import torch

from reftrace.backends.torch_dtypes import torch_dtype
from reftrace.graph import Graph


def example_tensors(graph: Graph, start: int = 0, device: torch.device | None = None) -> list[torch.Tensor]:
    """Uninitialised tensors matching ``graph.inputs[start:]`` (example inputs handed to compilers)."""
    return [torch.empty(v.shape, dtype=torch_dtype(v.dtype), device=device) for v in graph.inputs[start:]]


def device_of(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    """Where emitted code should create its tensors: the inputs' device, or None for the CPU default."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return None
