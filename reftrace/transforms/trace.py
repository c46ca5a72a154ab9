"""``trace``: run a ``reftrace.numpy`` function on example arrays and return its Graph.

``rt.trace`` (the facade, ``reftrace/__init__.py``) sends torch tensors and ``nn.Module``s to
the torch bridge instead; the core never imports it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from reftrace.builder import Builder
from reftrace.errors import ArgumentError, TracingError
from reftrace.graph import Atom, Aval, Graph, Literal
from reftrace.primitives import checked
from reftrace.lax import TracedArray, check_dtype, new_input, tracing

_OUTPUTS_MUST_BE_ARRAYS = "rt.trace outputs must be arrays: return one array, or a flat tuple/list of arrays"


def trace(fn: Callable[..., Any], *example_args: Any, **kwargs: Any) -> Graph:
    """The Graph of ``fn`` at the shapes/dtypes of ``example_args``.

    Example arguments are numpy arrays or Python numbers of bool, integer, floating or
    complex dtype; anything else (a string, None, a complex256 array) is an ArgumentError, and so is a
    count that ``fn`` cannot take. Outputs may be one array or a flat tuple/list of arrays;
    anything else is a TracingError. Keyword options are for torch functions (see
    ``reftrace.torch_bridge.capture``), which ``rt.trace`` sends there.
    """
    _check_callable(fn)
    if kwargs:
        raise ArgumentError(f"rt.trace got keyword arguments {sorted(kwargs)}; a numpy trace passes its example "
                            "arguments by position (keyword options such as decompositions= are for torch "
                            "functions)")
    avals = [_example_aval(a, i) for i, a in enumerate(example_args)]
    _check_arity(fn, len(avals))
    builder = Builder()
    inputs = [new_input(builder, aval) for aval in avals]
    with tracing(builder):
        out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    graph = builder.build([t.atom for t in inputs], [_output_atom(builder, o, i) for i, o in enumerate(outs)])
    return checked(graph, "trace")


def _check_callable(fn: Any) -> None:
    if isinstance(fn, Graph):
        raise ArgumentError("rt.trace got a Graph, which is already traced; run it with "
                            "rt.lower(graph, 'jax' or 'torch')(*arrays), or transform it with rt.vjp/rt.partition")
    if not callable(fn):
        raise ArgumentError(f"rt.trace expects a function first, then example arguments; got "
                            f"{type(fn).__name__} {fn!r:.60}")


def _check_arity(fn: Callable[..., Any], count: int) -> None:
    """Catch a wrong number of example arguments here, not as a TypeError from inside ``fn``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C functions may have no signature: let the call decide
        return
    try:
        signature.bind(*range(count))
    except TypeError as exc:
        raise ArgumentError(f"rt.trace: {getattr(fn, '__name__', 'the function')}{signature} cannot take "
                            f"{count} example argument(s) ({exc}); pass one example array per parameter"
                            ) from None


def _example_aval(x: Any, index: int) -> Aval:
    """The aval of example argument ``index``: a numeric array or Python/numpy scalar, else ArgumentError."""
    if isinstance(x, (str, bytes, dict, set)) or x is None:
        raise ArgumentError(f"rt.trace: argument {index} is {type(x).__name__} {x!r:.40}, not an array; "
                            "pass numpy arrays or Python numbers (keep other values in a closure)")
    try:
        arr = np.asarray(x)
    except (OverflowError, ValueError) as exc:  # a ragged list, an int beyond int64 ...
        raise ArgumentError(f"rt.trace: argument {index} ({type(x).__name__}) is not a numeric array: {exc}"
                            ) from None
    if isinstance(x, int) and arr.dtype == object:
        raise ArgumentError(f"rt.trace: argument {index} is the Python int {x}, which does not fit int64; "
                            "pass a numpy array of the dtype you mean (np.uint64, np.float64)")
    return Aval(arr.shape, check_dtype(arr.dtype, f"input {index}"))


def _output_atom(builder: Builder, x: Any, i: int) -> Atom:
    if isinstance(x, TracedArray):
        if x.builder is not builder:
            raise TracingError(f"output {i} belongs to another trace")
        return x.atom
    if x is None or isinstance(x, (str, bytes, tuple, list, dict, set)):
        raise TracingError(f"output {i} is a {type(x).__name__}; {_OUTPUTS_MUST_BE_ARRAYS}")
    try:
        arr = np.asarray(x)  # a constant output: numpy or JAX arrays, Python numbers
    except (OverflowError, ValueError, TypeError) as exc:
        raise TracingError(f"output {i} ({type(x).__name__}) is not an array ({exc}); "
                           f"{_OUTPUTS_MUST_BE_ARRAYS}") from None
    try:
        check_dtype(arr.dtype, f"output {i}")
    except ArgumentError as exc:
        raise TracingError(f"{exc}; {_OUTPUTS_MUST_BE_ARRAYS}") from None
    return Literal.of(arr)
