"""JAX lowering rules: ``jax_rules[primitive](*arrays, **params) -> array | tuple``."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reftrace import primitives as P
from reftrace.primitives import Primitive

jax_rules: dict[Primitive, Callable[..., Any]] = {}

_UNARY = {
    P.exp_p: jnp.exp, P.log_p: jnp.log, P.log1p_p: jnp.log1p, P.expm1_p: jnp.expm1, P.tanh_p: jnp.tanh,
    P.logistic_p: jax.nn.sigmoid, P.sin_p: jnp.sin, P.cos_p: jnp.cos, P.tan_p: jnp.tan, P.asin_p: jnp.arcsin,
    P.acos_p: jnp.arccos, P.atan_p: jnp.arctan, P.sinh_p: jnp.sinh, P.cosh_p: jnp.cosh, P.asinh_p: jnp.arcsinh,
    P.acosh_p: jnp.arccosh, P.atanh_p: jnp.arctanh, P.sqrt_p: jnp.sqrt, P.rsqrt_p: lax.rsqrt, P.cbrt_p: jnp.cbrt,
    P.erf_p: jax.scipy.special.erf, P.erfc_p: jax.scipy.special.erfc, P.erf_inv_p: jax.scipy.special.erfinv,
    P.lgamma_p: jax.scipy.special.gammaln, P.digamma_p: jax.scipy.special.digamma,
    P.floor_p: jnp.floor, P.ceil_p: jnp.ceil, P.round_p: jnp.round, P.neg_p: jnp.negative, P.sign_p: jnp.sign,
    P.abs_p: jnp.abs, P.is_finite_p: jnp.isfinite,
}
for _prim, _fn in _UNARY.items():
    jax_rules[_prim] = _fn


def _not(x):
    return jnp.logical_not(x) if x.dtype == jnp.bool_ else jnp.bitwise_not(x)


jax_rules[P.not_p] = _not
jax_rules[P.integer_pow_p] = lambda x, *, y: lax.integer_pow(x, y)


def _int_div(x, y):
    """lax semantics: integer division rounds toward zero."""
    return lax.div(*jnp.broadcast_arrays(x, y)) if jnp.issubdtype(x.dtype, jnp.integer) else x / y


def _rem(x, y):
    return lax.rem(*jnp.broadcast_arrays(x, y))


def _pow(x, y):
    x, y = jnp.broadcast_arrays(x, y)
    return jnp.power(x, y) if jnp.issubdtype(x.dtype, jnp.integer) else lax.pow(x, y)  # lax.pow: floats only


_BINARY = {
    P.add_p: jnp.add, P.sub_p: jnp.subtract, P.mul_p: jnp.multiply, P.div_p: _int_div, P.rem_p: _rem, P.pow_p: _pow,
    P.max_p: jnp.maximum, P.min_p: jnp.minimum, P.atan2_p: jnp.arctan2, P.eq_p: jnp.equal, P.ne_p: jnp.not_equal,
    P.lt_p: jnp.less, P.le_p: jnp.less_equal, P.gt_p: jnp.greater, P.ge_p: jnp.greater_equal,
}
for _prim, _fn in _BINARY.items():
    jax_rules[_prim] = _fn


def _logical(bool_fn, int_fn):
    return lambda x, y: bool_fn(x, y) if x.dtype == jnp.bool_ else int_fn(x, y)


jax_rules[P.and_p] = _logical(jnp.logical_and, jnp.bitwise_and)
jax_rules[P.or_p] = _logical(jnp.logical_or, jnp.bitwise_or)
jax_rules[P.xor_p] = _logical(jnp.logical_xor, jnp.bitwise_xor)
jax_rules[P.select_p] = lambda pred, t, f: jnp.where(pred, t, f)


def _convert(x, *, new_dtype):
    """complex to real keeps the real part (said explicitly, as numpy's cast)."""
    if jnp.iscomplexobj(x) and not jnp.issubdtype(new_dtype, jnp.complexfloating):
        x = jnp.real(x)
    return lax.convert_element_type(x, new_dtype)


jax_rules[P.convert_element_type_p] = _convert
jax_rules[P.real_p] = jnp.real
jax_rules[P.imag_p] = jnp.imag
jax_rules[P.conj_p] = jnp.conj
jax_rules[P.complex_p] = lambda re, im: lax.complex(*jnp.broadcast_arrays(re, im))
_JNP_FFT = {"fft": jnp.fft.fftn, "ifft": jnp.fft.ifftn, "rfft": jnp.fft.rfftn}


def _fft(x, *, fft_type, fft_lengths):
    axes = tuple(range(-len(fft_lengths), 0))
    if fft_type == "irfft":
        return jnp.fft.irfftn(x, s=fft_lengths, axes=axes)
    return _JNP_FFT[fft_type](x, axes=axes)


jax_rules[P.fft_p] = _fft
jax_rules[P.stop_gradient_p] = lax.stop_gradient


def computed_in_float32(rule):
    """``rule`` run on a float16/bfloat16 operand in float32 and its result rounded once, as torch's CPU
    kernels accumulate and compute (their ``acc_type``/opmath): ``jnp.sum(x, dtype=bfloat16)`` adds in
    bfloat16 (600 values: 3% off), lax's scans round every partial result (600 steps of 0.1 stall at 32),
    and a bfloat16 softmax is one unit in the last place off here and there."""
    def wrapped(x, **params):
        x = jnp.asarray(x)
        if x.dtype in (jnp.float16, jnp.bfloat16):
            return rule(x.astype(jnp.float32), **params).astype(x.dtype)
        return rule(x, **params)
    return wrapped


jax_rules[P.reduce_sum_p] = computed_in_float32(lambda x, *, axes: jnp.sum(x, axis=axes, dtype=x.dtype))
# lax reductions: an empty axis gives the identity (-inf/+inf), where jnp.max raises
jax_rules[P.reduce_max_p] = lambda x, *, axes: lax.reduce_max(jnp.asarray(x), axes)
jax_rules[P.reduce_min_p] = lambda x, *, axes: lax.reduce_min(jnp.asarray(x), axes)
jax_rules[P.reduce_prod_p] = computed_in_float32(lambda x, *, axes: jnp.prod(x, axis=axes, dtype=x.dtype))
jax_rules[P.reduce_and_p] = lambda x, *, axes: jnp.all(x, axis=axes)
jax_rules[P.reduce_or_p] = lambda x, *, axes: jnp.any(x, axis=axes)
jax_rules[P.argmax_p] = lambda x, *, axis, index_dtype: jnp.argmax(x, axis=axis).astype(index_dtype)
jax_rules[P.argmin_p] = lambda x, *, axis, index_dtype: jnp.argmin(x, axis=axis).astype(index_dtype)
jax_rules[P.cumsum_p] = computed_in_float32(lambda x, *, axis, reverse: lax.cumsum(x, axis=axis, reverse=reverse))
jax_rules[P.cumprod_p] = computed_in_float32(lambda x, *, axis, reverse: lax.cumprod(x, axis=axis, reverse=reverse))
jax_rules[P.cummax_p] = lambda x, *, axis, reverse: lax.cummax(x, axis=axis, reverse=reverse)
jax_rules[P.cummin_p] = lambda x, *, axis, reverse: lax.cummin(x, axis=axis, reverse=reverse)


def _sort(x, *, axis, descending, index_dtype):
    """A stable multi-key lax.sort: (NaN last or first, the value or its order-reversing image, position)."""
    x = jnp.asarray(x)
    position = lax.broadcasted_iota(index_dtype, x.shape, axis)
    if jnp.issubdtype(x.dtype, jnp.floating):
        nan = jnp.isnan(x)
        key = jnp.where(nan | (x == 0), jnp.zeros_like(x), x)  # -0.0 ties with 0.0; NaNs tie
        group = jnp.where(nan, 0, 1) if descending else jnp.where(nan, 1, 0)
        keys = (group.astype(jnp.int8), -key if descending else key)
    elif x.dtype == jnp.bool_:
        keys = (jnp.where(x, 0, 1).astype(jnp.int8) if descending else x.astype(jnp.int8),)
    else:
        keys = (jnp.bitwise_not(x) if descending else x,)
    *_, order = lax.sort((*keys, position), dimension=axis, is_stable=True, num_keys=len(keys))
    return jnp.take_along_axis(x, order, axis=axis), order


jax_rules[P.sort_p] = _sort

jax_rules[P.broadcast_in_dim_p] = (
    lambda x, *, shape, broadcast_dimensions: lax.broadcast_in_dim(jnp.asarray(x), shape, broadcast_dimensions))
jax_rules[P.reshape_p] = lambda x, *, new_sizes: jnp.reshape(x, new_sizes)
jax_rules[P.transpose_p] = lambda x, *, permutation: jnp.transpose(x, permutation)
jax_rules[P.slice_p] = lambda x, *, start_indices, limit_indices, strides: lax.slice(
    x, start_indices, limit_indices, strides)
jax_rules[P.pad_p] = lambda x, v, *, padding_config: lax.pad(x, jnp.asarray(v, x.dtype), padding_config)
jax_rules[P.concatenate_p] = lambda *xs, dimension: lax.concatenate(xs, dimension)
jax_rules[P.rev_p] = lambda x, *, dimensions: lax.rev(x, dimensions)
jax_rules[P.iota_p] = lambda *, dtype, shape, dimension: lax.broadcasted_iota(dtype, shape, dimension)


def _dot_general(lhs, rhs, *, dimension_numbers, preferred_element_type):
    precision = lax.Precision.HIGHEST
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


jax_rules[P.dot_general_p] = _dot_general


def _conv(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count):
    dn = lax.ConvDimensionNumbers(*dimension_numbers)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                                    feature_group_count, batch_group_count, precision=lax.Precision.HIGHEST)


jax_rules[P.conv_general_dilated_p] = _conv


jax_rules[P.cholesky_p] = lambda a: jax.lax.linalg.cholesky(a, symmetrize_input=False)
jax_rules[P.triangular_solve_p] = (
    lambda a, b, *, left_side, lower, transpose_a, unit_diagonal: jax.lax.linalg.triangular_solve(
        a, b, left_side=left_side, lower=lower, transpose_a=transpose_a, unit_diagonal=unit_diagonal))
jax_rules[P.lu_p] = lambda a: jax.lax.linalg.lu(a)
jax_rules[P.qr_p] = lambda a, *, full_matrices: jax.lax.linalg.qr(a, full_matrices=full_matrices)


def _eigh(a, *, lower):
    v, w = jax.lax.linalg.eigh(a, lower=lower, symmetrize_input=False, sort_eigenvalues=True)
    return w, v


jax_rules[P.eigh_p] = _eigh
jax_rules[P.svd_p] = lambda a, *, full_matrices: tuple(
    jax.lax.linalg.svd(a, full_matrices=full_matrices, compute_uv=True))


def _pinv(a, atol, rtol, *, hermitian):
    if hermitian:
        v, w = jax.lax.linalg.eigh(a, symmetrize_input=False)
        s, u, vh = jnp.abs(w), v * jnp.sign(w)[..., None, :], jnp.conj(jnp.swapaxes(v, -1, -2))
    else:
        u, s, vh = jax.lax.linalg.svd(a, full_matrices=False)
    largest = jnp.max(s, axis=-1, initial=0.0)
    cutoff = jnp.maximum(atol, rtol * largest)[..., None]
    inv = jnp.where(s > cutoff, 1 / jnp.where(s > cutoff, s, 1), 0)
    return jnp.einsum("...ji,...j,...kj->...ik", jnp.conj(vh), inv, jnp.conj(u),  # V diag(1/s) U^H
                      precision=lax.Precision.HIGHEST)


jax_rules[P.pinv_p] = _pinv


# LAPACK geev, as torch: its eigenvectors already have unit 2-norm (no renormalisation needed)
jax_rules[P.eig_p] = lambda a: tuple(jax.lax.linalg.eig(a, compute_left_eigenvectors=False))


def _full_index(indices, axis):
    """Index tuple for torch-style gather/scatter: iotas everywhere but ``axis``."""
    grids = [lax.broadcasted_iota(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32, indices.shape, d)
             for d in range(indices.ndim)]
    grids[axis] = indices
    return tuple(grids)


jax_rules[P.gather_p] = lambda x, idx, *, axis: x[_full_index(idx, axis)]
jax_rules[P.scatter_add_p] = lambda x, idx, upd, *, axis: x.at[_full_index(idx, axis)].add(upd)
jax_rules[P.scatter_p] = lambda x, idx, upd, *, axis: x.at[_full_index(idx, axis)].set(upd)


def _random(key, *, shape, dtype, distribution):
    k = jax.random.wrap_key_data(key, impl="threefry2x32")
    if distribution == "uniform":
        return jax.random.uniform(k, shape, dtype)
    return jax.random.normal(k, shape, dtype)


jax_rules[P.random_p] = _random


def _random_fold_in(key, *, data):
    k = jax.random.wrap_key_data(key, impl="threefry2x32")
    return jax.random.key_data(jax.random.fold_in(k, np.uint32(data)))


jax_rules[P.random_fold_in_p] = _random_fold_in

_ = np  # numpy used by rule authors for dtype constants


# ----------------------------------------------------------------------------- sharding (reftrace.sharding)

from reftrace.sharding import sharding_constraint_p  # noqa: E402 - this section's own import, kept with its row


def _sharding_constraint(x, *, spec):
    """Under a mesh (``rt.lower(..., mesh=...)`` traces inside ``jax.set_mesh``) XLA's constraint;
    without one there is nothing to lay out, and the value passes through."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


jax_rules[sharding_constraint_p] = _sharding_constraint
