"""Torch lowering rules: ``torch_rules[primitive](*operands, **params) -> tensor | tuple``.

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
from reftrace.errors import UnsupportedOperatorError
from reftrace.graph import Aval
from reftrace.primitives import Primitive, is_float

torch_rules: dict[Primitive, Callable[..., Any]] = {}

# ``to_fx`` stores each proxy's Aval under this key of ``node.meta``.
AVAL_META = "reftrace_aval"


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
    P.neg_p: torch.neg, P.sign_p: torch.sign, P.abs_p: torch.abs, P.is_finite_p: torch.isfinite,
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
    """Float division, or integer division rounding toward zero (C / lax semantics)."""
    if is_float(aval_of(x).dtype):
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
torch_rules[P.convert_element_type_p] = lambda x, *, new_dtype: _t(x).to(torch_dtype(new_dtype))
torch_rules[P.stop_gradient_p] = lambda x: _t(x).detach()


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

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _permute_unless_identity(x: Any, perm: Sequence[int]) -> Any:
    return x if list(perm) == list(range(len(perm))) else x.permute(list(perm))


def _conv(lhs: Any, rhs: Any, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count) -> Any:
    """lax.conv_general_dilated as one torch.convNd on (N, C, spatial...) operands.

    Layouts are permuted to torch's. Symmetric non-negative padding goes to torch's
    ``padding``; input dilation and any other (possibly negative) padding become one
    explicit zero pad. ``batch_group_count`` folds batch groups into channels and runs a
    conv with that many channel groups. Weight gradients and input-dilated convs (input
    gradients of strided convs) have faster forms, tried first.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    la, ra = aval_of(lhs), aval_of(rhs)
    nspatial = la.ndim - 2
    if nspatial > 3:
        raise UnsupportedOperatorError(f"conv_general_dilated with {nspatial} spatial dims has no torch "
                                       "lowering (torch convolutions have 1 to 3)")
    out_shape = P.conv_output_shape(la.shape, ra.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count)
    dtype = torch_dtype(la.dtype)
    if 0 in out_shape or la.shape[lhs_spec[1]] == 0:
        return torch.zeros(list(out_shape), dtype=dtype)
    weight_grad = _as_weight_gradient(lhs, rhs, out_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, batch_group_count)
    if weight_grad is not None:
        return weight_grad
    x = _permute_unless_identity(_t(lhs), lhs_spec)
    w = _permute_unless_identity(_t(rhs), rhs_spec)
    x_shape = [la.shape[d] for d in lhs_spec]
    transposed = _as_conv_transpose(x, w, x_shape, [ra.shape[d] for d in rhs_spec], window_strides, padding,
                                    lhs_dilation, rhs_dilation, feature_group_count, batch_group_count)
    if transposed is not None:
        return _permute_unless_identity(transposed, [int(i) for i in np.argsort(out_spec)])
    conv_padding = [0] * max(nspatial, 1)
    if all(lo == hi >= 0 for lo, hi in padding) and all(d == 1 for d in lhs_dilation):
        conv_padding, padding = [lo for lo, _ in padding] or [0], [(0, 0)] * nspatial  # torch pads itself
    config = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in zip(padding, lhs_dilation)]
    if any(c != (0, 0, 0) for c in config):
        x = pad_with_scalar(x, x_shape, _py(np.zeros((), la.dtype)), config)
        x_shape = x_shape[:2] + [n + (n - 1) * (d - 1) + lo + hi if n else lo + hi
                                 for n, d, (lo, hi) in zip(x_shape[2:], lhs_dilation, padding)]
    strides, dilation = list(window_strides), list(rhs_dilation)
    if nspatial == 0:  # a conv without spatial dims is a conv over one unit spatial dim
        x, w, strides, dilation = x.unsqueeze(-1), w.unsqueeze(-1), [1], [1]
        x_shape = x_shape + [1]
    groups = feature_group_count
    if batch_group_count > 1:
        n, c, b = x_shape[0], x_shape[1], batch_group_count
        x = x.reshape([b, n // b] + x_shape[1:]).transpose(0, 1).reshape([n // b, b * c] + x_shape[2:])
        groups = b
    y = _CONV[max(nspatial, 1)](x, w, None, strides, conv_padding, dilation, groups)
    if nspatial == 0:
        y = y.squeeze(-1)
    return _permute_unless_identity(y, [int(i) for i in np.argsort(out_spec)])


def _as_conv_transpose(x: Any, w: Any, x_shape: Sequence[int], w_shape: Sequence[int], window_strides, padding,
                       lhs_dilation, rhs_dilation, groups: int, batch_group_count: int) -> Any:
    """An input-dilated conv (the input gradient of a strided conv) as ``torch.conv_transposeNd``.

    ``conv_transpose(x, v, stride=s, padding=p, output_padding=op, dilation=d)`` correlates the
    s-dilated input, padded by ``d(k-1) - p`` (plus ``op`` on the high side), with ``v`` flipped
    and its channel axes swapped. So a conv with ``lhs_dilation = s`` and padding ``(lo, hi)``
    is one with ``p = d(k-1) - lo`` and ``op = hi - lo``, when those are in torch's range; this
    avoids materialising the dilated input. Returns None when the pattern does not apply.
    """
    nspatial = len(x_shape) - 2
    if not (1 <= nspatial <= 3) or all(s == 1 for s in lhs_dilation) or batch_group_count != 1:
        return None
    if any(st != 1 for st in window_strides):
        return None
    conv_pad, out_pad = [], []
    for k, (lo, hi), s, d in zip(w_shape[2:], padding, lhs_dilation, rhs_dilation):
        p, op = d * (k - 1) - lo, hi - lo
        if p < 0 or not 0 <= op < max(s, d):
            return None
        conv_pad.append(p)
        out_pad.append(op)
    o, c_per_group = w_shape[0], w_shape[1]
    spatial = list(w_shape[2:])
    v = w.reshape([groups, o // groups, c_per_group] + spatial).transpose(1, 2)
    v = v.reshape([groups * c_per_group, o // groups] + spatial).flip(list(range(2, 2 + nspatial)))
    return _CONV_TRANSPOSE[nspatial](x, v, None, list(lhs_dilation), conv_pad, out_pad, groups,
                                     list(rhs_dilation))


_CONV_TRANSPOSE = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


def _as_weight_gradient(lhs: Any, rhs: Any, out_shape: Sequence[int], window_strides: Sequence[int],
                        padding: Sequence[tuple[int, int]], lhs_dilation: Sequence[int],
                        rhs_dilation: Sequence[int], dimension_numbers: Any, feature_group_count: int,
                        batch_group_count: int) -> Any:
    """A weight-gradient conv (``_conv_vjp``'s rhs cotangent) as ``aten.convolution_backward``.

    For a forward conv with stride s, padding p, dilation d and g groups, that cotangent is
    ``conv(x, ct)`` with x's batch and feature roles swapped, the output cotangent ct as the
    kernel (its batch as in-features), ``window_strides = d``, ``rhs_dilation = s`` and
    ``batch_group_count = g``: ``out[c, o, j] = sum_{n,t} x[n, c, j*d + t*s - lo] ct[n, o, t]``,
    which is torch's weight gradient. As a plain conv its kernel is the whole cotangent dilated
    by s, which torch runs on a slow generic kernel; convolution_backward uses the backend's
    weight-gradient kernel (what ``torch.nn.grad.conv2d_weight`` calls). Returns None when the
    pattern does not apply.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    la, ra = aval_of(lhs), aval_of(rhs)
    nspatial = la.ndim - 2
    if (not 1 <= nspatial <= 3 or feature_group_count != 1 or any(ld != 1 for ld in lhs_dilation)
            or not is_float(la.dtype)):
        return None
    # Any conv is some weight gradient, but a forward conv is faster as itself (about 2x on CPU).
    # The layouts tell them apart: a weight gradient's lhs and rhs are activations (the forward
    # input and the output cotangent) with batch and feature roles swapped, so their batch axis
    # comes after the feature axis; a forward conv on NC.../N...C operands has it first.
    if lhs_spec[0] < lhs_spec[1] or rhs_spec[0] < rhs_spec[1]:
        return None
    x_sizes = [la.shape[d] for d in lhs_spec[2:]]
    o_sizes = [ra.shape[d] for d in rhs_spec[2:]]
    k_sizes = [out_shape[d] for d in out_spec[2:]]
    stride, dilation, pad = list(rhs_dilation), list(window_strides), [lo for lo, _ in padding]
    # convolution_backward requires o to be the forward's output size for input x, kernel k. Then
    # the high padding does not matter: torch reads x at j*d + t*s - p <= x - 1 + p, inside its
    # padded range; this conv reads the same indices, inside its own padded input (its output
    # has size k); both read zeros outside [0, x), and a negative high padding only crops
    # positions no window reads.
    for x, o, k, s, d, p in zip(x_sizes, o_sizes, k_sizes, stride, dilation, pad):
        if x == 0 or p < 0 or o != (x + 2 * p - d * (k - 1) - 1) // s + 1:
            return None
    inp = _permute_unless_identity(_t(lhs), [lhs_spec[1], lhs_spec[0], *lhs_spec[2:]])  # (N, C, x...)
    grad = _permute_unless_identity(_t(rhs), [rhs_spec[1], rhs_spec[0], *rhs_spec[2:]])  # (N, O, o...)
    groups = batch_group_count
    weight_size = [ra.shape[rhs_spec[0]], la.shape[lhs_spec[0]] // groups, *k_sizes]  # (O, C/g, k...)
    # Only the weight's shape is read. A full uninitialised tensor, not torch.nn.grad's expanded
    # 1-element one: CPU kernels copy a stride-0 weight to a contiguous one first.
    weight = grad.new_empty(weight_size)
    dw = torch.ops.aten.convolution_backward(grad, inp, weight, None, stride, pad, dilation, False,
                                             [0] * nspatial, groups, [False, True, False])[1]
    # this conv's output in torch order is (C/g, O, k...): dw with its first two axes swapped
    swap = [1, 0, *range(2, nspatial + 2)]
    return _permute_unless_identity(dw, [swap[int(i)] for i in np.argsort(out_spec)])


torch_rules[P.conv_general_dilated_p] = _conv


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
    permutation = torch.argmax(p, dim=-2).to(torch.int32)  # a = P L U: row i of L U is row perm[i] of a
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


# ----------------------------------------------------------------------------- indexing

def _index64(indices: Any) -> Any:
    """torch.gather/scatter want int64 indices."""
    idx = _t(indices)
    return idx if aval_of(indices).dtype == np.int64 else idx.to(torch.int64)


torch_rules[P.gather_p] = lambda x, idx, *, axis: torch.gather(_t(x), axis, _index64(idx))
torch_rules[P.scatter_add_p] = (
    lambda x, idx, upd, *, axis: torch.scatter_add(_t(x), axis, _index64(idx), _t(upd)))
torch_rules[P.scatter_p] = lambda x, idx, upd, *, axis: torch.scatter(_t(x), axis, _index64(idx), _t(upd))


# ----------------------------------------------------------------------------- random

_MASK32 = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _add32(a: Any, b: Any) -> Any:
    return torch.bitwise_and(torch.add(a, b), _MASK32)


def _rotl32(x: Any, r: int) -> Any:
    left = torch.bitwise_and(torch.bitwise_left_shift(x, r), _MASK32)
    return torch.bitwise_or(left, torch.bitwise_right_shift(x, 32 - r))


def threefry2x32(k0: Any, k1: Any, x0: Any, x1: Any) -> tuple[Any, Any]:
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., SC'11) on int64 tensors holding u32 words.

    Words live in int64 so every op is plain torch arithmetic; each sum is masked to 32 bits.
    """
    ks = (k0, k1, torch.bitwise_xor(torch.bitwise_xor(k0, k1), 0x1BD11BDA))
    x0, x1 = _add32(x0, ks[0]), _add32(x1, ks[1])
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = _add32(x0, x1)
            x1 = torch.bitwise_xor(_rotl32(x1, r), x0)
        x0 = _add32(x0, ks[(i + 1) % 3])
        x1 = _add32(x1, torch.add(ks[(i + 2) % 3], i + 1))
    return x0, x1


def _random_bits(key: Any, nbits: int, shape: tuple[int, ...]) -> tuple[Any, Any] | Any:
    """JAX's partitionable threefry bits: counter i (row-major) -> threefry(key, (i >> 32, i & mask)).

    For 64 bits returns the (high, low) 32-bit words; otherwise their xor cut to ``nbits``,
    all held in int64 tensors.
    """
    key = _t(key).to(torch.int64)
    size = int(np.prod(shape, dtype=np.int64))
    counter = torch.arange(size, dtype=torch.int64)
    hi, lo = torch.bitwise_right_shift(counter, 32), torch.bitwise_and(counter, _MASK32)
    b0, b1 = threefry2x32(key[0], key[1], hi, lo)
    if nbits == 64:
        return b0, b1
    bits = torch.bitwise_xor(b0, b1)
    return bits if nbits == 32 else torch.bitwise_and(bits, (1 << nbits) - 1)


_FLOAT_BITS = {  # dtype -> (random bits drawn, mantissa bits), as jax.random.uniform draws them
    np.dtype(np.float64): (64, 52),
    np.dtype(np.float32): (32, 23),
    np.dtype(np.float16): (16, 10),
}
try:
    import ml_dtypes

    _FLOAT_BITS[np.dtype(ml_dtypes.bfloat16)] = (8, 7)
except ImportError:  # pragma: no cover
    pass


def _uniform(key: Any, shape: tuple[int, ...], dtype: np.dtype, lo: float, hi: float) -> Any:
    """Uniform [lo, hi) floats from random mantissa bits, exactly as jax.random.uniform.

    JAX bitcasts ``1.m`` and subtracts 1; that equals ``m * 2**-nmant`` exactly, which needs
    no bitcast (TorchScript has no ``Tensor.view(dtype)``).
    """
    try:
        nbits, nmant = _FLOAT_BITS[np.dtype(dtype)]
    except KeyError:
        raise UnsupportedOperatorError(f"random: no torch lowering for dtype {np.dtype(dtype).name}") from None
    bits = _random_bits(key, nbits, shape)
    if nbits == 64:  # the top 52 of the 64 bits (high << 32 | low) >> 12, without overflowing int64
        high, low = bits
        mant = torch.bitwise_or(torch.bitwise_left_shift(high, 20), torch.bitwise_right_shift(low, 12))
    else:
        mant = torch.bitwise_right_shift(bits, nbits - nmant)
    floats = torch.mul(mant.to(torch_dtype(dtype)), 2.0 ** -nmant)
    lo_d, hi_d = np.array(lo, dtype), np.array(hi, dtype)
    scale, low = float(hi_d - lo_d), float(lo_d)  # computed in ``dtype``, as JAX does
    if (scale, low) != (1.0, 0.0):
        floats = torch.clamp_min(torch.add(torch.mul(floats, scale), low), low)
    return floats.reshape(list(shape))


def _random(key: Any, *, shape: tuple[int, ...], dtype: np.dtype, distribution: str) -> Any:
    """Counter-based and Generator-free: the same key gives the same numbers as the JAX backend.

    ``uniform`` matches jax.random.uniform bit for bit; ``normal`` is sqrt(2) * erfinv(u) on
    u ~ U(nextafter(-1, 0), 1) as jax.random.normal, equal up to erfinv's rounding.
    """
    if distribution == "uniform":
        return _uniform(key, shape, dtype, 0.0, 1.0)
    lo = float(np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype)))
    u = _uniform(key, shape, dtype, lo, 1.0)
    return torch.mul(torch.erfinv(u), float(np.sqrt(np.array(2.0, dtype))))


torch_rules[P.random_p] = _random


def _random_fold_in(key: Any, *, data: int) -> Any:
    """jax.random.fold_in for threefry keys: the block cipher on the counter pair ``(0, data)``."""
    k = _t(key).to(torch.int64)
    zero = torch.mul(k[0], 0)  # a 0-d int64 on the key's device
    y0, y1 = threefry2x32(k[0], k[1], zero, torch.add(zero, int(data)))
    return torch.stack([y0, y1]).to(torch.uint32)


torch_rules[P.random_fold_in_p] = _random_fold_in

missing = set(P.registry.values()) - set(torch_rules)
assert not missing, f"primitives without a torch rule: {sorted(p.name for p in missing)}"
