"""``F.ctc_loss`` as torch ops of static shape: the CTC forward (alpha) recursion, unrolled over time.

ATen's ``ctc_loss`` reads its length tensors as numbers and ``_ctc_loss`` has no fake kernel (its second
output's shape reads the target lengths), so capture runs this instead (``static_rewrites``), above
autograd like the user's own code. The values are those of torch's CPU kernel, operation for
operation: per state, ``log(exp(a1 - m) + exp(a2 - m) + exp(a3 - m)) + m + log_prob`` with ``m`` the
largest (0 if all are ``-inf``), and the loss ``-logaddexp`` of the last two states at each sequence's
last frame. Padded positions (time steps past ``input_lengths``, states past ``2 * target_lengths``)
are masked, never read as values, so the recursion runs on the full padded shape.

The gradient is torch's too. torch's ``ctc_loss_backward`` returns ``exp(log_probs) - (the true
slope)`` (its alpha-beta formula assumes the inputs come out of ``log_softmax``, through whose backward
the extra ``exp(log_probs)`` cancels), so the loss carries a term ``exp(lp) - detach(exp(lp))`` over
each sequence's frames: 0 in value, that ``exp(log_probs)`` in slope. With ``zero_infinity`` an
impossible alignment (an infinite loss) gets a loss of 0 and no gradient, as torch's; the log-sum-exps
see a finite stand-in where all their terms are ``-inf``, so no ``0 * inf`` reaches the gradient.
Without it, its loss is inf and its slope NaN as torch's (on the classes of its targets and blank; torch
makes every class NaN on its frames, the same after ``log_softmax``'s backward). Lengths given as tensors
cannot be checked against the shapes while capturing (torch raises on a length past ``T`` or ``S``).
"""
from __future__ import annotations

from typing import Any, Sequence

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


def _log_add(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log(sum exp(t - m)) + m`` in torch's kernel's order, ``m`` the largest term (0 if all are
    ``-inf``); where every term is ``-inf`` the log sees 1 and the result is ``-inf``, so the
    gradient there is 0 rather than ``inf * 0``."""
    m = terms[0]
    for t in terms[1:]:
        m = torch.maximum(m, t)
    dead = m == float("-inf")
    m = torch.where(dead, torch.zeros_like(m), m)
    total = torch.exp(terms[0] - m)
    for t in terms[1:]:
        total = total + torch.exp(t - m)
    safe = torch.where(dead, torch.ones_like(total), total)
    return torch.where(dead, torch.full_like(m, float("-inf")), torch.log(safe) + m)


def _neg_log_likelihood(log_probs: torch.Tensor, padded: torch.Tensor, il: torch.Tensor, tl: torch.Tensor,
                        blank: int, zero_infinity: bool) -> torch.Tensor:
    """Per sequence ``-log p(target | log_probs)``, ``(N,)``, by torch's CPU recursion."""
    steps, n, _ = log_probs.shape
    width = padded.shape[1]
    states = 2 * width + 1
    device = log_probs.device
    s = torch.arange(states, device=device)
    label = (padded[:, ((s - 1) // 2).clamp(0, width - 1)] if width
             else torch.zeros((n, states), dtype=torch.int64, device=device))
    used = s[None, :] < (2 * tl + 1)[:, None]
    extended = torch.where((s[None, :] % 2 == 1) & used, label, torch.full_like(label, blank))  # (N, L)
    shifted = torch.cat([extended.new_full((n, 2), -1), extended[:, :-2]], 1)
    skip = (s[None, :] >= 2) & (extended != shifted) & used
    gathered = log_probs.gather(2, extended[None].expand(steps, n, states))  # (T, N, L)
    neg_inf = torch.full((n, states), float("-inf"), dtype=log_probs.dtype, device=device)
    column = neg_inf[:, :1]
    alpha = torch.where((s[None, :] < 2) & used, gathered[0], neg_inf)
    for t in range(1, steps):
        one = torch.cat([column, alpha[:, :-1]], 1)
        two = torch.where(skip, torch.cat([column, column, alpha[:, :-2]], 1)[:, :states], neg_inf)
        step = _log_add([alpha, one, two]) + gathered[t]
        alpha = torch.where((t < il)[:, None] & used, step, alpha)  # frozen past a sequence's last frame
    last_blank = alpha.gather(1, (2 * tl)[:, None])[:, 0]
    last_label = torch.where(tl > 0, alpha.gather(1, (2 * tl - 1).clamp(min=0)[:, None])[:, 0],
                             torch.full_like(last_blank, float("-inf")))
    if zero_infinity:
        return -_log_add([last_blank, last_label])
    # torch's kernel: an impossible alignment's loss is inf and its slope NaN (log of 0 at the end)
    m = torch.maximum(last_blank, last_label)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return -(torch.log(torch.exp(last_blank - m) + torch.exp(last_label - m)) + m)


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Any, target_lengths: Any,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
    """``F.ctc_loss``: torch's values and gradient, from ATen ops of static shape."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    il, tl = _lengths(input_lengths, lp), _lengths(target_lengths, lp)
    padded = _padded_targets(targets, target_lengths, tl).to(device=lp.device, dtype=torch.int64)
    nll = _neg_log_likelihood(lp, padded, il, tl, blank, zero_infinity)
    # torch's slope: + exp(log_probs) on each sequence's frames (0 in value)
    frames = (torch.arange(lp.shape[0], device=lp.device)[:, None] < il[None, :])[:, :, None]  # (T, N, 1)
    probs = torch.exp(lp)
    loss = nll + torch.where(frames, probs - probs.detach(), torch.zeros_like(probs)).sum((0, 2))
    if zero_infinity:  # no gradient for an impossible alignment, and a loss of 0
        loss = torch.where(nll == float("inf"), torch.zeros_like(loss), loss)
    if reduction == "mean":
        return (loss / tl.clamp_min(1).to(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss if batched else loss.squeeze(0)
