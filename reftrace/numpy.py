"""``reftrace.numpy``: a numpy-like front end that builds graphs without torch.

Semantics follow NumPy 2:

- **Type promotion** is ``numpy.result_type`` (NEP 50). Python scalars are weak:
  ``f32_array * 2.0`` stays float32, ``i32_array + 1`` stays int32, but
  ``i32_array * 1.5`` becomes float64. Array/array promotion is numpy's
  (``int64 + float32 -> float64``), which differs from JAX's.
- **Broadcasting** is numpy's; it becomes explicit ``broadcast_in_dim`` equations
  (rank-0 operands stay rank 0: every primitive broadcasts those).
- True division and transcendental functions of integers give float64; ``sum`` of
  bool/small ints accumulates in int64 (uint64 for unsigned), as numpy on Linux.
- Integer ``//`` and ``%`` follow numpy (floor division, sign of the divisor).

Functions accept traced arrays, numpy arrays and Python scalars. Outside a trace
they evaluate eagerly (through the JAX backend).
"""
from __future__ import annotations

import builtins
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.errors import ArgumentError, ShapeError, TracingError
from reftrace.lax import TracedArray

ndarray = TracedArray
float32, float64, int32, int64, bool_ = np.float32, np.float64, np.int32, np.int64, np.bool_
complex64, complex128 = np.complex64, np.complex128
pi, e, inf, nan = np.pi, np.e, np.inf, np.nan


# ----------------------------------------------------------------------------- promotion

def _dtype_or_weak(x: Any) -> Any:
    if isinstance(x, TracedArray):
        return x.dtype
    if isinstance(x, (bool, int, float, complex)) and not isinstance(x, np.generic):
        if isinstance(x, int) and not -2**63 <= x < 2**64:
            raise ArgumentError(f"a Python int operand ({x}) does not fit int64 or uint64; use a float")
        return x  # weak Python scalar, as NEP 50
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise ArgumentError(f"reftrace.numpy operands must be arrays or numbers, got {type(x).__name__} {x!r:.40}")
    return np.asarray(x).dtype


def result_type(*args: Any) -> np.dtype:
    """numpy's promotion (NEP 50) of the operands; a dtype a graph cannot hold is an ArgumentError."""
    return lax.check_dtype(np.result_type(*[_dtype_or_weak(a) for a in args]), "an operand")


def _dtype_arg(dtype: Any, fn: str) -> np.dtype:
    return lax.check_dtype(dtype, f"{fn}: dtype")


def _shape(x: Any) -> tuple[int, ...]:
    return x.shape if isinstance(x, TracedArray) else np.shape(x)


def asarray(x: Any, dtype: Any = None) -> Any:
    """A traced value stays traced (converted if ``dtype``); anything else becomes a numpy array."""
    dtype = _dtype_arg(dtype, "asarray") if dtype is not None else None
    if isinstance(x, TracedArray):
        return lax.convert_element_type(x, dtype) if dtype is not None else x
    return np.asarray(x, dtype=dtype)


def _cast(x: Any, dtype: np.dtype) -> Any:
    if isinstance(x, TracedArray):
        return lax.convert_element_type(x, dtype)
    arr = np.asarray(x).astype(dtype)
    return lax.constant(arr)


def _broadcast(x: Any, shape: tuple[int, ...]) -> Any:
    xs = _shape(x)
    if xs == shape or len(xs) == 0:
        return x
    if not isinstance(x, TracedArray) and lax.current_builder() is not None:
        x = lax.constant(x)
    return lax.broadcast_to_rank(x, shape)


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"operands could not be broadcast together with shapes {list(shapes)}") from None


def _prepare(*args: Any, dtype: Any = None) -> tuple[list[Any], np.dtype]:
    """Promote ``args`` to one dtype and broadcast them to one shape (rank-0 stay rank 0)."""
    dtype = np.dtype(dtype) if dtype is not None else result_type(*args)
    if P.is_int(dtype):
        for a in args:  # NEP 50: a weak Python int must fit the integer dtype it meets, not wrap around
            if isinstance(a, int) and not isinstance(a, bool):
                lax.scalar_of_dtype(a, dtype, "a Python int operand")
    shape = _broadcast_shapes(*[_shape(a) for a in args])
    return [_broadcast(_cast(a, dtype), shape) for a in args], dtype


def _binary(prim: P.Primitive, name: str, kinds: str = "fib", out_dtype: Any = None):
    def f(x: Any, y: Any) -> Any:
        (a, b), dtype = _prepare(x, y)
        if not P._dtype_ok(dtype, kinds):
            raise ShapeError(f"{name}: not supported for dtype {dtype.name}")
        return lax.bind(prim, a, b)
    f.__name__ = name
    return f


add = _binary(P.add_p, "add", "fic")
subtract = _binary(P.sub_p, "subtract", "fic")
multiply = _binary(P.mul_p, "multiply", "fic")
maximum = _binary(P.max_p, "maximum")
minimum = _binary(P.min_p, "minimum")
arctan2 = _binary(P.atan2_p, "arctan2", "f")
equal = _binary(P.eq_p, "equal", "fibc")
not_equal = _binary(P.ne_p, "not_equal", "fibc")
less = _binary(P.lt_p, "less")
less_equal = _binary(P.le_p, "less_equal")
greater = _binary(P.gt_p, "greater")
greater_equal = _binary(P.ge_p, "greater_equal")
logical_and = _binary(P.and_p, "logical_and", "ib")
logical_or = _binary(P.or_p, "logical_or", "ib")
logical_xor = _binary(P.xor_p, "logical_xor", "ib")


def divide(x: Any, y: Any) -> Any:
    """True division; integer operands give float64 (numpy)."""
    dtype = result_type(x, y)
    if not P.is_inexact(dtype):
        dtype = np.dtype(np.float64)
    (a, b), _ = _prepare(x, y, dtype=dtype)
    return lax.bind(P.div_p, a, b)


true_divide = divide


def floor_divide(x: Any, y: Any) -> Any:
    (a, b), dtype = _prepare(x, y)
    if P.is_float(dtype):
        return lax.floor(lax.bind(P.div_p, a, b))
    q, r = lax.bind(P.div_p, a, b), lax.bind(P.rem_p, a, b)
    adjust = logical_and(not_equal(r, 0), not_equal(less(r, 0), less(b, 0)))
    return where(adjust, subtract(q, 1), q)


def remainder(x: Any, y: Any) -> Any:
    """numpy ``%``: the result has the sign of the divisor."""
    (a, b), dtype = _prepare(x, y)
    r = lax.bind(P.rem_p, a, b)
    adjust = logical_and(not_equal(r, 0), not_equal(less(r, 0), less(b, 0)))
    return where(adjust, add(r, b), r)


mod = remainder


def power(x: Any, y: Any) -> Any:
    """``x ** y``; a Python-int exponent becomes ``integer_pow`` (exact, and a simple VJP)."""
    if isinstance(y, int) and not isinstance(y, bool) and isinstance(x, TracedArray):
        dtype = result_type(x, y)
        if P.is_inexact(dtype) or y >= 0:
            return lax.integer_pow(_cast(x, dtype), y)
    (a, b), dtype = _prepare(x, y)
    if P.is_int(dtype) and not isinstance(y, TracedArray) and np.any(np.asarray(y) < 0):
        raise ArgumentError("power: integers to negative integer powers are not allowed (as in numpy); "
                            "make the base a float array first")
    if dtype == np.bool_:
        raise ShapeError("power of bool arrays is not supported")
    return lax.bind(P.pow_p, a, b)


def _float_unary(prim: P.Primitive, name: str):
    def f(x: Any) -> Any:
        dtype = result_type(x)
        if not P.is_inexact(dtype):
            dtype = np.dtype(np.float64)
        if P.is_complex(dtype) and not P._dtype_ok(dtype, "c"):
            raise ShapeError(f"{name}: not supported for complex dtypes")
        return lax.bind(prim, _cast(x, dtype))
    f.__name__ = name
    return f


exp = _float_unary(P.exp_p, "exp")
log = _float_unary(P.log_p, "log")
log1p = _float_unary(P.log1p_p, "log1p")
expm1 = _float_unary(P.expm1_p, "expm1")
sin = _float_unary(P.sin_p, "sin")
cos = _float_unary(P.cos_p, "cos")
tan = _float_unary(P.tan_p, "tan")
arcsin = _float_unary(P.asin_p, "arcsin")
arccos = _float_unary(P.acos_p, "arccos")
arctan = _float_unary(P.atan_p, "arctan")
sinh = _float_unary(P.sinh_p, "sinh")
cosh = _float_unary(P.cosh_p, "cosh")
tanh = _float_unary(P.tanh_p, "tanh")
arcsinh = _float_unary(P.asinh_p, "arcsinh")
arccosh = _float_unary(P.acosh_p, "arccosh")
arctanh = _float_unary(P.atanh_p, "arctanh")
sqrt = _float_unary(P.sqrt_p, "sqrt")
cbrt = _float_unary(P.cbrt_p, "cbrt")


def _same_dtype_unary(prim: P.Primitive, name: str, kinds: str):
    def f(x: Any) -> Any:
        x = x if isinstance(x, TracedArray) else _cast(x, result_type(x))
        if not P._dtype_ok(np.dtype(x.dtype), kinds):
            raise ShapeError(f"{name}: not supported for dtype {np.dtype(x.dtype).name}")
        return lax.bind(prim, x)
    f.__name__ = name
    return f


negative = _same_dtype_unary(P.neg_p, "negative", "fic")
abs = absolute = _same_dtype_unary(P.abs_p, "abs", "fic")  # noqa: A001 - complex: the modulus, real
sign = _same_dtype_unary(P.sign_p, "sign", "fic")  # complex: z / |z| (numpy 2)


def real(x: Any) -> Any:
    x = x if isinstance(x, TracedArray) else _cast(x, result_type(x))
    return lax.real(x) if P.is_complex(x.dtype) else x


def imag(x: Any) -> Any:
    """The imaginary part; of a real array, zeros of its dtype (numpy)."""
    x = x if isinstance(x, TracedArray) else _cast(x, result_type(x))
    return lax.imag(x) if P.is_complex(x.dtype) else lax.full(x.shape, 0, x.dtype)


def conj(x: Any) -> Any:
    x = x if isinstance(x, TracedArray) else _cast(x, result_type(x))
    return lax.conj(x) if P.is_complex(x.dtype) else x


conjugate = conj


def angle(x: Any) -> Any:
    """The argument ``atan2(imag, real)``; of a real array, 0 or pi (numpy)."""
    x = x if isinstance(x, TracedArray) else _cast(x, result_type(x))
    if not P.is_complex(x.dtype):
        x = _cast(x, P.complex_dtype(x.dtype if P.is_float(x.dtype) else np.float64))
    return lax.atan2(lax.imag(x), lax.real(x))
invert = _same_dtype_unary(P.not_p, "invert", "ib")
logical_not = invert


def positive(x: Any) -> Any:
    return x


def _rounding(prim: P.Primitive, name: str):
    def f(x: Any) -> Any:
        if isinstance(x, TracedArray) and not P.is_float(x.dtype):
            return x  # numpy: floor/ceil/round of integers is the identity (dtype kept)
        return lax.bind(prim, _cast(x, result_type(x)))
    f.__name__ = name
    return f


floor = _rounding(P.floor_p, "floor")
ceil = _rounding(P.ceil_p, "ceil")
round = _rounding(P.round_p, "round")  # noqa: A001 - half to even, as numpy


def square(x: Any) -> Any:
    return power(x, 2)


def reciprocal(x: Any) -> Any:
    return divide(1.0 if P.is_float(result_type(x)) else 1, x)


def clip(x: Any, a_min: Any = None, a_max: Any = None) -> Any:
    if a_min is not None:
        x = maximum(x, a_min)
    if a_max is not None:
        x = minimum(x, a_max)
    return x


def where(condition: Any, x: Any, y: Any) -> Any:
    (a, b), dtype = _prepare(x, y)
    shape = _broadcast_shapes(_shape(condition), _shape(a), _shape(b))
    cond = _broadcast(_cast(condition, np.dtype(bool)), shape)
    return lax.bind(P.select_p, cond, _broadcast(a, shape), _broadcast(b, shape))


# ----------------------------------------------------------------------------- reductions

def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _axis(axis: Any, ndim: int, fn: str) -> int:
    """One axis in ``[-ndim, ndim)``, made non-negative."""
    if not _is_int(axis):
        raise ArgumentError(f"{fn}: axis must be an int, got {type(axis).__name__} {axis!r:.40}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{fn}: axis {axis} is out of bounds for an array of rank {ndim}")
    return int(axis) % ndim


def _axes(axis: Any, ndim: int, fn: str) -> tuple[int, ...]:
    """``None`` (all axes), one axis or a tuple of distinct axes, sorted and non-negative."""
    if axis is None:
        return tuple(range(ndim))
    if _is_int(axis):
        return (_axis(axis, ndim, fn),)
    if not isinstance(axis, (tuple, list)):
        raise ArgumentError(f"{fn}: axis must be None, an int or a tuple of ints, got {type(axis).__name__} "
                            f"{axis!r:.40}")
    axes = [_axis(a, ndim, fn) for a in axis]
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{fn}: repeated axis in {tuple(axis)}")
    return tuple(sorted(axes))


def _keep(x: Any, reduced: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    if not keepdims:
        return reduced
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    return lax.reshape(reduced, shape)


def _as_traced(x: Any) -> Any:
    if isinstance(x, TracedArray):
        return x
    if lax.current_builder() is None:
        raise TracingError("reftrace.numpy reductions need a traced array (call them inside rt.trace)")
    return lax.constant(x)


def sum(x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None) -> Any:  # noqa: A001
    x = _as_traced(x)
    if dtype is not None:
        dtype = _dtype_arg(dtype, "sum")
    else:
        dtype = x.dtype
        if P.is_bool(dtype) or (P.is_int(dtype) and dtype.itemsize < 8):
            dtype = np.dtype(np.uint64 if np.issubdtype(dtype, np.unsignedinteger) else np.int64)
    axes = _axes(axis, x.ndim, "sum")
    return _keep(x, lax.reduce_sum(lax.convert_element_type(x, dtype), axes), axes, keepdims)


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    x = _as_traced(x)
    dtype = x.dtype if P.is_inexact(x.dtype) else np.dtype(np.float64)
    axes = _axes(axis, x.ndim, "mean")
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    return divide(sum(x, axes, keepdims, dtype=dtype), np.asarray(count, dtype))


def _minmax(prim: P.Primitive, name: str):
    def f(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        x = _as_traced(x)
        axes = _axes(axis, x.ndim, name)
        if any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"{name}: zero-size reduction along axes {axes} of shape {x.shape}")
        return _keep(x, lax.reduce(prim, x, axes), axes, keepdims)
    f.__name__ = name
    return f


max = amax = _minmax(P.reduce_max_p, "max")  # noqa: A001
min = amin = _minmax(P.reduce_min_p, "min")  # noqa: A001


def prod(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    x = _as_traced(x)
    axes = _axes(axis, x.ndim, "prod")
    return _keep(x, lax.reduce_prod(x, axes), axes, keepdims)


def _arg(fn, name: str):
    def f(x: Any, axis: int | None = None) -> Any:
        x = _as_traced(x)
        if axis is None:
            x, axis = lax.reshape(x, (x.size,)), 0
        axis = _axis(axis, x.ndim, name)
        if x.shape[axis] == 0:
            raise ShapeError(f"{name}: axis {axis} of shape {x.shape} is empty, so there is no {name}")
        return fn(x, axis)
    f.__name__ = name
    return f


argmax = _arg(lax.argmax, "argmax")
argmin = _arg(lax.argmin, "argmin")


def cumsum(x: Any, axis: int | None = None) -> Any:
    x = _as_traced(x)
    if axis is None:
        x, axis = lax.reshape(x, (x.size,)), 0
    return lax.cumsum(x, _axis(axis, x.ndim, "cumsum"))


# ----------------------------------------------------------------------------- shapes

def reshape(x: Any, *shape: Any) -> Any:
    x = _as_traced(x)
    if len(shape) == 1 and not _is_int(shape[0]):
        shape = shape[0]
    shape = list(_shape_arg(shape, "reshape", allow_minus_one=True))
    if shape.count(-1) > 1:
        raise ShapeError("reshape: only one dimension may be -1")
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        if known == 0 or x.size % known:
            raise ShapeError(f"reshape: cannot reshape {x.shape} into {tuple(shape)}")
        shape[shape.index(-1)] = x.size // known
    return lax.reshape(x, tuple(shape))


def transpose(x: Any, axes: Sequence[int] | None = None) -> Any:
    x = _as_traced(x)
    if axes is None:
        return lax.transpose(x, tuple(reversed(range(x.ndim))))
    if not isinstance(axes, (tuple, list, range, np.ndarray)):
        raise ArgumentError(f"transpose: axes must be a tuple of ints, got {type(axes).__name__} {axes!r:.40}")
    perm = tuple(_axis(a, x.ndim, "transpose") for a in axes)
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {tuple(axes)} are not a permutation of the {x.ndim} axes of {x.shape}")
    return lax.transpose(x, perm)


def swapaxes(x: Any, a: int, b: int) -> Any:
    x = _as_traced(x)
    perm = list(range(x.ndim))
    a, b = _axis(a, x.ndim, "swapaxes"), _axis(b, x.ndim, "swapaxes")
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


def broadcast_to(x: Any, shape: Sequence[int]) -> Any:
    x = _as_traced(x)
    shape = _shape_arg(shape, "broadcast_to")
    if len(shape) < x.ndim or _broadcast_shapes(x.shape, shape) != shape:
        raise ShapeError(f"broadcast_to: cannot broadcast {x.shape} to {shape}")
    return lax.broadcast_to_rank(x, shape)


def expand_dims(x: Any, axis: int) -> Any:
    x = _as_traced(x)
    axis = _axis(axis, x.ndim + 1, "expand_dims")
    return lax.reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def squeeze(x: Any, axis: Any = None) -> Any:
    x = _as_traced(x)
    axes = tuple(i for i, d in enumerate(x.shape) if d == 1) if axis is None else _axes(axis, x.ndim, "squeeze")
    for a in axes:
        if x.shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of shape {x.shape} has size {x.shape[a]}, not 1")
    return lax.reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def _array_list(arrays: Sequence[Any], fn: str) -> list[Any]:
    if isinstance(arrays, (str, bytes, dict)) or not hasattr(arrays, "__iter__"):
        raise ArgumentError(f"{fn} takes a sequence of arrays, got {type(arrays).__name__}")
    arrays = [_as_traced(a) for a in arrays]
    if not arrays:
        raise ArgumentError(f"{fn} needs at least one array")
    return arrays


def concatenate(arrays: Sequence[Any], axis: int = 0) -> Any:
    arrays = _array_list(arrays, "concatenate")
    if arrays[0].ndim == 0:
        raise ShapeError("concatenate: rank-0 arrays cannot be concatenated; use stack")
    if len({a.ndim for a in arrays}) > 1:
        raise ShapeError(f"concatenate: arrays have different ranks, shapes {[a.shape for a in arrays]}")
    dtype = result_type(*arrays)
    arrays = [_cast(a, dtype) for a in arrays]
    return lax.concatenate(arrays, _axis(axis, arrays[0].ndim, "concatenate"))


def stack(arrays: Sequence[Any], axis: int = 0) -> Any:
    arrays = _array_list(arrays, "stack")
    if len({a.shape for a in arrays}) > 1:
        raise ShapeError(f"stack: arrays must have one shape, got {[a.shape for a in arrays]}")
    return concatenate([expand_dims(a, axis) for a in arrays], axis)


def astype(x: Any, dtype: Any) -> Any:
    return _cast(x, _dtype_arg(dtype, "astype"))


def zeros_like(x: Any) -> Any:
    return lax.full(_shape(x), 0, result_type(x))


def ones_like(x: Any) -> Any:
    return lax.full(_shape(x), 1, result_type(x))


def _shape_arg(shape: Any, fn: str, allow_minus_one: bool = False) -> tuple[int, ...]:
    """A shape from an int or a sequence of ints, each >= 0 (or -1 where ``allow_minus_one``)."""
    dims = (shape,) if _is_int(shape) else shape.tolist() if isinstance(shape, np.ndarray) else shape
    if not isinstance(dims, (tuple, list, range)) or not all(_is_int(d) for d in dims):
        raise ArgumentError(f"{fn}: a shape must be an int or a tuple of ints, got {shape!r:.60}")
    lowest = -1 if allow_minus_one else 0
    if any(d < lowest for d in dims):
        raise ShapeError(f"{fn}: negative dimension in shape {tuple(dims)}")
    return tuple(int(d) for d in dims)


def zeros(shape: int | Sequence[int], dtype: Any = np.float64) -> Any:
    return lax.full(_shape_arg(shape, "zeros"), 0, _dtype_arg(dtype, "zeros"))


def ones(shape: int | Sequence[int], dtype: Any = np.float64) -> Any:
    return lax.full(_shape_arg(shape, "ones"), 1, _dtype_arg(dtype, "ones"))


def full(shape: int | Sequence[int], fill_value: Any, dtype: Any = None) -> Any:
    dtype = _dtype_arg(dtype, "full") if dtype is not None else result_type(fill_value)
    return lax.full(_shape_arg(shape, "full"), fill_value, dtype)


def arange(n: int, dtype: Any = np.int64) -> Any:
    """``0, 1, ..., n-1``; ``n`` must be an int (the length is a shape, known while tracing)."""
    if not _is_int(n):
        raise ArgumentError(f"arange: n must be an int (the length of the result), got {type(n).__name__} {n!r:.40}")
    return lax.iota(_dtype_arg(dtype, "arange"), (builtins.max(int(n), 0),), 0)


# ----------------------------------------------------------------------------- contractions

def matmul(a: Any, b: Any) -> Any:
    """numpy matmul: 1-D operands are promoted and squeezed, batch dimensions broadcast."""
    (a, b), dtype = _prepare_matmul(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError("matmul: operands must not be scalars")
    a1, b1 = a.ndim == 1, b.ndim == 1
    if a1:
        a = lax.reshape(a, (1,) + a.shape)
    if b1:
        b = lax.reshape(b, b.shape + (1,))
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: contracting dimensions differ, {a.shape} @ {b.shape}")
    batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    a = lax.broadcast_to_rank(a, batch + a.shape[-2:])
    b = lax.broadcast_to_rank(b, batch + b.shape[-2:])
    nb = len(batch)
    out = lax.dot_general(a, b, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))))
    if a1:
        out = lax.reshape(out, out.shape[:-2] + out.shape[-1:])
    if b1:
        out = lax.reshape(out, out.shape[:-1])
    return out


def _prepare_matmul(a: Any, b: Any) -> tuple[list[Any], np.dtype]:
    dtype = result_type(a, b)
    if dtype == np.bool_:
        raise ShapeError("matmul of bool arrays is not supported")
    return [_as_traced(_cast(a, dtype)), _as_traced(_cast(b, dtype))], dtype


def dot(a: Any, b: Any) -> Any:
    if _shape(a) == () or _shape(b) == ():
        return multiply(a, b)
    if len(_shape(b)) <= 2:
        return matmul(a, b)
    raise ShapeError("dot: only operands of rank <= 2 for the second argument are supported; use matmul")


# ----------------------------------------------------------------------------- indexing

def getitem(x: Any, key: Any) -> Any:
    """Basic indexing (ints, slices with steps, None, Ellipsis) plus one integer-array index."""
    x = _as_traced(x)
    key = key if isinstance(key, tuple) else (key,)
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise ShapeError("an index can only have a single ellipsis")
    n_real = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > x.ndim:
        raise ShapeError(f"too many indices for an array of rank {x.ndim}")
    ell = [i for i, k in enumerate(key) if k is Ellipsis]
    if ell:
        i = ell[0]
        key = key[:i] + (builtins.slice(None),) * (x.ndim - n_real) + key[i + 1:]
    key = key + (builtins.slice(None),) * (x.ndim - builtins.sum(1 for k in key if k is not None))
    starts, limits, strides, flips, final = [], [], [], [], []
    array_index = None
    dim = 0
    for k in key:
        if k is None:
            final.append(1)
            continue
        n = x.shape[dim]
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k)
            if not -n <= k < n:
                raise ShapeError(f"index {k} is out of bounds for axis {dim} with size {n}")
            k %= n
            starts.append(k), limits.append(k + 1), strides.append(1), flips.append(False)
        elif isinstance(k, builtins.slice):
            bounds = (k.start, k.stop, k.step)
            if not builtins.all(b is None or _is_int(b) or isinstance(b, TracedArray) for b in bounds):
                raise ArgumentError(f"slice {k} has a bound that is not an int or None")
            if k.step == 0:
                raise ArgumentError("slice step cannot be zero")
            s0, s1, st = k.indices(n)
            m = len(range(s0, s1, st))
            if st > 0:
                starts.append(s0), limits.append(s0 + (m - 1) * st + 1 if m else s0), flips.append(False)
            else:  # negative step: reverse the axis, then slice forward
                r0 = n - 1 - s0
                starts.append(r0), limits.append(r0 + (m - 1) * (-st) + 1 if m else r0), flips.append(True)
            strides.append(builtins.abs(st))
            final.append(m)
        elif isinstance(k, (TracedArray, np.ndarray, list)):
            if array_index is not None:
                raise ShapeError("only one integer-array index is supported")
            k = _index_array(k)
            array_index = (dim, k)
            starts.append(0), limits.append(n), strides.append(1), flips.append(False)
            final.extend(_shape(k))
        else:
            raise ArgumentError(f"unsupported index {k!r:.40} ({type(k).__name__}); valid indices are ints, slices, "
                                "None, ... and one integer array")
        dim += 1
    y = lax.rev(x, [i for i, f in enumerate(flips) if f])
    y = lax.slice(y, starts, limits, strides)
    if array_index is not None:
        y = _take(y, *array_index)
    # integer-indexed axes are size 1 here and new axes are size 1: a reshape finishes the job
    return lax.reshape(y, tuple(final))


def _index_array(index: Any) -> Any:
    """An integer index array (traced, or numpy); a boolean mask or a float array is an ArgumentError."""
    if not isinstance(index, TracedArray):
        index = np.asarray(index)
        if index.size == 0 and index.dtype.kind == "f":  # ``[]`` is an empty integer index, as in numpy
            index = index.astype(np.int64)
    if P.is_bool(index.dtype):
        raise ArgumentError("boolean-mask indexing is not supported: its result shape depends on the mask's "
                            "values; use rnp.where(mask, x, 0), or integer indices (np.flatnonzero(mask)) for a "
                            "mask known before tracing")
    if not P.is_int(index.dtype):
        raise ArgumentError(f"an index array must hold integers, got {np.dtype(index.dtype).name}")
    return index


def _take(x: Any, axis: int, index: Any) -> Any:
    """``x`` indexed by an integer array along ``axis`` (negative indices wrap), via gather."""
    idx = index if isinstance(index, TracedArray) else np.asarray(index)
    if isinstance(idx, np.ndarray):
        n = x.shape[axis]
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ShapeError(f"index out of bounds for axis {axis} with size {n}")
        idx = lax.constant((idx % n).astype(np.int64))
    else:
        idx = where(less(idx, 0), add(idx, x.shape[axis]), idx)
    ishape = idx.shape
    flat = lax.reshape(idx, (int(np.prod(ishape, dtype=np.int64)),))
    # bring axis to the front, gather rows, restore
    perm = (axis,) + tuple(i for i in range(x.ndim) if i != axis)
    xt = lax.transpose(x, perm)
    full_idx = lax.broadcast_in_dim(flat, (flat.shape[0],) + xt.shape[1:], (0,))
    g = lax.gather(xt, lax.convert_element_type(full_idx, np.int64), 0)
    g = lax.reshape(g, ishape + xt.shape[1:])
    k = len(ishape)
    inv = tuple(range(k, k + axis)) + tuple(range(k)) + tuple(range(k + axis, k + x.ndim - 1))
    return lax.transpose(g, inv)


def take(x: Any, indices: Any, axis: int = 0) -> Any:
    x = _as_traced(x)
    return _take(x, _axis(axis, x.ndim, "take"), _index_array(indices))


# ----------------------------------------------------------------------------- TracedArray's operators

def _install_operators(cls: type) -> None:
    """Give ``cls`` (TracedArray) numpy's operators: ``x + y`` is ``add(x, y)``, ``y + x`` is ``add(y, x)``.

    Defined here, where their semantics are, so ``reftrace.lax`` does not import this module.
    """
    def method(fn: Any) -> Any:
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(self, *args, **kwargs)
        forward.__name__ = fn.__name__
        return forward

    def reflected(fn: Any) -> Any:
        def backward(self: Any, other: Any) -> Any:
            return fn(other, self)
        backward.__name__ = f"r{fn.__name__}"
        return backward

    binary = {"add": add, "sub": subtract, "mul": multiply, "truediv": divide, "floordiv": floor_divide,
              "mod": remainder, "pow": power, "matmul": matmul, "and": logical_and, "or": logical_or,
              "xor": logical_xor}
    for name, fn in binary.items():
        setattr(cls, f"__{name}__", method(fn))
        setattr(cls, f"__r{name}__", reflected(fn))
    unary = {"neg": negative, "pos": positive, "abs": abs, "invert": invert, "lt": less, "le": less_equal,
             "gt": greater, "ge": greater_equal, "eq": equal, "ne": not_equal, "getitem": getitem}
    for name, fn in unary.items():
        setattr(cls, f"__{name}__", method(fn))
    for fn in (sum, mean, max, min, prod, argmax, argmin, reshape, astype, transpose, conj):
        setattr(cls, fn.__name__.rstrip("_"), method(fn))
    cls.conjugate = method(conj)
    cls.T = property(method(transpose))
    cls.real = property(method(real))
    cls.imag = property(method(imag))


_install_operators(TracedArray)



from reftrace import numpy_fft as fft  # noqa: E402 - numpy.fft's place (it needs only lax, not this module)
