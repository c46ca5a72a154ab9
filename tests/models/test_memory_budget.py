"""rt.optimal(memory_budget=0.5) through aot_module on real models: the activations autograd really
keeps (measured with saved_tensors_hooks, parameters and inputs left out) are at most half the
default's, and outputs and gradients are unchanged."""
import pytest
import torch

import reftrace as rt
from benchmarks.partition_budget import MODELS, saved_activation_bytes
from reftrace.compile import aot_module, nop


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
