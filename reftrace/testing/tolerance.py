"""The tolerance rule: a target may be as inexact as eager torch, a few times over, plus a floor.

For a tensor the target produced (``got``), eager's result at the same dtype (``eager``) and
the float64 reference (``ref``)::

    error(got) <= MULTIPLE * error(eager) + FLOOR[dtype] * max(1, scale)

``error`` is the largest absolute difference from ``ref`` (infinite on a shape mismatch or a
non-finite entry where ``ref`` is finite). ``scale`` is the largest magnitude among the
reference's intermediate values for that stage (``reftrace.testing.reference``): a float32
kernel's rounding error is a few ulps of the magnitudes it combines, wherever it reorders a
sum, fuses a multiply-add or picks another algorithm, and the floor (about 170 float32 ulps,
or 45,000 float64 ulps, of the largest magnitude) covers that; ``MULTIPLE * error(eager)``
covers ill-conditioned programs where every implementation at that dtype is far from float64.
This is torch's ``fp64_ref`` accuracy check (``torch._dynamo.utils.same``) with a max-norm
and a magnitude-aware floor. No false alarms follow from it because the oracle also keeps
programs away from kinks and overflow (``reftrace.testing.guards``, ``check``), where two
correct implementations may differ by more than rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MULTIPLE = 10.0
FLOOR = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class Discrepancy:
    """How far ``got`` is from the reference, next to eager's distance and what the rule allows."""

    error: float
    eager_error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def __str__(self) -> str:
        return f"max abs err {self.error:.2e} vs eager {self.eager_error:.2e} (allowed {self.allowed:.2e})"


def error(got: torch.Tensor | None, ref: torch.Tensor) -> float:
    """Largest absolute difference from ``ref`` in float64; ``None`` counts as zeros (an absent grad)."""
    ref64 = ref.detach().to(torch.float64)
    if got is None:
        got64 = torch.zeros_like(ref64)
    else:
        if tuple(got.shape) != tuple(ref.shape):
            return float("inf")
        got64 = got.detach().to(torch.float64)
    if got64.numel() == 0:
        return 0.0
    diff = (got64 - ref64).abs()
    diff = torch.where(torch.isnan(ref64) & torch.isnan(got64), 0.0, diff)
    return float(diff.nan_to_num(float("inf")).max())


def compare(got: torch.Tensor | None, eager: torch.Tensor | None, ref: torch.Tensor, scale: float) -> Discrepancy:
    """Apply the rule to one tensor; the floor uses eager's dtype (the dtype the program asked for)."""
    dtype = eager.dtype if eager is not None else ref.dtype
    eager_error = error(eager, ref)
    allowed = MULTIPLE * eager_error + FLOOR.get(dtype, 1e-5) * max(1.0, scale)
    return Discrepancy(error(got, ref), eager_error, allowed)
