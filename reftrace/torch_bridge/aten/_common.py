"""The ATen table itself and the helpers its rows share.

``aten_rules[OpOverload](*args, **kwargs)`` receives a dispatched ATen op's arguments with
every tensor as a ``TracedArray`` and every other argument static (Python
numbers, lists, ``np.dtype`` for torch dtypes, ``None``). It returns a TracedArray
or a tuple/list of them, built with ``reftrace.lax`` inside the capture's builder.

Rules may read the op's output avals with ``out_aval()``: the translator checks
every result's shape against them and converts dtypes to them afterwards, so type
promotion is always torch's and a rule only has to pick a sensible compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.torch_dtypes import numpy_dtype, torch_dtype
from reftrace.errors import UnsupportedOperatorError
from reftrace.graph import Aval
from reftrace.lax import TracedArray
from reftrace.nn.pooling import lowest  # noqa: F401 - the rows import it from here

aten = torch.ops.aten
aten_rules: dict[Any, Callable[..., Any]] = {}


def register(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register(aten.add.Tensor, aten.add.Scalar)`` makes ``fn`` the row for each op. An op
    another library defines, which may not be loaded, is named by its qualified name
    (``"transformers::grouped_mm_fallback"``, ``OpOverload.name()``); ``rule_for`` finds either."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            aten_rules[op] = fn
        return fn
    return deco


def rule_for(op: Any) -> Callable[..., Any] | None:
    """The row for ``op``: by the OpOverload, else by its qualified name (ops of other libraries)."""
    rule = aten_rules.get(op)
    if rule is None and hasattr(op, "name"):
        rule = aten_rules.get(op.name())
    return rule


# ----------------------------------------------------------------------------- the op being translated

class NodeContext:
    """What a rule may know about the ATen op it translates (set by the translator)."""

    def __init__(self, op: Any, out_avals: Sequence[Aval | None], in_vals: Sequence[Any]) -> None:
        self.op = op
        self.out_avals = tuple(out_avals)
        self.in_vals = tuple(in_vals)  # each positional argument's fake tensor (or None)
        self.sparse_lookups: list[SparseLookup] = []  # embedding(sparse=True) lookups the rule made


@dataclass(frozen=True)
class SparseLookup:
    """An ``embedding(weight, indices, sparse=True)`` lookup, whose weight eager gives a sparse gradient:
    its values ``output``, made from ``weight`` and ``indices`` (values of the graph being built)."""

    weight: TracedArray
    indices: TracedArray
    padding_idx: int
    output: TracedArray
    location: str | None = None  # the user's line (set by the translator)


_context: list[NodeContext] = []


def current() -> NodeContext:
    return _context[-1]


def out_aval(i: int = 0) -> Aval:
    """The aval torch's meta says output ``i`` of the current op has."""
    aval = current().out_avals[i]
    assert aval is not None, f"output {i} of {current().op} has no tensor meta"
    return aval


def unsupported(what: str) -> UnsupportedOperatorError:
    """An UnsupportedOperatorError for an argument combination a rule does not cover."""
    return UnsupportedOperatorError(f"{current().op}: {what}")


# ----------------------------------------------------------------------------- values

def is_tensor(x: Any) -> bool:
    return isinstance(x, TracedArray)


def literal(value: Any, dtype: Any) -> TracedArray:
    """A constant (scalar or array) as a traced operand of ``dtype`` (``lax.constant`` with its dtype required)."""
    return lax.constant(value, dtype)


def cast(x: Any, dtype: Any) -> TracedArray:
    """A tensor converted to ``dtype``, or a Python scalar as a rank-0 constant of ``dtype``."""
    dtype = np.dtype(dtype)
    if is_tensor(x):
        return lax.convert_element_type(x, dtype)
    return literal(x, dtype)


def shape_of(x: Any) -> tuple[int, ...]:
    return x.shape if is_tensor(x) else ()


def broadcast_shapes(*xs: Any) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*[shape_of(x) for x in xs]))


def bcast(x: TracedArray, shape: Sequence[int]) -> TracedArray:
    """numpy-style broadcast to ``shape``; rank-0 operands stay rank 0 (every primitive broadcasts them)."""
    shape = tuple(shape)
    if x.ndim == 0 or x.shape == shape:
        return x
    return lax.broadcast_to_rank(x, shape)


def bcast_full(x: TracedArray, shape: Sequence[int]) -> TracedArray:
    """Broadcast to ``shape`` including rank-0 operands (for outputs and non-elementwise consumers)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    return lax.broadcast_to_rank(x, shape)


def elementwise(prim: P.Primitive, *args: Any, dtype: Any) -> TracedArray:
    """``prim`` on ``args`` cast to ``dtype`` and broadcast together (torch broadcasting)."""
    shape = broadcast_shapes(*args)
    return lax.bind(prim, *[bcast(cast(a, dtype), shape) for a in args])


def _proxy(x: Any) -> Any:
    if is_tensor(x):
        return torch.empty((1,) * min(x.ndim, 1), dtype=torch_dtype(x.dtype))
    return x


def promote(*xs: Any) -> np.dtype:
    """torch's type promotion of tensors (rank-0 ones rank lower) and Python scalars."""
    proxies = [_proxy(x) for x in xs]
    dtype = torch.result_type(proxies[0], proxies[1]) if len(proxies) > 1 else None
    if len(proxies) == 1:
        p = proxies[0]
        dtype = p.dtype if isinstance(p, torch.Tensor) else torch.tensor(p).dtype
    for p in proxies[2:]:
        dtype = torch.result_type(torch.empty((1,), dtype=dtype), p)
    return numpy_dtype(dtype)


def opmath(dtype: Any) -> np.dtype:
    """The dtype torch's CPU kernels compute float16/bfloat16 in (float32: their opmath/acc type), else ``dtype``."""
    d = np.dtype(dtype)
    return np.dtype(np.float32) if P.is_float(d) and d.itemsize == 2 else d


def float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` if floating or complex, else torch's default float dtype (float32)."""
    dtype = np.dtype(dtype)
    return dtype if P.is_inexact(dtype) else numpy_dtype(torch.get_default_dtype())


# ----------------------------------------------------------------------------- dims

def norm_dim(d: int, ndim: int) -> int:
    n = max(ndim, 1)
    if not -n <= d < n:
        raise UnsupportedOperatorError(f"{current().op}: dimension {d} out of range for rank {ndim}")
    return d % n


def norm_dims(dims: Any, ndim: int) -> tuple[int, ...]:
    """Reduction dims: ``None`` and ``[]`` mean every dimension (ATen's convention)."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(sorted({norm_dim(int(d), ndim) for d in dims})) if ndim else ()


def keep_dims(reduced: TracedArray, shape: Sequence[int], axes: Sequence[int], keepdim: bool) -> TracedArray:
    if not keepdim:
        return reduced
    return lax.reshape(reduced, tuple(1 if i in axes else d for i, d in enumerate(shape)))


def highest(dtype: Any) -> Any:
    """The identity of min: +inf for floats, the maximum for integers, True for bool."""
    dtype = np.dtype(dtype)
    if P.is_float(dtype):
        return np.inf
    if P.is_bool(dtype):
        return True
    return np.iinfo(dtype).max


