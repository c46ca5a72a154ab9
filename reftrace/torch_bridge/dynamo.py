"""``torch.compile(fn_or_module, backend="reftrace")``: reftrace as a TorchDynamo backend.

Dynamo handles Python (graph breaks, guards, recompiles) and hands each straight-line
``fx.GraphModule`` of torch calls to the backend. reftrace treats that GraphModule as an
ordinary function and runs it through ``aot_function``: captured at its first real call,
differentiated by reftrace's own ``vjp``, partitioned, compiled forward and backward.

The backend is registered by name through the ``torch_dynamo_backends`` entry point
(``pyproject.toml``), so ``backend="reftrace"`` works without importing reftrace.
Options: ``options={"compiler": "nop" | "ts" | "xla" | compiler, "partition": "default" |
"mincut" | "fusion" | policy | partition_fn, "decompositions": {...}}``; without "partition",
the compiler's own (``preferred_partition``: "fusion" for "xla", else "default").
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.fx.passes.split_module import split_module
from torch.utils import _pytree as pytree

from reftrace.errors import ArgumentError, DataDependentControlFlowError, ReftraceError
from reftrace.torch_bridge.aot import aot_function
from reftrace.torch_bridge.autograd import Compiler
from reftrace.torch_bridge.compilers import ReftracePartitioner, as_partitioner, nop, ts_compile, xla_compile
from reftrace.transforms.policies import MinCut, resolve_policy

__all__ = ["reftrace_backend", "BackendOptions", "COMPILERS"]

COMPILERS: dict[str, Compiler] = {"nop": nop, "ts": ts_compile, "xla": xla_compile}

_OPTION_NAMES = ("compiler", "partition", "decompositions")
_DOCS = "see docs/torch.md#using-reftrace-with-torchcompile"


@dataclass(frozen=True)
class BackendOptions:
    """The backend's settings, parsed from ``torch.compile(..., options=...)``."""

    compiler: Compiler = nop
    partition: Any = None  # the compiler's own (``preferred_partition``): "fusion" for "xla"
    decompositions: Mapping[Any, Callable[..., Any]] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> "BackendOptions":
        """Check every option by name and value, so a typo fails loudly instead of being ignored."""
        if mode not in (None, "default"):
            raise ArgumentError(f"torch.compile(mode={mode!r}) is an Inductor setting that reftrace does not "
                                f"have; drop mode= and choose with options={{'compiler': ...}} ({_DOCS})")
        options = dict(options or {})
        unknown = sorted(set(options) - set(_OPTION_NAMES), key=str)
        if unknown:
            raise ArgumentError(f"unknown reftrace backend option(s) {unknown}; the options are "
                                f"{list(_OPTION_NAMES)} ({_DOCS})")
        return cls(compiler=_compiler(options.get("compiler", "nop")),
                   partition=_partitioner(options.get("partition")),
                   decompositions=_decompositions(options.get("decompositions")))


def _compiler(choice: Any) -> Compiler:
    if isinstance(choice, str):
        try:
            return COMPILERS[choice]
        except KeyError:
            raise ArgumentError(f"unknown reftrace compiler {choice!r}; use one of {sorted(COMPILERS)} or a "
                                f"compiler(gm, example_inputs) -> callable ({_DOCS})") from None
    if callable(choice):
        return choice
    raise ArgumentError(f"options['compiler'] must be a name {sorted(COMPILERS)} or a compiler "
                        f"callable, got {type(choice).__name__}")


def _partitioner(choice: Any) -> Any:
    """A policy name or MinCut value is resolved now (a bad name fails before any capture); None
    leaves the choice to the compiler."""
    if choice is None:
        return None
    try:
        if isinstance(choice, str):
            resolve_policy(choice)
            return ReftracePartitioner(choice, choice)
        if isinstance(choice, MinCut):
            return ReftracePartitioner(choice, "mincut")
        return as_partitioner(choice)
    except ReftraceError as err:
        raise ArgumentError(f"options['partition']: {err}") from None


def _decompositions(table: Any) -> Mapping[Any, Callable[..., Any]] | None:
    if table is None or isinstance(table, Mapping):
        return table
    raise ArgumentError(f"options['decompositions'] must be a dict {{OpOverload: function}}, "
                        f"got {type(table).__name__}")


class ReftraceGraph:
    """What the backend returns for a straight-line Dynamo graph: ``aot_function`` over it.

    Capture waits for the first real call (Dynamo's example inputs may be fake); from then on
    reftrace's own guards (shapes, dtypes, requires_grad, int arguments, grad mode) pick or
    compile the graph, so a Dynamo graph with symbolic shapes gets one reftrace graph per
    concrete shape and never a stale one.

    Grad mode: a Dynamo graph sets it itself (``torch.no_grad()`` blocks are
    ``_set_grad_enabled`` calls), but a compiled graph runs no Python, so the mode the graph
    leaves is set after the call. A graph entered with grad off that turns it on
    (``torch.enable_grad()`` inside) is compiled for training, with the entry mode replayed
    at the start of the capture so the ops before the block stay non-differentiable.
    """

    def __init__(self, gm: torch.fx.GraphModule, options: BackendOptions) -> None:
        self.gm = gm
        self.options = options
        modes = [n.args[0] for n in gm.graph.find_nodes(op="call_function", target=torch._C._set_grad_enabled)]
        self.turns_grad_on = True in modes
        self.exit_mode: bool | None = modes[-1] if modes else None
        self.outputs_that_are_inputs: dict[int, int] = {}  # flat output position -> argument position
        self.compiled = aot_function(self._entered, options.compiler, options.compiler,
                                     partition_fn=options.partition, decompositions=options.decompositions)

    def __call__(self, *args: Any) -> Any:
        entry_mode = torch.is_grad_enabled()
        try:
            if entry_mode or not self.turns_grad_on:
                out = self.compiled(entry_mode, *args)
            else:
                with torch.enable_grad():
                    out = self.compiled(entry_mode, *args)
        except DataDependentControlFlowError as err:
            raise _with_dynamo_hint(err) from None
        if self.exit_mode is not None:
            torch._C._set_grad_enabled(self.exit_mode)
        if self.outputs_that_are_inputs:  # eager returns the mutated tensor itself, not a copy
            leaves, spec = pytree.tree_flatten(out)
            for k, i in self.outputs_that_are_inputs.items():
                leaves[k] = args[i]
            out = pytree.tree_unflatten(leaves, spec)
        return out

    def _entered(self, entry_grad_mode: bool, *args: Any) -> Any:
        """The graph as the capture runs it: entered in the caller's grad mode (a guard of the capture).

        Sizes a graph with dynamic shapes returns (``SymInt`` outputs) are plain ints here, constants
        of the compiled signature, which ``aot_function`` returns as they are. An output that is an
        argument itself (``x.add_(1); return x``) is noted, to hand back the caller's tensor.
        """
        torch._C._set_grad_enabled(entry_grad_mode)
        out = self.gm(*args)
        positions = {id(a): i for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        self.outputs_that_are_inputs = {k: positions[id(leaf)] for k, leaf in enumerate(pytree.tree_leaves(out))
                                        if id(leaf) in positions}
        return out


def _with_dynamo_hint(err: DataDependentControlFlowError) -> DataDependentControlFlowError:
    """Dynamo breaks the graph at ``.item()`` and value-sized ops unless told to keep them: say so."""
    config = torch._dynamo.config
    flags = [f for f in ("capture_scalar_outputs", "capture_dynamic_output_shape_ops") if getattr(config, f, False)]
    if flags:
        err.args = (f"{err} Under torch.compile, set torch._dynamo.config.{' and '.join(flags)} back to False: "
                    "Dynamo then breaks the graph there and runs that line eagerly.",)
    return err


_INLINED = {"wrap": 1, "tag_activation_checkpoint": 1, "invoke_subgraph": 2}  # HOP name -> first operand


def _hop_name(node: torch.fx.Node) -> str | None:
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return None


def _inlinable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A subgraph call in the shape Dynamo emits (anything else is left to run eagerly)."""
    first_operand = _INLINED.get(_hop_name(node))
    if first_operand is None or not isinstance(node.args[0], torch.fx.Node) or node.args[0].op != "get_attr":
        return False
    body = getattr(gm, node.args[0].target, None)
    if not isinstance(body, torch.fx.GraphModule):
        return False
    if node.kwargs and _hop_name(node) != "tag_activation_checkpoint":  # checkpoint's kwargs are its settings
        return False
    returns = body.graph.find_nodes(op="output")[0].args[0]
    return (len(body.graph.find_nodes(op="placeholder")) == len(node.args) - first_operand
            and isinstance(returns, (tuple, list))
            and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))


def inline_subgraph_calls(gm: torch.fx.GraphModule) -> bool:
    """Copy the bodies of ``wrap``, ``tag_activation_checkpoint`` and ``invoke_subgraph`` into ``gm``.

    They are plain function calls to a subgraph (checkpointing only changes what autograd
    saves, which reftrace's partitioner decides anyway), so the whole computation becomes one
    reftrace graph. Returns whether anything changed; nested calls are inlined too.
    """
    changed = False
    while True:
        calls = [n for n in gm.graph.nodes if _inlinable(gm, n)]
        if not calls:
            return changed
        for node in calls:
            body_node = node.args[0]
            body = getattr(gm, body_node.target)
            operands = node.args[_INLINED[_hop_name(node)]:]
            placeholders = body.graph.find_nodes(op="placeholder")
            val_map: dict[torch.fx.Node, Any] = dict(zip(placeholders, operands))
            with gm.graph.inserting_before(node):
                results = gm.graph.graph_copy(body.graph, val_map)
            for old, new in val_map.items():
                if old.op == "get_attr":  # the body's own attributes, seen from the root module
                    new.target = f"{body_node.target}.{old.target}"
            for user in list(node.users):
                user.replace_all_uses_with(results[user.args[1]])
                gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            if not body_node.users:
                gm.graph.erase_node(body_node)
        changed = True
        gm.recompile()


def _eager_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Higher-order ops that must run as torch runs them, and the ``getitem``s reading their results.

    A custom ``autograd.Function`` (``autograd_function_apply``) has a backward of its own and a
    hook on an intermediate tensor (``register_hook``) changes the gradient; reftrace's VJP rules
    would silently ignore both. Control flow and other higher-order ops run eagerly too.
    """
    eager: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if _hop_name(node) is not None or (node.op == "call_function" and node.target is operator.getitem
                                           and node.args[0] in eager):
            eager.add(node)
    return eager


class _CompiledPart(torch.nn.Module):
    """A reftrace-compiled piece of a split Dynamo graph, callable where its submodule was."""

    def __init__(self, graph: ReftraceGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *args: Any) -> Any:
        return self.graph(*args)


def split_at_eager_ops(gm: torch.fx.GraphModule, options: BackendOptions) -> torch.fx.GraphModule | None:
    """Split ``gm`` into reftrace graphs around the ops that must run eagerly; None if there are none.

    The pieces are joined by torch autograd, as Dynamo's graph breaks are: reftrace's
    gradients inside each piece, torch's for the eager ops between them.
    """
    eager = _eager_nodes(gm)
    if not eager:
        return None
    part_of: dict[torch.fx.Node, int] = {}
    part, previous = 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        kind = node in eager
        if previous is not None and kind != previous:
            part += 1
        part_of[node], previous = part, kind
    eager_parts = {part_of[n] for n in eager}
    split = split_module(gm, gm, lambda node: part_of[node], keep_original_order=True)
    for name, sub in list(split.named_children()):
        if name.startswith("submod_") and int(name.removeprefix("submod_")) not in eager_parts:
            setattr(split, name, _CompiledPart(ReftraceGraph(sub, options)))
    return split


def _raises(error: ReftraceError) -> Callable[..., Any]:
    def misconfigured(*_args: Any) -> Any:
        raise error.with_traceback(None)
    return misconfigured


def reftrace_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                     options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable[..., Any]:
    """The TorchDynamo backend: ``torch.compile(fn_or_module, backend="reftrace", options=...)``.

    A bad option does not fail here, where Dynamo would wrap it in its own
    ``BackendCompilerFailed``: the returned graph raises the ``ArgumentError`` at the call,
    the same place capture errors (an unsupported operator) surface.
    """
    del example_inputs  # possibly fake; the first real call is captured instead
    try:
        parsed = BackendOptions.parse(options, mode)
    except ReftraceError as err:
        return _raises(err)
    inline_subgraph_calls(gm)
    return split_at_eager_ops(gm, parsed) or ReftraceGraph(gm, parsed)
