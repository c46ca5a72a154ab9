"""The IR: immutable graph values (Var, Literal, Eqn, Graph), their printer and typecheck.

A Graph is a value: frozen, hashable, and compared structurally. Variables are
numbered canonically (inputs first, then equation outputs in order) whenever a
Graph is built, so two traces of the same function are equal no matter which
builder or transform produced them. Names such as ``a``, ``b`` are only assigned
when a graph is printed.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from reftrace.errors import ArgumentError, GraphError, ShapeError

Shape = tuple[int, ...]


def _canonical_dtype(dtype: Any) -> np.dtype:
    return np.dtype(dtype)


@dataclass(frozen=True)
class Aval:
    """Abstract value: what every value in a graph has, a shape and a dtype."""

    shape: Shape
    dtype: np.dtype

    def __post_init__(self) -> None:
        shape = self.shape
        if type(shape) is not tuple or not all(type(d) is int for d in shape):  # avals are made often: fast path
            shape = tuple(int(d) for d in shape)
            object.__setattr__(self, "shape", shape)
        if any(d < 0 for d in shape):
            raise ShapeError(f"negative dimension in shape {shape}")
        if not isinstance(self.dtype, np.dtype):
            object.__setattr__(self, "dtype", _canonical_dtype(self.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def str_short(self) -> str:
        return f"{dtype_short_name(self.dtype)}[{','.join(map(str, self.shape))}]"


_DTYPE_SHORT = {
    "float16": "f16", "float32": "f32", "float64": "f64", "bfloat16": "bf16",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64",
    "bool": "bool", "complex64": "c64", "complex128": "c128",
}


def dtype_short_name(dtype: np.dtype) -> str:
    return _DTYPE_SHORT.get(np.dtype(dtype).name, np.dtype(dtype).name)


class _ValueMixin:
    aval: Aval

    @property
    def shape(self) -> Shape:
        return self.aval.shape

    @property
    def dtype(self) -> np.dtype:
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return self.aval.ndim

    @property
    def size(self) -> int:
        return self.aval.size

    @property
    def nbytes(self) -> int:
        return self.aval.nbytes


@dataclass(frozen=True)
class Var(_ValueMixin):
    """A value produced by an input or an equation. ``id`` is canonical within its Graph."""

    id: int
    aval: Aval

    # Vars key every transform's dicts: hash the id alone (equal Vars have equal ids), not the aval
    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return self is other or (other.__class__ is Var and self.id == other.id and self.aval == other.aval)

    def __repr__(self) -> str:
        return f"Var({self.id}:{self.aval.str_short()})"


@dataclass(frozen=True)
class Literal(_ValueMixin):
    """A constant operand. Its data is stored as bytes so it hashes and compares exactly."""

    data: bytes
    aval: Aval

    @staticmethod
    def of(value: Any, dtype: Any = None) -> "Literal":
        arr = np.asarray(value, dtype=dtype)
        return Literal(np.ascontiguousarray(arr).tobytes(), Aval(arr.shape, arr.dtype))

    @property
    def value(self) -> np.ndarray:
        """The constant as a (read-only) numpy array; a 0-d array for scalars."""
        arr = np.frombuffer(self.data, dtype=self.aval.dtype).reshape(self.aval.shape)
        return arr

    def item(self) -> Any:
        return self.value.item()

    def __str__(self) -> str:
        """``1.5:f32``, ``[1.0, 2.0]:f32[2]``, or ``const:f32[64,3]`` past 4 elements; values print
        exactly (``reftrace.graph_text.parse`` reads them back bit for bit)."""
        if self.aval.shape == ():
            return f"{_format_values(self.value)}:{dtype_short_name(self.dtype)}"
        if self.aval.size <= 4:
            return f"{_format_values(self.value)}:{self.aval.str_short()}"
        return f"const:{self.aval.str_short()}"

    def __repr__(self) -> str:
        return f"Literal({self})"


Atom = Var | Literal


class Params(Mapping[str, Any]):
    """An immutable, hashable mapping of equation parameters (sorted by key)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        frozen = tuple(sorted((k, _freeze(v)) for k, v in pairs))
        object.__setattr__(self, "_items", frozen)
        object.__setattr__(self, "_hash", hash(frozen))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Params are immutable")

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._items == other._items

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the parameters (faster than ``dict(params)``, for ``**kwargs``)."""
        return dict(self._items)

    def __repr__(self) -> str:
        return "Params(" + ", ".join(f"{k}={v!r}" for k, v in self._items) + ")"

    def __reduce__(self):  # pickle/deepcopy through __init__ (__setattr__ is blocked)
        return (Params, (self._items,))


def _freeze(value: Any) -> Any:
    """Turn parameter values into hashable ones (lists to tuples, dtypes canonical)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value)
    if isinstance(value, np.generic):
        return value.item()
    hash(value)  # raises TypeError early for unhashable params
    return value


@dataclass(frozen=True)
class Eqn:
    """``outputs = primitive(*inputs, **params)``."""

    primitive: Any  # reftrace.primitives.Primitive; typed loosely to keep graph.py self-contained
    inputs: tuple[Atom, ...]
    outputs: tuple[Var, ...]
    params: Params = field(default_factory=Params)


@dataclass(frozen=True, eq=False)
class Graph:
    """An immutable, structurally compared program: ``outputs = f(*inputs)``.

    ``joint`` is ``None`` for an ordinary graph; for a graph made by ``vjp`` it is
    ``(num_primals, num_outputs)`` so ``partition`` knows where primals end and
    cotangents start (inputs) and where outputs end and gradients start (outputs).

    ``input_names`` / ``output_names`` (one string per input / output, or ``None``) say what
    the values are: a module's parameter and buffer names, ``args[0]``, ``update(bn.running_mean)``,
    ``grad(fc.weight)``... (docs/ir.md, "Names"). They are documentation, like a jaxpr's debug
    info: they do not take part in ``==`` or the hash, so two traces of the same computation
    are equal (and share compiled code) whatever their values are called. Transforms carry
    them along.
    """

    inputs: tuple[Var, ...]
    eqns: tuple[Eqn, ...]
    outputs: tuple[Atom, ...]
    joint: tuple[int, int] | None = None
    input_names: tuple[str, ...] | None = field(default=None, compare=False)
    output_names: tuple[str, ...] | None = field(default=None, compare=False)
    _key: tuple = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        inputs, eqns, outputs = _canonicalize(tuple(self.inputs), tuple(self.eqns), tuple(self.outputs))
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "eqns", eqns)
        object.__setattr__(self, "outputs", outputs)
        for what, names, values in (("input", self.input_names, inputs), ("output", self.output_names, outputs)):
            if names is not None:
                names = tuple(names)
                if len(names) != len(values) or not all(isinstance(n, str) for n in names):
                    raise GraphError(f"{what}_names must be {len(values)} strings, one per {what}; got {names!r}")
                object.__setattr__(self, f"{what}_names", names)
        key = (inputs, eqns, outputs, self.joint)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, Graph) and self._hash == other._hash and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {len(self.inputs)} inputs, {len(self.eqns)} eqns, {len(self.outputs)} outputs>"

    @property
    def in_avals(self) -> tuple[Aval, ...]:
        return tuple(v.aval for v in self.inputs)

    @property
    def out_avals(self) -> tuple[Aval, ...]:
        return tuple(v.aval for v in self.outputs)

    def replace(self, **changes: Any) -> "Graph":
        """A graph with some fields changed. Names stay with unchanged inputs/outputs; new inputs or
        outputs come without names unless ``input_names``/``output_names`` are given too."""
        fields = dict(inputs=self.inputs, eqns=self.eqns, outputs=self.outputs, joint=self.joint,
                      input_names=None if "inputs" in changes else self.input_names,
                      output_names=None if "outputs" in changes else self.output_names)
        fields.update(changes)
        return Graph(**fields)

    def named(self, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None
              ) -> "Graph":
        """This graph with names (``None`` keeps the current ones)."""
        return Graph(self.inputs, self.eqns, self.outputs, self.joint,
                     self.input_names if input_names is None else tuple(input_names),
                     self.output_names if output_names is None else tuple(output_names))


def _canonicalize(inputs, eqns, outputs):
    """Renumber variables 0, 1, 2, ... in definition order; check single definition and scoping."""
    mapping: dict[Var, Var] = {}
    counter = itertools.count()

    def define(v: Var) -> Var:
        if not isinstance(v, Var):
            raise GraphError(f"graph inputs and equation outputs must be Vars, got {v!r}")
        if v in mapping:
            raise GraphError(f"variable {v!r} is defined twice")
        new = Var(next(counter), v.aval)
        mapping[v] = new
        return new

    def use(a: Atom) -> Atom:
        if isinstance(a, Literal):
            return a
        try:
            return mapping[a]
        except KeyError:
            raise GraphError(f"variable {a!r} is used before it is defined") from None
        except TypeError:
            raise GraphError(f"expected a Var or Literal operand, got {a!r}") from None

    new_inputs = tuple(define(v) for v in inputs)
    new_eqns = []
    for e in eqns:
        ins = tuple(use(a) for a in e.inputs)
        outs = tuple(define(v) for v in e.outputs)
        params = e.params if isinstance(e.params, Params) else Params(e.params)
        new_eqns.append(Eqn(e.primitive, ins, outs, params))
    new_outputs = tuple(use(a) for a in outputs)
    return new_inputs, tuple(new_eqns), new_outputs


# ----------------------------------------------------------------------------- printing

def _names() -> Iterator[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    for n in itertools.count(1):
        for combo in itertools.product(letters, repeat=n):
            yield "".join(combo)


def _format_values(arr: np.ndarray) -> str:
    """Nested-list text of ``arr``'s values, as ``tolist()`` prints them, except that a NaN other
    than the dtype's own ``nan`` prints as ``-nan`` (sign bit set) or ``nan(0x<bits>)``."""
    if arr.ndim:
        return "[" + ", ".join(_format_values(row) for row in arr) + "]"
    v = arr.item()
    if isinstance(v, float) and v != v:
        bits = _bits(arr)
        if bits == _bits(np.array(np.nan, arr.dtype)):
            return "nan"
        if bits == _bits(np.array(-np.nan, arr.dtype)):
            return "-nan"
        return f"nan(0x{bits:0{2 * arr.dtype.itemsize}x})"
    return repr(v)  # repr of a Python float round-trips, and every float dtype converts to it exactly


def _bits(x: Any) -> int:
    """A scalar's bit pattern as an unsigned integer."""
    return int(np.asarray(x).view(f"u{x.dtype.itemsize}"))


def _format_param(v: Any) -> str:
    """``repr``, except dtypes print short (``f32``), also inside tuples."""
    if isinstance(v, np.dtype):
        return dtype_short_name(v)
    if isinstance(v, Graph):
        return "{ graph }"
    if isinstance(v, tuple):
        items = ", ".join(_format_param(x) for x in v)
        return f"({items},)" if len(v) == 1 else f"({items})"
    return repr(v)


def format_graph(graph: Graph, indent: int = 0, literal: Callable[[Literal], str] = str) -> str:
    """A jaxpr-like listing: ``{ lambda a:f32[3] . b:f32[3] = cos a ... in (b) }``.

    A joint graph's listing starts with ``# joint: (num_primals, num_outputs)``. ``literal`` prints
    each literal operand (``reftrace.graph_text.save`` prints large ones as references).
    The format is documented in docs/graph_format.md; ``reftrace.graph_text.parse`` reads it.
    """
    names: dict[Var, str] = {}
    gen = _names()

    def name(a: Atom, decl: bool = False) -> str:
        if isinstance(a, Literal):
            return literal(a)
        if a not in names:
            names[a] = next(gen)
        return f"{names[a]}:{a.aval.str_short()}" if decl else names[a]

    pad = " " * indent
    lines = []
    if graph.joint is not None:
        lines.append(f"{pad}# joint: ({graph.joint[0]}, {graph.joint[1]})")
    for key in ("input_names", "output_names"):
        if (given := getattr(graph, key)) is not None:
            lines.append(f"{pad}# {key}: {json.dumps(list(given))}")
    ins = " ".join(name(v, decl=True) for v in graph.inputs)
    lines.append(f"{pad}{{ lambda {ins} .")
    for e in graph.eqns:
        outs = " ".join(name(v, decl=True) for v in e.outputs)
        params = " ".join(f"{k}={_format_param(v)}" for k, v in e.params.items())
        params = f"[{params}]" if params else ""
        args = " ".join(name(a) for a in e.inputs)
        lines.append(f"{pad}    {outs} = {e.primitive.name}{params} {args}".rstrip())
    outs = " ".join(name(a) for a in graph.outputs)
    lines.append(f"{pad}  in ({outs}) }}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- dead-code elimination

def live_eqns(eqns: Sequence[Eqn], outputs: Iterable[Atom], available: Collection[Var] = ()) -> list[Eqn]:
    """The equations (in order) that ``outputs`` need: reftrace's one dead-code elimination.

    One backward sweep; every primitive is pure, so an equation none of whose outputs is
    needed can go. Values in ``available`` are given rather than computed (a backward graph
    reads saved values): an equation is kept only for a needed output that is not available.
    """
    # within one graph (or builder) a Var's id names it: sets of ints hash faster than sets of Vars
    needed = {a.id for a in outputs if type(a) is Var}
    given = {v.id for v in available}
    kept: list[Eqn] = []
    for eqn in reversed(eqns):
        if any(v.id in needed and v.id not in given for v in eqn.outputs):
            kept.append(eqn)
            needed.update(a.id for a in eqn.inputs if type(a) is Var)
    kept.reverse()
    return kept


def free_vars(eqns: Sequence[Eqn], outputs: Iterable[Atom]) -> set[Var]:
    """The values ``eqns`` read or ``outputs`` name that ``eqns`` do not define: what they need as inputs."""
    defined = {v for e in eqns for v in e.outputs}
    used = {a for e in eqns for a in e.inputs if isinstance(a, Var)}
    used.update(a for a in outputs if isinstance(a, Var))
    return used - defined


def expect_graph(value: object, verb: str) -> None:
    """Raise ArgumentError unless ``value`` is a Graph, saying how to get one from what was passed."""
    if isinstance(value, Graph):
        return
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Graph) for v in value):
        hint = "this is a (forward, backward) pair such as a Partition: pass p.forward or p.backward"
    elif isinstance(getattr(value, "reftrace_graph", None), Graph):
        hint = "this module was emitted from a reftrace Graph: pass its .reftrace_graph"
    elif callable(value):
        hint = "trace the function first: rt.trace(fn, *example_arrays)"
    else:
        hint = "make one with rt.trace(fn, *example_arrays)"
    raise ArgumentError(f"{verb} expects a reftrace Graph, got {type(value).__name__}; {hint}")
