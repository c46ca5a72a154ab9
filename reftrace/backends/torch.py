"""The torch backend: a graph becomes a ``torch.fx.GraphModule`` of plain torch calls.

``to_fx`` is ``eval_graph`` with an ``apply`` that calls the torch rules on fx
proxies, so each rule's torch calls are recorded as nodes: one idiom for every
primitive, and the same rules run eagerly in ``apply_torch``. A torch function mode
turns the calls into nodes through a trimmed tracer, since emission is on every
model's compile path. The generated code prints readably and is accepted by
``torch.jit.script`` (and ``torch.jit.freeze``).
``lower_torch`` wraps the module in a callable that checks its arguments.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.overrides import TorchFunctionMode

from reftrace.backends.signature import check_args
from reftrace.backends.torch_dtypes import tensor_from_numpy
from reftrace.backends.torch_fx_passes import merge_convolution_backwards, transpose_products
from reftrace.backends.torch_rules import AVAL_META, as_tensor, aval_of, torch_rules
from reftrace.backends import torch_conv, torch_nn, torch_random  # noqa: F401 - their rows complete torch_rules
from reftrace.composite import is_composite, lower_through
from reftrace.errors import ArgumentError, UnsupportedOperatorError
from reftrace.graph import Aval, Eqn, Graph, Literal, Params, Var
from reftrace.interpreter import eval_graph
from reftrace.primitives import Primitive, infer_avals

__all__ = ["to_fx", "lower_torch", "apply_torch", "eval_torch", "TorchExecutable"]


def _literal_value(lit: Literal) -> Any:
    return lit.value


def _call_rule(eqn: Eqn, operands: Sequence[Any], literal: Callable[[Literal], Any] = _literal_value
               ) -> tuple[Any, ...]:
    """``eqn``'s torch rule on ``operands`` (tensors or proxies). A composite without one, or whose rule
    returns ``NotImplemented`` (its kernel does not take these operands), runs as its decomposition,
    each inner proxy tagged with its aval as ``to_fx`` tags the graph's own, the decomposition's literals
    made by ``literal`` (``to_fx`` makes its array literals buffers, as the graph's own)."""
    prim = eqn.primitive
    rule = torch_rules.get(prim)
    out = NotImplemented if rule is None else rule(*operands, **eqn.params.to_dict())
    if out is NotImplemented:  # no rule, or a composite's fused rule declines these operands
        if is_composite(prim):
            inner = functools.partial(_call_tagged, literal=literal)
            return tuple(lower_through(eqn, operands, inner, literal))
        raise UnsupportedOperatorError(f"primitive {prim.name} has no torch lowering")
    return tuple(out) if prim.multiple_results else (out,)


def _call_tagged(eqn: Eqn, operands: Sequence[Any], literal: Callable[[Literal], Any] = _literal_value
                 ) -> tuple[Any, ...]:
    outs = _call_rule(eqn, operands, literal)
    for out, var in zip(outs, eqn.outputs, strict=True):
        if isinstance(out, fx.Proxy):
            out.node.meta[AVAL_META] = var.aval
    return outs


# ----------------------------------------------------------------------------- eager

def apply_torch(prim: Primitive, operands: Sequence[Any], params: Params | dict) -> tuple[torch.Tensor, ...]:
    """Run one primitive eagerly on torch tensors (numpy arrays are taken as literals).

    Returns a tuple of outputs (the ``eval_graph`` apply contract), after checking each
    against the primitive's shape rule so a wrong rule fails loudly.
    """
    frozen = params if isinstance(params, Params) else Params(params)
    in_avals = [aval_of(o) for o in operands]
    expected = infer_avals(prim, in_avals, frozen)
    eqn = Eqn(prim, tuple(Var(i, a) for i, a in enumerate(in_avals)),
              tuple(Var(len(in_avals) + i, a) for i, a in enumerate(expected)), frozen)
    outs = _call_rule(eqn, operands)
    for i, (o, av) in enumerate(zip(outs, expected, strict=True)):
        got = aval_of(o)
        if got != av:
            raise RuntimeError(f"internal: torch rule for {prim.name} produced output {i} {got.str_short()} "
                               f"but its shape rule says {av.str_short()}")
    return outs


def eval_torch(graph: Graph, *args: Any) -> tuple[torch.Tensor, ...]:
    """Interpret ``graph`` op by op with eager torch (no FX); handy for debugging a rule."""
    tensors = [_to_tensor(a) for a in check_args(graph, args, "eagerly evaluated graph")]
    return tuple(eval_graph(graph, tensors, lambda eqn, operands: apply_torch(eqn.primitive, operands, eqn.params)))


# ----------------------------------------------------------------------------- FX emission

_FACTORIES = frozenset({torch.full, torch.arange, torch.tensor, torch.zeros, torch.ones, torch.empty})
_LEAVES = frozenset(fx.node.base_types) | {type(None)}  # arguments fx stores as they are


class _Tracer(fx.proxy.GraphAppendingTracer):
    """Appends nodes to ``graph`` by a short path: a model's graph makes thousands of them.

    The stock ``create_proxy`` spends most of its time on generality the rules do not
    need: scope and stack-trace bookkeeping, a pytree walk of every argument looking for
    SymInts, and a regex per node name. Nodes, names and arguments come out the same.
    Rule arguments are mostly proxies, Python scalars, dtypes, strings, ``None`` and
    lists/tuples of those; anything else (slices, dicts) takes the stock ``create_arg``.
    """

    def __init__(self, graph: fx.Graph) -> None:
        super().__init__(graph)
        self._stems: dict[Any, str] = {}  # target -> name stem, as fx derives it

    def create_arg(self, a: Any) -> Any:
        kind = type(a)
        if kind in _LEAVES:
            return a
        if kind is fx.Proxy:
            return a.node
        if kind is tuple or kind is list:
            return kind([x if type(x) in _LEAVES else self.create_arg(x) for x in a])
        return super().create_arg(a)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        args, kwargs = self.create_arg(args), self.create_arg(kwargs)  # first: may add getattr nodes
        if name is None:
            name = self._stems.get(target) or self._stems.setdefault(target, self.graph._target_to_str(target))
        # Created bare, then given its arguments as Node.__init__ does: Graph.create_node would
        # walk them for SymInts, and assigning ``node.args`` would re-index the node.
        node = self.graph.create_node(kind, target, name=name, type_expr=type_expr)
        node._update_args_kwargs(args, kwargs)
        return proxy_factory_fn(node) if proxy_factory_fn else fx.Proxy(node, self)


class _RecordTorchCalls(TorchFunctionMode):
    """While emitting, records every torch function call as a graph node: calls on proxies
    (directly, not through ``fx.Proxy.__torch_function__`` again), and factories with none
    (``torch.full``, ``torch.arange``, ``torch.tensor``), made on ``device`` if one is given."""

    def __init__(self, tracer: _Tracer, device: str | None) -> None:
        super().__init__()
        self.tracer = tracer
        self.device = device
        self._methods: dict[Any, bool] = {}  # func -> is a Tensor method (is_tensor_method_or_property is slow)

    def __torch_function__(self, func: Callable[..., Any], types: tuple[type, ...], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not types:  # torch saw no proxy argument
            if _has_proxy((args, kwargs)):  # one inside a list (einsum's operands): let func unpack it
                return func(*args, **kwargs)
            if self.device is not None and func in _FACTORIES:
                kwargs = {**kwargs, "device": self.device}
        is_method = self._methods.get(func)
        if is_method is None:
            is_method = self._methods[func] = torch.overrides.is_tensor_method_or_property(func)
        if is_method:
            return self.tracer.create_proxy("call_method", func.__name__, args, kwargs)
        return self.tracer.create_proxy("call_function", func, args, kwargs)


def _has_proxy(tree: Any) -> bool:
    found = []
    map_aggregate(tree, lambda a: found.append(a) if isinstance(a, fx.Proxy) else a)
    return bool(found)


def _inline(lit: Literal) -> bool:
    """Rank-0 literals are inlined as Python scalars, except NaN (TorchScript cannot read ``nan``)."""
    return lit.aval.ndim == 0 and not (lit.dtype.kind in "fc" and np.isnan(lit.value))


def _literals(graph: Graph) -> list[Literal]:
    """The graph's distinct literals, in first-use order."""
    seen: dict[Literal, None] = {}
    for atoms in [e.inputs for e in graph.eqns] + [graph.outputs]:
        for a in atoms:
            if isinstance(a, Literal):
                seen.setdefault(a)
    return list(seen)


def to_fx(graph: Graph, input_names: Sequence[str] | None = None, output_as_list: bool = False,
          device: str | torch.device | None = None) -> fx.GraphModule:
    """An ``fx.GraphModule`` computing ``graph`` with plain torch calls.

    Placeholders are named ``input_names`` (default ``in_0``, ``in_1``, ...). Array
    literals become registered buffers ``_literal_<i>``; rank-0 literals are inlined
    (NaN ones are buffers too).
    ``forward`` returns a tuple, or a list when ``output_as_list`` (functorch style).
    Tensors the code creates (``torch.full``, ``torch.arange``, ...) are made on ``device``
    (default: torch's default device, the CPU); buffers are placed there too.
    The source graph is attached as ``gm.reftrace_graph``. The input graph is not changed.
    """
    if not isinstance(graph, Graph):
        raise ArgumentError(f"to_fx expects a reftrace Graph, got {type(graph).__name__}")
    names = list(input_names) if input_names is not None else [f"in_{i}" for i in range(len(graph.inputs))]
    if len(names) != len(graph.inputs):
        raise ArgumentError(f"to_fx: {len(names)} input names for a graph with {len(graph.inputs)} inputs")
    fx_graph = fx.Graph()
    tracer = _Tracer(fx_graph)
    root = torch.nn.Module()

    def proxy(node: fx.Node, aval: Aval) -> fx.Proxy:
        node.meta[AVAL_META] = aval
        return fx.Proxy(node, tracer)

    inputs = [proxy(fx_graph.placeholder(name), v.aval) for name, v in zip(names, graph.inputs)]
    constants: dict[Literal, Any] = {}  # literal -> numpy scalar or buffer proxy
    buffers = 0

    def constant(lit: Literal) -> Any:
        nonlocal buffers
        if lit not in constants:
            if _inline(lit):
                constants[lit] = lit.value
            else:
                buffer = tensor_from_numpy(lit.value, copy=True)
                root.register_buffer(f"_literal_{buffers}", buffer if device is None else buffer.to(device))
                constants[lit] = proxy(fx_graph.get_attr(f"_literal_{buffers}"), lit.aval)
                buffers += 1
        return constants[lit]
    for lit in _literals(graph):  # the graph's own first, numbered in first-use order
        constant(lit)

    def apply(eqn: Eqn, operands: Sequence[Any]) -> tuple[Any, ...]:
        outs = _call_rule(eqn, operands, constant)
        for out, var in zip(outs, eqn.outputs, strict=True):
            if not isinstance(out, fx.Proxy):
                raise RuntimeError(f"internal: torch rule for {eqn.primitive.name} returned {type(out).__name__} "
                                   "instead of a traced value")
            out.node.meta[AVAL_META] = var.aval
        return outs

    with _RecordTorchCalls(tracer, None if device is None else str(device)):
        outs = eval_graph(graph, inputs, apply, constant)
        outs = [as_tensor(o) for o in outs]  # a rank-0 literal output becomes a torch.full node
    fx_graph.output(tracer.create_arg(list(outs) if output_as_list else tuple(outs)))
    transpose_products(fx_graph)
    merge_convolution_backwards(fx_graph)
    gm = fx.GraphModule(root, fx_graph)
    gm.reftrace_graph = graph
    # fx's deepcopy keeps only attributes listed here (functorch-style pipelines deepcopy modules)
    gm.meta.setdefault("_user_preserved_attributes", {})["reftrace_graph"] = graph
    return gm


# ----------------------------------------------------------------------------- lowering

def _to_tensor(x: Any) -> torch.Tensor:
    """A checked argument as a tensor: tensors pass through, numpy arrays are shared (no copy),
    JAX arrays are copied through numpy (bit-exact, bfloat16 included; JAX memory is immutable)."""
    if isinstance(x, torch.Tensor):
        return x
    return tensor_from_numpy(np.asarray(x))


class TorchExecutable:
    """``graph`` as a torch callable: numpy arrays, tensors, JAX arrays in, a tuple of tensors out.

    Runs on the device of its tensor arguments (one module per device, built on first
    use). Outputs may alias inputs (an output that is an input, or a view such as a reshape).
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.module = to_fx(graph)
        self._modules: dict[str, fx.GraphModule] = {"cpu": self.module}

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        tensors = [_to_tensor(a) for a in check_args(self.graph, args, "torch-lowered graph", kwargs)]
        device = next((str(t.device) for t in tensors if t.device.type != "cpu"), "cpu")
        if device not in self._modules:
            self._modules[device] = to_fx(self.graph, device=device)
        return tuple(self._modules[device](*tensors))

    def __repr__(self) -> str:
        return f"<TorchExecutable {self.graph!r}>"


@functools.lru_cache(maxsize=256)
def lower_torch(graph: Graph) -> TorchExecutable:
    """The torch callable for ``graph``, built once per graph value."""
    return TorchExecutable(graph)
