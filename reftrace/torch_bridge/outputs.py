"""A captured function's outputs: its tensors, flat, plus a structure that rebuilds the rest.

Graph outputs are tensors only; what a function returns is often more: tuples and
dicts, ``ModelOutput``s, and objects that hold tensors in attributes (transformers'
``DynamicCache``/``EncoderDecoderCache`` and their layers, dataclasses). ``flatten_outputs``
walks the value:

- types torch's pytree knows (tuples, lists, dicts, namedtuples, and what libraries register
  with ``torch.utils._pytree.register_pytree_node``, such as transformers' ``ModelOutput``)
  are flattened by their registration;
- any other object with tensors among its attributes (``__dict__`` or ``__slots__``) is
  flattened through them and rebuilt as a new object of the same class (``cls.__new__``
  plus the attributes, no ``__init__`` call); an object reached twice is rebuilt once;
- every other leaf (``None``, numbers, strings, devices, configs, modules) is static: the
  rebuilt value holds the very object the capture returned. This is sound because a
  capture is guarded on everything a static value can depend on (shapes, dtypes, the
  non-tensor arguments); a value read from tensor data is refused while tracing.

A value the walk cannot rebuild (a tensor inside a set) raises ``TracingError``. To control
how a type is flattened, register it with torch's pytree; its registration wins.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from reftrace.errors import TracingError

__all__ = ["OutputSpec", "flatten_outputs"]


@dataclass(frozen=True, eq=False)
class _Slot:
    """The ``index``-th flat tensor."""

    index: int


@dataclass(frozen=True, eq=False)
class _Static:
    """A value returned as it was captured."""

    value: Any


@dataclass(frozen=True, eq=False)
class _Tree:
    """A pytree node (and everything torch's pytree flattens below it in one go)."""

    spec: pytree.TreeSpec
    children: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class _Object:
    """An object rebuilt from its class and attributes; ``key`` identifies it when reached again."""

    cls: type
    key: int
    names: tuple[str, ...]
    children: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class _Again:
    """A second reference to the object with ``key`` (shared, or a cycle)."""

    key: int


# Objects never walked into: they hold no output tensors of their own, or are not data.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           torch.nn.Module, torch.device, torch.dtype, torch.Size, str, bytes, int, float, complex, bool)


@dataclass(frozen=True, eq=False)
class OutputSpec:
    """How to rebuild a function's return value from its flat output tensors."""

    root: Any
    num_tensors: int
    bare_static: str | None  # the first non-None non-tensor value standing in a plain container, described

    def rebuild(self, tensors: Sequence[Any]) -> Any:
        """The return value with ``tensors`` in place of the captured ones (new objects each call)."""
        if len(tensors) != self.num_tensors:
            raise TracingError(f"reftrace bug: {len(tensors)} tensors to rebuild an output of {self.num_tensors}")
        return _rebuild(self.root, tensors, {})


def flatten_outputs(value: Any) -> tuple[list[torch.Tensor], OutputSpec]:
    """The tensors in ``value`` (depth first) and the ``OutputSpec`` that puts them back."""
    walk = _Walk()
    root = walk.flatten(value, inside_object=False)
    return walk.tensors, OutputSpec(root, len(walk.tensors), walk.bare_static)


class _Walk:
    """One flattening: the tensors found, the objects being walked (by id), whether a bare static was seen."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.walking: dict[int, int] = {}  # id(object) -> key, for objects rebuilt as new objects
        self.next_key = 0
        self.bare_static: str | None = None

    def flatten(self, value: Any, inside_object: bool) -> Any:
        leaves, spec = pytree.tree_flatten(value)
        if spec.is_leaf():
            return self.leaf(value, inside_object)
        return _Tree(spec, tuple(self.leaf(x, inside_object) for x in leaves))

    def leaf(self, x: Any, inside_object: bool) -> Any:
        if isinstance(x, torch.Tensor):
            self.tensors.append(x)
            return _Slot(len(self.tensors) - 1)
        if x is None or isinstance(x, _OPAQUE):
            return self.static(x, inside_object)
        if isinstance(x, (set, frozenset)):
            if any(isinstance(e, torch.Tensor) for e in x):
                raise TracingError("the function returns a set holding tensors; reftrace cannot rebuild it with "
                                   "the compiled tensors. Return a tuple or list instead")
            return self.static(x, inside_object)
        if id(x) in self.walking:
            return _Again(self.walking[id(x)])
        names = _attribute_names(x)
        if names is None:
            return self.static(x, inside_object)
        key = self.walking[id(x)] = self.next_key
        self.next_key += 1
        start = len(self.tensors)
        children = tuple(self.flatten(getattr(x, n), inside_object=True) for n in names)
        if len(self.tensors) == start and not _refers_back(children):
            del self.walking[id(x)]  # no tensor inside: later references return the object itself too
            return self.static(x, inside_object)
        return _Object(type(x), key, names, children)

    def static(self, x: Any, inside_object: bool) -> _Static:
        if x is not None and not inside_object and self.bare_static is None:
            self.bare_static = f"a {type(x).__name__} ({repr(x)[:60]})"
        return _Static(x)


def _attribute_names(x: Any) -> tuple[str, ...] | None:
    """The attributes that make up ``x`` (instance dict, then slots), or None for what has neither."""
    names: list[str] = list(getattr(x, "__dict__", {}))
    for klass in type(x).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(x, slot) and slot not in names:
                names.append(slot)
    if not names and not hasattr(x, "__dict__"):
        return None
    return tuple(names)


def _refers_back(children: Sequence[Any]) -> bool:
    """Whether a subtree mentions an object being rebuilt (a cycle or shared reference must be kept)."""
    for c in children:
        if isinstance(c, _Again):
            return True
        if isinstance(c, (_Tree, _Object)) and _refers_back(c.children):
            return True
    return False


def _rebuild(node: Any, tensors: Sequence[Any], made: dict[int, Any]) -> Any:
    if isinstance(node, _Slot):
        return tensors[node.index]
    if isinstance(node, _Static):
        return node.value
    if isinstance(node, _Tree):
        return pytree.tree_unflatten([_rebuild(c, tensors, made) for c in node.children], node.spec)
    if isinstance(node, _Again):
        return made[node.key]
    obj = node.cls.__new__(node.cls)
    made[node.key] = obj
    for name, child in zip(node.names, node.children):
        object.__setattr__(obj, name, _rebuild(child, tensors, made))
    return obj
