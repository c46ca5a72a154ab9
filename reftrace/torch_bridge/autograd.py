"""Autograd glue: a captured Graph becomes an ordinary ``torch.autograd.Function``.

Forward runs the compiled forward graph and keeps the saved values; backward runs
the compiled backward graph. Gradients come from reftrace's ``vjp``, never from
torch.autograd. When backward itself is differentiated (``create_graph=True``),
the gradient is computed by a second compiled graph, ``vjp(graph)`` restricted to
its gradients, which is differentiable in turn: double backward is just another
graph.

A graph with random ops takes its ``u32[2]`` key as an ordinary (integer, never
differentiated) input. The autograd Function keeps every input of a call, the key
included, so the backward and a double backward see the forward's random draws: the
backward reads the saved draws (partitions never recompute ``random``), and double
backward re-runs the joint graph with the same key, which draws the same values.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from reftrace.backends.torch import to_fx
from reftrace.backends.torch_dtypes import torch_dtype
from reftrace.backends.torch_fx_passes import compute_in_place
from reftrace.errors import CompilerError
from reftrace.graph import Graph
from reftrace.primitives import is_inexact
from reftrace.torch_bridge.autocast import autocast_off
from reftrace.torch_bridge.compilers import default_partition, nop
from reftrace.torch_bridge.sparse_gradients import SparseGradient, sparse_rows
from reftrace.torch_bridge.tensors import device_of, example_tensors
from reftrace.transforms.simplify import simplify
from reftrace.transforms.vjp import output_dependencies, vjp
from reftrace.transforms.zeros import with_zero_inputs

Compiler = Callable[[torch.fx.GraphModule, Sequence[torch.Tensor]], Callable[..., Any]]


def call_compiled(fn: Callable[..., Any], args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Call a compiler's result, honouring functorch's boxed calling convention."""
    if getattr(fn, "_boxed_call", False):
        out = fn(list(args))
    else:
        out = fn(*args)
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def _input_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{i + 1}" for i in range(n)]


def new_rng_key(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh ``u32[2]`` key for a captured graph's random ops, from torch's default generator.

    Two uint32 words drawn with ``torch.randint`` (so ``torch.manual_seed`` fixes them and each
    call advances the generator), as a ``torch.uint32`` tensor on ``device``.
    """
    words = torch.randint(0, 2 ** 32, (2,), dtype=torch.int64)
    return words.to(device=device, dtype=torch.uint32)


class PartitionedFunction:
    """A graph compiled for training with a fixed set of differentiable inputs.

    ``graph``: inputs are tensors; outputs are the function's outputs. ``wrt``: input indices
    that get gradients. Outputs that depend on no ``wrt`` input through differentiable
    primitives (integer outputs, detached values, BatchNorm's running statistics) are
    non-differentiable, as in eager torch, and receive no cotangent; so are ``nondiff_outputs``.
    A gradient no incoming cotangent reaches is ``None``, as eager torch leaves it.
    ``autograd_links`` (from capture, one set per output): inputs eager's autograd graph links an
    output to although its value does not depend on them (an in-place overwrite such as ``y.zero_()``
    cut the dependency): the output is differentiable all the same, and those inputs get zeros.
    ``sparse_gradients`` (from capture): embedding tables whose gradient goes back sparse, as eager's.
    """

    def __init__(self, graph: Graph, wrt: Sequence[int], nondiff_outputs: Sequence[int] = (), *,
                 fw_compiler: Compiler, bw_compiler: Compiler, partitioner: Any,
                 example_inputs: Sequence[torch.Tensor], mutated_inputs: Sequence[int] = (),
                 autograd_links: Sequence[frozenset[int]] = (),
                 sparse_gradients: Sequence[SparseGradient] = ()) -> None:
        self.graph = graph
        self.wrt = tuple(wrt)
        self.sparse_gradients = tuple(s for s in sparse_gradients if s.weight in self.wrt)
        dependencies = output_dependencies(graph, self.wrt)
        if autograd_links:  # the vjp's gradient for an input linked only this way is zeros, as eager's
            dependencies = tuple(d | (linked & set(self.wrt)) for d, linked in zip(dependencies, autograd_links,
                                                                                    strict=True))
        self.nondiff_outputs = tuple(j for j, deps in enumerate(dependencies)
                                     if not deps or j in set(nondiff_outputs))
        self.num_inputs = len(graph.inputs)
        self.num_outputs = len(graph.outputs)
        self.mutated_inputs = frozenset(mutated_inputs)  # written back by the caller after forward
        self.ct_outputs = tuple(j for j in range(self.num_outputs) if j not in set(self.nondiff_outputs))
        self.ct_dependencies = tuple(dependencies[j] for j in self.ct_outputs)
        self._reached: dict[tuple[bool, ...], frozenset[int]] = {}
        joint = vjp(graph, wrt=self.wrt, nondiff_outputs=self.nondiff_outputs)
        self.joint = joint
        self.device = device_of(example_inputs)
        fw_gm, bw_gm = partitioner.split(joint, num_fwd_outputs=self.num_outputs, device=self.device,
                                         overwritten_inputs=tuple(sorted(self.mutated_inputs)))
        self.num_saved = len(fw_gm.graph.find_nodes(op="output")[0].args[0]) - self.num_outputs
        self.fw_gm, self.bw_gm = fw_gm, bw_gm
        self.compiled_fw = _compile(fw_compiler, fw_gm, list(example_inputs), "fw_compiler")
        self.bw_compiler = bw_compiler
        self._compiled_bw: Callable[..., Any] | None = None
        if len(self.ct_outputs) <= 1:  # one backward only: compiled now, as functorch's seed example shows
            self._compiled_bw = self.compiled_bw
        self._partial_bw: dict[tuple[bool, ...], Callable[..., Any] | None] = {}
        self._double: dict[tuple[tuple[bool, ...], tuple[int, ...]], PartitionedFunction] = {}
        self._double_inference: dict[tuple[int, ...], InferenceFunction] = {}
        self._fn = _make_autograd_function(self)

    def reached(self, present: tuple[bool, ...]) -> frozenset[int]:
        """The inputs a gradient reaches when only the cotangent outputs flagged in ``present`` have one."""
        got = self._reached.get(present)
        if got is None:
            got = frozenset().union(*(d for d, p in zip(self.ct_dependencies, present) if p))
            self._reached[present] = got
        return got

    @property
    def compiled_bw(self) -> Callable[..., Any]:
        """The backward compiled by ``bw_compiler``: with the forward where there is one differentiable
        output, else on first use (a loss that reads one output of several only ever needs
        ``backward_without``'s, and compiling both would double the backward's compile time)."""
        if self._compiled_bw is None:
            examples = _placeholder_examples(self.bw_gm, self.device)
            self._compiled_bw = _compile(self.bw_compiler, self.bw_gm, examples, "bw_compiler")
        return self._compiled_bw

    def backward_without(self, present: tuple[bool, ...]) -> Callable[..., Any] | None:
        """The compiled backward for cotangents only where ``present`` says, taking ``(*saved, *those)``.

        An output the caller does not use gets no cotangent in eager torch, and no part of the backward
        runs for it; computing that part on zeros instead would turn ``0 * inf`` into NaN (``sqrt`` at 0
        among outputs the loss does not read). So the missing cotangents are symbolic zeros
        (``with_zero_inputs``), one backward compiled per pattern. None where the backward did not come
        from a reftrace Graph (a functorch-style partitioner): zeros then stand in.
        """
        if present not in self._partial_bw:
            graph = getattr(self.bw_gm, "reftrace_graph", None)
            fn = None
            if graph is not None:
                first = len(graph.inputs) - len(present)
                missing = [first + k for k, p in enumerate(present) if not p]
                graph = simplify(with_zero_inputs(graph, range(first, len(graph.inputs)), missing))
                names = [f"saved_{i + 1}" for i in range(first)]
                names += [f"tangents_{k + 1}" for k, p in enumerate(present) if p]
                gm = to_fx(graph, input_names=names, output_as_list=True, device=self.device)
                fn = _compile(self.bw_compiler, gm, _placeholder_examples(gm, self.device), "bw_compiler")
            self._partial_bw[present] = fn
        return self._partial_bw[present]

    def zero_cotangent(self, k: int) -> torch.Tensor:
        """Zeros standing for the missing cotangent of the ``k``-th differentiable output."""
        aval = self.graph.outputs[self.ct_outputs[k]].aval
        return torch.zeros(aval.shape, dtype=torch_dtype(aval.dtype), device=self.device)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self._fn.apply(*tensors)

    def double_backward(self, primals: Sequence[torch.Tensor], cts: Sequence[torch.Tensor | None]
                        ) -> Sequence[torch.Tensor]:
        """Gradients as a differentiable function of (primals, cotangents); a missing (None) cotangent
        is a symbolic zero, as in ``backward_without``."""
        missing = tuple(k for k, c in enumerate(cts) if c is None)
        args = list(primals) + [c for c in cts if c is not None]
        pattern = (tuple(bool(t.requires_grad) for t in args), missing)
        if not any(pattern[0]):
            saved_free = self._grads_inference(missing)
            return saved_free(args)
        fn = self._double.get(pattern)
        if fn is None:
            grads_graph = self._grads_graph(missing)
            wrt = [i for i, (t, v) in enumerate(zip(args, grads_graph.inputs))
                   if t.requires_grad and is_inexact(v.dtype)]
            fn = PartitionedFunction(grads_graph, wrt, (), fw_compiler=nop, bw_compiler=nop,
                                     partitioner=default_partition, example_inputs=args)
            self._double[pattern] = fn
        return fn(args)

    def _grads_graph(self, missing: tuple[int, ...]) -> Graph:
        """The joint's gradients as a graph of (primals, the cotangents not ``missing``)."""
        j = self.joint
        grads = simplify(j.replace(outputs=j.outputs[self.num_outputs:], joint=None))
        if not missing:
            return grads
        first = self.num_inputs
        return simplify(with_zero_inputs(grads, range(first, len(grads.inputs)), [first + k for k in missing]))

    def _grads_inference(self, missing: tuple[int, ...]) -> "InferenceFunction":
        fn = self._double_inference.get(missing)
        if fn is None:
            grads_graph = self._grads_graph(missing)
            fn = self._double_inference[missing] = InferenceFunction(grads_graph, nop,
                                                                     example_tensors(grads_graph, device=self.device))
        return fn


def _compile(compiler: Compiler, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor], role: str
             ) -> Callable[..., Any]:
    """``compiler(gm, example_inputs)``, checked: a compiler must return something callable. A
    compiler that returns the module itself (``nop``) runs it as it is: its elementwise arithmetic
    then writes into fresh operands, as eager's gradient sums do (``compute_in_place``); other
    compilers keep the functional graph."""
    compiled = compiler(gm, example_inputs)
    if compiled is gm:
        compute_in_place(gm)
    if not callable(compiled):
        name = getattr(compiler, "__name__", type(compiler).__name__)
        raise CompilerError(f"the {role} {name} returned {type(compiled).__name__}, not a callable; a compiler "
                            "takes (fx.GraphModule, example_inputs) and returns a callable (return the "
                            "GraphModule itself to run it as it is)")
    return compiled


def _placeholder_examples(gm: torch.fx.GraphModule, device: torch.device | None) -> list[torch.Tensor]:
    graph = getattr(gm, "reftrace_graph", None)
    if graph is not None:
        return example_tensors(graph, device=device)
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        out.append(torch.empty(val.shape, dtype=val.dtype, device=device) if val is not None
                   else torch.empty((), device=device))
    return out


def _distinct(outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The outputs, a tensor that stands at an earlier position too copied: two outputs the graph
    computes as one value (``(x.exp(), x.exp())``, shared by simplification) are two tensors in eager,
    so changing one in place must not change the other, and each gets its own cotangent. (Outputs
    that are one tensor in eager, ``y, y``, are views the caller rebuilds after the call.)"""
    seen: set[int] = set()
    result = []
    for t in outputs:
        result.append(t.clone() if id(t) in seen else t)
        seen.add(id(t))
    return tuple(result)


def _make_autograd_function(pf: PartitionedFunction) -> type[torch.autograd.Function]:
    n_in, n_out, wrt = pf.num_inputs, pf.num_outputs, pf.wrt
    nondiff = pf.nondiff_outputs
    mutated = pf.mutated_inputs
    ct_outputs = pf.ct_outputs

    class ReftraceFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            ctx.set_materialize_grads(False)  # a missing cotangent stays None: its gradient paths are symbolic zeros
            outs = call_compiled(pf.compiled_fw, tensors)
            saved = outs[n_out:]
            if mutated:  # the caller overwrites these inputs after forward: keep their current values
                saved = [s.clone() if any(s is tensors[i] for i in mutated) else s for s in saved]
            ctx.save_for_backward(*saved)
            # primals for double backward: references (they keep their autograd history), except
            # inputs about to be overwritten, which are copied; a random key is among them, so
            # double backward draws what this forward drew
            ctx.primals = [t.detach().clone() if i in mutated else t for i, t in enumerate(tensors)]
            results = _distinct(outs[:n_out])
            ctx.mark_non_differentiable(*[results[i] for i in nondiff])
            return results

        @staticmethod
        def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
            present = tuple(grad_outputs[i] is not None for i in ct_outputs)
            reached = pf.reached(present)
            result: list[torch.Tensor | None] = [None] * n_in
            if not reached:
                return tuple(result)
            saved, primals = ctx.saved_tensors, ctx.primals
            with autocast_off():  # a backward run under autocast: the graph's dtypes are its own
                if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
                    grads = pf.double_backward(primals, [grad_outputs[i] for i in ct_outputs])
                elif (partial := None if all(present) else pf.backward_without(present)) is not None:
                    # missing cotangents are symbolic zeros
                    given = _laid_out(partial, [grad_outputs[i] for i, p in zip(ct_outputs, present) if p])
                    grads = call_compiled(partial, [*saved, *given])
                else:
                    cts = [grad_outputs[i] if p else pf.zero_cotangent(k)
                           for k, (i, p) in enumerate(zip(ct_outputs, present))]
                    grads = call_compiled(pf.compiled_bw, [*saved, *_laid_out(pf.compiled_bw, cts)])
            for i, g in zip(wrt, grads):
                if i in reached:
                    result[i] = g
            for sparse in pf.sparse_gradients:
                if result[sparse.weight] is not None:
                    result[sparse.weight] = sparse_rows(result[sparse.weight],
                                                        [(primals[k], pad) for k, pad in sparse.indices])
            return tuple(result)

    return ReftraceFunction


def _laid_out(compiled: Callable[..., Any], cotangents: list[torch.Tensor]) -> list[torch.Tensor]:
    """The cotangents as the compiled backward takes them: contiguous (a graph's ``view`` needs it, and
    ``y.sum()``'s cotangent is one number expanded), unless it takes any layout (``xla_compile``'s, which
    passes an expanded one on without writing it out)."""
    if getattr(compiled, "reftrace_takes_any_layout", False):
        return cotangents
    return [c.contiguous() for c in cotangents]


class InferenceFunction:
    """A graph compiled without autograd (no input requires grad, or grad mode is off)."""

    def __init__(self, graph: Graph, compiler: Compiler, example_inputs: Sequence[torch.Tensor]) -> None:
        self.graph = graph
        self.gm = to_fx(graph, input_names=_input_names("arg", len(graph.inputs)), output_as_list=True,
                        device=device_of(example_inputs))
        self.compiled = _compile(compiler, self.gm, list(example_inputs), "inference_compiler")

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(call_compiled(self.compiled, tensors))
