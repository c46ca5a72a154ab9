"""``to_fx``'s fast emitter against stock fx tracing.

``to_fx`` records the rules' torch calls through a trimmed tracer and a torch function
mode that creates nodes itself. Swapping in fx's stock ``GraphAppendingTracer`` and a mode
that hands proxy calls to ``fx.Proxy.__torch_function__`` builds the module the plain fx
way; both must give the same nodes (names, targets, arguments, users, avals) and code.
The avals ``to_fx`` attaches (read off the graph, not recomputed) are checked against
the shapes and dtypes the module computes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.overrides import TorchFunctionMode

import reftrace as rt
import reftrace.backends.torch as torch_backend
from reftrace.backends.torch import to_fx
from reftrace.backends.torch_dtypes import numpy_dtype, torch_dtype
from reftrace.backends.torch_rules import AVAL_META
from reftrace.graph import Graph
from tests.backends.test_backends import rng
from tests.backends.test_lowering import _mixed_args, every_primitive_program, mixed_program


class _StockRecord(TorchFunctionMode):
    """Factories become nodes through the stock tracer; calls on proxies go to ``fx.Proxy``."""

    def __init__(self, tracer: fx.proxy.TracerBase, device: str | None) -> None:
        super().__init__()
        self.tracer = tracer
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch_backend._has_proxy((args, kwargs)):
            return func(*args, **kwargs)
        if self.device is not None and func in torch_backend._FACTORIES:
            kwargs = {**kwargs, "device": self.device}
        return self.tracer.create_proxy("call_function", func, args, kwargs)


def stock_to_fx(graph: Graph, **kwargs: Any) -> fx.GraphModule:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "_Tracer", fx.proxy.GraphAppendingTracer)
        mp.setattr(torch_backend, "_RecordTorchCalls", _StockRecord)
        return to_fx(graph, **kwargs)


def nodes(gm: fx.GraphModule) -> list[tuple]:
    return [(n.name, n.op, n.target, repr(n.args), repr(n.kwargs), [u.name for u in n.users], n.meta.get(AVAL_META))
            for n in gm.graph.nodes]


def assert_same_as_stock(graph: Graph, **kwargs: Any) -> fx.GraphModule:
    fast, stock = to_fx(graph, **kwargs), stock_to_fx(graph, **kwargs)
    fast.graph.lint()
    assert nodes(fast) == nodes(stock)
    assert fast.code == stock.code
    assert dict(fast.named_buffers()).keys() == dict(stock.named_buffers()).keys()
    return fast


def assert_avals_are_computed_ones(gm: fx.GraphModule, args: list[torch.Tensor]) -> None:
    ShapeProp(gm).propagate(*args)
    checked = 0
    for n in gm.graph.nodes:
        computed = n.meta.get("tensor_meta")
        if AVAL_META in n.meta and isinstance(computed, TensorMetadata):
            aval = n.meta[AVAL_META]
            assert (tuple(computed.shape), numpy_dtype(computed.dtype)) == (aval.shape, aval.dtype), n.name
            checked += 1
    assert checked >= len(gm.reftrace_graph.eqns) // 2


def _every_primitive_args() -> tuple:
    r = rng(24)
    return (r.uniform(0.1, 0.9, (4, 6)), r.uniform(0.1, 0.9, (4, 6)), r.random((4, 6)) < 0.5,
            np.stack([r.permutation(6)[:3] for _ in range(4)]), np.array([5, 6], np.uint32))


@pytest.mark.parametrize("device", [None, "meta"])
def test_every_primitive_matches_stock_fx(device):
    args = _every_primitive_args()
    gm = assert_same_as_stock(rt.trace(every_primitive_program, *args), device=device)
    if device is None:
        assert_avals_are_computed_ones(gm, [torch.from_numpy(a) for a in args])


def test_mixed_program_matches_stock_fx():
    args = _mixed_args()
    g = rt.trace(mixed_program, *args)
    assert_avals_are_computed_ones(assert_same_as_stock(g), [torch.from_numpy(a) for a in args])
    assert_same_as_stock(g, device="meta", output_as_list=True, input_names=["x", "w", "idx", "key"])


def _joint_partition(model: torch.nn.Module, args: tuple) -> tuple[Graph, Graph]:
    from reftrace.torch_bridge.capture import capture_flat
    from reftrace.torch_bridge.modules import module_state
    from reftrace.transforms.partition import partition
    from reftrace.transforms.vjp import vjp

    state = module_state(model)
    n = len(state.names)
    tensors = list(state.tensors) + list(args)
    cap = capture_flat(lambda ts: torch.func.functional_call(model, dict(zip(state.names, ts[:n])), tuple(ts[n:])),
                       tensors)
    wrt = [i for i, t in enumerate(tensors) if t.requires_grad]
    p = partition(vjp(cap.graph, wrt=wrt, nondiff_outputs=range(cap.num_outputs, len(cap.graph.outputs))),
                  "default")
    return p.forward, p.backward


def test_conv_net_training_graphs_match_stock_fx():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Softmax(-1)).train()
    forward, backward = _joint_partition(model, (torch.randn(2, 3, 8, 8),))
    for g in (forward, backward):
        gm = assert_same_as_stock(g, device="meta")
        assert_avals_are_computed_ones(gm, [torch.empty(v.shape, dtype=torch_dtype(v.dtype), device="meta")
                                            for v in g.inputs])
