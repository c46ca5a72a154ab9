"""Which inputs eager torch's autograd graph links each output to, whatever the values.

An in-place overwrite (``y.zero_()``, ``y.fill_(3.0)``, ``y.copy_(c)``, ``y[:] = 0``) keeps ``y`` in
eager's autograd graph: the output still requires grad, and the inputs behind ``y`` get zero
gradients, not ``None``. Functionalization turns the overwrite into a fresh value that depends on
nothing, so the graph's own dependencies (``output_dependencies``) see neither. Capture runs the
function under autograd, on fake tensors; walking each output's ``grad_fn`` graph back to the
inputs recovers the links eager has.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def autograd_links(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[frozenset[int], ...]:
    """For each of ``outputs``, the indices of ``inputs`` its autograd graph reaches (empty where the
    output does not require grad). An input is reached at its own ``grad_fn`` (inputs made by a
    functionalization wrapper hang off one) or, for a leaf, at the ``AccumulateGrad`` node of it."""
    at_node: dict[Any, int] = {}
    at_leaf: dict[int, int] = {}
    for i, t in enumerate(inputs):
        if t.requires_grad:
            if t.grad_fn is not None:
                at_node[t.grad_fn] = i
            else:
                at_leaf[id(t)] = i
    masks: dict[Any, int] = {}  # holds each visited node, so its Python object (and identity) stays the same

    def own_bit(node: Any) -> int:
        if node in at_node:
            return 1 << at_node[node]
        variable = getattr(node, "variable", None)  # AccumulateGrad
        return 1 << at_leaf[id(variable)] if variable is not None and id(variable) in at_leaf else 0

    def mask_of(root: Any) -> int:
        stack = [(root, False)]
        while stack:  # iterative post-order: autograd graphs of unrolled models are deep
            node, children_done = stack.pop()
            if node in masks:
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if children_done or node in at_node:
                mask = own_bit(node)
                if node not in at_node:
                    for c in children:
                        mask |= masks[c]
                masks[node] = mask
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in masks)
        return masks[root]

    links = []
    for t in outputs:
        if not t.requires_grad:
            links.append(frozenset())
        elif t.grad_fn is None:
            links.append(frozenset([at_leaf[id(t)]]) if id(t) in at_leaf else frozenset())
        else:
            mask = mask_of(t.grad_fn)
            links.append(frozenset(i for i in range(len(inputs)) if mask >> i & 1))
    return tuple(links)
