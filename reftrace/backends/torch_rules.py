"""Torch lowering rules: ``torch_rules[primitive](*operands, **params) -> tensor | tuple``.

This file holds the table, the operand helpers and most rows; convolutions are in
``torch_conv.py`` and the RNG in ``torch_random.py``, which add their rows to this table
(``reftrace.backends.torch`` imports all three).

Every rule is written once and runs in two modes:

- **eagerly**, on ``torch.Tensor`` operands (``reftrace.backends.torch.apply_torch``);
- **symbolically**, on ``torch.fx.Proxy`` operands (``reftrace.backends.torch.to_fx``),
  where each torch call becomes a node of the generated ``fx.GraphModule``.

So a rule calls only torch functions and Tensor methods, and branches only on
static facts: its params and its operands' avals (shape/dtype), read with
``aval_of``, never on tensor values. Factory calls (``torch.full``,
``torch.arange``, ``torch.tensor``) are recorded as nodes by ``to_fx``.

Operands that are graph Literals arrive as numpy arrays. A rank-0 literal becomes
a Python scalar where torch takes one (``torch.mul(x, 2.0)``), else a
``torch.full([], value, dtype=...)`` call; the dtype is always explicit, so float64
and int64 (even beyond 2**53) stay exact, eagerly and under TorchScript.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx

from reftrace import primitives as P
from reftrace.backends.torch_dtypes import numpy_dtype, tensor_from_numpy, torch_dtype
from reftrace.graph import Aval
from reftrace.primitives import Primitive, is_inexact

torch_rules: dict[Primitive, Callable[..., Any]] = {}

# ``to_fx`` stores each proxy's Aval under this key of ``node.meta``.
AVAL_META = "reftrace_aval"


def device_type(x: Any) -> str:
    """Where a rule's operand lives: a tensor's device type, or for an FX proxy the device the
    module is emitted for (``to_fx(device=...)``; the CPU by default). For rules whose kernel
    exists on one device only."""
    if isinstance(x, torch.Tensor):
        return x.device.type
    device = getattr(torch.overrides._get_current_function_mode(), "device", None)
    return str(device or "cpu").split(":")[0]


# ----------------------------------------------------------------------------- operand helpers

def aval_of(x: Any) -> Aval:
    """The static shape/dtype of a rule operand (tensor, fx proxy made by to_fx, or numpy literal)."""
    if isinstance(x, torch.Tensor):
        return Aval(tuple(x.shape), numpy_dtype(x.dtype))
    if isinstance(x, fx.Proxy):
        try:
            return x.node.meta[AVAL_META]
        except KeyError:
            raise RuntimeError(f"internal: fx node {x.node.name} has no reftrace aval; rules may only "
                               "ask aval_of about their own operands") from None
    arr = np.asarray(x)
    return Aval(arr.shape, arr.dtype)


def _is_scalar_literal(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0


def _py(x: Any) -> bool | int | float | complex:
    """A rank-0 numpy literal as the Python scalar of the same kind (exact for int64 and float64)."""
    kind = np.dtype(x.dtype).kind
    if kind == "b":
        return bool(x)
    if kind in "iu":
        return int(x)
    if kind == "c":
        return complex(x)
    return float(x)


def _t(x: Any) -> Any:
    """A tensor (or proxy) for any operand; numpy literals become tensors of their own dtype.

    Rank-0 literals use ``torch.full([], v, dtype=...)``: TorchScript's ``torch.tensor(v,
    dtype=torch.float64)`` rounds ``v`` through float32.
    """
    if isinstance(x, (torch.Tensor, fx.Proxy)):
        return x
    if _is_scalar_literal(x):
        return torch.full([], _py(x), dtype=torch_dtype(np.asarray(x).dtype))
    return tensor_from_numpy(x, copy=True)  # eager only: to_fx turns array literals into buffers


as_tensor = _t  # public name, for emitters outside the rules


def _s(x: Any) -> Any:
    """A Python scalar for a rank-0 literal (torch takes those as ``other``), else a tensor.

    Bool literals stay tensors: TorchScript reads a Python bool Scalar as an int, so
    ``bitwise_and(bool_tensor, True)`` would turn int64 there.
    """
    return _py(x) if _is_scalar_literal(x) and np.asarray(x).dtype != np.bool_ else _t(x)


def _tdtype(x: Any) -> torch.dtype:
    return torch_dtype(aval_of(x).dtype)


# ----------------------------------------------------------------------------- elementwise

def _cbrt(x: Any) -> Any:
    """torch has no cbrt: sign(x) * |x|**(1/3) (within an ulp or two in float64)."""
    x = _t(x)
    return torch.mul(torch.sign(x), torch.pow(torch.abs(x), 1.0 / 3.0))


_UNARY = {
    P.exp_p: torch.exp, P.log_p: torch.log, P.log1p_p: torch.log1p, P.expm1_p: torch.expm1, P.tanh_p: torch.tanh,
    P.logistic_p: torch.sigmoid, P.sin_p: torch.sin, P.cos_p: torch.cos, P.tan_p: torch.tan, P.asin_p: torch.asin,
    P.acos_p: torch.acos, P.atan_p: torch.atan, P.sinh_p: torch.sinh, P.cosh_p: torch.cosh, P.asinh_p: torch.asinh,
    P.acosh_p: torch.acosh, P.atanh_p: torch.atanh, P.sqrt_p: torch.sqrt, P.rsqrt_p: torch.rsqrt,
    P.erf_p: torch.erf, P.erfc_p: torch.erfc, P.erf_inv_p: torch.erfinv, P.lgamma_p: torch.lgamma,
    P.digamma_p: torch.digamma, P.floor_p: torch.floor, P.ceil_p: torch.ceil,
    P.round_p: torch.round,  # half to even, as lax.round with ROUND_TO_NEAREST_EVEN / jnp.round
    P.neg_p: torch.neg, P.abs_p: torch.abs, P.is_finite_p: torch.isfinite,
    P.not_p: torch.bitwise_not,  # logical not on bool, bitwise not on integers
}


def _unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    def rule(x: Any) -> Any:
        return fn(_t(x))
    rule.__name__ = getattr(fn, "__name__", "unary")
    return rule


for _prim, _fn in _UNARY.items():
    torch_rules[_prim] = _unary(_fn)
torch_rules[P.cbrt_p] = _cbrt
torch_rules[P.integer_pow_p] = lambda x, *, y: torch.pow(_t(x), y)


def _binary(fn: Callable[..., Any], mirrored: Callable[..., Any] | None = None,
            scalar_other: bool = True) -> Callable[..., Any]:
    """``fn(x, y)``; a rank-0 literal ``y`` goes in as a Python scalar when ``scalar_other``.

    ``mirrored(y, x) == fn(x, y)`` lets a literal ``x`` become the scalar too (commutative
    ops, or comparisons with the flipped comparison).
    """
    def rule(x: Any, y: Any) -> Any:
        if scalar_other and mirrored is not None and _is_scalar_literal(x) and not _is_scalar_literal(y):
            return mirrored(_t(y), _s(x))
        return fn(_t(x), _s(y) if scalar_other else _t(y))
    return rule


def _div(x: Any, y: Any) -> Any:
    """Float (and complex) division, or integer division rounding toward zero (C / lax semantics)."""
    if is_inexact(aval_of(x).dtype):
        return torch.div(_t(x), _s(y))
    return torch.div(_t(x), _s(y), rounding_mode="trunc")


torch_rules[P.add_p] = _binary(torch.add, torch.add)
torch_rules[P.sub_p] = _binary(torch.sub)
torch_rules[P.mul_p] = _binary(torch.mul, torch.mul)
torch_rules[P.div_p] = _div
torch_rules[P.rem_p] = _binary(torch.fmod)  # sign of the dividend
torch_rules[P.pow_p] = _binary(torch.pow)
torch_rules[P.max_p] = _binary(torch.maximum, scalar_other=False)  # NaN-propagating, like lax.max
torch_rules[P.min_p] = _binary(torch.minimum, scalar_other=False)
torch_rules[P.atan2_p] = _binary(torch.atan2, scalar_other=False)
torch_rules[P.and_p] = _binary(torch.bitwise_and, torch.bitwise_and)
torch_rules[P.or_p] = _binary(torch.bitwise_or, torch.bitwise_or)
torch_rules[P.xor_p] = _binary(torch.bitwise_xor, torch.bitwise_xor)
torch_rules[P.eq_p] = _binary(torch.eq, torch.eq)
torch_rules[P.ne_p] = _binary(torch.ne, torch.ne)
torch_rules[P.lt_p] = _binary(torch.lt, torch.gt)
torch_rules[P.le_p] = _binary(torch.le, torch.ge)
torch_rules[P.gt_p] = _binary(torch.gt, torch.lt)
torch_rules[P.ge_p] = _binary(torch.ge, torch.le)


def _select(pred: Any, on_true: Any, on_false: Any) -> Any:
    both_literal = _is_scalar_literal(on_true) and _is_scalar_literal(on_false)
    t = _t(on_true) if both_literal else _s(on_true)
    return torch.where(_t(pred), t, _s(on_false))


torch_rules[P.select_p] = _select


def _convert(x: Any, *, new_dtype: np.dtype) -> Any:
    """A cast; complex to real keeps the real part (said explicitly: torch warns on the implicit cast)."""
    drop_imaginary = P.is_complex(aval_of(x).dtype) and not P.is_complex(new_dtype)
    x = _t(x)
    if drop_imaginary:
        x = torch.real(x)
    return x.to(torch_dtype(new_dtype))


torch_rules[P.convert_element_type_p] = _convert
torch_rules[P.stop_gradient_p] = lambda x: _t(x).detach()

# ----------------------------------------------------------------------------- complex numbers
# torch.real/imag are views and conj is a lazy bit: clone/resolve so no result aliases an operand

torch_rules[P.real_p] = lambda x: torch.clone(torch.real(_t(x)))
torch_rules[P.imag_p] = lambda x: torch.clone(torch.imag(_t(x)))
torch_rules[P.conj_p] = lambda x: torch.conj_physical(_t(x))
torch_rules[P.complex_p] = lambda re, im: torch.complex(_t(re), _t(im))  # broadcasts rank-0 parts


def _fft(x: Any, *, fft_type: str, fft_lengths: tuple[int, ...]) -> Any:
    dims = tuple(range(-len(fft_lengths), 0))
    x = _t(x)
    if fft_type == "fft":
        return torch.fft.fftn(x, dim=dims)
    if fft_type == "ifft":
        return torch.fft.ifftn(x, dim=dims)
    if fft_type == "rfft":
        return torch.fft.rfftn(x, dim=dims)
    return torch.fft.irfftn(x, s=fft_lengths, dim=dims)


torch_rules[P.fft_p] = _fft


# ----------------------------------------------------------------------------- reductions

def _out_shape_without(shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    return [d for i, d in enumerate(shape) if i not in axes]


def _reduce_sum(x: Any, *, axes: tuple[int, ...]) -> Any:
    if not axes:  # torch.sum(x, dim=[]) would sum everything
        return _t(x)
    return torch.sum(_t(x), dim=list(axes), dtype=_tdtype(x))  # dtype: no int32 -> int64 promotion


def _reduce_prod(x: Any, *, axes: tuple[int, ...]) -> Any:
    out, dtype = _t(x), _tdtype(x)
    for a in sorted(axes, reverse=True):  # torch.prod takes one dim at a time
        out = torch.prod(out, a, dtype=dtype)
    return out


def _extremum(fn: Callable[..., Any], toward: str) -> Callable[..., Any]:
    """amax/amin; over an empty axis they give the identity (-inf/+inf, int min/max) as lax does."""
    def rule(x: Any, *, axes: tuple[int, ...]) -> Any:
        av = aval_of(x)
        if not axes:
            return _t(x)
        if any(av.shape[a] == 0 for a in axes):
            return torch.full(_out_shape_without(av.shape, axes), _identity(av.dtype, toward),
                              dtype=torch_dtype(av.dtype))
        return fn(_t(x), list(axes))
    return rule


def _identity(dtype: np.dtype, toward: str) -> bool | int | float:
    if dtype.kind == "b":
        return toward == "min"
    if dtype.kind == "f":
        return -float("inf") if toward == "max" else float("inf")
    info = np.iinfo(dtype)
    return int(info.min) if toward == "max" else int(info.max)


def _logical_reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
    def rule(x: Any, *, axes: tuple[int, ...]) -> Any:
        return fn(_t(x), dim=list(axes)) if axes else _t(x)
    return rule


torch_rules[P.reduce_sum_p] = _reduce_sum
torch_rules[P.reduce_prod_p] = _reduce_prod
torch_rules[P.reduce_max_p] = _extremum(torch.amax, "max")
torch_rules[P.reduce_min_p] = _extremum(torch.amin, "min")
torch_rules[P.reduce_and_p] = _logical_reduce(torch.all)
torch_rules[P.reduce_or_p] = _logical_reduce(torch.any)


def _sign(x: Any) -> Any:
    """lax's sign: NaN and -0.0 stay as they are, where ``torch.sgn`` gives 0 for both."""
    if not np.issubdtype(aval_of(x).dtype, np.floating):
        return torch.sgn(_t(x))
    t = _t(x)
    return torch.where(torch.isnan(t) | (t == 0), t, torch.sgn(t))


torch_rules[P.sign_p] = _sign


def _arg_extremum(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.argmax/argmin return the first occurrence (and NaN counts as the extremum), as lax."""
    def rule(x: Any, *, axis: int, index_dtype: np.dtype) -> Any:
        y = _t(x) if aval_of(x).dtype != np.bool_ else _t(x).to(torch.uint8)  # no bool argmax in torch
        out = fn(y, axis)
        return out if np.dtype(index_dtype) == np.int64 else out.to(torch_dtype(index_dtype))
    return rule


torch_rules[P.argmax_p] = _arg_extremum(torch.argmax)
torch_rules[P.argmin_p] = _arg_extremum(torch.argmin)


def _cumulative(scan: Callable[[Any, int, torch.dtype], Any]) -> Callable[..., Any]:
    """A scan along ``axis``; ``reverse`` scans from the end (flip, scan, flip)."""
    def rule(x: Any, *, axis: int, reverse: bool) -> Any:
        dtype, y = _tdtype(x), _t(x)
        if reverse:
            y = torch.flip(y, [axis])
        y = scan(y, axis, dtype)
        return torch.flip(y, [axis]) if reverse else y
    return rule


torch_rules[P.cumsum_p] = _cumulative(lambda x, a, dt: torch.cumsum(x, a, dtype=dt))
torch_rules[P.cumprod_p] = _cumulative(lambda x, a, dt: torch.cumprod(x, a, dtype=dt))
torch_rules[P.cummax_p] = _cumulative(lambda x, a, dt: torch.cummax(x, a)[0])
torch_rules[P.cummin_p] = _cumulative(lambda x, a, dt: torch.cummin(x, a)[0])


def _sort(x: Any, *, axis: int, descending: bool, index_dtype: np.dtype) -> tuple[Any, Any]:
    values, indices = torch.sort(_t(x), dim=axis, descending=descending, stable=True)
    return values, indices if np.dtype(index_dtype) == np.int64 else indices.to(torch_dtype(index_dtype))


torch_rules[P.sort_p] = _sort


# ----------------------------------------------------------------------------- shape ops

def _broadcast_in_dim(x: Any, *, shape: tuple[int, ...], broadcast_dimensions: tuple[int, ...]) -> Any:
    av = aval_of(x)
    if _is_scalar_literal(x):
        return torch.full(list(shape), _py(x), dtype=torch_dtype(av.dtype))
    if av.shape == tuple(shape):
        return _t(x)
    y = _t(x)
    leading = tuple(broadcast_dimensions) == tuple(range(len(shape) - av.ndim, len(shape)))
    if av.ndim and not leading:  # put operand dims where broadcast_dimensions says, 1 elsewhere; then expand
        inter = [1] * len(shape)
        for d, od in zip(av.shape, broadcast_dimensions):
            inter[od] = d
        y = y.reshape(inter)
        if inter == list(shape):  # only unit dims inserted: nothing to expand
            return y
    return y.expand(list(shape))  # expand also prepends new leading dims


def _slice(x: Any, *, start_indices: tuple[int, ...], limit_indices: tuple[int, ...],
           strides: tuple[int, ...]) -> Any:
    av = aval_of(x)
    index = tuple(slice(None) if (s, l, st) == (0, d, 1) else slice(s, l, st)
                  for s, l, st, d in zip(start_indices, limit_indices, strides, av.shape))
    return _t(x)[index]


torch_rules[P.broadcast_in_dim_p] = _broadcast_in_dim
torch_rules[P.reshape_p] = lambda x, *, new_sizes: _t(x).reshape(list(new_sizes))
torch_rules[P.transpose_p] = lambda x, *, permutation: _t(x).permute(list(permutation))
torch_rules[P.slice_p] = _slice
torch_rules[P.concatenate_p] = lambda *xs, dimension: torch.cat([_t(x) for x in xs], dimension)
torch_rules[P.rev_p] = lambda x, *, dimensions: torch.flip(_t(x), list(dimensions))


def _pad_list(ndim: int, dim: int, lo: int, hi: int) -> list[int]:
    """constant_pad_nd's argument padding only ``dim`` (its list runs from the last dim backwards)."""
    return [0, 0] * (ndim - 1 - dim) + [lo, hi]


def pad_with_scalar(x: Any, shape: Sequence[int], value: bool | int | float,
                    config: Sequence[tuple[int, int, int]]) -> Any:
    """lax.pad with a Python scalar: interior padding, then lo/hi (negative lo/hi crop).

    ``shape`` is ``x``'s static shape. Interior padding of ``k`` along a dim of size ``n``:
    add a unit axis, pad it to ``1 + k``, merge, and drop the trailing ``k``.
    """
    shape, ndim = list(shape), len(shape)
    for d, (_, _, interior) in enumerate(config):
        n = shape[d]
        if interior == 0 or n == 0:
            continue
        x = torch.constant_pad_nd(torch.unsqueeze(x, d + 1), _pad_list(ndim + 1, d + 1, 0, interior), value)
        x = x.reshape(shape[:d] + [n * (1 + interior)] + shape[d + 1:])
        shape[d] = n + (n - 1) * interior
        x = torch.narrow(x, d, 0, shape[d])
    grow = []
    for d in reversed(range(ndim)):
        lo, hi, _ = config[d]
        grow += [max(lo, 0), max(hi, 0)]
    while grow and grow[-2:] == [0, 0]:
        grow = grow[:-2]
    if grow:
        x = torch.constant_pad_nd(x, grow, value)
    for d, (lo, hi, _) in enumerate(config):  # crop after growing: a crop may eat into the padding
        size = shape[d] + max(lo, 0) + max(hi, 0)
        if lo < 0 or hi < 0:
            start = -min(lo, 0)
            x = torch.narrow(x, d, start, size - start + min(hi, 0))
    return x


def _pad(x: Any, padding_value: Any, *, padding_config: tuple[tuple[int, int, int], ...]) -> Any:
    av = aval_of(x)
    if _is_scalar_literal(padding_value):
        return pad_with_scalar(_t(x), av.shape, _py(padding_value), padding_config)
    # A traced padding value: pad with zeros, then choose through a padded mask.
    zero = _py(np.zeros((), av.dtype))
    padded = pad_with_scalar(_t(x), av.shape, zero, padding_config)
    mask = pad_with_scalar(torch.ones_like(_t(x), dtype=torch.bool), av.shape, False, padding_config)
    return torch.where(mask, padded, _t(padding_value))


torch_rules[P.pad_p] = _pad


def _iota(*, dtype: np.dtype, shape: tuple[int, ...], dimension: int) -> Any:
    y = torch.arange(shape[dimension], dtype=torch_dtype(dtype))
    if len(shape) == 1:
        return y
    inter = [1] * len(shape)
    inter[dimension] = shape[dimension]
    return y.reshape(inter).expand(list(shape))


torch_rules[P.iota_p] = _iota


# ----------------------------------------------------------------------------- contractions

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def dot_general_equation(lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any) -> str:
    """The einsum equation of a dot_general: output dims are (batch, lhs free, rhs free).

    Letters follow lhs dims in order, then new rhs dims: a matmul reads ``ab,bc->ac``.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    lhs = _LETTERS[:lhs_ndim]
    paired = {r: lhs[l] for l, r in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb))}
    fresh = iter(_LETTERS[lhs_ndim:])
    rhs = "".join(paired[i] if i in paired else next(fresh) for i in range(rhs_ndim))
    batch = "".join(lhs[i] for i in lb)
    lhs_free = "".join(c for i, c in enumerate(lhs) if i not in lc and i not in lb)
    rhs_free = "".join(c for i, c in enumerate(rhs) if i not in rc and i not in rb)
    return f"{lhs},{rhs}->{batch}{lhs_free}{rhs_free}"


def _dot_general(lhs: Any, rhs: Any, *, dimension_numbers: Any, preferred_element_type: Any = None) -> Any:
    la, ra = aval_of(lhs), aval_of(rhs)
    x, y = _t(lhs), _t(rhs)
    if preferred_element_type is not None and np.dtype(preferred_element_type) != la.dtype:
        # accumulate in the preferred type, as XLA does: cast the (exactly representable) inputs
        x, y = x.to(torch_dtype(preferred_element_type)), y.to(torch_dtype(preferred_element_type))
    layout = _matmul_layout(la.ndim, ra.ndim, dimension_numbers)
    if layout is None:
        return torch.einsum(dot_general_equation(la.ndim, ra.ndim, dimension_numbers), [x, y])
    transpose_lhs, transpose_rhs = layout
    return torch.matmul(x.transpose(-1, -2) if transpose_lhs else x, y.transpose(-1, -2) if transpose_rhs else y)


def _matmul_layout(lhs_ndim: int, rhs_ndim: int, dimension_numbers: Any) -> tuple[bool, bool] | None:
    """Whether a dot_general is a (batched) matmul of possibly transposed operands, and which.

    Leading batch dims, one contracting dim among the last two of each operand:
    ``(*b, m, k) @ (*b, k, n)`` is ``(False, False)``; a Linear layer's ``x @ wᵀ`` is
    ``(False, True)``; its weight gradient ``gᵀ @ x`` is ``(True, False)``. Anything else is
    None (an einsum). ``torch.matmul`` reads better than an einsum in printed and drawn graphs
    and skips einsum's equation parsing on every call.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    nb = len(lb)
    if len(lc) != 1 or lhs_ndim != nb + 2 or rhs_ndim != nb + 2:
        return None
    if tuple(lb) != tuple(range(nb)) or tuple(rb) != tuple(range(nb)):
        return None
    (l,), (r,) = lc, rc
    if l not in (nb, nb + 1) or r not in (nb, nb + 1):
        return None
    return l == nb, r == nb + 1


torch_rules[P.dot_general_p] = _dot_general



# ----------------------------------------------------------------------------- linear algebra

def _cholesky(a: Any) -> Any:
    """torch.linalg.cholesky_ex (no error on values): a matrix that is not positive definite gives NaN."""
    factor, info = torch.linalg.cholesky_ex(_t(a))
    nan = torch.div(torch.zeros_like(factor), 0.0)  # computed: TorchScript cannot read a nan literal
    return torch.where(torch.eq(info, 0).unsqueeze(-1).unsqueeze(-1), factor, nan)


def _triangular_solve(a: Any, b: Any, *, left_side: bool, lower: bool, transpose_a: bool,
                      unit_diagonal: bool) -> Any:
    m = _t(a)
    upper = not lower
    if transpose_a:
        m, upper = m.mT, lower
    return torch.linalg.solve_triangular(m, _t(b), upper=upper, left=left_side, unitriangular=unit_diagonal)


def _lu(a: Any) -> tuple[Any, Any, Any]:
    """LAPACK's getrf through torch.linalg.lu_factor_ex; the permutation is read off lu_unpack's P."""
    av = aval_of(a)
    m, n = av.shape[-2:]
    factor, pivots, info = torch.linalg.lu_factor_ex(_t(a))
    if m == 0 or n == 0:  # nothing to pivot (argmax refuses empty dimensions)
        order = torch.arange(m, dtype=torch.int32).expand(list(av.shape[:-2]) + [m])
        return factor, torch.sub(pivots, 1), order
    p, lower, upper = torch.lu_unpack(factor, pivots, unpack_data=False)
    # a = P L U: row i of L U is row perm[i] of a (P has a's dtype; argmax refuses complex ones)
    permutation = torch.argmax(torch.real(p), dim=-2).to(torch.int32)
    return factor, torch.sub(pivots, 1), permutation


torch_rules[P.cholesky_p] = _cholesky
torch_rules[P.triangular_solve_p] = _triangular_solve
torch_rules[P.lu_p] = _lu


def _qr(a: Any, *, full_matrices: bool) -> tuple[Any, Any]:
    q, r = torch.linalg.qr(_t(a), mode="complete" if full_matrices else "reduced")
    return q, r


def _eigh(a: Any, *, lower: bool) -> tuple[Any, Any]:
    w, v = torch.linalg.eigh(_t(a), UPLO="L" if lower else "U")
    return w, v


def _svd(a: Any, *, full_matrices: bool) -> tuple[Any, Any, Any]:
    u, s, vh = torch.linalg.svd(_t(a), full_matrices=full_matrices)
    return u, s, vh


torch_rules[P.pinv_p] = lambda a, atol, rtol, *, hermitian: torch.linalg.pinv(_t(a), atol=_t(atol), rtol=_t(rtol),
                                                                             hermitian=hermitian)
torch_rules[P.qr_p] = _qr
torch_rules[P.eigh_p] = _eigh
torch_rules[P.svd_p] = _svd


def _eig(a: Any) -> tuple[Any, Any]:
    w, v = torch.linalg.eig(_t(a))  # unpacked, not tuple(): on an FX proxy only unpacking can iterate
    return w, v


torch_rules[P.eig_p] = _eig


# ----------------------------------------------------------------------------- indexing

def _index64(indices: Any) -> Any:
    """torch.gather/scatter want int64 indices."""
    idx = _t(indices)
    return idx if aval_of(indices).dtype == np.int64 else idx.to(torch.int64)


torch_rules[P.gather_p] = lambda x, idx, *, axis: torch.gather(_t(x), axis, _index64(idx))
torch_rules[P.scatter_add_p] = (
    lambda x, idx, upd, *, axis: torch.scatter_add(_t(x), axis, _index64(idx), _t(upd)))
torch_rules[P.scatter_p] = lambda x, idx, upd, *, axis: torch.scatter(_t(x), axis, _index64(idx), _t(upd))


# ----------------------------------------------------------------------------- sharding (reftrace.sharding)

from reftrace.sharding import sharding_constraint_p  # noqa: E402 - this section's own import, kept with its row

torch_rules[sharding_constraint_p] = lambda x, *, spec: _t(x)  # one device: a layout request has nothing to do
