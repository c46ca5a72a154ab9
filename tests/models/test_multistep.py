"""Real models trained several steps with a real optimizer through ``aot_module``, against eager torch.

AdamW with weight decay is the demanding case: it turns any gradient that differs in kind from
eager's (a zero where eager has ``None``) into a parameter change, and it amplifies small
gradient errors over steps. Parameters, buffers and ``None``-ness of gradients must equal a
deepcopy trained eagerly, and the module's parameters must stay the same objects.
"""
from __future__ import annotations

import copy

import pytest
import torch

from reftrace.compile import aot_module, nop, xla_compile
from tests.models.zoo import CASES

STEPS = 3
# float64 with nop everywhere; xla on two models (its compiles dominate the time).
RUNS = [("resnet18", "nop"), ("gpt2_logits_loss", "nop"), ("bert", "nop"), ("transformer_encoder", "nop"),
        ("lstm", "nop"), ("upsampling_net", "xla"), ("gpt2_logits_loss", "xla")]


def _train(model, run, args, kwargs, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(run(*args, **kwargs)).backward()
        none = [n for n, p in model.named_parameters() if p.grad is None]
        opt.step()
    return none


@pytest.mark.slow
@pytest.mark.parametrize("name,compiler", RUNS)
def test_adamw_steps_match_eager(name, compiler):
    case = CASES[name]
    model, args, kwargs = case.base(torch.float64)
    got_model, want_model = copy.deepcopy(model), copy.deepcopy(model)
    ids = [id(p) for p in got_model.parameters()]
    run = aot_module(got_model, {"nop": nop, "xla": xla_compile}[compiler])
    got_none = _train(got_model, run, args, kwargs, case.loss_fn)
    want_none = _train(want_model, want_model, args, kwargs, case.loss_fn)
    assert got_none == want_none
    assert [id(p) for p in got_model.parameters()] == ids
    for (n, got), want in zip(got_model.state_dict().items(), want_model.state_dict().values()):
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert torch.equal(got, want), n
    assert len(run._compiled.cache) == 1  # three steps, one compile
