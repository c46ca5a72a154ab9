"""Graph names (``input_names`` / ``output_names``): not part of ``==``, carried by every transform,
set by the torch bridge, and read by ``vjp``'s defaults so a traced module differentiates as
``loss.backward()`` does."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import reftrace as rt
import reftrace.numpy as rnp


def _named_graph() -> rt.Graph:
    g = rt.trace(lambda x, y: (rnp.cos(x) * y, rnp.sin(y)), np.ones(3), np.ones(3))
    return g.named(["x", "y"], ["prod", "s"])


def test_names_do_not_take_part_in_equality_and_are_validated():
    g = _named_graph()
    plain = g.named()  # same names
    assert g == plain and hash(g) == hash(rt.trace(lambda x, y: (rnp.cos(x) * y, rnp.sin(y)), np.ones(3), np.ones(3)))
    assert g.named(["a", "b"]) == g and g.named(["a", "b"]).input_names == ("a", "b")
    with pytest.raises(rt.GraphError, match="input_names must be 2 strings"):
        g.named(["x"])
    assert g.replace(eqns=g.eqns).input_names == ("x", "y")
    assert g.replace(outputs=g.outputs[:1]).output_names is None  # new outputs: names dropped


def test_transforms_carry_names():
    g = _named_graph()
    j = rt.vjp(g)
    assert j.input_names == ("x", "y", "ct(prod)", "ct(s)")
    assert j.output_names == ("prod", "s", "grad(x)", "grad(y)")
    assert rt.simplify(j).output_names == j.output_names
    assert rt.decompose(j).input_names == j.input_names
    t = rt.jvp(g, wrt=[1])
    assert t.input_names == ("x", "y", "tangent(y)")
    assert t.output_names == ("prod", "s", "tangent(prod)", "tangent(s)")
    p = rt.partition(j, policy="mincut")
    k = p.num_saved
    assert p.forward.input_names == ("x", "y") and p.forward.output_names[:2] == ("prod", "s")
    assert p.backward.input_names[k:] == ("ct(prod)", "ct(s)")
    assert p.backward.output_names == ("grad(x)", "grad(y)")
    saved_names = p.forward.output_names[2:]
    assert saved_names == p.backward.input_names[:k]
    for v, name in zip(p.saved, saved_names):  # a saved input keeps its name, an activation is saved[k]
        assert name in ("x", "y") if v in p.forward.inputs else name.startswith("saved[")
    assert p.saved_input_bytes + p.saved_activation_bytes == p.saved_bytes
    assert p.saved_input_bytes == sum(v.nbytes for v in p.saved if v in p.forward.inputs)


def test_names_are_printed_and_parsed_back():
    j = rt.vjp(_named_graph())
    text = str(j)
    assert '# input_names: ["x", "y", "ct(prod)", "ct(s)"]' in text
    back = rt.parse(text)
    assert back == j and back.input_names == j.input_names and back.output_names == j.output_names


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x, *, scale=1.0):
        return self.fc(self.bn(self.conv(x)).mean((2, 3))) * scale


def test_traced_module_names_and_vjp_defaults_match_loss_backward():
    """No wrt / nondiff_outputs: buffers get no gradient, running-statistic updates take no
    cotangent, and the gradients are eager's."""
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 3, 8, 8)
    eager = copy.deepcopy(net)
    g = rt.trace(net, x, scale=2.0)
    params = [name for name, _ in net.named_parameters()]
    assert list(g.input_names[:len(params)]) == params
    assert g.input_names[len(params):] == ("buffer(bn.running_mean)", "buffer(bn.running_var)",
                                          "buffer(bn.num_batches_tracked)", "args[0]")
    assert g.output_names == ("out", "update(bn.running_mean)", "update(bn.running_var)",
                              "update(bn.num_batches_tracked)")
    j = rt.vjp(g)
    assert j.input_names[len(g.inputs):] == ("ct(out)",)
    assert j.output_names[len(g.outputs):] == tuple(f"grad({n})" for n in params) + ("grad(args[0])",)

    ct = torch.randn(2, 2)
    (eager(x, scale=2.0) * ct).sum().backward()
    state = [t.detach() for t in net.parameters()] + list(net.buffers())
    outs = rt.lower(j, "torch")(*state, x, ct)
    grads = dict(zip(j.output_names[len(g.outputs):], outs[len(g.outputs):]))
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[f"grad({name})"], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(outs[1], eager.bn.running_mean)


def test_tensor_keyword_arguments_are_named():
    class Shifted(torch.nn.Module):
        def forward(self, x, *, shift):
            return x + shift[0] * shift[1]

    g = rt.trace(Shifted(), torch.randn(3), shift=(torch.randn(3), torch.randn(3)))
    assert g.input_names == ("args[0]", "kwargs['shift'][0]", "kwargs['shift'][1]")
