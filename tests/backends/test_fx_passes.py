"""``compute_in_place``, the pass the torch bridge applies to a module that runs as it is:
elementwise arithmetic writes into a fresh operand, with the values bit for bit (checked
against ``eval_torch``, which runs every rule eagerly on fresh tensors)."""
from __future__ import annotations

import operator
import re

import numpy as np
import torch
from torch import fx

import reftrace as rt
import reftrace.numpy as rnp
from reftrace.backends.torch import eval_torch, to_fx
from reftrace.backends.torch_fx_passes import _is_fresh, compute_in_place


def run_both(graph, *args):
    gm = to_fx(graph)
    assert ".add_(" not in gm.code, "to_fx itself stays functional"
    compute_in_place(gm)
    fast = gm(*[torch.as_tensor(a) for a in args])
    eager = eval_torch(graph, *args)
    for a, b in zip(fast, eager, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return gm.code


def test_a_residual_streams_cotangents_compute_in_place():
    """Each block's gradient adds into the stream's: ``add_`` on the fresh product, as eager."""
    x, w = np.random.default_rng(0).standard_normal((2, 8, 8)).astype(np.float32)

    def f(x, w):
        for _ in range(3):
            x = x + rnp.tanh(x @ w)
        return rnp.sum(x * x)
    _, backward = rt.partition(rt.vjp(rt.trace(f, x, w)), "default")
    args = [np.random.default_rng(k).standard_normal(v.shape).astype(v.dtype) for k, v in enumerate(backward.inputs)]
    code = run_both(backward, *args)
    assert ".add_(" in code


def test_inputs_views_and_values_read_again_are_not_written():
    def f(x, y):
        s = x + y                    # x and y: inputs; s: read twice (a view of it, a product)
        t = rnp.transpose(s) + y.T   # two views
        u = s * 2.0                  # read twice: by v and by v + u
        v = u + y                    # fresh and read once: v + u accumulates into v
        return t, v + u, (x * y) + rnp.ones((3,), np.float32)  # the product: fresh, read once
    x, y = np.ones((3, 3), np.float32), np.full((3, 3), 2.0, np.float32)
    code = run_both(rt.trace(f, x, y), x, y)
    written = re.findall(r"(\w+)\.add_\(", code)
    assert sorted(written) == ["add_2", "mul_1"], code   # v (add_2) and x * y (mul_1), nothing else


def test_views_from_aten_tuples_are_not_fresh():
    g = fx.Graph()
    x = g.placeholder("x")
    for op, fresh in [(torch.ops.aten.split, False), (torch.ops.aten.unbind, False), (torch.ops.aten.chunk, False),
                      (torch.ops.aten.native_layer_norm_backward, True), (torch.ops.aten.sort, True)]:
        element = g.call_function(operator.getitem, (g.call_function(op, (x,)), 0))
        assert _is_fresh(element) == fresh, op
    call = g.call_function(torch.ops.aten.sort, (x,))
    first, again = (g.call_function(operator.getitem, (call, 0)) for _ in range(2))
    assert not _is_fresh(first), "the same element read twice"


def test_the_bridge_accumulates_in_place_only_for_modules_run_as_they_are():
    """``nop`` runs the backward module itself: its sums accumulate in place. A compiler that
    returns something else (a boxed wrapper, TorchScript, inductor) gets the functional graph."""
    from reftrace.compile import aot_function, make_boxed_compiler, nop
    seen = {}

    def keep(name, compiler):
        def compile_(gm, example_inputs):
            seen[name] = gm
            return compiler(gm, example_inputs)
        return compile_

    def f(x, w):
        for _ in range(2):
            x = x + torch.tanh(x @ w)
        return (x * x).sum()
    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    for name, compiler in (("nop", nop), ("boxed", make_boxed_compiler(nop))):
        aot_function(f, nop, keep(name, compiler))(x, w).backward()
    assert ".add_(" in seen["nop"].code and ".add_(" not in seen["boxed"].code


def test_a_memory_bound_chain_reuses_its_buffers():
    """cos's backward recomputed (min-cut), ``-sin(x) * ct``: the negation writes into ``sin(x)``
    and the products into the running cotangent, one buffer per step instead of three."""
    x = np.random.default_rng(2).standard_normal(64).astype(np.float32)

    def f(x):
        for _ in range(3):
            x = rnp.cos(x)
        return rnp.sum(x)
    _, backward = rt.partition(rt.vjp(rt.trace(f, x)), "mincut")
    args = [np.random.default_rng(k).standard_normal(v.shape).astype(v.dtype) for k, v in enumerate(backward.inputs)]
    code = run_both(backward, *args)
    assert code.count(".neg_(") == 3 and code.count(".mul_(") == 3


def test_only_the_first_operand_of_sub_and_div_is_written():
    def f(x, y):
        return (x * 2.0) - (y * 3.0), (x * 2.0) / (y * 3.0), -(x * y)
    x, y = np.full((4,), 3.0, np.float32), np.full((4,), 5.0, np.float32)
    code = run_both(rt.trace(f, x, y), x, y)
    assert ".sub_(" in code and ".div_(" in code and ".neg_(" in code


def test_a_fresh_operand_added_to_itself_and_out_arguments():
    """``m + m`` (one product read twice by one add) doubles in place correctly; a call writing into
    an ``out=`` tensor does not make fresh memory."""
    def f(x):
        m = x * 2.0
        return m + m
    x = np.arange(4, dtype=np.float32)
    assert ".add_(" in run_both(rt.trace(f, x), x)
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    assert not _is_fresh(g.call_function(torch.add, (a, b), {"out": a}))
    assert _is_fresh(g.call_function(torch.add, (a, b)))


def test_a_sum_of_thousands_of_terms_is_written_in_place_without_recursion():
    """Each add writes into the previous one's result: a chain longer than Python's recursion
    limit (it used to raise RecursionError at compile time)."""
    xs = [np.full((3,), float(k), np.float32) for k in range(1500)]

    def f(*xs):
        s = xs[0] * 1.0
        for x in xs[1:]:
            s = s + x * 2.0
        return s
    code = run_both(rt.trace(f, *xs), *xs)
    assert code.count(".add_(") == len(xs) - 1
