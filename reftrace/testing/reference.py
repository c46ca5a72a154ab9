"""The float64 reference: a program's values, gradients and Hessian-vector products by reftrace.

reftrace captures the program (casts promoted, float64 inputs), differentiates it with its own
VJP rules (``rt.vjp``, twice for second order) and evaluates the graphs op by op with eager
torch in float64. It is independent of ``torch.autograd``: the oracle's second opinion is eager
torch itself. Each stage also records ``scale``, the largest magnitude among all intermediate
values, which sets the tolerance floor (``reftrace.testing.tolerance``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from reftrace.backends.torch import apply_torch
from reftrace.graph import Graph
from reftrace.interpreter import eval_graph
from reftrace.torch_bridge.capture import capture_flat
from reftrace.transforms.vjp import vjp
from reftrace.testing.program import Program


@dataclass(frozen=True)
class Stage:
    """Reference results of one stage and the magnitude scale of its intermediates."""

    values: tuple[torch.Tensor, ...]
    scale: float


@dataclass(frozen=True)
class Reference:
    """``outputs``; ``mutations`` (final values of the inputs the program writes to, by input
    index); ``grads`` (one per param, for the cotangents given); ``hvp`` (per param, or ``None``
    when not asked)."""

    outputs: Stage
    mutations: dict[int, torch.Tensor]
    grads: Stage | None
    hvp: Stage | None


class ReferenceGraphs:
    """The captured graph of a program at one set of shapes, and its first and second VJPs (built lazily)."""

    def __init__(self, program: Program, example: Sequence[torch.Tensor]) -> None:
        captured = capture_flat(lambda ts: program.reference_fn(*ts), [t.detach() for t in example])
        self.graph: Graph = captured.graph
        self.num_outputs = captured.num_outputs
        self.mutated_inputs = captured.mutated_inputs
        self.params = program.params
        self._joint: Graph | None = None
        self._double: Graph | None = None

    @property
    def joint(self) -> Graph:
        if self._joint is None:
            mutations = range(self.num_outputs, len(self.graph.outputs))
            self._joint = vjp(self.graph, wrt=self.params, nondiff_outputs=tuple(mutations))
        return self._joint

    @property
    def double(self) -> Graph:
        if self._double is None:
            self._double = vjp(self.joint, wrt=self.params, nondiff_outputs=tuple(range(len(self.graph.outputs))))
        return self._double

    def evaluate(self, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor] | None,
                 directions: Sequence[torch.Tensor] | None) -> Reference:
        """Values at ``inputs``; grads for ``cotangents`` (one per output) if given; HVPs along
        ``directions`` (one per param) if given as well."""
        primals = [t.detach().to(torch.float64) if t.is_floating_point() else t.detach() for t in inputs]
        values, scale = _evaluate(self.graph, primals)
        outputs = Stage(tuple(values[:self.num_outputs]), scale)
        mutations = dict(zip(self.mutated_inputs, values[self.num_outputs:]))
        grads = hvp = None
        if cotangents is not None and self.params:
            # an output eager does not differentiate (no cotangent) takes a zero one
            cts = [c.to(torch.float64) if c is not None else torch.zeros_like(v, dtype=torch.float64)
                   for c, v in zip(cotangents, values[:self.num_outputs])]
            joint_values, joint_scale = _evaluate(self.joint, primals + cts)
            grads = Stage(tuple(joint_values[len(self.graph.outputs):]), joint_scale)
            if directions is not None:
                vs = [v.to(torch.float64) for v in directions]
                double_values, double_scale = _evaluate(self.double, primals + cts + vs)
                hvp = Stage(tuple(double_values[len(self.joint.outputs):]), double_scale)
        return Reference(outputs, mutations, grads, hvp)


def _evaluate(graph: Graph, args: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Evaluate ``graph`` with eager torch, tracking the largest finite magnitude of any float value."""
    largest = [max((_magnitude(a) for a in args), default=0.0)]

    def apply(eqn: Any, operands: Sequence[Any]) -> Sequence[Any]:
        outs = apply_torch(eqn.primitive, operands, eqn.params)
        largest[0] = max(largest[0], *(_magnitude(o) for o in outs))
        return outs

    values = eval_graph(graph, list(args), apply)
    return [torch.as_tensor(v) for v in values], largest[0]


def _magnitude(x: Any) -> float:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return 0.0
    finite = x.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return float(finite.max())
