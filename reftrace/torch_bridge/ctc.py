"""``F.ctc_loss`` as one op capture records: ``reftrace::ctc_loss``, the ``ctc_loss`` composite.

ATen's ``ctc_loss`` reads its length tensors as numbers and ``_ctc_loss`` has no fake kernel (its second
output's shape reads the target lengths), so capture runs ``ctc_loss`` here instead (``static_rewrites``),
above autograd like the user's own code: the targets padded to ``(N, S)``, the lengths as int64 tensors,
then ``ctc_loss_op`` (each sequence's loss; a fake kernel gives its shape) and the reduction. Its
translation is ``reftrace.nn.ctc_loss``, whose decomposition, torch lowering (ATen's CTC kernels) and JAX
lowering (the recursion under ``lax.scan``) give torch's values and torch's gradient; see
``reftrace.nn.ctc``. Lengths given as tensors cannot be checked against the shapes while capturing
(torch raises on a length past ``T`` or ``S``).
"""
from __future__ import annotations

from typing import Any

import torch


def _numbers(lengths: Any) -> list[int] | None:
    """Lengths given as Python numbers (a list, or one number for an unbatched input), else None."""
    if isinstance(lengths, torch.Tensor):
        return None
    return [int(n) for n in lengths] if isinstance(lengths, (list, tuple)) else [int(lengths)]


def _lengths(lengths: Any, like: torch.Tensor) -> torch.Tensor:
    """The lengths as an int64 tensor on ``like``'s device (numbers become a constant)."""
    numbers = _numbers(lengths)
    if numbers is None:
        return lengths.to(device=like.device, dtype=torch.int64).reshape(-1)
    return torch.tensor(numbers, dtype=torch.int64, device=like.device)


def _padded_targets(targets: torch.Tensor, target_lengths: Any, lengths: torch.Tensor) -> torch.Tensor:
    """``(N, S)`` targets: 2-d targets as they are; 1-d (concatenated) ones cut at each sequence's
    offset, ``S`` the longest length when the lengths are numbers, else ``targets.numel()`` (a bound
    that needs no tensor value), positions past a length holding 0."""
    if targets.dim() == 2:
        return targets
    n = lengths.shape[0]
    numbers = _numbers(target_lengths)
    width = max(max(numbers, default=0) if numbers is not None else targets.numel(), 1)
    offsets = torch.cumsum(lengths, 0) - lengths
    index = offsets[:, None] + torch.arange(width, device=targets.device)[None, :]
    inside = torch.arange(width, device=targets.device)[None, :] < lengths[:, None]
    flat = targets.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((n, width), dtype=targets.dtype, device=targets.device)
    picked = flat[index.clamp(0, flat.numel() - 1)]
    return torch.where(inside, picked, torch.zeros_like(picked))


@torch.library.custom_op("reftrace::ctc_loss", mutates_args=())
def ctc_loss_op(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                target_lengths: torch.Tensor, blank: int, zero_infinity: bool) -> torch.Tensor:
    """Each sequence's loss, ``(N,)``, from ``(T, N, C)`` log-probabilities, ``(N, S)`` padded int64 targets
    and int64 lengths: what capture records for ``F.ctc_loss`` (the ``ctc_loss`` composite; ATen's own op
    reads its lengths as numbers). Run eagerly, it is ATen's kernel, with no gradient: reftrace
    differentiates the composite, whose torch row runs ATen's backward."""
    nll = torch.ops.aten._ctc_loss.Tensor(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)[0]
    return torch.where(nll == float("inf"), torch.zeros_like(nll), nll) if zero_infinity else nll


@ctc_loss_op.register_fake
def _ctc_loss_shape(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                    target_lengths: torch.Tensor, blank: int, zero_infinity: bool) -> torch.Tensor:
    return log_probs.new_empty(log_probs.shape[1:2])


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Any, target_lengths: Any,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
    """``F.ctc_loss`` as ``ctc_loss_op`` and the reduction: torch's values and gradient."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    il, tl = _lengths(input_lengths, lp), _lengths(target_lengths, lp)
    padded = _padded_targets(targets, target_lengths, tl).to(device=lp.device, dtype=torch.int64)
    loss = ctc_loss_op(lp, padded, il, tl, blank, zero_infinity)
    if reduction == "mean":
        return (loss / tl.clamp_min(1).to(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss if batched else loss.squeeze(0)
