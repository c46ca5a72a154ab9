"""Peephole passes on the FX code ``to_fx`` emits, so it runs as eager's autograd would. Each
keeps every value bit for bit (the tests compare with the rules run eagerly):

- ``transpose_products``: ``(a @ b).T`` as ``bᵀ @ aᵀ`` (a weight gradient written contiguous);
- ``merge_convolution_backwards``: a convolution's two gradient calls as one;
- ``compute_in_place``: elementwise arithmetic into a fresh operand (not functional: only for a
  module that runs as it is).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from reftrace.backends.torch_rules import AVAL_META

__all__ = ["transpose_products", "merge_convolution_backwards", "compute_in_place"]


def _is_swap(node: fx.Node, matrix: bool = False) -> bool:
    """A view swapping a matrix's two axes: ``x.permute([1, 0])`` or ``x.transpose(-1, -2)`` of a matrix
    (``matrix``: the node is known to be one, as an operand of a matrix product is)."""
    if node.op != "call_method":
        return False
    aval = node.meta.get(AVAL_META)
    if not matrix and (aval is None or aval.ndim != 2):
        return False
    return ((node.target == "permute" and list(node.args[1]) == [1, 0])
            or (node.target == "transpose" and tuple(node.args[1:]) in ((-1, -2), (0, 1), (1, 0))))


def transpose_products(fx_graph: fx.Graph) -> None:
    """``(a @ b).T`` becomes ``bᵀ @ aᵀ`` when the product has no other use: the same values, written in
    the transposed layout directly. A Linear layer's weight gradient comes out of a VJP as the
    transpose of a product; as a transposed view it is not contiguous, and torch's AccumulateGrad
    copies such a gradient into the parameter's layout on every step (eager's ``mm`` writes it
    contiguous). Transposes of transposes cancel."""
    for node in list(fx_graph.nodes):
        product = node.args[0] if _is_swap(node) else None
        if (product is None or product.op != "call_function" or product.target is not torch.matmul
                or len(product.users) != 1 or product.meta[AVAL_META].ndim != 2):
            continue
        operands = product.args
        with fx_graph.inserting_before(node):
            lhs, rhs = (_swapped(fx_graph, operand) for operand in reversed(operands))
            swapped = fx_graph.call_function(torch.matmul, (lhs, rhs))
        swapped.meta[AVAL_META] = node.meta[AVAL_META]
        node.replace_all_uses_with(swapped)
        fx_graph.erase_node(node)
        fx_graph.erase_node(product)
        for operand in operands:
            if not operand.users and operand.op == "call_method":
                fx_graph.erase_node(operand)


def merge_convolution_backwards(fx_graph: fx.Graph) -> None:
    """A convolution's input and weight gradients, two ``aten.convolution_backward`` calls on one
    cotangent (each computing one gradient, with a shape-only stand-in for the other operand),
    become one call computing both, as eager's autograd runs it: the backend prepares the
    cotangent and the operands once (mkldnn reorders them), and the values are the same."""
    conv_backward = torch.ops.aten.convolution_backward
    position = {node: i for i, node in enumerate(fx_graph.nodes)}
    waiting: dict[Any, list[fx.Node]] = {}  # (cotangent, params, computed gradient) -> unpaired calls
    for node in list(fx_graph.nodes):
        if node.op != "call_function" or node.target is not conv_backward or len(node.args) != 11:
            continue
        which = {(True, False, False): 0, (False, True, False): 1}.get(tuple(node.args[10]))
        if which is None:
            continue
        params = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in node.args[3:10])
        partners = waiting.get((node.args[0], params, 1 - which), [])
        for other in partners:
            input_grad, weight_grad = (node, other) if which == 0 else (other, node)
            if _mergeable(input_grad, weight_grad, position):
                partners.remove(other)
                break
        else:
            waiting.setdefault((node.args[0], params, which), []).append(node)
            continue
        first = min(input_grad, weight_grad, key=position.__getitem__)
        x, w = weight_grad.args[1], input_grad.args[2]
        with fx_graph.inserting_before(first):
            both = fx_graph.call_function(conv_backward, (node.args[0], x, w, *node.args[3:10], [True, True, False]))
        stand_ins = (input_grad.args[1], weight_grad.args[2])
        for call in (input_grad, weight_grad):
            call.replace_all_uses_with(both)
            fx_graph.erase_node(call)
        for stand_in in stand_ins:
            if isinstance(stand_in, fx.Node) and not stand_in.users:
                fx_graph.erase_node(stand_in)


def _mergeable(input_grad: fx.Node, weight_grad: fx.Node, position: dict[fx.Node, int]) -> bool:
    """Whether one call can compute both gradients: the real operands (the weight grad's input, the
    input grad's weight) exist before either call, and each has its stand-in's shape. Summed
    convolution outputs share a cotangent, so the two calls may come from different
    convolutions; that is still right, since an input gradient reads only the weight and the
    input's shape, and a weight gradient only the input and the weight's shape."""
    x, w = weight_grad.args[1], input_grad.args[2]
    shapes = (_stand_in_shape(input_grad.args[1]), _shape(x), _stand_in_shape(weight_grad.args[2]), _shape(w))
    first = min(position[input_grad], position[weight_grad])
    return (None not in shapes and shapes[0] == shapes[1] and shapes[2] == shapes[3]
            and all(position[a] < first for a in (x, w)))


def compute_in_place(gm: fx.GraphModule) -> None:
    """Rewrite ``gm`` so that elementwise arithmetic writes into a fresh operand: ``torch.add(a, b)``
    becomes ``a.add_(b)`` (and ``mul``, ``sub``, ``div``, ``neg`` alike) where ``a`` is a fresh
    tensor (made by an elementwise op, a matmul or an ATen op that returns new memory, never a
    view) read by nothing else, with the result's shape and dtype. The result reuses ``a``'s
    memory instead of allocating, as eager's autograd does when it accumulates gradients (a
    residual stream's cotangents) and as a memory-bound chain needs (a recomputed ``cos``
    backward, ``-sin(x) * ct`` per step, allocates once per step instead of three times). Same
    values: the same kernels on the same operands (``add`` and ``mul`` commute exactly). The
    module is no longer functional, so this is for a module that runs as it is (the torch bridge
    applies it when the compiler returns the module itself, as ``nop`` does); compilers and
    torch's partitioners get functional graphs."""
    fx_graph = gm.graph
    written: set[fx.Node] = set()  # in-place results: fresh, as the tensors they wrote into
    for node in list(fx_graph.nodes):
        if node.op != "call_function" or node.target not in _IN_PLACE or node.kwargs:
            continue
        method, commutes = _IN_PLACE[node.target]
        operands = list(node.args)
        out = node.meta.get(AVAL_META)
        orders = [operands, operands[::-1]] if commutes and len(operands) == 2 else [operands]
        for a, *rest in orders:
            aval = a.meta.get(AVAL_META) if isinstance(a, fx.Node) else None
            if aval is None or out is None or (aval.shape, aval.dtype) != (out.shape, out.dtype):
                continue
            if len(a.users) != 1 or not (a in written or _is_fresh(a)):
                continue
            with fx_graph.inserting_before(node):
                result = fx_graph.call_method(method, (a, *rest))
            result.meta[AVAL_META] = out
            written.add(result)
            node.replace_all_uses_with(result)
            fx_graph.erase_node(node)
            break
    gm.recompile()


# op -> (its in-place method, whether its two operands commute)
_IN_PLACE = {torch.add: ("add_", True), torch.mul: ("mul_", True), torch.sub: ("sub_", False),
             torch.div: ("div_", False), torch.neg: ("neg_", False)}

_FRESH_RESULTS = frozenset({torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.matmul, torch.sin,
                            torch.cos, torch.exp, torch.log, torch.tanh, torch.sigmoid, torch.sqrt, torch.rsqrt,
                            torch.abs, torch.relu, torch.where, torch.pow, torch.square, torch.reciprocal})


def _is_fresh(node: fx.Node) -> bool:
    """Whether ``node``'s tensor is memory nothing else refers to: the result of an elementwise op
    or a matmul, or an element of an ATen op's tuple whose schema returns no aliases (not
    ``split``'s views). (``compute_in_place`` also counts its own in-place results.)"""
    if node.op != "call_function":
        return False
    if node.target in _FRESH_RESULTS:
        return "out" not in node.kwargs
    source = node.args[0] if node.target is operator.getitem else None
    if not (isinstance(source, fx.Node) and source.op == "call_function"):
        return False
    if any(u.target is not operator.getitem or (u is not node and u.args[1] == node.args[1]) for u in source.users):
        return False  # the tuple, or this element, is read some other way too
    op = source.target
    overloads = ([getattr(op, name) for name in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket)
                 else [op] if isinstance(op, torch._ops.OpOverload) else [])
    functional = [o for o in overloads if not o._schema.is_mutable]  # not the out= variants
    return bool(functional) and all(r.alias_info is None for o in functional for r in o._schema.returns)


def _shape(node: Any) -> tuple[int, ...] | None:
    aval = node.meta.get(AVAL_META) if isinstance(node, fx.Node) else None
    return None if aval is None else tuple(aval.shape)


def _stand_in_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a ``x.new_empty(shape)`` node (a convolution rule's shape-only operand)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "new_empty":
        return tuple(node.args[1])
    return None


def _swapped(fx_graph: fx.Graph, matrix: fx.Node) -> fx.Node:
    return matrix.args[0] if _is_swap(matrix, matrix=True) else fx_graph.call_method("transpose", (matrix, -1, -2))
