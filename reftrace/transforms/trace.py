"""``trace``: run a function on example arguments and return its Graph.

numpy arrays (and Python scalars) go to the ``reftrace.numpy`` tracer; torch
tensors and ``nn.Module`` callables go to the torch bridge.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from reftrace.builder import Builder
from reftrace.errors import TracingError
from reftrace.graph import Atom, Aval, Graph, Literal
from reftrace.lax import TracedArray, new_input, tracing


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and (isinstance(x, torch.Tensor) or isinstance(x, torch.nn.Module))


def trace(fn: Callable[..., Any], *example_args: Any, **kwargs: Any) -> Graph:
    """The Graph of ``fn`` at the shapes/dtypes of ``example_args``.

    Outputs may be one array or a tuple/list of arrays. For torch functions and
    modules see ``reftrace.torch_bridge.capture`` (keyword options are passed there).
    """
    if _is_torch(fn) or any(_is_torch(a) for a in example_args):
        from reftrace.torch_bridge.capture import capture
        return capture(fn, *example_args, **kwargs)
    if kwargs:
        raise TracingError(f"unexpected keyword arguments {sorted(kwargs)} for a numpy trace")
    builder = Builder()
    inputs = []
    for i, a in enumerate(example_args):
        arr = np.asarray(a)
        if arr.dtype == object:
            raise TracingError(f"argument {i} ({type(a).__name__}) is not an array")
        inputs.append(new_input(builder, Aval(arr.shape, arr.dtype)))
    with tracing(builder):
        out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return builder.build([t.atom for t in inputs], [_output_atom(builder, o, i) for i, o in enumerate(outs)])


def _output_atom(builder: Builder, x: Any, i: int) -> Atom:
    if isinstance(x, TracedArray):
        if x.builder is not builder:
            raise TracingError(f"output {i} belongs to another trace")
        return x.atom
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TracingError(f"output {i} is a {type(x).__name__}, not an array")
    return Literal.of(arr)
