"""Translating a functional ATen FX graph into a reftrace Graph, one table row per node.

Every node's result is checked against torch's own meta (``node.meta["val"]``):
a shape that differs is a bug in the table and raises; a dtype that differs is
converted, so the captured graph always has torch's type promotion. Nodes whose
results are never used are skipped (they need no row), and equations left dead
by multi-output rules are pruned.

A graph with random ops gets one extra input, its ``u32[2]`` key, after the
placeholders (so it is the last input); see ``reftrace.torch_bridge.aten.random``.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx

from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.torch_dtypes import numpy_dtype
from reftrace.builder import Builder
from reftrace.errors import ReftraceError, TracingError, UnsupportedOperatorError
from reftrace.graph import Aval, Graph, Literal, Var
from reftrace.lax import TracedArray
from reftrace.torch_bridge.aten import NodeContext, aten_rules
from reftrace.torch_bridge.aten import _common
from reftrace.torch_bridge.aten.random import key_stream
from reftrace.torch_bridge.user_frames import location_from_stack_trace

DOCS_ANCHOR = "docs/torch.md#unsupported-operators"
STOP_GRADIENT = "reftrace_stop_gradient"  # key in node.meta["custom"]: made under no_grad() or by detach()
# key in node.meta["custom"] of ``copy(old, new)`` nodes that capture writes for an in-place op under
# no_grad(): the value is ``new``, the gradient goes to ``old`` unchanged (torch does not record the op)
STRAIGHT_THROUGH = "reftrace_straight_through"


def _stops_gradient(node: fx.Node) -> bool:
    custom = node.meta.get("custom")
    return isinstance(custom, dict) and bool(custom.get(STOP_GRADIENT))


def aval_of_meta(val: Any, what: str) -> Aval:
    """The Aval of a FakeTensor meta; symbolic (data-dependent) sizes are refused."""
    shape = tuple(val.shape)
    if not all(isinstance(d, int) for d in shape):
        raise TracingError(f"{what} has a symbolic shape {shape}; reftrace captures static shapes only")
    return Aval(shape, numpy_dtype(val.dtype))


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A concrete tensor's values as numpy, bit for bit (bfloat16 included)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype(torch.bfloat16))
    return t.numpy()


def op_display_name(op: Any) -> str:
    """``aten::mystery`` for an OpOverload (what users see in profiles and errors)."""
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else str(op)


def op_python_path(op: Any) -> str:
    """``torch.ops.aten.mystery.default``: the key a decompositions dict takes."""
    try:
        return f"torch.ops.{op.namespace}.{op._opname}.{op._overloadname}"
    except AttributeError:
        return repr(op)


def unsupported_operator(op: Any, location: str | None) -> UnsupportedOperatorError:
    where = f" (called from {location})" if location else ""
    message = (f"{op_display_name(op)} has no reftrace mapping{where}. Pass a decomposition with "
               f"decompositions={{{op_python_path(op)}: ...}}, or add a row to the ATen table; "
               f"see {DOCS_ANCHOR}.")
    if isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags:
        message += (" It draws random numbers: reftrace maps dropout, bernoulli, rand/randn(_like), randint, "
                    "uniform_, normal_ and a few more through its functional RNG (docs/torch.md#random-operators), "
                    "but not this one; a decomposition into those ops works.")
    return UnsupportedOperatorError(message)


def functional_variant(op: Any) -> Any | None:
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: the out-of-place twin of an in-place op, if any.

    Functionalization removes mutations of the function's own tensors, but a decomposition
    (or code mutating a constant) can still leave an in-place op in the graph.
    """
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.arguments or not op._opname.endswith("_") or op._opname.startswith("_"):
        return None
    first = schema.arguments[0].alias_info
    if first is None or not first.is_write:
        return None
    packet = getattr(getattr(torch.ops, op.namespace), op._opname[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the outputs depend on; an in-place op counts as a write to its first argument."""
    writers: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and functional_variant(node.target) is not None:
            if node.args and isinstance(node.args[0], fx.Node):
                writers.setdefault(node.args[0], []).append(node)
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
        stack.extend(writers.get(node, ()))
    return live


def _metas(val: Any) -> list[Any]:
    return list(val) if isinstance(val, (tuple, list)) else [val]


class _Translator:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.builder = Builder()
        self.env: dict[fx.Node, Any] = {}
        self.stopped: dict[fx.Node, Any] = {}

    def _read(self, node: fx.Node, consumer_stops: bool) -> Any:
        """A node's value; leaving a no_grad()/detach region it passes through ``stop_gradient``."""
        if consumer_stops or not _stops_gradient(node):
            return self.env[node]
        if node not in self.stopped:
            self.stopped[node] = _stop_gradient(self.env[node])
        return self.stopped[node]

    def run(self) -> Graph:
        live = _live_nodes(self.gm.graph)
        inputs: list[TracedArray] = []
        outputs: list[Any] = []
        with lax.tracing(self.builder), key_stream(self.builder) as keys:
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    aval = aval_of_meta(node.meta["val"], f"input {node.name}")
                    self.env[node] = lax.new_input(self.builder, aval)
                    inputs.append(self.env[node])
                elif node not in live:
                    continue
                elif node.op == "get_attr":
                    self.env[node] = self._constant(getattr(self.gm, node.target))
                elif node.op == "call_function":
                    self.env[node] = self._call(node)
                elif node.op == "output":
                    outputs = [self._output(v, i) for i, v in enumerate(_flat_outputs(node.args[0]))]
                else:
                    raise TracingError(f"unexpected FX node {node.format_node()}")
        if keys.key is not None:  # random ops drew from it: the key is the last input
            inputs.append(keys.key)
        graph = self.builder.build([t.atom for t in inputs], outputs)
        return prune(graph)

    def _constant(self, value: Any) -> Any:
        """A tensor constant becomes a literal; other objects (a Generator) stay static for the op using them."""
        if not isinstance(value, torch.Tensor):
            return value
        return lax._wrap_literal(Literal.of(tensor_to_numpy(value)))

    def _output(self, value: Any, i: int) -> Any:
        if isinstance(value, fx.Node):
            value = self._read(value, consumer_stops=False)
        if isinstance(value, TracedArray):
            return value.atom
        raise TracingError(f"output {i} of the captured function is a {type(value).__name__}, not a tensor")

    def _arg(self, a: Any, stops: bool) -> Any:
        if isinstance(a, fx.Node):
            return self._read(a, stops)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x, stops) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v, stops) for k, v in a.items()}
        if isinstance(a, torch.dtype):
            return numpy_dtype(a)
        if isinstance(a, torch.Tensor):
            return lax._wrap_literal(Literal.of(tensor_to_numpy(a)))
        return a

    def _call(self, node: fx.Node) -> Any:
        target = node.target
        stops = _stops_gradient(node)
        if target is operator.getitem:
            container, index = node.args
            return self._read(container, stops)[index]
        if _is_straight_through(node):
            old, new = node.args[:2]
            return straight_through(self._read(old, False), self._read(new, False))
        location = location_from_stack_trace(node.meta.get("stack_trace"))
        rule = aten_rules.get(target)
        mutated = None
        if rule is None and (functional := functional_variant(target)) is not None:
            rule, mutated = aten_rules.get(functional), node.args[0]
        if rule is None:
            raise unsupported_operator(target, location)
        args, kwargs = self._arg(node.args, stops), self._arg(node.kwargs, stops)
        metas = _metas(node.meta.get("val"))
        out_avals = [aval_of_meta(m, f"output of {op_display_name(target)}") if isinstance(m, torch.Tensor)
                     else None for m in metas]
        in_vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args]
        _common._context.append(NodeContext(target, out_avals, in_vals))
        try:
            result = rule(*args, **kwargs)
        except ReftraceError as err:
            if location and "(called from" not in str(err) and "(at " not in str(err):
                raise type(err)(f"{err} (called from {location})") from None
            raise
        finally:
            _common._context.pop()
        result = self._check(target, result, out_avals, isinstance(node.meta.get("val"), (tuple, list)))
        if isinstance(mutated, fx.Node):  # later readers of the mutated tensor see its new value
            self.env[mutated] = result
            self.stopped.pop(mutated, None)
        return result

    def _check(self, op: Any, result: Any, out_avals: list[Aval | None], multiple: bool) -> Any:
        results = list(result) if multiple else [result]
        if len(results) != len(out_avals):
            raise ReftraceError(f"reftrace bug: the ATen rule for {op_display_name(op)} returned {len(results)} "
                                f"values but torch's meta has {len(out_avals)}; please report it")
        checked = []
        for r, aval in zip(results, out_avals):
            if aval is None:
                checked.append(r)
                continue
            if not isinstance(r, TracedArray):
                r = lax._wrap_literal(Literal.of(np.asarray(r, dtype=aval.dtype)))
            if r.shape != aval.shape:
                raise ReftraceError(f"reftrace bug: the ATen rule for {op_display_name(op)} produced "
                                    f"{r.aval.str_short()} but torch says {aval.str_short()}; please report it")
            checked.append(lax.convert_element_type(r, aval.dtype))
        return type(result)(checked) if multiple else checked[0]


def _is_straight_through(node: fx.Node) -> bool:
    custom = node.meta.get("custom")
    return (isinstance(custom, dict) and bool(custom.get(STRAIGHT_THROUGH))
            and node.target is torch.ops.aten.copy.default)


def straight_through(old: TracedArray, new: Any) -> TracedArray:
    """``new``'s value with ``old``'s gradient path: ``(old - stop_gradient(old)) + new``.

    ``old - stop_gradient(old)`` is exactly 0 for finite ``old`` (whose gradient it carries);
    where ``old`` is inf or NaN the result is plain ``new``. ``new`` arrives gradient-stopped.
    """
    new = lax.broadcast_to_rank(lax.convert_element_type(new, old.dtype), old.shape)
    if not P.is_float(old.dtype):
        return new
    passthrough = lax.sub(old, lax.stop_gradient(old))
    return lax.select(lax.is_finite(old), lax.add(passthrough, new), new)


def _stop_gradient(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_stop_gradient(v) for v in value)
    if isinstance(value, TracedArray) and P.is_float(value.dtype):
        return lax.stop_gradient(value)
    return value


def _flat_outputs(args: Any) -> Iterable[Any]:
    return list(args) if isinstance(args, (tuple, list)) else [args]


def prune(graph: Graph) -> Graph:
    """Drop equations whose outputs nothing uses (every primitive is pure)."""
    needed = {a for a in graph.outputs if isinstance(a, Var)}
    kept = []
    for eqn in reversed(graph.eqns):
        if any(v in needed for v in eqn.outputs):
            kept.append(eqn)
            needed.update(a for a in eqn.inputs if isinstance(a, Var))
    if len(kept) == len(graph.eqns):
        return graph
    return graph.replace(eqns=tuple(reversed(kept)))


def fx_to_graph(gm: fx.GraphModule) -> Graph:
    """The reftrace Graph of a functional ATen ``GraphModule`` (placeholders become inputs, in order).

    If it has random ops, one more input follows the placeholders: the ``u32[2]`` key they draw from.
    """
    return _Translator(gm).run()
