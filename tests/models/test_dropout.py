"""mobilenet_v3_small in full training mode, its classifier's Dropout(p=0.2) active.

reftrace draws dropout masks from its own functional RNG (``reftrace/torch_bridge/aten/random.py``),
so they differ from eager torch's.
The test recovers the mask the compiled step used, then replays eager torch with that mask:
the last Linear's weight gradient is ``G^T @ d`` (``G = dloss/dlogits``, known from the
compiled logits; ``d`` the dropout output, batch 2 < 10 classes), so least squares gives ``d``
exactly up to rounding. Every element of ``d`` must be either 0 or ``h / (1 - p)`` (``h`` the
dropout input), about ``p`` of them 0; with that mask, every output, gradient, parameter and
BatchNorm statistic must equal eager torch.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reftrace.compile import nop, ts_compile
from tests.models.training_step import compare, training_step
from tests.models.zoo import mobilenet_v3_small

P = 0.2


class ReplayDropout(torch.nn.Module):
    """Dropout with a given output: keeps ``h / (1 - p)`` where ``recovered`` is nearer to it than to 0.

    The mask is decided (and checked) at the first call and reused by later ones."""

    def __init__(self, recovered: torch.Tensor, p: float) -> None:
        super().__init__()
        self.recovered = recovered
        self.p = p
        self.keep: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            self._decide(h)
        return h * self.keep.to(h.dtype) / (1 - self.p)

    def _decide(self, h: torch.Tensor) -> None:
        scaled = h.detach().double() / (1 - self.p)
        self.keep = (self.recovered - scaled).abs() <= self.recovered.abs()
        expected = torch.where(self.keep, scaled, 0.0)
        torch.testing.assert_close(self.recovered, expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"dropout output is neither 0 nor h / (1 - p): {m}")


@pytest.mark.parametrize("compiler", [nop, pytest.param(ts_compile, marks=pytest.mark.slow)], ids=["nop", "ts"])
def test_mobilenet_v3_small_train_mode_with_dropout(compiler):
    torch.manual_seed(0)
    base = mobilenet_v3_small(dropout=True)
    assert isinstance(base.classifier[2], torch.nn.Dropout) and base.classifier[2].p == P and base.training
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([3, 7])
    loss_fn = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731

    got = training_step(copy.deepcopy(base), (x,), loss_fn, compiler=compiler)
    logits = got.tensors["out[0]"].double()
    g = (torch.softmax(logits, -1) - F.one_hot(labels, 10).double()) / len(labels)  # dloss/dlogits
    grad_w = got.tensors["grad classifier.3.weight"].double()  # = g^T @ d
    recovered = torch.linalg.lstsq(g.T, grad_w).solution  # d, shape (2, 1024)

    replay = copy.deepcopy(base)
    replay.classifier[2] = ReplayDropout(recovered, P)
    want = training_step(replay, (x,), loss_fn)
    keep = replay.classifier[2].keep
    dropped = keep.numel() - int(keep.sum())
    assert abs(dropped - P * keep.numel()) < 6 * (keep.numel() * P * (1 - P)) ** 0.5, dropped  # ~p dropped
    # The second forward of each step draws a fresh mask; compare only the first step's tensors.
    for result in (got, want):
        result.tensors = {k: v for k, v in result.tensors.items() if not k.startswith("second out")}
    compare(got, want, rtol=1e-4, atol=1e-5)
