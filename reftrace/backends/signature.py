"""Checking a call's arguments against a graph's input avals, naming the bad argument."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace.errors import ArgumentError
from reftrace.graph import Aval, Graph


def arg_aval(x: Any) -> Aval:
    """shape/dtype of a numpy, JAX or torch array, or of a Python scalar."""
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is not None and shape is not None:
        if type(x).__module__.startswith("torch"):
            from reftrace.backends.torch_dtypes import numpy_dtype
            dtype = numpy_dtype(dtype)
        return Aval(tuple(shape), np.dtype(dtype))
    arr = np.asarray(x)
    return Aval(arr.shape, arr.dtype)


def check_args(graph: Graph, args: Sequence[Any], what: str = "lowered graph") -> None:
    """Raise ArgumentError unless ``args`` match ``graph.inputs`` in number, shape and dtype.

    A Python scalar is accepted for a rank-0 input of the same kind (bool/int/float).
    """
    if len(args) != len(graph.inputs):
        raise ArgumentError(f"{what} takes {len(graph.inputs)} arguments "
                            f"({', '.join(v.aval.str_short() for v in graph.inputs)}), got {len(args)}")
    for i, (x, v) in enumerate(zip(args, graph.inputs)):
        if isinstance(x, (bool, int, float)) and not isinstance(x, np.generic) and v.aval.shape == ():
            kind = "b" if isinstance(x, bool) else "iu" if isinstance(x, int) else "f"
            if v.dtype.kind in kind or (kind == "iu" and v.dtype.kind == "f"):
                continue
        got = arg_aval(x)
        if got != v.aval:
            raise ArgumentError(f"argument {i} of the {what}: expected {v.aval.str_short()}, "
                                f"got {got.str_short()}; trace the function again for new shapes/dtypes")
