"""Checking a call's arguments against a graph's input avals, naming the bad argument.

Both backends call ``check_args`` first, so they accept the same things: numpy arrays
and scalars, torch tensors, JAX arrays, and Python bool/int/float for rank-0 inputs.
Each backend then only converts the foreign array types it cannot take directly.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from reftrace.errors import ArgumentError
from reftrace.graph import Aval, Graph
from reftrace.lax import scalar_of_dtype
from reftrace.primitives import is_bool, is_complex, is_float, is_int

_PYTHON_SCALARS = (bool, int, float, complex)


def is_torch_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_jax_array(x: Any) -> bool:
    """True for a JAX array, without importing jax when the caller never did."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, _PYTHON_SCALARS) and not isinstance(x, np.generic)  # np.float64 subclasses float


def arg_aval(x: Any) -> Aval:
    """shape/dtype of a numpy, JAX or torch array, or of a Python scalar."""
    if is_torch_tensor(x):
        from reftrace.backends.torch_dtypes import numpy_dtype
        return Aval(tuple(x.shape), numpy_dtype(x.dtype))
    dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
    if dtype is not None and shape is not None:
        return Aval(tuple(shape), np.dtype(dtype))
    arr = np.asarray(x)
    return Aval(arr.shape, arr.dtype)


def describe(x: Any) -> str:
    """What an argument is, for error messages: ``a torch tensor f32[2,3]``, ``a Python float``."""
    if _is_python_scalar(x):
        return f"a Python {type(x).__name__} ({x!r})"
    if is_torch_tensor(x):
        return f"a torch tensor {arg_aval(x).str_short()}"
    if is_jax_array(x):
        return f"a JAX array {arg_aval(x).str_short()}"
    if isinstance(x, (np.ndarray, np.generic)):
        return f"a numpy {'array' if isinstance(x, np.ndarray) else 'scalar'} {arg_aval(x).str_short()}"
    return "None" if x is None else f"a {type(x).__name__}"


def check_args(graph: Graph, args: Sequence[Any], what: str = "lowered graph",
               kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """``args`` checked against ``graph.inputs`` in number, kind, shape and dtype.

    Returns the arguments with Python scalars turned into rank-0 numpy arrays of the
    input's exact dtype (so a backend never guesses a scalar's width); arrays are
    returned as they came. Raises ArgumentError naming the argument and what to pass.
    """
    if kwargs:
        raise ArgumentError(f"the {what} takes positional arguments only {_signature(graph)}; got keyword "
                            f"argument(s) {', '.join(sorted(kwargs))}: pass them by position, in input order")
    if len(args) != len(graph.inputs):
        raise ArgumentError(f"the {what} takes {len(graph.inputs)} arguments {_signature(graph)}, got {len(args)}")
    return [_checked(x, v.aval, i, what) for i, (x, v) in enumerate(zip(args, graph.inputs))]


def _signature(graph: Graph) -> str:
    return f"({', '.join(v.aval.str_short() for v in graph.inputs)})"


def _checked(x: Any, expected: Aval, i: int, what: str) -> Any:
    where = f"argument {i} of the {what}"
    if _is_python_scalar(x):
        return _scalar_as_array(x, expected, where)
    if not (isinstance(x, (np.ndarray, np.generic)) or is_torch_tensor(x) or is_jax_array(x)):
        raise ArgumentError(f"{where} is {describe(x)}; pass a numpy array, a torch tensor or a JAX array "
                            f"of {expected.str_short()}" + (" (or a Python scalar)" if expected.ndim == 0 else ""))
    got = arg_aval(x)
    if got != expected:
        raise ArgumentError(f"{where}: expected {expected.str_short()}, got {describe(x)}; "
                            "trace the function again for new shapes/dtypes")
    return x


def _scalar_as_array(x: bool | int | float | complex, expected: Aval, where: str) -> np.ndarray:
    """A Python scalar as a rank-0 array of ``expected.dtype``, refusing any value that would change."""
    dtype = expected.dtype
    if is_complex(dtype) and expected.ndim == 0 and not isinstance(x, bool):
        return np.asarray(x, dtype)  # a complex input takes any Python number
    fits_kind = (is_bool(dtype) if isinstance(x, bool)
                 else (is_int(dtype) or is_float(dtype)) if isinstance(x, int)
                 else is_float(dtype) if isinstance(x, float) else False)
    if expected.ndim != 0 or not fits_kind:
        raise ArgumentError(f"{where}: expected {expected.str_short()}, got {describe(x)}; a Python scalar is "
                            "accepted only for a rank-0 input of its kind (bool, int, float or complex; an int "
                            "also for a float input, any number for a complex input): pass an array of the input's shape and dtype")
    if isinstance(x, bool):
        return np.asarray(x, dtype)
    if isinstance(x, int) and is_int(dtype):
        return scalar_of_dtype(x, dtype, f"{where}:")
    try:  # a float input, given a Python float or int
        value = float(x)
    except OverflowError:  # an int beyond float64
        value = math.inf
    with np.errstate(over="ignore"):
        arr = np.asarray(value, dtype)
    finite = isinstance(x, int) or math.isfinite(x)  # inf and nan are float values like any other
    if finite and not np.isfinite(arr.astype(np.float64)):
        raise ArgumentError(f"{where}: {x} overflows {dtype.name} (it would become inf); "
                            "pass a value in range, or trace with a wider float dtype")
    return arr
