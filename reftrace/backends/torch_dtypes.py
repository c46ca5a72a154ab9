"""numpy <-> torch dtype maps, and numpy <-> torch array conversions that keep every bit.

Graphs speak numpy dtypes; the torch backend and the bridge speak torch dtypes.
bfloat16 is numpy's ``ml_dtypes.bfloat16`` (the type JAX uses), when installed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reftrace.errors import UnsupportedOperatorError

_PAIRS: list[tuple[Any, torch.dtype]] = [
    (np.bool_, torch.bool),
    (np.uint8, torch.uint8), (np.int8, torch.int8), (np.int16, torch.int16),
    (np.int32, torch.int32), (np.int64, torch.int64),
    (np.float16, torch.float16), (np.float32, torch.float32), (np.float64, torch.float64),
    (np.complex64, torch.complex64), (np.complex128, torch.complex128),
]
# Unsigned 16/32/64-bit tensors exist in torch >= 2.3 with limited operator support.
for _np_t, _name in ((np.uint16, "uint16"), (np.uint32, "uint32"), (np.uint64, "uint64")):
    if hasattr(torch, _name):
        _PAIRS.append((_np_t, getattr(torch, _name)))
try:  # bfloat16 has no numpy builtin; JAX's ml_dtypes provides one
    import ml_dtypes

    _PAIRS.append((ml_dtypes.bfloat16, torch.bfloat16))
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    ml_dtypes = None

_TO_TORCH: dict[np.dtype, torch.dtype] = {np.dtype(n): t for n, t in _PAIRS}
_TO_NUMPY: dict[torch.dtype, np.dtype] = {t: np.dtype(n) for n, t in _PAIRS}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype for a numpy dtype (or anything ``np.dtype`` accepts); torch dtypes pass through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _TO_TORCH[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise UnsupportedOperatorError(f"numpy dtype {dtype} has no torch equivalent") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype for a torch dtype; numpy dtypes (and their names) pass through."""
    if isinstance(dtype, torch.dtype):
        try:
            return _TO_NUMPY[dtype]
        except KeyError:
            raise UnsupportedOperatorError(f"torch dtype {dtype} has no numpy equivalent in reftrace") from None
    return np.dtype(dtype)


def tensor_from_numpy(arr: Any, copy: bool = False) -> torch.Tensor:
    """A torch tensor viewing ``arr`` (no copy when possible); ``copy=True`` forces fresh memory.

    Read-only, negatively strided or bfloat16 arrays are copied or reinterpreted
    bit-for-bit, never rounded through another dtype.
    """
    arr = np.asarray(arr)
    if copy or not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr, copy=True, order="C")
    if ml_dtypes is not None and arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    torch_dtype(arr.dtype)  # raises a clear error for unsupported dtypes
    return torch.from_numpy(arr)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A concrete tensor's values as numpy, bit for bit (bfloat16 included)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype(torch.bfloat16))
    return t.numpy()
