"""rt.optimal(memory_budget=0.5) through aot_module on real models: the activations autograd really
keeps (measured with saved_tensors_hooks, parameters and inputs left out) are at most half the
default's, and outputs and gradients are unchanged."""
import copy
import re

import pytest
import torch

import reftrace as rt
from benchmarks.partition_budget import MODELS, saved_activation_bytes
from reftrace.compile import aot_function, aot_module, nop


def step_bytes_and_results(model, x, policy):
    compiled = aot_module(model, fw_compiler=nop, bw_compiler=nop, partition_fn=policy)
    model.zero_grad(set_to_none=True)
    compiled(x).sum().backward()          # compile outside the hooks
    model.zero_grad(set_to_none=True)
    out = []
    saved = saved_activation_bytes(lambda: out.append(compiled(x)) or out[0].sum().backward(),
                                   [*model.parameters(), *model.buffers(), x])
    return saved, [out[0].detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_half_the_default_activation_memory_with_the_same_gradients(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    default_bytes, want = step_bytes_and_results(model, x, "default")
    budget_bytes, got = step_bytes_and_results(model, x, rt.optimal(memory_budget=0.5))
    assert 0 < budget_bytes <= default_bytes / 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_recomputed_batch_norm_reads_no_running_statistics():
    """The backward recomputes a train-mode batch norm without its running statistics (which the
    forward overwrites), so no copy of them is kept and a zero budget is feasible; the step matches
    eager, statistics included."""
    torch.manual_seed(0)
    channels = 8
    model = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
                                torch.nn.Conv2d(channels, 2, 1)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    eager = copy.deepcopy(model)
    eager(x).sum().backward()
    graphs = []
    compiled = aot_module(model, nop, lambda gm, _: graphs.append(gm) or gm, partition_fn=rt.optimal(0))
    compiled(x).sum().backward()
    recomputed = re.search(r"aten\.native_batch_norm\((.*)\)", graphs[0].code)  # the forward op, not its backward
    assert recomputed, "the budget forces the backward to recompute the batch norm"
    assert ", None, None, True," in recomputed.group(1), "recomputed without running statistics"
    for a, b in zip([*model.parameters(), *model.buffers()], [*eager.parameters(), *eager.buffers()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    kept = saved_activation_bytes(lambda: compiled(x).sum().backward(), [*model.parameters(), x])
    assert kept == 0, "nothing but the input and parameters is saved: no copy of the running statistics"


def test_an_infeasible_budget_names_the_overwritten_input_it_pays_for():
    """An input the function overwrites after reading it: the backward needs its old value, so the
    smallest budget is one copy of it, the message says so, and at that budget the gradient is
    eager's and the input is updated once."""
    def f(x, w):
        y = (x * w).sin()
        x.add_(1)
        return y

    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(rt.PartitionError, match=r"smallest feasible budget is 32 bytes. It pays for inputs the "
                                                r"function overwrites in place \(1 value, 32 bytes\)"):
        aot_function(f, nop, nop, partition_fn=rt.optimal(0))(torch.randn(4, dtype=torch.float64), w)
    x = torch.randn(4, dtype=torch.float64)
    before = x.clone()
    aot_function(f, nop, nop, partition_fn=rt.optimal(32))(x, w).sum().backward()
    torch.testing.assert_close(w.grad, (before * w).cos().detach() * before, rtol=1e-14, atol=0)
    torch.testing.assert_close(x, before + 1, rtol=0, atol=0)
