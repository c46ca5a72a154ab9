"""Strict, primitive-level functions on traced values (the ``jax.lax`` of reftrace).

VJP rules and front ends are written with these. No implicit promotion: operands
must already agree in dtype; rank-0 operands (and Python scalars, which take the
other operand's dtype) broadcast. Outside any trace, a call evaluates eagerly.
"""
from __future__ import annotations

import builtins
from typing import Any, Callable, Sequence

import numpy as np

from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.errors import ArgumentError, DataDependentControlFlowError, ShapeError, TracingError
from reftrace.graph import Atom, Aval, Literal
from reftrace.primitives import Primitive

_builders: list[Builder] = []


class TracedArray:
    """A value being traced: a builder and the atom (Var or Literal) it stands for."""

    __slots__ = ("builder", "atom")
    __array_priority__ = 1000  # numpy defers to our operators

    def __init__(self, builder: Builder, atom: Atom) -> None:
        self.builder = builder
        self.atom = atom

    aval = property(lambda self: self.atom.aval)
    shape = property(lambda self: self.atom.aval.shape)
    dtype = property(lambda self: self.atom.aval.dtype)
    ndim = property(lambda self: self.atom.aval.ndim)
    size = property(lambda self: self.atom.aval.size)

    def __repr__(self) -> str:
        return f"TracedArray({self.aval.str_short()})"

    def __bool__(self) -> bool:
        raise DataDependentControlFlowError(
            f"data-dependent control flow: the truth value of a traced {self.aval.str_short()} is not "
            "known while tracing. Use reftrace.numpy.where (or select) instead of if/while on array values.")

    def _concrete(self, conversion: str) -> DataDependentControlFlowError:
        return DataDependentControlFlowError(
            f"{conversion} on a traced {self.aval.str_short()}: its value is unknown while tracing, so it cannot "
            "become a Python number. Keep it an array (reftrace.numpy functions, reftrace.numpy.where for "
            "choices), or pass the number to the function as a Python constant instead of an argument.")

    def __float__(self) -> float:
        raise self._concrete("float(x)")

    def __int__(self) -> int:
        raise self._concrete("int(x)")

    def __complex__(self) -> complex:
        raise self._concrete("complex(x)")

    def __index__(self) -> int:
        raise self._concrete("use as a Python index (operator.index: range(), a list index, a shape)")

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TracingError(f"a traced {self.aval.str_short()} cannot become a concrete numpy array while "
                           "tracing; use reftrace.numpy functions instead of numpy ones.")

    def __len__(self) -> int:
        if self.ndim == 0:
            raise ArgumentError(f"len() of a rank-0 traced {self.aval.str_short()}: it has no length; "
                                "use .shape or .size")
        return self.shape[0]

    def __iter__(self) -> Any:
        """Rows along the first axis, as numpy (a bounded loop: shapes are static)."""
        if self.ndim == 0:
            raise ArgumentError(f"iteration over a rank-0 traced {self.aval.str_short()}: it has no rows")
        return (self[i] for i in range(self.shape[0]))

    def __hash__(self) -> int:
        return id(self)

    # The arithmetic, comparison and indexing operators follow numpy's semantics: reftrace.numpy
    # installs them (``_install_operators``), as JAX's array methods are installed on its tracers.


_COMPLEX = (np.dtype(np.complex64), np.dtype(np.complex128))


def check_dtype(dtype: Any, what: str) -> np.dtype:
    """``dtype`` as a numpy dtype a graph can hold (bool, integer, floating, complex), else ArgumentError naming
    ``what``."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise ArgumentError(f"{what}: {dtype!r} is not a dtype ({exc})") from None
    if not (P.is_bool(dtype) or P.is_int(dtype) or P.is_float(dtype) or dtype in _COMPLEX):
        raise ArgumentError(f"{what} has dtype {dtype}, which a graph cannot hold; graphs hold bool, integer, "
                            "floating and complex64/complex128 arrays")
    return dtype


def scalar_of_dtype(value: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """``value`` (a number or 0-d array) as a rank-0 array of ``dtype``; ArgumentError if it is no number,
    or a Python int out of ``dtype``'s range (numpy 2 refuses those too instead of wrapping)."""
    if isinstance(value, int) and not isinstance(value, bool) and P.is_int(dtype):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ArgumentError(f"{what} {value} does not fit {dtype.name} (range {info.min}..{info.max}); "
                                "use a value in range, or a wider dtype")
    try:
        return np.asarray(value, dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ArgumentError(f"{what} must be a number of dtype {dtype.name}, got {type(value).__name__} "
                            f"{value!r:.40} ({exc})") from None


def current_builder() -> Builder | None:
    return _builders[-1] if _builders else None


class tracing:
    """Context manager making ``builder`` the one that ``bind`` emits into."""

    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    def __enter__(self) -> Builder:
        _builders.append(self.builder)
        return self.builder

    def __exit__(self, *exc: Any) -> None:
        _builders.pop()


def new_input(builder: Builder, aval: Aval) -> TracedArray:
    return TracedArray(builder, builder.new_var(aval))


def to_atom(x: Any, dtype: Any = None) -> Atom:
    """A traced value's atom, or a Literal for a concrete scalar/array (cast to ``dtype`` if given)."""
    if isinstance(x, TracedArray):
        return x.atom
    if isinstance(x, Literal):
        return x
    arr = np.asarray(x)
    if dtype is not None:
        arr = arr.astype(dtype)
    return Literal.of(arr)


def bind(prim: Primitive, *args: Any, **params: Any) -> Any:
    """Emit ``prim`` into the current builder; one TracedArray out (or a tuple if multiple_results)."""
    builders = {a.builder for a in args if isinstance(a, TracedArray)}
    if len(builders) > 1:
        raise TracingError(f"{prim.name}: operands come from different traces (a value escaped its trace?)")
    builder = builders.pop() if builders else current_builder()
    if builder is None:
        return _eager(prim, args, params)
    outs = builder.bind(prim, [to_atom(a) for a in args], params)
    wrapped = tuple(TracedArray(builder, v) for v in outs)
    return wrapped if prim.multiple_results else wrapped[0]


EagerEvaluator = Callable[[Primitive, Sequence[np.ndarray], dict[str, Any]], Any]
_eager_evaluator: EagerEvaluator | None = None


def set_eager_evaluator(evaluator: EagerEvaluator | None) -> EagerEvaluator | None:
    """Choose how primitives run on concrete arrays outside a trace; returns the previous choice.

    The core evaluates nothing itself: ``import reftrace`` installs the JAX backend's evaluator
    (one XLA call per primitive), so the arrow runs from the facade to the backend, never from
    the core.
    """
    global _eager_evaluator
    previous, _eager_evaluator = _eager_evaluator, evaluator
    return previous


def _eager(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    """Run one primitive on concrete arrays outside any trace, with the installed evaluator."""
    if _eager_evaluator is None:
        raise TracingError(f"{prim.name} was called on concrete arrays outside rt.trace, and no eager "
                           "evaluator is installed (reftrace.lax.set_eager_evaluator); call it inside rt.trace")
    return _eager_evaluator(prim, [np.asarray(a) for a in args], params)


# ----------------------------------------------------------------------------- helpers

def _scalar_like(x: Any, other: Any) -> Any:
    """Python scalars take the dtype of the traced operand they meet."""
    if isinstance(x, (bool, int, float, builtins.complex)) and not isinstance(x, TracedArray):
        dtype = getattr(other, "dtype", None)
        return Literal.of(x, dtype) if dtype is not None else x
    return x


def constant(value: Any, dtype: Any = None) -> Any:
    """A constant operand: the one way rules, front ends and the torch bridge make constants.

    ``value`` is a ``Literal`` or anything numpy reads (converted to ``dtype`` when given). Inside
    a trace it is a TracedArray over a literal; outside, the plain numpy value.
    """
    lit = value if isinstance(value, Literal) else Literal.of(
        np.asarray(value, dtype=None if dtype is None else np.dtype(dtype)))
    b = current_builder()
    return TracedArray(b, lit) if b is not None else lit.value


def _wrap_literal(x: Any) -> Any:
    """Operands as given, Literals made into constants (Python scalars stay for the op to type)."""
    return constant(x) if isinstance(x, Literal) else x


def _unary(prim: Primitive):
    def f(x: Any) -> Any:
        return bind(prim, x)
    f.__name__ = prim.name
    return f


def _binary(prim: Primitive):
    def f(x: Any, y: Any) -> Any:
        x2, y2 = _wrap_literal(_scalar_like(x, y)), _wrap_literal(_scalar_like(y, x))
        return bind(prim, x2, y2)
    f.__name__ = prim.name
    return f


# one wrapper per elementwise primitive, by name (``grep 'exp ='`` finds it)
exp = _unary(P.exp_p)
log = _unary(P.log_p)
log1p = _unary(P.log1p_p)
expm1 = _unary(P.expm1_p)
tanh = _unary(P.tanh_p)
logistic = _unary(P.logistic_p)
sin = _unary(P.sin_p)
cos = _unary(P.cos_p)
tan = _unary(P.tan_p)
asin = _unary(P.asin_p)
acos = _unary(P.acos_p)
atan = _unary(P.atan_p)
sinh = _unary(P.sinh_p)
cosh = _unary(P.cosh_p)
asinh = _unary(P.asinh_p)
acosh = _unary(P.acosh_p)
atanh = _unary(P.atanh_p)
sqrt = _unary(P.sqrt_p)
rsqrt = _unary(P.rsqrt_p)
cbrt = _unary(P.cbrt_p)
erf = _unary(P.erf_p)
erfc = _unary(P.erfc_p)
erf_inv = _unary(P.erf_inv_p)
lgamma = _unary(P.lgamma_p)
digamma = _unary(P.digamma_p)
floor = _unary(P.floor_p)
ceil = _unary(P.ceil_p)
round = _unary(P.round_p)
neg = _unary(P.neg_p)
sign = _unary(P.sign_p)
abs = _unary(P.abs_p)
is_finite = _unary(P.is_finite_p)
add = _binary(P.add_p)
sub = _binary(P.sub_p)
mul = _binary(P.mul_p)
div = _binary(P.div_p)
rem = _binary(P.rem_p)
pow = _binary(P.pow_p)
max = _binary(P.max_p)
min = _binary(P.min_p)
atan2 = _binary(P.atan2_p)
xor = _binary(P.xor_p)
eq = _binary(P.eq_p)
ne = _binary(P.ne_p)
lt = _binary(P.lt_p)
le = _binary(P.le_p)
gt = _binary(P.gt_p)
ge = _binary(P.ge_p)
bitwise_not = _unary(P.not_p)
logical_and, logical_or, logical_xor = _binary(P.and_p), _binary(P.or_p), _binary(P.xor_p)
maximum, minimum = _binary(P.max_p), _binary(P.min_p)


def integer_pow(x: Any, y: int) -> Any:
    if not isinstance(y, (int, np.integer)) or isinstance(y, (bool, np.bool_)):
        raise ArgumentError(f"integer_pow: the exponent must be a Python int, got {type(y).__name__} {y!r:.40}; "
                            "use pow for array or float exponents")
    return bind(P.integer_pow_p, x, y=int(y))


def select(pred: Any, on_true: Any, on_false: Any) -> Any:
    on_true, on_false = _scalar_like(on_true, on_false), _scalar_like(on_false, on_true)
    return bind(P.select_p, pred, _wrap_literal(on_true), _wrap_literal(on_false))


def convert_element_type(x: Any, dtype: Any) -> Any:
    dtype = check_dtype(dtype, "convert_element_type: new dtype")
    if getattr(x, "dtype", None) == dtype:
        return x
    return bind(P.convert_element_type_p, x, new_dtype=dtype)


def stop_gradient(x: Any) -> Any:
    return bind(P.stop_gradient_p, x)


real = _unary(P.real_p)
imag = _unary(P.imag_p)
conj = _unary(P.conj_p)


def complex(re: Any, im: Any) -> Any:  # noqa: A001 - lax's name
    re, im = _scalar_like(re, im), _scalar_like(im, re)
    return bind(P.complex_p, _wrap_literal(re), _wrap_literal(im))


def conj_if_complex(x: Any) -> Any:
    """``conj(x)`` for a complex ``x``, ``x`` itself otherwise: what the VJP rules conjugate."""
    return conj(x) if P.is_complex(aval_of(x).dtype) else x


def fft(x: Any, fft_type: str, fft_lengths: Sequence[int]) -> Any:
    """``jax.lax.fft``: over the trailing ``len(fft_lengths)`` axes (see ``primitives.fft_p``)."""
    return bind(P.fft_p, x, fft_type=fft_type, fft_lengths=tuple(int(n) for n in fft_lengths))


def reduce(prim: Primitive, x: Any, axes: Sequence[int]) -> Any:
    axes = tuple(sorted(int(a) for a in axes))
    if not axes:
        return x
    return bind(prim, x, axes=axes)


def reduce_sum(x: Any, axes: Sequence[int]) -> Any:
    return reduce(P.reduce_sum_p, x, axes)


def reduce_max(x: Any, axes: Sequence[int]) -> Any:
    return reduce(P.reduce_max_p, x, axes)


def reduce_min(x: Any, axes: Sequence[int]) -> Any:
    return reduce(P.reduce_min_p, x, axes)


def reduce_prod(x: Any, axes: Sequence[int]) -> Any:
    return reduce(P.reduce_prod_p, x, axes)


def argmax(x: Any, axis: int, index_dtype: Any = np.int64) -> Any:
    return bind(P.argmax_p, x, axis=int(axis), index_dtype=np.dtype(index_dtype))


def argmin(x: Any, axis: int, index_dtype: Any = np.int64) -> Any:
    return bind(P.argmin_p, x, axis=int(axis), index_dtype=np.dtype(index_dtype))


def sort(x: Any, axis: int, descending: bool = False, index_dtype: Any = np.int64) -> tuple[Any, Any]:
    """(values, indices): a stable sort along ``axis`` (NaN largest) and its permutation."""
    return bind(P.sort_p, x, axis=int(axis), descending=bool(descending), index_dtype=np.dtype(index_dtype))


def cumsum(x: Any, axis: int, reverse: bool = False) -> Any:
    return bind(P.cumsum_p, x, axis=int(axis), reverse=bool(reverse))


def broadcast_in_dim(x: Any, shape: Sequence[int], broadcast_dimensions: Sequence[int]) -> Any:
    shape, dims = tuple(int(d) for d in shape), tuple(int(d) for d in broadcast_dimensions)
    if tuple(np.shape(x) if not isinstance(x, TracedArray) else x.shape) == shape and dims == tuple(range(len(shape))):
        return x
    return bind(P.broadcast_in_dim_p, x, shape=shape, broadcast_dimensions=dims)


def broadcast_to_rank(x: Any, shape: Sequence[int]) -> Any:
    """numpy-style broadcast of ``x`` to ``shape`` (trailing alignment)."""
    shape = tuple(shape)
    xs = x.shape if isinstance(x, TracedArray) else np.shape(x)
    lead = len(shape) - len(xs)
    return broadcast_in_dim(x, shape, tuple(range(lead, len(shape))))


def full(shape: Sequence[int], value: Any, dtype: Any) -> Any:
    """A constant array: a rank-0 Literal broadcast to ``shape``."""
    lit = Literal.of(scalar_of_dtype(value, check_dtype(dtype, "full: dtype"), "full: the fill value"))
    if tuple(shape) == ():
        return _wrap_literal(lit)
    return bind(P.broadcast_in_dim_p, _wrap_literal(lit), shape=tuple(shape), broadcast_dimensions=())


def zeros(aval: Aval) -> Any:
    return full(aval.shape, 0, aval.dtype)


def reshape(x: Any, new_sizes: Sequence[int]) -> Any:
    new_sizes = tuple(int(d) for d in new_sizes)
    if x.shape == new_sizes:
        return x
    return bind(P.reshape_p, x, new_sizes=new_sizes)


def transpose(x: Any, permutation: Sequence[int]) -> Any:
    permutation = tuple(int(p) for p in permutation)
    if len(permutation) != x.ndim:
        raise ShapeError(f"transpose: permutation {permutation} has {len(permutation)} axes for an array of "
                         f"rank {x.ndim}")
    if permutation == tuple(range(x.ndim)):
        return x
    return bind(P.transpose_p, x, permutation=permutation)


def slice(x: Any, start_indices: Sequence[int], limit_indices: Sequence[int],  # noqa: A001
          strides: Sequence[int] | None = None) -> Any:
    strides = tuple(strides) if strides is not None else (1,) * len(start_indices)
    if tuple(start_indices) == (0,) * x.ndim and tuple(limit_indices) == x.shape and set(strides) <= {1}:
        return x
    return bind(P.slice_p, x, start_indices=tuple(int(s) for s in start_indices),
                limit_indices=tuple(int(s) for s in limit_indices), strides=tuple(int(s) for s in strides))


def pad(x: Any, padding_value: Any, padding_config: Sequence[tuple[int, int, int]]) -> Any:
    config = tuple((int(lo), int(hi), int(i)) for lo, hi, i in padding_config)
    if all(c == (0, 0, 0) for c in config):
        return x
    return bind(P.pad_p, x, _wrap_literal(_scalar_like(padding_value, x)), padding_config=config)


def concatenate(xs: Sequence[Any], dimension: int) -> Any:
    if len(xs) == 1:
        return xs[0]
    return bind(P.concatenate_p, *xs, dimension=int(dimension))


def rev(x: Any, dimensions: Sequence[int]) -> Any:
    dimensions = tuple(sorted(int(d) for d in dimensions))
    if not dimensions:
        return x
    return bind(P.rev_p, x, dimensions=dimensions)


def iota(dtype: Any, shape: Sequence[int], dimension: int = 0) -> Any:
    return bind(P.iota_p, dtype=check_dtype(dtype, "iota: dtype"), shape=tuple(int(s) for s in shape),
                dimension=int(dimension))


def dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, preferred_element_type: Any = None) -> Any:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError):
        raise ArgumentError(f"dot_general: dimension_numbers must be ((lhs_contracting, rhs_contracting), "
                            f"(lhs_batch, rhs_batch)), tuples of axes; got {dimension_numbers!r:.80}") from None
    pet = (check_dtype(preferred_element_type, "dot_general: preferred_element_type")
           if preferred_element_type is not None else None)
    return bind(P.dot_general_p, lhs, rhs, dimension_numbers=dn, preferred_element_type=pet)


def conv_general_dilated(lhs: Any, rhs: Any, window_strides: Sequence[int], padding: Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1) -> Any:
    n = lhs.ndim - 2
    if dimension_numbers is None:  # torch layout: NC*, OI*, NC*
        spec = tuple(range(n + 2))
        dimension_numbers = (spec, spec, spec)
    return bind(P.conv_general_dilated_p, lhs, rhs,
                window_strides=tuple(int(s) for s in window_strides),
                padding=tuple((int(lo), int(hi)) for lo, hi in padding),
                lhs_dilation=tuple(int(d) for d in (lhs_dilation or (1,) * n)),
                rhs_dilation=tuple(int(d) for d in (rhs_dilation or (1,) * n)),
                dimension_numbers=tuple(tuple(int(d) for d in s) for s in dimension_numbers),
                feature_group_count=int(feature_group_count), batch_group_count=int(batch_group_count))


def cholesky(a: Any) -> Any:
    return bind(P.cholesky_p, a)


def triangular_solve(a: Any, b: Any, *, left_side: bool = True, lower: bool = True, transpose_a: bool = False,
                     unit_diagonal: bool = False) -> Any:
    return bind(P.triangular_solve_p, a, b, left_side=bool(left_side), lower=bool(lower),
                transpose_a=bool(transpose_a), unit_diagonal=bool(unit_diagonal))


def lu(a: Any) -> tuple[Any, Any, Any]:
    return bind(P.lu_p, a)


def qr(a: Any, full_matrices: bool = False) -> tuple[Any, Any]:
    return bind(P.qr_p, a, full_matrices=bool(full_matrices))


def eigh(a: Any, lower: bool = True) -> tuple[Any, Any]:
    return bind(P.eigh_p, a, lower=bool(lower))


def svd(a: Any, full_matrices: bool = False) -> tuple[Any, Any, Any]:
    return bind(P.svd_p, a, full_matrices=bool(full_matrices))


def pinv(a: Any, atol: Any, rtol: Any, hermitian: bool = False) -> Any:
    return bind(P.pinv_p, a, atol, rtol, hermitian=bool(hermitian))


def eig(a: Any) -> tuple[Any, Any]:
    return bind(P.eig_p, a)


def gather(operand: Any, indices: Any, axis: int) -> Any:
    return bind(P.gather_p, operand, indices, axis=int(axis))


def scatter_add(operand: Any, indices: Any, updates: Any, axis: int) -> Any:
    return bind(P.scatter_add_p, operand, indices, updates, axis=int(axis))


def scatter(operand: Any, indices: Any, updates: Any, axis: int) -> Any:
    return bind(P.scatter_p, operand, indices, updates, axis=int(axis))


def is_traced(x: Any) -> bool:
    return isinstance(x, TracedArray)


def aval_of(x: Any) -> Aval:
    if isinstance(x, TracedArray):
        return x.aval
    arr = np.asarray(x)
    return Aval(arr.shape, arr.dtype)

