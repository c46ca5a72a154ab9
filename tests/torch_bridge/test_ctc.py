"""``F.ctc_loss`` through reftrace: torch's values and torch's gradient, as one ``ctc_loss`` composite
(ATen's kernels on the torch backend, the recursion under ``lax.scan`` on XLA).

torch's backward returns ``exp(log_probs)`` minus the true slope (it assumes ``log_softmax`` inputs), so
the gradient of a leaf ``log_probs`` is checked as well as that of logits before a ``log_softmax``.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from reftrace.compile import aot_function, aot_module, nop, xla_compile

T, N, C = 9, 3, 6
INPUT_LENGTHS = [9, 6, 4]
TARGET_LENGTHS = [3, 0, 2]


def _targets(blank: int, layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    padded = torch.randint(0, C, (N, 4), generator=g)
    padded[padded == blank] = (blank + 1) % C
    padded[0, 1] = padded[0, 0]  # a repeated label: the path must pass a blank between them
    if layout == "padded":
        return padded
    return torch.cat([padded[i, :n] for i, n in enumerate(TARGET_LENGTHS)])


def _compare(fn, x: torch.Tensor, compiler=nop, rtol: float = 1e-11) -> None:
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = fn(xe), aot_function(fn, compiler)(xc)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("reduction,zero_infinity,layout,tensor_lengths", list(itertools.product(
    ["none", "mean", "sum"], [False, True], ["padded", "concatenated"], [False, True])))
@pytest.mark.parametrize("blank,on_logits", [(0, False), (C - 1, True)])
def test_ctc_loss_matches_eager(reduction, zero_infinity, layout, tensor_lengths, blank, on_logits):
    torch.manual_seed(0)
    logits = torch.randn(T, N, C, dtype=torch.float64)
    targets = _targets(blank, layout)
    il = torch.tensor(INPUT_LENGTHS) if tensor_lengths else INPUT_LENGTHS
    tl = torch.tensor(TARGET_LENGTHS) if tensor_lengths else TARGET_LENGTHS

    def loss(x):
        lp = x.log_softmax(-1) if on_logits else x
        return F.ctc_loss(lp, targets, il, tl, blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    _compare(loss, logits if on_logits else logits.log_softmax(-1))


def test_ctc_loss_through_xla_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(T, N, C)
    targets = _targets(0, "padded")
    _compare(lambda x: F.ctc_loss(x.log_softmax(-1), targets, torch.tensor(INPUT_LENGTHS),
                                  torch.tensor(TARGET_LENGTHS)), logits, xla_compile, rtol=1e-5)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_a_long_sequence_is_one_equation_and_compiles_for_xla(zero_infinity):
    """T = 150 frames: capture records one ``ctc_loss`` equation (its decomposition, unrolled, is not
    traced), and XLA compiles the recursion as one frame under a scan; float64, as eager."""
    from reftrace.torch_bridge.capture import capture_flat
    torch.manual_seed(0)
    steps, n, classes = 150, 2, 5
    logits = torch.randn(steps, n, classes, dtype=torch.float64)
    targets, il, tl = torch.randint(1, classes, (n, 40)), torch.tensor([150, 97]), torch.tensor([40, 31])

    def loss(x):
        return F.ctc_loss(x.log_softmax(-1), targets, il, tl, reduction="sum", zero_infinity=zero_infinity)
    graph = capture_flat(lambda ts: loss(ts[0]), [logits]).graph
    assert [e.primitive.name for e in graph.eqns].count("ctc_loss") == 1 and len(graph.eqns) < 30
    _compare(loss, logits, xla_compile, rtol=1e-9)


def test_ctc_loss_unbatched():
    torch.manual_seed(0)
    lp = torch.randn(T, C, dtype=torch.float64).log_softmax(-1)
    _compare(lambda x: F.ctc_loss(x, torch.tensor([1, 2, 2]), torch.tensor(7), torch.tensor(3), reduction="none"), lp)


def test_an_impossible_alignment_gets_no_gradient_with_zero_infinity_and_nan_without():
    """4 labels in 2 frames: torch's loss is inf (0 with ``zero_infinity``, and no gradient); without it
    torch's slope for that sequence is NaN, and reftrace's is NaN there too, the others equal eager's."""
    torch.manual_seed(0)
    lp = torch.randn(T, N, C, dtype=torch.float64).log_softmax(-1)
    targets, il, tl = _targets(0, "padded"), torch.tensor([9, 6, 2]), torch.tensor([3, 0, 4])
    _compare(lambda x: F.ctc_loss(x, targets, il, tl, reduction="none", zero_infinity=True), lp)
    xe, xc = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    fn = lambda x: F.ctc_loss(x, targets, il, tl, reduction="sum")  # noqa: E731
    want, got = fn(xe), aot_function(fn, nop)(xc)
    want.backward()
    got.backward()
    assert got.item() == want.item() == float("inf")
    torch.testing.assert_close(xc.grad[:, :2], xe.grad[:, :2], rtol=1e-11, atol=1e-12)
    assert xe.grad[:2, 2].isnan().all() and xc.grad[:2, 2].isnan().any()
    assert not xc.grad[2:, 2].isnan().any()  # past its input length: no gradient, as eager


def test_ctc_training_matches_eager():
    """A small acoustic model trained with ``nn.CTCLoss`` and Adam: three steps, as eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, C),
                                torch.nn.LogSoftmax(-1)).double()
    twin = copy.deepcopy(model)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    targets = _targets(0, "padded")
    il, tl = torch.tensor(INPUT_LENGTHS), torch.tensor(TARGET_LENGTHS)

    def train(m, f):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for step in range(3):
            x = torch.randn(T, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            ctc(f(x), targets, il, tl).backward()
            opt.step()
        return m.state_dict()
    want, got = train(model, model), train(twin, aot_module(twin, nop))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
