"""The primitive set and its shape/dtype rules.

Like JAX's Autodidax, every rule lives in a table keyed by the primitive:

- ``shape_rules[p](*in_avals, **params) -> out_aval | tuple[out_aval, ...]`` (here)
- ``vjp_rules[p]`` (``reftrace.transforms.vjp_rules``)
- ``jax_rules[p]`` (``reftrace.backends.jax_rules``)
- ``torch_rules[p]`` (``reftrace.backends.torch_rules``)

Conventions (lax-like, strict): elementwise operands have equal shapes, except that
rank-0 operands broadcast; operands of an elementwise op have one dtype (no implicit
promotion: front ends insert ``convert_element_type``). Axes are non-negative ints.
"""
from __future__ import annotations

import functools
import os

from typing import Any, Callable, Sequence

import numpy as np

from reftrace.errors import GraphError, ShapeError, UnsupportedOperatorError
from reftrace.graph import Aval, Graph, Params


class Primitive:
    """A named operation. Compared by identity; one object per primitive."""

    __slots__ = ("name", "multiple_results", "differentiable")

    def __init__(self, name: str, multiple_results: bool = False, differentiable: bool = True) -> None:
        self.name = name
        self.multiple_results = multiple_results
        self.differentiable = differentiable

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):  # pickles as a reference to the registry entry
        return (primitive, (self.name,))

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return self is other


registry: dict[str, Primitive] = {}
shape_rules: dict[Primitive, Callable[..., Any]] = {}


def primitive(name: str) -> Primitive:
    """Look a primitive up by name."""
    try:
        return registry[name]
    except KeyError:
        raise UnsupportedOperatorError(f"no primitive named {name!r}") from None


def _new(name: str, rule: Callable[..., Any], *, multiple_results: bool = False,
         differentiable: bool = True) -> Primitive:
    p = Primitive(name, multiple_results, differentiable)
    registry[name] = p
    shape_rules[p] = rule
    return p


def infer_avals(prim: Primitive, in_avals: Sequence[Aval], params: Params | dict) -> tuple[Aval, ...]:
    """Apply ``prim``'s shape rule; always returns a tuple of output avals."""
    try:
        rule = shape_rules[prim]
    except KeyError:
        raise UnsupportedOperatorError(f"primitive {prim.name} has no shape rule") from None
    out = rule(*in_avals, **(params.to_dict() if isinstance(params, Params) else params))
    return tuple(out) if prim.multiple_results else (out,)


# ----------------------------------------------------------------------------- dtype helpers

_EXTENDED_FLOATS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})


@functools.lru_cache(maxsize=None)  # shape rules ask for every equation built
def is_float(dtype: Any) -> bool:
    """Floating point, including ml_dtypes' bfloat16/float8 (whose numpy kind is 'V')."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.name in _EXTENDED_FLOATS


@functools.lru_cache(maxsize=None)
def is_int(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer)


@functools.lru_cache(maxsize=None)
def is_bool(dtype: Any) -> bool:
    return np.dtype(dtype) == np.bool_


@functools.lru_cache(maxsize=None)
def is_complex(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.complexfloating)


@functools.lru_cache(maxsize=None)
def is_inexact(dtype: Any) -> bool:
    """Floating or complex: the dtypes that carry gradients (JAX's ``inexact``)."""
    return is_float(dtype) or is_complex(dtype)


def real_dtype(dtype: Any) -> np.dtype:
    """complex64 -> float32, complex128 -> float64; a real dtype is its own."""
    dtype = np.dtype(dtype)
    return np.empty((), dtype).real.dtype if is_complex(dtype) else dtype


def complex_dtype(dtype: Any) -> np.dtype:
    """float32 (and narrower floats) -> complex64, float64 -> complex128; a complex dtype is its own."""
    dtype = np.dtype(dtype)
    if is_complex(dtype):
        return dtype
    return np.dtype(np.complex128) if dtype == np.float64 else np.dtype(np.complex64)


def _check_axes(axes: Sequence[int], ndim: int, what: str) -> None:
    for a in axes:
        if not (isinstance(a, int) and 0 <= a < ndim):
            raise ShapeError(f"{what}: axis {a} out of range for rank {ndim}")
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{what}: repeated axes {tuple(axes)}")


def _common_shape(avals: Sequence[Aval], what: str) -> tuple[int, ...]:
    shapes = {a.shape for a in avals if a.ndim > 0}
    if len(shapes) > 1:
        raise ShapeError(f"{what}: operand shapes {[a.shape for a in avals]} differ "
                         "(only rank-0 operands broadcast; use broadcast_in_dim)")
    return shapes.pop() if shapes else ()


def _common_dtype(avals: Sequence[Aval], what: str) -> np.dtype:
    dtypes = {a.dtype for a in avals}
    if len(dtypes) > 1:
        raise ShapeError(f"{what}: operand dtypes {[a.dtype.name for a in avals]} differ "
                         "(insert convert_element_type)")
    return dtypes.pop()


# ----------------------------------------------------------------------------- elementwise

def _unary_rule(name: str, kinds: str):
    def rule(x: Aval) -> Aval:
        if not _dtype_ok(x.dtype, kinds):
            raise ShapeError(f"{name}: dtype {x.dtype.name} not supported (expects {kinds})")
        return x
    return rule


def _dtype_ok(dtype: np.dtype, kinds: str) -> bool:
    """``kinds``: f floating, c complex, i integer, b bool."""
    return ((is_float(dtype) and "f" in kinds) or (is_int(dtype) and "i" in kinds)
            or (is_bool(dtype) and "b" in kinds) or (is_complex(dtype) and "c" in kinds))


def _binary_rule(name: str, kinds: str, out_bool: bool = False):
    def rule(x: Aval, y: Aval) -> Aval:
        shape = _common_shape([x, y], name)
        dtype = _common_dtype([x, y], name)
        if not _dtype_ok(dtype, kinds):
            raise ShapeError(f"{name}: dtype {dtype.name} not supported (expects {kinds})")
        return Aval(shape, np.dtype(bool) if out_bool else dtype)
    return rule


FLOAT_UNARY = ("exp", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
               "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
               "sqrt", "rsqrt", "cbrt", "erf", "erfc", "erf_inv", "lgamma", "digamma",
               "floor", "ceil", "round")
exp_p = _new("exp", _unary_rule("exp", "fc"))
log_p = _new("log", _unary_rule("log", "fc"))
log1p_p = _new("log1p", _unary_rule("log1p", "fc"))
expm1_p = _new("expm1", _unary_rule("expm1", "fc"))
tanh_p = _new("tanh", _unary_rule("tanh", "fc"))
logistic_p = _new("logistic", _unary_rule("logistic", "fc"))
sin_p = _new("sin", _unary_rule("sin", "fc"))
cos_p = _new("cos", _unary_rule("cos", "fc"))
tan_p = _new("tan", _unary_rule("tan", "fc"))
asin_p = _new("asin", _unary_rule("asin", "fc"))
acos_p = _new("acos", _unary_rule("acos", "fc"))
atan_p = _new("atan", _unary_rule("atan", "fc"))
sinh_p = _new("sinh", _unary_rule("sinh", "fc"))
cosh_p = _new("cosh", _unary_rule("cosh", "fc"))
asinh_p = _new("asinh", _unary_rule("asinh", "fc"))
acosh_p = _new("acosh", _unary_rule("acosh", "fc"))
atanh_p = _new("atanh", _unary_rule("atanh", "fc"))
sqrt_p = _new("sqrt", _unary_rule("sqrt", "fc"))
rsqrt_p = _new("rsqrt", _unary_rule("rsqrt", "fc"))
cbrt_p = _new("cbrt", _unary_rule("cbrt", "f"))
erf_p = _new("erf", _unary_rule("erf", "f"))
erfc_p = _new("erfc", _unary_rule("erfc", "f"))
erf_inv_p = _new("erf_inv", _unary_rule("erf_inv", "f"))
lgamma_p = _new("lgamma", _unary_rule("lgamma", "f"))
digamma_p = _new("digamma", _unary_rule("digamma", "f"))
floor_p = _new("floor", _unary_rule("floor", "f"))
ceil_p = _new("ceil", _unary_rule("ceil", "f"))
round_p = _new("round", _unary_rule("round", "f"))
neg_p = _new("neg", _unary_rule("neg", "fic"))
sign_p = _new("sign", _unary_rule("sign", "fic"))  # complex: z / |z| (0 at 0), torch.sgn
abs_p = _new("abs", lambda x: Aval(x.shape, real_dtype(_unary_rule("abs", "fic")(x).dtype)))  # complex: modulus
not_p = _new("not", _unary_rule("not", "ib"))
is_finite_p = _new("is_finite", lambda x: Aval(_unary_rule("is_finite", "f")(x).shape, np.dtype(bool)),
                   differentiable=False)


def _integer_pow_rule(x: Aval, *, y: int) -> Aval:
    if not isinstance(y, int):
        raise ShapeError(f"integer_pow: exponent must be a Python int, got {y!r}")
    return _unary_rule("integer_pow", "fic")(x)


integer_pow_p = _new("integer_pow", _integer_pow_rule)

add_p = _new("add", _binary_rule("add", "fic"))
sub_p = _new("sub", _binary_rule("sub", "fic"))
mul_p = _new("mul", _binary_rule("mul", "fic"))
div_p = _new("div", _binary_rule("div", "fic"))      # integers: rounds toward zero (C / lax)
rem_p = _new("rem", _binary_rule("rem", "fi"))      # sign of the dividend (C fmod / lax)
pow_p = _new("pow", _binary_rule("pow", "fic"))
max_p = _new("max", _binary_rule("max", "fib"))
min_p = _new("min", _binary_rule("min", "fib"))
atan2_p = _new("atan2", _binary_rule("atan2", "f"))
and_p = _new("and", _binary_rule("and", "ib"))
or_p = _new("or", _binary_rule("or", "ib"))
xor_p = _new("xor", _binary_rule("xor", "ib"))
eq_p = _new("eq", _binary_rule("eq", "fibc", out_bool=True), differentiable=False)
ne_p = _new("ne", _binary_rule("ne", "fibc", out_bool=True), differentiable=False)
lt_p = _new("lt", _binary_rule("lt", "fib", out_bool=True), differentiable=False)
le_p = _new("le", _binary_rule("le", "fib", out_bool=True), differentiable=False)
gt_p = _new("gt", _binary_rule("gt", "fib", out_bool=True), differentiable=False)
ge_p = _new("ge", _binary_rule("ge", "fib", out_bool=True), differentiable=False)

UNARY_PRIMITIVES = tuple(registry[n] for n in FLOAT_UNARY) + (neg_p, sign_p, abs_p, not_p, is_finite_p)
BINARY_PRIMITIVES = (add_p, sub_p, mul_p, div_p, rem_p, pow_p, max_p, min_p, atan2_p, and_p, or_p,
                     xor_p, eq_p, ne_p, lt_p, le_p, gt_p, ge_p)
COMPARISONS = (eq_p, ne_p, lt_p, le_p, gt_p, ge_p)


def _select_rule(pred: Aval, on_true: Aval, on_false: Aval) -> Aval:
    if not is_bool(pred.dtype):
        raise ShapeError(f"select: predicate must be bool, got {pred.dtype.name}")
    shape = _common_shape([pred, on_true, on_false], "select")
    return Aval(shape, _common_dtype([on_true, on_false], "select"))


select_p = _new("select", _select_rule)  # select(pred, on_true, on_false) == where(pred, on_true, on_false)


def _convert_rule(x: Aval, *, new_dtype: np.dtype) -> Aval:  # complex -> real keeps the real part
    return Aval(x.shape, new_dtype)


convert_element_type_p = _new("convert_element_type", _convert_rule)
stop_gradient_p = _new("stop_gradient", lambda x: x)  # identity whose VJP is zero


# ----------------------------------------------------------------------------- complex numbers
# convert_element_type from complex to a real dtype keeps the real part (numpy's and torch's cast).

def _complex_part_rule(name: str):
    def rule(x: Aval) -> Aval:
        if not is_complex(x.dtype):
            raise ShapeError(f"{name}: expects a complex operand, got {x.dtype.name}")
        return Aval(x.shape, real_dtype(x.dtype))
    return rule


def _complex_rule(re: Aval, im: Aval) -> Aval:
    shape = _common_shape([re, im], "complex")
    dtype = _common_dtype([re, im], "complex")
    if dtype not in (np.float32, np.float64):
        raise ShapeError(f"complex: expects float32 or float64 parts, got {dtype.name} "
                         "(convert_element_type first)")
    return Aval(shape, complex_dtype(dtype))


real_p = _new("real", _complex_part_rule("real"))
imag_p = _new("imag", _complex_part_rule("imag"))
conj_p = _new("conj", _unary_rule("conj", "c"))
complex_p = _new("complex", _complex_rule)          # complex(re, im) = re + i*im

FFT_TYPES = ("fft", "ifft", "rfft", "irfft")


def _fft_rule(x: Aval, *, fft_type: str, fft_lengths: tuple[int, ...]) -> Aval:
    """As ``jax.lax.fft``: over the trailing ``len(fft_lengths)`` axes; ``fft`` is unnormalised and
    ``ifft`` divides by the product of the lengths; ``rfft`` keeps ``n // 2 + 1`` entries of the last
    axis and ``irfft`` makes ``fft_lengths[-1]`` real values from them."""
    if fft_type not in FFT_TYPES:
        raise ShapeError(f"fft: fft_type must be one of {FFT_TYPES}, got {fft_type!r}")
    k = len(fft_lengths)
    if not 1 <= k <= x.ndim:
        raise ShapeError(f"fft: {k} fft_lengths for an operand of rank {x.ndim}")
    trailing = x.shape[x.ndim - k:]
    if fft_type == "rfft":
        if not is_float(x.dtype) or x.dtype not in (np.float32, np.float64):
            raise ShapeError(f"fft: rfft expects a float32/float64 operand, got {x.dtype.name}")
        if tuple(trailing) != tuple(fft_lengths):
            raise ShapeError(f"fft: rfft lengths {fft_lengths} != the trailing shape {trailing}")
        return Aval(x.shape[:-1] + (fft_lengths[-1] // 2 + 1,), complex_dtype(x.dtype))
    if not is_complex(x.dtype):
        raise ShapeError(f"fft: {fft_type} expects a complex operand, got {x.dtype.name}")
    if fft_type == "irfft":
        expected = tuple(fft_lengths[:-1]) + (fft_lengths[-1] // 2 + 1,)
        if tuple(trailing) != expected:
            raise ShapeError(f"fft: irfft lengths {fft_lengths} need trailing shape {expected}, got {trailing}")
        return Aval(x.shape[:-1] + (fft_lengths[-1],), real_dtype(x.dtype))
    if tuple(trailing) != tuple(fft_lengths):
        raise ShapeError(f"fft: {fft_type} lengths {fft_lengths} != the trailing shape {trailing}")
    return x


fft_p = _new("fft", _fft_rule)


# ----------------------------------------------------------------------------- reductions

def _reduce_rule(name: str, kinds: str):
    def rule(x: Aval, *, axes: tuple[int, ...]) -> Aval:
        _check_axes(axes, x.ndim, name)
        if not _dtype_ok(x.dtype, kinds):
            raise ShapeError(f"{name}: dtype {x.dtype.name} not supported")
        return Aval(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)
    return rule


reduce_sum_p = _new("reduce_sum", _reduce_rule("reduce_sum", "fic"))
reduce_max_p = _new("reduce_max", _reduce_rule("reduce_max", "fib"))
reduce_min_p = _new("reduce_min", _reduce_rule("reduce_min", "fib"))
reduce_prod_p = _new("reduce_prod", _reduce_rule("reduce_prod", "fic"))
reduce_and_p = _new("reduce_and", _reduce_rule("reduce_and", "b"), differentiable=False)
reduce_or_p = _new("reduce_or", _reduce_rule("reduce_or", "b"), differentiable=False)


def _arg_rule(name: str):
    def rule(x: Aval, *, axis: int, index_dtype: np.dtype) -> Aval:
        _check_axes((axis,), x.ndim, name)
        if x.shape[axis] == 0:
            raise ShapeError(f"{name}: reduction over an empty axis {axis} of shape {x.shape}")
        if not is_int(index_dtype):
            raise ShapeError(f"{name}: index_dtype must be an integer type, got {index_dtype}")
        return Aval(tuple(d for i, d in enumerate(x.shape) if i != axis), index_dtype)
    return rule


argmax_p = _new("argmax", _arg_rule("argmax"), differentiable=False)  # first occurrence of the max
argmin_p = _new("argmin", _arg_rule("argmin"), differentiable=False)


def _cumulative_rule(name: str, kinds: str):
    def rule(x: Aval, *, axis: int, reverse: bool) -> Aval:
        _check_axes((axis,), x.ndim, name)
        return _unary_rule(name, kinds)(x)
    return rule


cumsum_p = _new("cumsum", _cumulative_rule("cumsum", "fic"))
cumprod_p = _new("cumprod", _cumulative_rule("cumprod", "fic"))
cummax_p = _new("cummax", _cumulative_rule("cummax", "fi"))
cummin_p = _new("cummin", _cumulative_rule("cummin", "fi"))


def _sort_rule(x: Aval, *, axis: int, descending: bool, index_dtype: np.dtype) -> tuple[Aval, Aval]:
    _check_axes((axis,), x.ndim, "sort")
    if not is_int(index_dtype):
        raise ShapeError(f"sort: index_dtype must be an integer type, got {index_dtype}")
    return x, Aval(x.shape, np.dtype(index_dtype))


# (values, indices): a stable sort along ``axis`` and the permutation it applied (values ==
# take_along_axis(x, indices)). NaN sorts above +inf (last ascending, first descending), -0.0 ties
# with 0.0, and equal keys keep their order in both directions (torch.sort(stable=True)).
sort_p = _new("sort", _sort_rule, multiple_results=True)


# ----------------------------------------------------------------------------- shape ops

def _broadcast_in_dim_rule(x: Aval, *, shape: tuple[int, ...], broadcast_dimensions: tuple[int, ...]) -> Aval:
    if len(broadcast_dimensions) != x.ndim:
        raise ShapeError(f"broadcast_in_dim: operand rank {x.ndim} but broadcast_dimensions "
                         f"{broadcast_dimensions}")
    _check_axes(broadcast_dimensions, len(shape), "broadcast_in_dim")
    if list(broadcast_dimensions) != sorted(broadcast_dimensions):
        raise ShapeError(f"broadcast_in_dim: broadcast_dimensions {broadcast_dimensions} must increase")
    for d, od in zip(x.shape, broadcast_dimensions):
        if d != 1 and d != shape[od]:
            raise ShapeError(f"broadcast_in_dim: cannot broadcast {x.shape} to {shape} "
                             f"along {broadcast_dimensions}")
    return Aval(shape, x.dtype)


broadcast_in_dim_p = _new("broadcast_in_dim", _broadcast_in_dim_rule)


def _reshape_rule(x: Aval, *, new_sizes: tuple[int, ...]) -> Aval:
    if int(np.prod(new_sizes, dtype=np.int64)) != x.size:
        raise ShapeError(f"reshape: cannot reshape {x.shape} ({x.size} elements) to {new_sizes}")
    return Aval(new_sizes, x.dtype)


reshape_p = _new("reshape", _reshape_rule)


def _transpose_rule(x: Aval, *, permutation: tuple[int, ...]) -> Aval:
    if sorted(permutation) != list(range(x.ndim)):
        raise ShapeError(f"transpose: {permutation} is not a permutation of rank {x.ndim}")
    return Aval(tuple(x.shape[p] for p in permutation), x.dtype)


transpose_p = _new("transpose", _transpose_rule)


def _slice_rule(x: Aval, *, start_indices: tuple[int, ...], limit_indices: tuple[int, ...],
                strides: tuple[int, ...]) -> Aval:
    if not (len(start_indices) == len(limit_indices) == len(strides) == x.ndim):
        raise ShapeError(f"slice: index lists must have rank {x.ndim}")
    out = []
    for d, s, l, st in zip(x.shape, start_indices, limit_indices, strides):
        if not (0 <= s <= l <= d) or st < 1:
            raise ShapeError(f"slice: bad bounds start={start_indices} limit={limit_indices} "
                             f"strides={strides} for shape {x.shape}")
        out.append(max(0, -(-(l - s) // st)))
    return Aval(tuple(out), x.dtype)


slice_p = _new("slice", _slice_rule)


def _pad_rule(x: Aval, padding_value: Aval, *, padding_config: tuple[tuple[int, int, int], ...]) -> Aval:
    if padding_value.ndim != 0 or padding_value.dtype != x.dtype:
        raise ShapeError(f"pad: padding value must be a rank-0 {x.dtype.name}, got {padding_value.str_short()}")
    if len(padding_config) != x.ndim:
        raise ShapeError(f"pad: padding_config has {len(padding_config)} entries for rank {x.ndim}")
    out = []
    for d, (lo, hi, interior) in zip(x.shape, padding_config):
        if interior < 0:
            raise ShapeError("pad: interior padding must be >= 0")
        n = lo + hi + d + max(0, d - 1) * interior
        if n < 0:
            raise ShapeError(f"pad: negative output size for {x.shape} with {padding_config}")
        out.append(n)
    return Aval(tuple(out), x.dtype)


pad_p = _new("pad", _pad_rule)  # lo/hi may be negative (crop), as in lax.pad


def _concatenate_rule(*xs: Aval, dimension: int) -> Aval:
    if not xs:
        raise ShapeError("concatenate: needs at least one operand")
    _check_axes((dimension,), xs[0].ndim, "concatenate")
    dtype = _common_dtype(xs, "concatenate")
    for x in xs:
        if x.ndim != xs[0].ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape))
                                       if i != dimension):
            raise ShapeError(f"concatenate: shapes {[x.shape for x in xs]} differ off dimension {dimension}")
    shape = list(xs[0].shape)
    shape[dimension] = sum(x.shape[dimension] for x in xs)
    return Aval(tuple(shape), dtype)


concatenate_p = _new("concatenate", _concatenate_rule)


def _rev_rule(x: Aval, *, dimensions: tuple[int, ...]) -> Aval:
    _check_axes(dimensions, x.ndim, "rev")
    return x


rev_p = _new("rev", _rev_rule)


def _iota_rule(*, dtype: np.dtype, shape: tuple[int, ...], dimension: int) -> Aval:
    _check_axes((dimension,), len(shape), "iota")
    return Aval(shape, dtype)


iota_p = _new("iota", _iota_rule, differentiable=False)


# ----------------------------------------------------------------------------- contractions

def _dot_general_rule(lhs: Aval, rhs: Aval, *, dimension_numbers, preferred_element_type=None) -> Aval:
    (lc, rc), (lb, rb) = dimension_numbers
    _check_axes(tuple(lc) + tuple(lb), lhs.ndim, "dot_general lhs")
    _check_axes(tuple(rc) + tuple(rb), rhs.ndim, "dot_general rhs")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ShapeError(f"dot_general: dimension_numbers {dimension_numbers} unbalanced")
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ShapeError(f"dot_general: lhs dim {a} ({lhs.shape[a]}) != rhs dim {b} ({rhs.shape[b]}) "
                             f"for shapes {lhs.shape} @ {rhs.shape}")
    dtype = _common_dtype([lhs, rhs], "dot_general")
    if is_bool(dtype):
        raise ShapeError("dot_general: bool operands are not supported")
    batch = tuple(lhs.shape[i] for i in lb)
    lfree = tuple(d for i, d in enumerate(lhs.shape) if i not in lc and i not in lb)
    rfree = tuple(d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb)
    return Aval(batch + lfree + rfree, preferred_element_type or dtype)


dot_general_p = _new("dot_general", _dot_general_rule)


def conv_output_shape(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count):
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n = lhs_shape[lhs_spec[0]]
    c = lhs_shape[lhs_spec[1]]
    o = rhs_shape[rhs_spec[0]]
    i = rhs_shape[rhs_spec[1]]
    if c != i * feature_group_count:
        raise ShapeError(f"conv: lhs has {c} features but rhs expects {i} x {feature_group_count} groups")
    if o % feature_group_count or o % batch_group_count or n % batch_group_count:
        raise ShapeError("conv: output features / batch not divisible by the group counts")
    spatial = []
    for k, (lo, hi) in enumerate(padding):
        x = lhs_shape[lhs_spec[2 + k]]
        w = rhs_shape[rhs_spec[2 + k]]
        x_dil = (x - 1) * lhs_dilation[k] + 1 if x > 0 else 0
        w_dil = (w - 1) * rhs_dilation[k] + 1
        span = x_dil + lo + hi - w_dil
        spatial.append(max(0, span // window_strides[k] + 1) if span >= 0 else 0)
    out = [0] * len(lhs_shape)
    out[out_spec[0]] = n // batch_group_count
    out[out_spec[1]] = o
    for k, s in enumerate(spatial):
        out[out_spec[2 + k]] = s
    return tuple(out)


def _conv_rule(lhs: Aval, rhs: Aval, *, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count, batch_group_count) -> Aval:
    nspatial = lhs.ndim - 2
    if rhs.ndim != lhs.ndim or any(len(t) != nspatial for t in
                                   (window_strides, padding, lhs_dilation, rhs_dilation)):
        raise ShapeError(f"conv: inconsistent ranks for lhs {lhs.shape}, rhs {rhs.shape}")
    dtype = _common_dtype([lhs, rhs], "conv_general_dilated")
    shape = conv_output_shape(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, batch_group_count)
    return Aval(shape, dtype)


# dimension_numbers = (lhs_spec, rhs_spec, out_spec), each (batch-or-out-feature, feature, *spatial)
# dims, exactly as JAX's ConvDimensionNumbers.
conv_general_dilated_p = _new("conv_general_dilated", _conv_rule)


# ----------------------------------------------------------------------------- linear algebra
# Batched over leading dimensions; operands are float or complex matrices in the last two dimensions.
# "Symmetric" reads "Hermitian" and a transpose in a decomposition's definition reads the conjugate
# transpose for complex matrices (LAPACK's and torch's meaning); ``triangular_solve``'s ``transpose_a``
# is the plain transpose (a conjugate transpose is ``transpose_a`` of ``conj(a)``). What a singular or
# indefinite matrix gives is unspecified (inf/NaN): nothing here raises on values.

def _matrices(name: str, *avals: Aval) -> None:
    for a in avals:
        if a.ndim < 2 or not is_inexact(a.dtype):
            raise ShapeError(f"{name}: expects float or complex matrices (rank >= 2), got {a.str_short()}")


def _square(name: str, a: Aval) -> None:
    _matrices(name, a)
    if a.shape[-1] != a.shape[-2]:
        raise ShapeError(f"{name}: expects square matrices, got {a.str_short()}")


def _cholesky_rule(a: Aval) -> Aval:
    _square("cholesky", a)
    return a


# the lower factor L with a = L L^H, reading only a's lower triangle (LAPACK potrf)
cholesky_p = _new("cholesky", _cholesky_rule)


def _triangular_solve_rule(a: Aval, b: Aval, *, left_side: bool, lower: bool, transpose_a: bool,
                           unit_diagonal: bool) -> Aval:
    _square("triangular_solve", a)
    _matrices("triangular_solve", b)
    n = a.shape[-1]
    if a.shape[:-2] != b.shape[:-2] or a.dtype != b.dtype or b.shape[-2 if left_side else -1] != n:
        raise ShapeError(f"triangular_solve: {a.str_short()} and {b.str_short()} do not match "
                         f"(left_side={left_side}; batch dimensions must be equal)")
    return b


# x with op(a) x = b (left_side) or x op(a) = b, op(a) = a^T if transpose_a; a's other triangle is not read
triangular_solve_p = _new("triangular_solve", _triangular_solve_rule)


def _lu_rule(a: Aval) -> tuple[Aval, Aval, Aval]:
    _matrices("lu", a)
    m, n = a.shape[-2:]
    batch = a.shape[:-2]
    return a, Aval(batch + (min(m, n),), np.dtype(np.int32)), Aval(batch + (m,), np.dtype(np.int32))


# (lu, pivots, permutation): partial pivoting (LAPACK getrf); lu packs unit-lower L and upper U,
# pivots[i] is the (0-based) row swapped with row i, and a[..., permutation, :] == L @ U
lu_p = _new("lu", _lu_rule, multiple_results=True)


def _qr_rule(a: Aval, *, full_matrices: bool) -> tuple[Aval, Aval]:
    _matrices("qr", a)
    m, n = a.shape[-2:]
    k = m if full_matrices else min(m, n)
    return Aval(a.shape[:-2] + (m, k), a.dtype), Aval(a.shape[:-2] + (k, n), a.dtype)


# (q, r): Householder QR (LAPACK geqrf + orgqr, so r's diagonal may be negative)
qr_p = _new("qr", _qr_rule, multiple_results=True)


def _eigh_rule(a: Aval, *, lower: bool) -> tuple[Aval, Aval]:
    _square("eigh", a)
    return Aval(a.shape[:-1], real_dtype(a.dtype)), a


# (eigenvalues ascending, real; eigenvectors as columns) of the symmetric (Hermitian) matrix in a's
# lower (or upper) triangle
eigh_p = _new("eigh", _eigh_rule, multiple_results=True)


def _svd_rule(a: Aval, *, full_matrices: bool) -> tuple[Aval, Aval, Aval]:
    _matrices("svd", a)
    m, n = a.shape[-2:]
    k = min(m, n)
    batch = a.shape[:-2]
    u = (m, m) if full_matrices else (m, k)
    vh = (n, n) if full_matrices else (k, n)
    return Aval(batch + u, a.dtype), Aval(batch + (k,), real_dtype(a.dtype)), Aval(batch + vh, a.dtype)


# (u, s, vh) with a = u diag(s) vh, s real and descending (LAPACK gesdd)
svd_p = _new("svd", _svd_rule, multiple_results=True)


def _pinv_rule(a: Aval, atol: Aval, rtol: Aval, *, hermitian: bool) -> Aval:
    _matrices("pinv", a)
    for t in (atol, rtol):
        if t.shape != a.shape[:-2] or t.dtype != real_dtype(a.dtype):
            raise ShapeError(f"pinv: tolerances must be {real_dtype(a.dtype).name} arrays of the batch shape "
                             f"{a.shape[:-2]}, got {t.str_short()}")
    return Aval(a.shape[:-2] + (a.shape[-1], a.shape[-2]), a.dtype)


# Moore-Penrose pseudo-inverse keeping singular values > max(atol, rtol * largest); with ``hermitian``
# the (symmetric) matrix is decomposed by eigh. Its own primitive so that its derivative is the
# constant-rank formula, finite at rank-deficient matrices (differentiating the SVD is not).
pinv_p = _new("pinv", _pinv_rule)


def _eig_rule(a: Aval) -> tuple[Aval, Aval]:
    _square("eig", a)
    if a.dtype.itemsize < 4:  # LAPACK (both backends) has no half-precision geev
        raise ShapeError(f"eig: expects float32, float64, complex64 or complex128 matrices, got {a.str_short()}")
    c = complex_dtype(a.dtype)
    return Aval(a.shape[:-1], c), Aval(a.shape, c)


# (eigenvalues, right eigenvectors as columns) of a general square matrix, both complex even for a real
# one: a v = l v. LAPACK geev's (and torch.linalg.eig's) meaning: the order of the eigenvalues is
# unspecified, and each eigenvector has unit 2-norm, so it is unique only up to a phase e^{i phi} (up to
# sign for a real eigenvector); geev makes its largest component real, but builds of LAPACK may still
# differ in that sign. JAX computes it with LAPACK on the host CPU (for GPU arrays too, by JAX's docs);
# the "jax" backend raises on platforms without it (TPU). Differentiable where eigenvalues are distinct.
eig_p = _new("eig", _eig_rule, multiple_results=True)


# ----------------------------------------------------------------------------- indexing (torch-style)

def _gather_rule(operand: Aval, indices: Aval, *, axis: int) -> Aval:
    _check_axes((axis,), operand.ndim, "gather")
    if indices.ndim != operand.ndim or not is_int(indices.dtype):
        raise ShapeError(f"gather: indices {indices.str_short()} must be an integer array of rank {operand.ndim}")
    for d, (a, b) in enumerate(zip(indices.shape, operand.shape)):
        if d != axis and a > b:
            raise ShapeError(f"gather: indices shape {indices.shape} exceeds operand {operand.shape} at dim {d}")
    return Aval(indices.shape, operand.dtype)


# out[i][j][k] = operand[i][indices[i][j][k]][k] for axis == 1 (torch.gather / take_along_axis)
gather_p = _new("gather", _gather_rule)


def _scatter_rule(name: str):
    def rule(operand: Aval, indices: Aval, updates: Aval, *, axis: int) -> Aval:
        _check_axes((axis,), operand.ndim, name)
        if indices.shape != updates.shape or indices.ndim != operand.ndim or not is_int(indices.dtype):
            raise ShapeError(f"{name}: indices {indices.str_short()} and updates {updates.str_short()} "
                             f"must share a shape of rank {operand.ndim}")
        if updates.dtype != operand.dtype:
            raise ShapeError(f"{name}: updates dtype {updates.dtype.name} != operand {operand.dtype.name}")
        for d, (a, b) in enumerate(zip(indices.shape, operand.shape)):
            if d != axis and a > b:
                raise ShapeError(f"{name}: indices shape {indices.shape} exceeds operand {operand.shape}")
        return operand
    return rule


# out = operand; out[i][indices[i][j][k]][k] += updates[i][j][k]  (torch.scatter_add, axis == 1)
scatter_add_p = _new("scatter_add", _scatter_rule("scatter_add"))
# as scatter_add but overwrites; with duplicate indices the winner is unspecified (as in torch)
scatter_p = _new("scatter", _scatter_rule("scatter"))


# ----------------------------------------------------------------------------- random

def _random_rule(key: Aval, *, shape: tuple[int, ...], dtype: np.dtype, distribution: str) -> Aval:
    if key.shape != (2,) or key.dtype != np.dtype(np.uint32):
        raise ShapeError(f"random: key must be u32[2], got {key.str_short()}")
    if distribution not in ("uniform", "normal"):
        raise ShapeError(f"random: unknown distribution {distribution!r}")
    return Aval(shape, dtype)


# Draws from an explicit key threaded through the graph (a pure function of the key).
random_p = _new("random", _random_rule, differentiable=False)

_KEY = Aval((2,), np.dtype(np.uint32))


def _random_fold_in_rule(key: Aval, *, data: int) -> Aval:
    if key != _KEY:
        raise ShapeError(f"random_fold_in: key must be u32[2], got {key.str_short()}")
    if not isinstance(data, (int, np.integer)) or not 0 <= int(data) < 2 ** 32:
        raise ShapeError(f"random_fold_in: data must be an int in [0, 2**32), got {data!r}")
    return _KEY


# A new key from a key and a u32 ``data`` (jax.random.fold_in): threefry2x32(key, (0, data)).
# Folding distinct data into one key gives independent streams, so one key input can feed
# every draw of a graph.
random_fold_in_p = _new("random_fold_in", _random_fold_in_rule, differentiable=False)


def eqn_is_random(prim: Primitive) -> bool:
    return prim is random_p


# ----------------------------------------------------------------------------- primitive groups
# Defined once here; transforms and partition policies ask these instead of listing primitives.

REDUCTIONS = (reduce_sum_p, reduce_max_p, reduce_min_p, reduce_prod_p, reduce_and_p, reduce_or_p)
"""Reductions over ``axes`` (the identity when ``axes`` is empty)."""
INDEX_REDUCTIONS = (argmax_p, argmin_p)
"""Reductions to the index of an extremum along one axis."""
COMPUTE_INTENSIVE = (dot_general_p, conv_general_dilated_p)
"""Primitives whose work grows faster than their inputs: what partitioners save rather than recompute."""


# ----------------------------------------------------------------------------- typecheck

def typecheck(graph: Graph) -> None:
    """Re-derive every equation's output avals from the shape rules; raise ShapeError on mismatch."""
    for i, e in enumerate(graph.eqns):
        try:
            expected = infer_avals(e.primitive, [a.aval for a in e.inputs], e.params)
        except ShapeError as exc:
            raise ShapeError(f"equation {i} ({e.primitive.name}): {exc}") from None
        got = [v.aval for v in e.outputs]
        if list(expected) != got:
            raise ShapeError(
                f"equation {i} ({e.primitive.name}) declares outputs "
                f"{[a.str_short() for a in got]} but its rule gives {[a.str_short() for a in expected]}"
            )
    if graph.joint is not None:
        num_primals, num_outs = graph.joint
        if not (0 <= num_primals <= len(graph.inputs) and 0 <= num_outs <= len(graph.outputs)):
            raise GraphError(f"joint spec {graph.joint} does not fit the graph's inputs/outputs")


def checked(graph: Graph, transform: str) -> Graph:
    """``graph`` as a transform returns it, typechecked first when ``REFTRACE_CHECK=1``.

    Autodidax checks every jaxpr a transform makes; here that costs a shape-rule call per
    equation, so it is a debug flag (the test suite turns it on). A failure names the transform.
    """
    if os.environ.get("REFTRACE_CHECK") == "1":
        try:
            typecheck(graph)
        except (ShapeError, GraphError) as err:
            raise GraphError(f"{transform} produced an ill-typed graph (REFTRACE_CHECK=1): {err}") from None
    return graph
