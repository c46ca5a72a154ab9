"""torch functions whose composite implementation reads a tensor as a Python number although the
result's shape does not depend on it: rewritten, before dispatch, to shape-static equivalents.

``torch.narrow(x, dim, start, length)`` with a tensor ``start`` calls ``start.item()`` inside
ATen (a data-dependent read a static capture must refuse), yet its output has ``length``
entries along ``dim`` whatever ``start`` is: it is ``index_select`` at ``start + arange(length)``.

``F.gaussian_nll_loss`` reads ``torch.any(var < 0)`` to raise on a negative variance. A captured
graph cannot raise on values; as where torch raises for a singular matrix, the result is NaN
instead (a negative variance becomes NaN before the clamp), and the rest is torch's code.

``torch.cov`` (and ``torch.corrcoef``, which calls it) reads ``norm_factor <= 0`` to warn and zero
the normalization, and raises on negative weights or weights summing to zero. Rewritten: the same
ATen ops in the same order (ATen's ``Correlation.cpp``), the zeroing a ``torch.where``, and NaN where
torch raises on the weights' values.

``F.ctc_loss`` (and ``torch.ctc_loss``) read their length tensors as numbers inside ATen, and
``_ctc_loss`` has no fake kernel: rewritten to one ``reftrace::ctc_loss`` op (``reftrace.torch_bridge.ctc``).

Not a number read, but a graph that would grow with the data: ``torch.lstm`` (``nn.LSTM``) decomposes
into one cell per time step; rewritten to one ``reftrace::lstm_layer`` op per layer and direction
(``reftrace.torch_bridge.rnn``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from reftrace.torch_bridge.ctc import ctc_loss
from reftrace.torch_bridge.rnn import lstm, lstm_arguments


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


_NO_DEGREES_OF_FREEDOM = ("cov(): degrees of freedom is <= 0. Correction should be strictly less than the number "
                          "of observations.")


def _cov(x: torch.Tensor, correction: int = 1, fweights: torch.Tensor | None = None,
         aweights: torch.Tensor | None = None) -> torch.Tensor:
    """ATen's ``cov`` op for op (``Correlation.cpp``), with no value read: a normalization that is not
    positive becomes 0 (torch warns, then zeroes it), and weights torch refuses (negative, or summing
    to zero) give NaN. As torch, one observation with one kind of weights zeroes ``x`` in place."""
    rows = x if x.ndim == 2 else x.view(1, -1)
    n = rows.shape[1]
    w = fweights
    if aweights is not None:
        w = aweights if w is None else w * aweights
    if w is None:
        w_sum = torch.scalar_tensor(n, dtype=torch.long, device=x.device)
    else:
        w_sum = w.sum()
    avg = (rows if w is None else rows * w).sum(1) / w_sum
    if w is None:
        if n - correction <= 0:
            warnings.warn(_NO_DEGREES_OF_FREEDOM, stacklevel=3)
        norm_factor = torch.scalar_tensor(max(n - correction, 0), dtype=torch.long, device=x.device)
    else:
        if correction == 0:
            norm_factor = w_sum
        elif aweights is None:
            norm_factor = w_sum - correction
        elif fweights is None and n == 1 and correction == 1:
            warnings.warn(_NO_DEGREES_OF_FREEDOM, stacklevel=3)
            norm_factor = torch.scalar_tensor(0, dtype=torch.long, device=x.device)
        else:
            norm_factor = w_sum - correction * (w * aweights).sum() / w_sum
        norm_factor = torch.where(norm_factor <= 0, torch.zeros_like(norm_factor), norm_factor)
    if n == 1 and (fweights is None) != (aweights is None):
        rows.zero_()
        centered = rows.float() if not (rows.is_floating_point() or rows.is_complex()) else rows
    else:
        centered = rows - avg.unsqueeze(1)
    c = torch.mm(centered, (centered if w is None else centered * w).t().conj())
    if c.is_complex() and 1 in centered.shape:  # ATen drops the rounding error of x * conj(x)
        c = torch.complex(c.real, torch.zeros_like(c.real))
    out = torch.true_divide(c, norm_factor).squeeze()
    if w is not None:  # torch raises on these values; a graph cannot
        refused = (w_sum == 0) | torch.stack([(t < 0).any() for t in (fweights, aweights) if t is not None]).any()
        out = torch.where(refused, torch.full_like(out, float("nan")), out)
    return out


def _corrcoef(x: torch.Tensor) -> torch.Tensor:
    """ATen's ``corrcoef`` on ``_cov``."""
    c = _cov(x)
    if c.ndim == 0:
        return c / c  # NaN for 0, inf or NaN; 1 otherwise
    d = c.diagonal()
    stddev = torch.sqrt(d.real if d.is_complex() else d)
    c = c / stddev.view(-1, 1)
    c = c / stddev.view(1, -1)
    if c.is_complex():
        return torch.complex(c.real.clip(-1, 1), c.imag.clip(-1, 1))
    return c.clip(-1, 1)


def _cov_arguments(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``torch.cov``'s arguments when they pass torch's shape and dtype checks (else torch raises its own error)."""
    names = ("input", "correction", "fweights", "aweights")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    x = bound.get("input")
    if not isinstance(x, torch.Tensor) or x.ndim > 2 or x.dtype == torch.bool:
        return None
    n = x.shape[-1] if x.ndim == 2 else x.numel()
    fw, aw = bound.get("fweights"), bound.get("aweights")
    if fw is not None and (fw.ndim > 1 or fw.is_floating_point() or fw.is_complex() or fw.dtype == torch.bool
                           or fw.numel() != n):
        return None
    if aw is not None and (aw.ndim > 1 or not aw.is_floating_point() or aw.numel() != n):
        return None
    if not isinstance(bound.get("correction", 1), int):
        return None
    return bound


def _ctc_arguments(args: tuple, kwargs: dict, aten_reduction: bool) -> dict[str, Any] | None:
    """``F.ctc_loss``'s arguments (``torch.ctc_loss`` numbers its reduction as ATen does), or None where
    the call is not one torch accepts (then torch's own call raises its error)."""
    names = ("log_probs", "targets", "input_lengths", "target_lengths", "blank", "reduction", "zero_infinity")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    if len(bound) < 4 or len(bound) != len(args) + len(kwargs):
        return None
    lp = bound["log_probs"]
    if not isinstance(lp, torch.Tensor) or not lp.is_floating_point() or lp.dim() not in (2, 3):
        return None
    if not all(isinstance(bound[k], (torch.Tensor, list, tuple)) for k in ("input_lengths", "target_lengths")):
        return None
    if aten_reduction:
        reduction = bound.get("reduction", 1)
        if reduction not in (0, 1, 2):
            return None
        bound["reduction"] = ("none", "mean", "sum")[reduction]
    return bound


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
        if func is torch.nn.functional.ctc_loss or func is torch.ctc_loss:
            bound = _ctc_arguments(args, kwargs, func is torch.ctc_loss)
            if bound is not None:
                return ctc_loss(**bound)
        if func is torch.lstm:
            bound = lstm_arguments(args, kwargs)
            if bound is not None:
                return lstm(**bound)
        if func in (torch.cov, torch.Tensor.cov):
            bound = _cov_arguments(args, kwargs)
            if bound is not None:
                return _cov(bound.pop("input"), **bound)
        if func in (torch.corrcoef, torch.Tensor.corrcoef) and len(args) == 1 and not kwargs:
            if _cov_arguments(args, {}) is not None:
                return _corrcoef(args[0])
        return func(*args, **kwargs)
