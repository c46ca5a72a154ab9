"""Translating functional ATen ops into reftrace equations, one table row per op, as torch dispatches them.

Every op's result is checked against the (fake) tensors torch computed for it: a
shape that differs is a bug in the table and raises; a dtype that differs is
converted, so the captured graph always has torch's type promotion. An op with no
row only fails if its result is used (torch dispatches checks whose results are
discarded), and equations nothing reads are pruned at the end.

A graph with random ops gets one extra input, its ``u32[2]`` key, after the
tensor inputs (so it is the last input); see ``reftrace.torch_bridge.aten.random``.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._mode_utils import no_dispatch

from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.torch_dtypes import numpy_dtype, tensor_to_numpy
from reftrace.builder import Builder
from reftrace.errors import (DataDependentControlFlowError, ReftraceError, ShapeError, TracingError,
                             UnsupportedOperatorError)
from reftrace.graph import Aval, Graph, Literal
from reftrace.primitives import checked
from reftrace.lax import TracedArray
from reftrace.torch_bridge.aten import NodeContext, rule_for
from reftrace.torch_bridge.aten import _common
from reftrace.torch_bridge.aten._common import SparseLookup
from reftrace.torch_bridge.sparse_gradients import SparseGradient, find_sparse_gradients
from reftrace.torch_bridge.user_frames import innermost_user_frame
from reftrace.transforms.simplify import eliminate_dead_code, live_eqns

DOCS_ANCHOR = "docs/torch.md#unsupported-operators"


def aval_of_meta(val: Any, what: str) -> Aval:
    """The Aval of a FakeTensor meta; symbolic (data-dependent) sizes are refused."""
    shape = tuple(val.shape)
    if not all(isinstance(d, int) for d in shape):
        raise TracingError(f"{what} has a symbolic shape {shape}; reftrace captures static shapes only")
    return Aval(shape, numpy_dtype(val.dtype))


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


def _metas(val: Any) -> list[Any]:
    return list(val) if isinstance(val, (tuple, list)) else [val]


class _Unsupported:
    """The value of an op reftrace cannot translate: the error is raised only if the value is used.

    torch runs (and so dispatches) ops whose results the function never uses, such as
    checks whose outputs are discarded; like dead code, they need no row.
    """

    def __init__(self, error: ReftraceError) -> None:
        self.error = error


class _Entry:
    """What a dispatched tensor stands for: its traced value, and whether it was made with gradients stopped."""

    __slots__ = ("tensor", "value", "stops", "stopped")

    def __init__(self, tensor: torch.Tensor, value: Any, stops: bool) -> None:
        self.tensor = tensor  # keeps the tensor alive, so its id() is not reused while tracing
        self.value = value
        self.stops = stops
        self.stopped: Any = None


class Translator:
    """Builds a reftrace Graph from functional ATen ops as they are dispatched, one table row per op.

    ``capture`` calls ``input`` for each (fake) input tensor, ``call`` for each ATen op
    after torch has run it on fake tensors (its outputs carry torch's shapes and dtypes,
    which every row's result is checked against), and ``finish`` with the output tensors.
    Tensors are known by identity; a real (non-fake) tensor an op reads is a constant.
    Must run inside ``lax.tracing(translator.builder)``.
    """

    def __init__(self) -> None:
        self.builder = Builder()
        self.env: dict[int, _Entry] = {}
        self.inputs: list[TracedArray] = []
        self.closed_over: list[ClosedOver] = []  # the real tensors read as constants, in order
        self._constant_index: dict[int, int] = {}  # id(tensor) -> its index in closed_over
        self.sparse_lookups: list[SparseLookup] = []  # embedding(sparse=True) lookups, for find_sparse_gradients
        self.sparse_gradients: tuple[SparseGradient, ...] = ()  # set by finish

    def input(self, t: torch.Tensor) -> None:
        value = lax.new_input(self.builder, aval_of_meta(t, f"input {len(self.inputs)}"))
        self.inputs.append(value)
        self.env[id(t)] = _Entry(t, value, False)

    def _read(self, t: torch.Tensor, consumer_stops: bool) -> Any:
        """A tensor's value; leaving a no_grad()/detach region it passes through ``stop_gradient``."""
        entry = self.env.get(id(t))
        if entry is None:
            if isinstance(t, FakeTensor):
                raise TracingError(f"reftrace bug: a {tuple(t.shape)} {t.dtype} tensor reached an ATen op "
                                   "without being made by one; please report it")
            with no_dispatch():  # a constant's values, read beneath the fake-tensor mode we run inside
                value = Literal.of(tensor_to_numpy(t))
            self._constant_index[id(t)] = len(self.closed_over)
            self.closed_over.append(ClosedOver.of(t, value.nbytes, innermost_user_frame()))
            entry = self.env[id(t)] = _Entry(t, lax.constant(value), False)
        if t.requires_grad and not consumer_stops and id(t) in self._constant_index:
            # a differentiable read of a constant (not under detach()/no_grad): its gradient is lost
            k = self._constant_index[id(t)]
            self.closed_over[k] = dataclasses.replace(self.closed_over[k], requires_grad=True)
        if consumer_stops or not entry.stops or isinstance(entry.value, _Unsupported):
            return entry.value
        if entry.stopped is None:
            entry.stopped = _stop_gradient(entry.value)
        return entry.stopped

    def _arg(self, a: Any, stops: bool) -> Any:
        if isinstance(a, torch.Tensor):
            return self._read(a, stops)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x, stops) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v, stops) for k, v in a.items()}
        if isinstance(a, torch.dtype):
            return numpy_dtype(a)
        return a

    def call(self, op: Any, args: tuple, kwargs: dict, out: Any, *, location: str | None = None,
             stops: bool = False, straight: bool = False) -> None:
        """Translate one dispatched op whose (fake) results are ``out``."""
        metas = _metas(out)
        if not any(isinstance(m, torch.Tensor) for m in metas):
            return  # metadata queries, asserts: nothing a graph computes
        if straight and op is torch.ops.aten.copy.default:
            old, new = self._read(args[0], False), self._read(args[1], False)
            poisoned = next((v for v in (old, new) if isinstance(v, _Unsupported)), None)
            self._bind(metas, [poisoned or straight_through(old, new)], stops)
            return
        rule, mutated = rule_for(op), None
        if rule is None and (functional := functional_variant(op)) is not None:
            rule, mutated = rule_for(functional), args[0]
        a, k = self._arg(args, stops), self._arg(kwargs, stops)
        poisoned = next((x for x in pytree.tree_leaves((a, k)) if isinstance(x, _Unsupported)), None)
        if poisoned is not None:
            results: Any = [poisoned] * len(metas)
        elif rule is None:
            results = [_Unsupported(unsupported_operator(op, location))] * len(metas)
        else:
            try:
                results = self._apply(op, rule, a, k, metas, isinstance(out, (tuple, list)), args, location)
            except ReftraceError as err:
                results = [_Unsupported(err)] * len(metas)
        self._bind(metas, results, stops)
        if isinstance(mutated, torch.Tensor):  # later readers of the mutated tensor see its new value
            self.env[id(mutated)] = _Entry(mutated, results[0], stops)

    def _apply(self, op: Any, rule: Any, args: tuple, kwargs: dict, metas: list[Any], multiple: bool,
               raw_args: tuple, location: str | None) -> list[Any]:
        out_avals = [_aval_of_result(m, op) if isinstance(m, torch.Tensor) else None for m in metas]
        in_vals = [x if isinstance(x, torch.Tensor) else None for x in raw_args]
        context = NodeContext(op, out_avals, in_vals)
        _common._context.append(context)
        complex_inputs = any(t.is_complex() for t in in_vals if t is not None) or any(
            a is not None and a.dtype.kind == "c" for a in out_avals)
        first_new = len(self.builder.eqns)
        try:
            try:
                result = rule(*args, **kwargs)
                checked_result = _check(op, result, out_avals, multiple)
            except ShapeError as err:
                if not complex_inputs:
                    raise
                raise UnsupportedOperatorError(f"{op_display_name(op)} on complex tensors is not supported "
                                               f"(a primitive refuses them: {err})") from None
            if complex_inputs and op not in _CASTS:
                _refuse_dropped_imaginary_parts(op, self.builder.eqns[first_new:])
            self.sparse_lookups.extend(dataclasses.replace(lookup, location=location)
                                       for lookup in context.sparse_lookups)
        except ReftraceError as err:
            if location and "(called from" not in str(err) and "(at " not in str(err):
                raise type(err)(f"{err} (called from {location})") from None
            raise
        finally:
            _common._context.pop()
        return checked_result

    def _bind(self, metas: list[Any], results: list[Any], stops: bool) -> None:
        for m, r in zip(metas, results):
            if isinstance(m, torch.Tensor):
                self.env[id(m)] = _Entry(m, r, stops)

    def finish(self, outputs: Sequence[torch.Tensor], key: TracedArray | None) -> Graph:
        """The Graph with the inputs seen so far (then ``key``, if random ops drew from it) and ``outputs``."""
        atoms = []
        for i, t in enumerate(outputs):
            value = self._read(t, consumer_stops=False)
            if isinstance(value, _Unsupported):
                raise value.error
            if not isinstance(value, TracedArray):
                raise TracingError(f"output {i} of the captured function is a {type(value).__name__}, "
                                   "not a tensor")
            atoms.append(value.atom)
        inputs = [t.atom for t in self.inputs] + ([key.atom] if key is not None else [])
        if self.sparse_lookups:  # the extra liveness pass only where a sparse lookup asks for it
            self.sparse_gradients = find_sparse_gradients(inputs, live_eqns(self.builder.eqns, atoms), atoms,
                                                          self.sparse_lookups)
        return checked(eliminate_dead_code(self.builder.build(inputs, atoms)), "capture")


@dataclass(frozen=True)
class ClosedOver:
    """A real tensor the function read from its enclosing scope: baked into the graph as a constant.
    ``requires_grad``: it requires grad and an op read it differentiably (not under detach/no_grad).
    ``tensor`` (weakly) and ``version``: the tensor and its version counter when its values were read."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    nbytes: int
    location: str | None
    tensor: Any = dataclasses.field(default=None, compare=False, repr=False)
    version: int | None = None

    @staticmethod
    def of(t: torch.Tensor, nbytes: int, location: str | None) -> "ClosedOver":
        try:
            tensor, version = weakref.ref(t), t._version
        except (RuntimeError, TypeError):  # an inference-mode tensor has no version counter to watch
            tensor, version = None, None
        return ClosedOver(tuple(t.shape), t.dtype, False, nbytes, location, tensor, version)

    def changed(self) -> bool:
        """Whether the tensor was written in place since its values were baked into the graph."""
        t = self.tensor() if self.tensor is not None else None
        return t is not None and t._version != self.version

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"a {list(self.shape)} {str(self.dtype).replace('torch.', '')} tensor ({self.nbytes} bytes){where}"


def _aval_of_result(meta: torch.Tensor, op: Any) -> Aval:
    if not all(isinstance(d, int) for d in meta.shape):
        raise DataDependentControlFlowError(
            f"data-dependent control flow: the output shape of {op_display_name(op)} depends on tensor values; "
            "reftrace captures static shapes")
    return aval_of_meta(meta, f"output of {op_display_name(op)}")


_CASTS = frozenset({torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default,
                    torch.ops.aten.copy.default, torch.ops.aten.copy_.default})
"""ATen ops whose meaning includes torch's complex-to-real cast (the real part, as torch's ``.to``)."""


def _refuse_dropped_imaginary_parts(op: Any, eqns: Sequence[Any]) -> None:
    """A rule written for real tensors casts a complex operand to a real dtype, silently keeping its
    real part: refuse instead of returning a wrong value (rules that want a part say real/imag)."""
    for e in eqns:
        if e.primitive is P.convert_element_type_p and P.is_complex(e.inputs[0].dtype) \
                and not P.is_complex(e.params["new_dtype"]):
            raise UnsupportedOperatorError(f"{op_display_name(op)} on complex tensors is not supported (its "
                                           "reftrace rule is written for real tensors)")


def _check(op: Any, result: Any, out_avals: list[Aval | None], multiple: bool) -> list[Any]:
    """Each result checked against torch's shape (a mismatch is a table bug) and cast to torch's dtype."""
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
            r = lax.constant(r, aval.dtype)
        if r.shape != aval.shape:
            raise ReftraceError(f"reftrace bug: the ATen rule for {op_display_name(op)} produced "
                                f"{r.aval.str_short()} but torch says {aval.str_short()}; please report it")
        checked.append(lax.convert_element_type(r, aval.dtype))
    return checked


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
    if isinstance(value, TracedArray) and P.is_inexact(value.dtype):
        return lax.stop_gradient(value)
    return value
