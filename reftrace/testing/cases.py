"""A program at concrete inputs: valid inputs, eager's results, and the float64 reference.

``make_case`` draws inputs, runs eager at the program's dtype and in float64 (casts promoted),
rejects the inputs where a comparison would not be meaningful, and evaluates the reference.
Rejected are inputs where

- a guarded line (``reftrace.testing.guards``) comes within ``max(1e-4, 100 * d, 10 * floor)``
  of a kink, ``d`` being how far eager's own rounding moved the guarded quantity and ``floor``
  the tolerance floor: a correct compiler may land on either side of a kink closer than that;
- any intermediate value, gradient or Hessian-vector product is non-finite or above 1e30
  (overflow is where float32 kernels legitimately differ);
- eager raises (an invalid program, e.g. an in-place write to a value autograd saved).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from reftrace.errors import ReftraceError
import reftrace.testing.guards as guards
from reftrace.testing.program import INDEX, PARAM, Op, Program
from reftrace.testing.reference import Reference, ReferenceGraphs, Stage
from reftrace.testing.tolerance import FLOOR, error

_LARGEST = 1e30
SECOND_CALL_SEED = 7919      # offsets from a check's seed for the second call's and the new shape's inputs
NEW_SHAPE_SEED = 104729


class Rejected(Exception):
    """These inputs make no meaningful comparison (see the module docstring)."""


@dataclass
class Run:
    """What one call of a function left behind: outputs, its inputs after the call, grads, HVPs."""

    outputs: tuple[Any, ...]
    inputs: list[torch.Tensor]
    grads: list[torch.Tensor | None] | None = None
    hvp: list[torch.Tensor | None] | None = None


@dataclass
class Case:
    """One comparison point: pristine ``inputs``, eager's ``eager`` run at that dtype, ``ref``."""

    program: Program
    inputs: list[torch.Tensor]
    inputs64: list[torch.Tensor]
    cotangents: list[torch.Tensor | None]
    directions: list[torch.Tensor]
    eager: Run
    ref: Reference
    notes: list[str] = field(default_factory=list)

    def fresh_inputs(self) -> list[torch.Tensor]:
        """Copies of the inputs (params require grad), so a call can mutate its own."""
        return [t.detach().clone().requires_grad_(t.requires_grad) for t in self.inputs]


def clone_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]


def as_tuple(out: Any) -> tuple[Any, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def gradients(outputs: Sequence[Any], params: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
              create_graph: bool = False) -> list[torch.Tensor | None]:
    """``torch.autograd.grad`` of the outputs that carry a cotangent and require grad (None: unreached)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents)
             if c is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not pairs or not params:
        return [None] * len(params)
    return list(torch.autograd.grad([o for o, _ in pairs], list(params), [c for _, c in pairs],
                                    allow_unused=True, create_graph=create_graph))


def hessian_vector_products(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor],
                            directions: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """``d/dparams <directions, grads>``: what ``create_graph=True`` grads must support."""
    terms = [(g * v).sum() for g, v in zip(grads, directions) if g is not None and g.requires_grad]
    if not terms or not params:
        return [None] * len(params)
    return list(torch.autograd.grad(sum(terms), list(params), allow_unused=True))


def call_and_differentiate(fn: Callable[..., Any], inputs: list[torch.Tensor], params: Sequence[int],
                           cotangents: Sequence[torch.Tensor | None]) -> Run:
    """Call ``fn`` on ``inputs`` (mutated in place as ``fn`` does), then take first-order grads."""
    outputs = as_tuple(fn(*inputs))
    grads = gradients(outputs, [inputs[i] for i in params], cotangents)
    return Run(outputs, inputs, grads)


def make_case(program: Program, seed: int, *, new_shapes: bool = False, second_order: bool = True,
              graphs: ReferenceGraphs | None = None) -> tuple[Case, ReferenceGraphs | None]:
    """The case at ``seed`` (raises Rejected); also returns the reference graphs, to reuse at these shapes."""
    params = program.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = program.make_inputs(seed, new_shapes=new_shapes)
        inputs64 = program.make_inputs(seed, new_shapes=new_shapes, dtype=torch.float64)
        scale64 = [0.0]
        eager, guard_values, cotangents, directions = _eager_run(program, clone_inputs(inputs), params, seed, None,
                                                                 second_order, promote=False)
        eager64, guard64, _, _ = _eager_run(program, clone_inputs(inputs64), params, seed, (cotangents, directions),
                                            second_order, promote=True, scale=scale64)
    _check_guards(program, guard_values, guard64, scale64[0], inputs[0].dtype if inputs else torch.float32)
    notes: list[str] = []
    try:
        graphs = graphs or ReferenceGraphs(program, inputs64)
        ref = graphs.evaluate(inputs64, cotangents if params else None,
                              directions if second_order and eager.hvp is not None else None)
    except ReftraceError as err:
        notes.append(f"reference: reftrace could not differentiate this program ({type(err).__name__}: {err}); "
                     "eager float64 stands in")
        graphs, ref = None, _eager_reference(program, eager64, inputs64, scale64[0])
    notes.extend(_second_opinion(ref, eager64, program))
    return Case(program, inputs, inputs64, cotangents, directions, eager, ref, notes), graphs


def _eager_run(program: Program, inputs: list[torch.Tensor], params: Sequence[int], seed: int,
               given: tuple[list, list] | None, second_order: bool, *, promote: bool,
               scale: list[float] | None = None) -> tuple[Run, dict[int, torch.Tensor], list, list]:
    """Run eagerly line by line, evaluating guards and watching every value for overflow; then
    differentiate along ``given`` (cotangents, directions), or along ones drawn from ``seed``."""
    guard_values: dict[int, torch.Tensor] = {}
    line = [0]

    def on_line(op: Op, env: dict[str, Any]) -> None:
        value = env[op.target]
        _check_finite(value, f"line {op.target} = {op.expr}")
        if scale is not None and value.numel():
            scale[0] = max(scale[0], float(value.detach().abs().max()))
        if op.guard is not None:
            guard_values[line[0]] = eval(op.guard, {"G": guards, "torch": torch}, env).to(torch.float64)
        line[0] += 1

    try:
        outputs = program.run_lines(inputs, on_line, promote=promote)
        run = Run(outputs, inputs)
        param_tensors = [inputs[i] for i in params]
        if given is None:
            cotangents = _cotangents(outputs, seed)
            directions = [_normal(t, seed + 17 + k) for k, t in enumerate(param_tensors)]
        else:
            cotangents = [c.to(torch.float64) if c is not None and promote else c for c in given[0]]
            directions = [v.to(torch.float64) if promote else v for v in given[1]]
        run.grads = gradients(outputs, param_tensors, cotangents, create_graph=second_order)
        for g in run.grads:
            _check_finite(g, "a gradient")
        if second_order:
            try:
                run.hvp = hessian_vector_products(run.grads, param_tensors, directions)
            except RuntimeError:
                run.hvp = None      # eager has no double backward here: second order is not checked
            for h in run.hvp or ():
                _check_finite(h, "a Hessian-vector product")
        run.grads = [g.detach() if g is not None else None for g in run.grads]
    except Rejected:
        raise
    except Exception as err:
        raise Rejected(f"eager raises {type(err).__name__}: {err}") from None
    for x, t in zip(program.inputs, inputs):
        if x.kind not in (PARAM, INDEX):
            _check_finite(t, f"input {x.name} after the call")
    if given is not None:
        cotangents, directions = list(given[0]), list(given[1])
    return run, guard_values, cotangents, directions


def _check_finite(value: Any, what: str) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        v = value.detach()
        if not bool(torch.isfinite(v).all()) or float(v.abs().max()) > _LARGEST:
            raise Rejected(f"{what} overflows or is not finite")


def _check_guards(program: Program, values: dict[int, torch.Tensor], values64: dict[int, torch.Tensor],
                  scale: float, dtype: torch.dtype) -> None:
    floor = FLOOR.get(dtype, 1e-5) * max(1.0, scale)
    for line, d64 in values64.items():
        d = values.get(line)
        if d64.numel() == 0:
            continue
        noise = float((d - d64).abs().nan_to_num(float("inf")).max()) if d is not None else 0.0
        margin = float(d64.abs().min())
        if margin <= max(1e-4, 100 * noise, 10 * floor):
            op = program.ops[line]
            raise Rejected(f"line {op.target} = {op.expr} is within {margin:.1e} of a kink")


def _normal(like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.dtype)


def _cotangents(outputs: Sequence[Any], seed: int) -> list[torch.Tensor | None]:
    """One random cotangent per output that requires grad in eager (others take none)."""
    return [_normal(o, seed + 1 + k) if isinstance(o, torch.Tensor) and o.requires_grad else None
            for k, o in enumerate(outputs)]


def _eager_reference(program: Program, eager64: Run, inputs64: list[torch.Tensor], scale: float) -> Reference:
    mutations = {i: t.detach() for i, t in enumerate(eager64.inputs)
                 if program.inputs[i].kind not in (PARAM, INDEX)}
    grads = Stage(tuple(_zeros_if_none(g, inputs64[i]) for g, i in zip(eager64.grads or (), program.params)), scale)
    hvp = None
    if eager64.hvp is not None:
        hvp = Stage(tuple(_zeros_if_none(h, inputs64[i]) for h, i in zip(eager64.hvp, program.params)), scale)
    return Reference(Stage(tuple(o.detach() for o in eager64.outputs), scale), mutations, grads, hvp)


def _zeros_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return g.detach() if g is not None else torch.zeros_like(like, dtype=torch.float64)


def _second_opinion(ref: Reference, eager64: Run, program: Program) -> list[str]:
    """Where eager float64 and reftrace's reference disagree: a reftrace bug or a torch bug, worth triage."""
    notes = []
    pairs = [("output", eager64.outputs, ref.outputs)]
    if ref.grads is not None and eager64.grads is not None:
        pairs.append(("grad", eager64.grads, ref.grads))
    if ref.hvp is not None and eager64.hvp is not None:
        pairs.append(("hvp", eager64.hvp, ref.hvp))
    for what, got, stage in pairs:
        for k, (g, r) in enumerate(zip(got, stage.values)):
            if not isinstance(r, torch.Tensor) or not r.is_floating_point():
                continue
            err = error(g, r)
            if err > 1e3 * FLOOR[torch.float64] * max(1.0, stage.scale):
                notes.append(f"second opinion: eager float64 {what} {k} differs from reftrace's by {err:.2e}")
    return notes
