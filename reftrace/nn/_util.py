"""Small helpers the composite definitions share."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace.graph import Aval


def const(value: float, dtype: Any) -> Any:
    """A rank-0 constant of ``dtype`` (rank-0 operands broadcast in elementwise ops)."""
    return lax.constant(value, np.dtype(dtype))


def accumulation_dtype(dtype: Any) -> np.dtype:
    """Statistics of half-precision values are computed in float32, as torch's kernels do."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def statistics_dtype(dtype: Any, parameter_dtypes: Sequence[Any]) -> np.dtype:
    """The dtype of a normalization's saved mean and rstd: float32 for a half-precision input whose
    parameters (weight, bias, running statistics) have another dtype (torch's "mixed type" kernels, as
    under autocast, where the parameters stay float32), else the input's own."""
    dtype = np.dtype(dtype)
    mixed = any(np.dtype(d) != dtype for d in parameter_dtypes)
    return accumulation_dtype(dtype) if mixed else dtype


def cast(x: Any, dtype: Any) -> Any:
    return x if x.dtype == np.dtype(dtype) else lax.convert_element_type(x, dtype)


def along(v: Any, shape: Sequence[int], dims: Sequence[int]) -> Any:
    """``v`` broadcast to ``shape``, its axes landing on ``dims``."""
    return lax.broadcast_in_dim(v, tuple(shape), tuple(dims))


def mean(x: Any, axes: Sequence[int]) -> Any:
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    return lax.div(lax.reduce_sum(x, tuple(axes)), const(count, x.dtype))


def other_axes(ndim: int, axes: Sequence[int]) -> list[int]:
    return [i for i in range(ndim) if i not in axes]


def expect_float(aval: Aval, what: str) -> None:
    from reftrace.errors import ShapeError
    from reftrace.primitives import is_float
    if not is_float(aval.dtype):
        raise ShapeError(f"{what}: expects a floating operand, got {aval.str_short()}")
