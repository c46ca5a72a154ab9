"""torch functions whose composite implementation reads a tensor as a Python number although the
result's shape does not depend on it: rewritten, before dispatch, to shape-static equivalents.

``torch.narrow(x, dim, start, length)`` with a tensor ``start`` calls ``start.item()`` inside
ATen (a data-dependent read a static capture must refuse), yet its output has ``length``
entries along ``dim`` whatever ``start`` is: it is ``index_select`` at ``start + arange(length)``.

``F.gaussian_nll_loss`` reads ``torch.any(var < 0)`` to raise on a negative variance. A captured
graph cannot raise on values; as where torch raises for a singular matrix, the result is NaN
instead (a negative variance becomes NaN before the clamp), and the rest is torch's code.
"""
from __future__ import annotations

import math
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


def _gaussian_nll_loss(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, full: bool = False,
                       eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """torch's ``F.gaussian_nll_loss`` for a tensor ``var``, NaN where torch raises on a negative variance."""
    var = torch.where(var < 0, torch.full_like(var, float("nan")), var)
    if var.size() != input.size():
        if input.size()[:-1] == var.size():  # homoscedastic: one variance per row
            var = torch.unsqueeze(var, -1)
        elif not (input.ndim == var.ndim
                  and sum(y for x, y in zip(input.size(), var.size()) if x != y) == 1):
            raise ValueError("var is of incorrect size")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")
    var = var.clone()
    with torch.no_grad():  # torch clamps without letting the clamp into the gradient
        var.clamp_(min=eps)
    loss = 0.5 * (torch.log(var) + (input - target) ** 2 / var)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _gaussian_nll_arguments(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    names = ("input", "target", "var", "full", "eps", "reduction")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    var = bound.get("var")
    return bound if isinstance(var, torch.Tensor) and var.is_floating_point() else None


class StaticShapeRewrites(TorchFunctionMode):
    """Active while a function is captured (``capture._run_functionalized``)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.narrow, torch.Tensor.narrow):
            narrow = _narrow_arguments(args, kwargs)
            if narrow is not None:
                return _narrow_at_tensor_start(*narrow)
        if func is torch.nn.functional.gaussian_nll_loss:
            bound = _gaussian_nll_arguments(args, kwargs)
            if bound is not None:
                return _gaussian_nll_loss(**bound)
        return func(*args, **kwargs)
