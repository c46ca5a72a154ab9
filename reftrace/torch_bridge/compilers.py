"""Compilers and partitioners with functorch.compile's contracts.

A compiler takes ``(fx.GraphModule, example_inputs)`` and returns a callable. A
partitioner takes the joint ``fx.GraphModule`` (inputs ``primals_*``, ``tangents_*``)
and returns ``(forward_module, backward_module)`` with functorch's convention:
``forward(*primals) -> (*outs, *saved)``, ``backward(*saved, *tangents) -> grads``.
reftrace's own partitioners also expose ``split(joint_graph, num_fwd_outputs)``, which
works on the reftrace Graph directly (no FX round trip).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch

from reftrace.backends.torch import to_fx
from reftrace.errors import ArgumentError, CompilerError
from reftrace.graph import Graph, Var
from reftrace.torch_bridge.capture import capture_flat
from reftrace.torch_bridge.tensors import example_tensors
from reftrace.transforms.partition import partition
from reftrace.transforms.optimal import Optimal
from reftrace.transforms.policies import MinCut


# ----------------------------------------------------------------------------- compilers

def make_boxed_func(f: Callable[..., Any]) -> Callable[[list], Any]:
    """Wrap ``f`` to take its arguments as one list (functorch's boxed calling convention)."""
    def g(args: list) -> Any:
        return f(*args)
    g._boxed_call = True  # type: ignore[attr-defined]
    return g


def make_boxed_compiler(compiler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(compiler)
    def boxed(fx_g: torch.fx.GraphModule, inps: Sequence[torch.Tensor]) -> Any:
        return make_boxed_func(compiler(fx_g, inps))
    return boxed


def nop(fx_g: torch.fx.GraphModule, _inps: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Run the graph as it is (eager torch ops)."""
    return fx_g


def print_compile(fx_g: torch.fx.GraphModule, _inps: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Print the graph's code, then run it as it is."""
    print(fx_g.code)
    return fx_g


def ts_compile(fx_g: torch.fx.GraphModule, _inps: Sequence[torch.Tensor]) -> Any:
    """TorchScript: ``torch.jit.script`` then ``torch.jit.freeze``."""
    scripted = torch.jit.script(fx_g)
    return torch.jit.freeze(scripted.eval())


def xla_compile(fx_g: torch.fx.GraphModule, inps: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """Run the graph as one XLA computation through the JAX backend.

    Uses the reftrace Graph the module was emitted from (``fx_g.reftrace_graph``); a
    foreign GraphModule is captured first. Tensors cross to JAX and back through
    DLPack (no copy where the layout allows).
    """
    from reftrace.backends.jax import lower_jax, numpy_runs_on_cpu
    graph = getattr(fx_g, "reftrace_graph", None)
    if graph is None:
        graph = capture_flat(lambda ts: fx_g(*ts), list(inps)).graph
    sources, computed = _output_sources(graph)
    run = lower_jax(graph.replace(outputs=computed) if computed != graph.outputs else graph)
    as_list = _returns_list(fx_g)

    def call(*args: torch.Tensor) -> Any:
        # the executable takes torch tensors (numpy views or DLPack where memory can be shared, bit-exact
        # copies where not); with a CPU default device, CPU tensors make it run on the CPU
        host_numpy = numpy_runs_on_cpu()
        on_cpu = host_numpy and all(getattr(a, "is_cpu", False) for a in args)
        results = run.call_tensors(args, host_numpy, on_cpu)
        outs = [args[j] if is_input else results[j] for is_input, j in sources]
        return outs if as_list else tuple(outs)
    call.reftrace_graph = graph  # type: ignore[attr-defined]
    call.reftrace_takes_any_layout = True  # type: ignore[attr-defined] - expanded cotangents stay unexpanded
    return call


def _output_sources(graph: Graph) -> tuple[list[tuple[bool, int]], tuple[Any, ...]]:
    """Where each output of ``graph`` comes from, ``(True, i)``: input ``i``; ``(False, j)``: the ``j``-th
    of the outputs the computation returns (also returned), each value once.

    Inputs pass through on the torch side, as with ``nop`` (a forward hands primals to the backward:
    an XLA computation would copy them into fresh buffers on every call). A value at several outputs
    (a forward output the backward needs too) is computed once and becomes one tensor, as with
    ``nop``: autograd then sees the user's in-place change of that output and refuses the backward
    that needs its old value, as eager does, where two tensors sharing memory would hide it.
    """
    position = {v: i for i, v in enumerate(graph.inputs)}
    sources: list[tuple[bool, int]] = []
    computed: list[Any] = []
    index: dict[Var, int] = {}
    for o in graph.outputs:
        if isinstance(o, Var) and o in position:
            sources.append((True, position[o]))
            continue
        j = index.get(o) if isinstance(o, Var) else None
        if j is None:
            j = len(computed)
            computed.append(o)
            if isinstance(o, Var):
                index[o] = j
        sources.append((False, j))
    return sources, tuple(computed)


def _returns_list(fx_g: torch.fx.GraphModule) -> bool:
    out = fx_g.graph.find_nodes(op="output")[0]
    return isinstance(out.args[0], list)


# ----------------------------------------------------------------------------- partitioners

class ReftracePartitioner:
    """A reftrace partition policy usable where functorch expects a ``partition_fn``."""

    def __init__(self, policy: Any, name: str) -> None:
        self.policy = policy
        self.__name__ = name

    def __repr__(self) -> str:
        return self.__name__

    def split(self, joint: Graph, num_fwd_outputs: int, device: torch.device | None = None,
              overwritten_inputs: tuple[int, ...] = ()) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        """Partition a reftrace joint graph; emit both halves as FX (creating tensors on ``device``).
        ``overwritten_inputs``: primals the caller overwrites after the forward (saved ones are copied)."""
        policy = self.policy
        if isinstance(policy, Optimal) and overwritten_inputs:
            policy = dataclasses.replace(policy, overwritten=tuple(overwritten_inputs))
        p = partition(joint, policy=policy)
        num_saved = len(p.forward.outputs) - num_fwd_outputs
        fw = to_fx(p.forward, input_names=[f"primals_{i + 1}" for i in range(len(p.forward.inputs))],
                   output_as_list=True, device=device)
        bw_names = [f"saved_{i + 1}" for i in range(num_saved)]
        bw_names += [f"tangents_{i + 1}" for i in range(len(p.backward.inputs) - num_saved)]
        bw = to_fx(p.backward, input_names=bw_names, output_as_list=True, device=device)
        return fw, bw

    def __call__(self, joint_module: torch.fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int,
                 **_kwargs: Any) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        graph = getattr(joint_module, "reftrace_graph", None)
        if graph is None or graph.joint is None:
            raise ArgumentError(f"{self.__name__} partitions joint graphs made by reftrace "
                                "(fx.GraphModule with a .reftrace_graph joint Graph)")
        return self.split(graph, num_fwd_outputs)


default_partition = ReftracePartitioner("default", "default_partition")
min_cut_rematerialization_partition = ReftracePartitioner("mincut", "min_cut_rematerialization_partition")
fusion_partition = ReftracePartitioner("fusion", "fusion_partition")
"""The min cut for a fusing compiler (the ``"fusion"`` policy): chains of core primitives are recomputed
in the backward, composites and matmuls saved. ``xla_compile``'s partition where none is named."""
xla_compile.reftrace_partition = fusion_partition  # type: ignore[attr-defined] - see ``preferred_partition``


def preferred_partition(bw_compiler: Any) -> Any:
    """The partition for ``bw_compiler`` where the caller names none: the one it names
    (``reftrace_partition``, as ``xla_compile`` does), else ``default_partition``, as functorch's."""
    return getattr(bw_compiler, "reftrace_partition", default_partition)


class ForeignPartitioner:
    """Adapts a functorch-style ``partition_fn`` (works on an FX joint module).

    functorch's partitioners expect what AOTAutograd hands them: a joint graph of ATen ops
    whose nodes carry ``meta["val"]``, with placeholders named ``primals_*`` and
    ``tangents_*``. reftrace's joint is emitted as torch calls, then retraced with
    ``make_fx`` into exactly that form.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def split(self, joint: Graph, num_fwd_outputs: int, device: torch.device | None = None,
              overwritten_inputs: tuple[int, ...] = ()) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        from torch.fx.experimental.proxy_tensor import make_fx

        num_primals = joint.joint[0]
        names = [f"primals_{i + 1}" for i in range(num_primals)]
        names += [f"tangents_{i + 1}" for i in range(len(joint.inputs) - num_primals)]
        gm = to_fx(joint, input_names=names, output_as_list=True, device=device)
        examples = example_tensors(joint, device=device)
        aten_joint = make_fx(gm, tracing_mode="fake")(*examples)
        for node, name in zip(aten_joint.graph.find_nodes(op="placeholder"), names, strict=True):
            node.name = node.target = name  # functorch tells primals from tangents by these names
        aten_joint.recompile()
        parts = self.fn(aten_joint, examples, num_fwd_outputs=num_fwd_outputs)
        if not (isinstance(parts, tuple) and len(parts) == 2
                and all(isinstance(p, torch.fx.GraphModule) for p in parts)):
            raise CompilerError(f"the partition_fn {getattr(self.fn, '__name__', self.fn)!r} returned "
                                f"{type(parts).__name__}; a partitioner returns (forward, backward) fx.GraphModules")
        return parts


def as_partitioner(partition_fn: Any) -> Any:
    """Our partitioners, a policy value ("default", "mincut", ``MinCut(...)``, ``rt.optimal(...)``, a
    callable policy), or a functorch-style fn."""
    if isinstance(partition_fn, ReftracePartitioner):
        return partition_fn
    if isinstance(partition_fn, str):
        return ReftracePartitioner(partition_fn, partition_fn)
    if isinstance(partition_fn, (MinCut, Optimal)):
        return ReftracePartitioner(partition_fn, repr(partition_fn))
    if callable(partition_fn):
        import inspect
        try:
            n = len(inspect.signature(partition_fn).parameters)
        except (TypeError, ValueError):
            n = 2
        if n == 1:  # a reftrace policy: policy(eqn) -> bool
            return ReftracePartitioner(partition_fn, getattr(partition_fn, "__name__", "policy"))
        return ForeignPartitioner(partition_fn)
    raise ArgumentError(f"partition_fn must be a partitioner, a policy name or a callable, got {partition_fn!r}")
