"""The names graphs give their inputs and outputs (``Graph.input_names`` / ``output_names``).

A name says what a value is, in a small grammar (docs/ir.md, "Names"):

- a module's parameter: its qualified name, ``encoder.layer.0.attention.query.weight``;
- a module's buffer: ``buffer(bn1.running_mean)``;
- a tensor argument: ``args[0]``, ``args[1][0]``, ``kwargs['mask']``; the random key: ``rng_key``;
- a function output: ``out`` (one tensor) or ``out[0]``, ``out[1]``, ...;
- the new value of a mutated input (a BatchNorm running statistic, an in-place op on an
  argument): ``update(<that input's name, without buffer()>)``;
- what transforms add: ``grad(<input>)`` and ``ct(<output>)`` (``vjp``), ``tangent(<name>)``
  (``jvp``), ``saved[k]`` (a value the forward of a partition computes for the backward).

``vjp`` reads two of these marks to differentiate a traced module as ``loss.backward()`` would:
buffers get no gradient and buffer updates take no cotangent.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["buffer", "update", "grad", "ct", "tangent", "saved", "is_buffer", "is_update", "or_default",
           "is_argument", "is_parameter"]


def buffer(name: str) -> str:
    return f"buffer({name})"


def update(name: str) -> str:
    """The new value of input ``name`` (its ``buffer(...)`` mark dropped)."""
    return f"update({_unmarked(name)})"


def grad(name: str) -> str:
    return f"grad({name})"


def ct(name: str) -> str:
    return f"ct({name})"


def tangent(name: str) -> str:
    return f"tangent({name})"


def saved(index: int) -> str:
    return f"saved[{index}]"


def is_buffer(name: str) -> bool:
    return name.startswith("buffer(") and name.endswith(")")


def is_update(name: str) -> bool:
    return name.startswith("update(") and name.endswith(")")


def _unmarked(name: str) -> str:
    return name[len("buffer("):-1] if is_buffer(name) else name


def or_default(names: Sequence[str] | None, count: int, stem: str) -> tuple[str, ...]:
    """``names``, or ``stem[0]``, ``stem[1]``, ... for a graph that has none."""
    return tuple(names) if names is not None else tuple(f"{stem}[{i}]" for i in range(count))


def is_argument(name: str) -> bool:
    """A tensor argument of the traced function (``args[0]``, ``kwargs['mask']``)."""
    return name.startswith(("args[", "kwargs["))


def is_parameter(name: str) -> bool:
    """A module parameter: an input name of none of the marked kinds (a qualified name like ``fc1.weight``)."""
    marked = ("buffer(", "update(", "grad(", "ct(", "tangent(", "saved[")
    return not (is_argument(name) or name == "rng_key" or name.startswith(marked))
