"""``nn.LSTM`` through reftrace: one ``lstm_layer`` composite per layer and direction (oneDNN's fused
layer and its backward on the torch backend in float32, as eager runs; the cell under ``lax.scan`` on
XLA), eager's values and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from reftrace.compile import aot_module, nop, xla_compile
from reftrace.torch_bridge.capture import capture_tree

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _compare(model: torch.nn.Module, x: torch.Tensor, hx: tuple | None, compiler) -> None:
    twin = copy.deepcopy(model)
    given = None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)
    want_y, (want_h, want_c) = model(x, hx)
    (want_y.sum() + (want_h * 2).sum() + (want_c * 3).sum()).backward()
    got_y, (got_h, got_c) = aot_module(twin, compiler)(x, given)
    (got_y.sum() + (got_h * 2).sum() + (got_c * 3).sum()).backward()
    tol = TOLERANCE[x.dtype]
    for got, want in [(got_y, want_y), (got_h, want_h), (got_c, want_c)]:
        torch.testing.assert_close(got, want, **tol)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=name)
    if hx is not None:
        for a, b in zip(given, hx):
            torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("options,batch_first,with_states", [
    ({}, False, False),
    ({"num_layers": 2}, True, True),
    ({"bidirectional": True}, True, False),
    ({"num_layers": 2, "bidirectional": True, "bias": False}, False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
def test_lstm_matches_eager(options, batch_first, with_states, dtype, compiler):
    torch.manual_seed(0)
    model = torch.nn.LSTM(3, 4, batch_first=batch_first, **options).to(dtype)
    x = torch.randn(2, 5, 3, dtype=dtype) if batch_first else torch.randn(5, 2, 3, dtype=dtype)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    hx = tuple(torch.randn(layers, 2, 4, dtype=dtype, requires_grad=True) for _ in range(2)) if with_states else None
    _compare(model, x, hx, compiler)


def test_a_long_sequence_is_one_equation_per_layer_and_direction():
    model = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    graph = capture_tree(model, torch.randn(300, 2, 3)).graph
    names = [e.primitive.name for e in graph.eqns]
    assert names.count("lstm_layer") == 4 and len(names) < 40


def test_unbatched_and_projected_lstms_match_eager():
    """An unbatched sequence goes through the rewrite; ``proj_size`` keeps ATen's own decomposition."""
    torch.manual_seed(0)
    _compare(torch.nn.LSTM(3, 4).double(), torch.randn(5, 3, dtype=torch.float64), None, nop)
    projected = torch.nn.LSTM(3, 4, proj_size=2).double()
    graph = capture_tree(projected, torch.randn(5, 2, 3, dtype=torch.float64)).graph
    assert "lstm_layer" not in [e.primitive.name for e in graph.eqns]
    _compare(projected, torch.randn(5, 2, 3, dtype=torch.float64), None, nop)


def test_lstm_training_matches_eager():
    """A two-layer LSTM with a linear head trained with Adam, float32 (oneDNN's kernels): three steps."""
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(5, 8, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = Tagger()
    twin = copy.deepcopy(model)

    def train(m, f):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for step in range(3):
            x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(step))
            y = torch.randint(0, 3, (4, 7), generator=torch.Generator().manual_seed(10 + step))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(f(x).reshape(-1, 3), y.reshape(-1)).backward()
            opt.step()
        return m.state_dict()
    want, got = train(model, model), train(twin, aot_module(twin, nop))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
