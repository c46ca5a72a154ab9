"""torch functions whose composite implementation reads a tensor as a Python number although the
result's shape does not depend on it: rewritten, before dispatch, to shape-static equivalents.

``torch.narrow(x, dim, start, length)`` with a tensor ``start`` calls ``start.item()`` inside
ATen (a data-dependent read a static capture must refuse), yet its output has ``length``
entries along ``dim`` whatever ``start`` is: it is ``index_select`` at ``start + arange(length)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def _narrow_at_tensor_start(x: torch.Tensor, dim: int, start: torch.Tensor, length: int) -> torch.Tensor:
    size = x.shape[dim]
    start = start.reshape(())
    start = torch.where(start < 0, start + size, start)  # narrow's negative starts count from the end
    return torch.index_select(x, dim, start + torch.arange(length, device=x.device, dtype=start.dtype))


def _narrow_arguments(args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    names = ("input", "dim", "start", "length")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    if len(bound) != 4 or not isinstance(bound["start"], torch.Tensor) or bound["start"].numel() != 1:
        return None
    return bound["input"], bound["dim"], bound["start"], bound["length"]


class StaticShapeRewrites(TorchFunctionMode):
    """Active while a function is captured (``capture._run_functionalized``)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.narrow, torch.Tensor.narrow):
            narrow = _narrow_arguments(args, kwargs)
            if narrow is not None:
                return _narrow_at_tensor_start(*narrow)
        return func(*args, **kwargs)
