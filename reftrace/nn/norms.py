"""Layer norm, group norm and batch norm as composites, with composite backward equations.

Operand lists follow the ATen ops, with absent optional operands left out and flagged in
params (``has_weight``, ``has_bias``, ``has_running_stats``). Statistics of half-precision
inputs are computed in float32 and returned in the input's dtype, as torch's CPU kernels do, or in
float32 where the parameters are float32 (``statistics_dtype``: torch's mixed-type kernels).
The backward equations cover the data cotangent of the normalised output; a cotangent
reaching the saved statistics themselves goes through the decomposition
(``reftrace.transforms.vjp.through_decomposition``).
"""
from __future__ import annotations

from typing import Any, Sequence

from reftrace import lax
from reftrace.composite import define_composite
from reftrace.graph import Eqn, Params
from reftrace.nn._util import accumulation_dtype, along, cast, const, mean, other_axes, statistics_dtype
from reftrace.transforms.recompute_rules import recompute_rules
from reftrace.transforms.vjp import through_decomposition
from reftrace.transforms.vjp_rules import vjp_rules


def _optional(operands: Sequence[Any], *present: bool) -> list[Any]:
    """The optional operands in order, ``None`` where absent."""
    values, it = [], iter(operands)
    for here in present:
        values.append(next(it) if here else None)
    return values


def _normalize(x: Any, mu: Any, rstd: Any, stat_dims: Sequence[int]) -> Any:
    return lax.mul(lax.sub(x, along(mu, x.shape, stat_dims)), along(rstd, x.shape, stat_dims))


def _affine(y: Any, weight: Any, bias: Any, param_dims: Sequence[int]) -> Any:
    if weight is not None:
        y = lax.mul(y, along(cast(weight, y.dtype), y.shape, param_dims))
    if bias is not None:
        y = lax.add(y, along(cast(bias, y.dtype), y.shape, param_dims))
    return y


def _normalization_backward(g: Any, x: Any, mu: Any, rstd: Any, weight: Any, axes: Sequence[int],
                            stat_dims: Sequence[int], param_dims: Sequence[int]) -> tuple[Any, Any, Any]:
    """(dx, dweight, dbias) of ``y = (x - mu) * rstd * weight + bias`` with ``mu``, ``rstd`` the
    statistics over ``axes`` (``stat_dims`` their dims in ``x``); ``dweight``/``dbias`` reduce over
    the complement of ``param_dims``. All in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    g, x, mu, rstd = (cast(v, acc) for v in (g, x, mu, rstd))
    xhat = _normalize(x, mu, rstd, stat_dims)
    gxhat = lax.mul(g, along(cast(weight, acc), x.shape, param_dims)) if weight is not None else g
    mean_g = along(mean(gxhat, axes), x.shape, stat_dims)
    mean_gx = along(mean(lax.mul(gxhat, xhat), axes), x.shape, stat_dims)
    dx = lax.mul(along(rstd, x.shape, stat_dims), lax.sub(lax.sub(gxhat, mean_g), lax.mul(xhat, mean_gx)))
    reduce_dims = tuple(other_axes(x.ndim, param_dims))
    return dx, lax.reduce_sum(lax.mul(g, xhat), reduce_dims), lax.reduce_sum(g, reduce_dims)


def _present_grads(dx: Any, dw: Any, db: Any, x: Any, weight: Any, bias: Any) -> tuple[Any, ...]:
    """The backward equation's outputs: dx, then dweight and dbias for the operands present, each in
    its operand's dtype."""
    outs = [cast(dx, x.dtype)]
    if weight is not None:
        outs.append(cast(dw, weight.dtype))
    if bias is not None:
        outs.append(cast(db, bias.dtype))
    return tuple(outs)


# ----------------------------------------------------------------------------- layer norm

def _layer_norm_axes(ndim: int, normalized_ndim: int) -> tuple[tuple[int, ...], list[int]]:
    axes = tuple(range(ndim - normalized_ndim, ndim))
    return axes, other_axes(ndim, axes)


def _layer_norm(x: Any, *affine: Any, normalized_ndim: int, eps: float, has_weight: bool, has_bias: bool
                ) -> tuple[Any, Any, Any]:
    weight, bias = _optional(affine, has_weight, has_bias)
    axes, lead = _layer_norm_axes(x.ndim, normalized_ndim)
    xa = cast(x, accumulation_dtype(x.dtype))
    mu = mean(xa, axes)
    centred = lax.sub(xa, along(mu, xa.shape, lead))
    rstd = lax.rsqrt(lax.add(mean(lax.mul(centred, centred), axes), const(eps, xa.dtype)))
    y = _affine(lax.mul(centred, along(rstd, xa.shape, lead)), weight, bias, axes)
    stat_shape = x.shape[:x.ndim - normalized_ndim] + (1,) * normalized_ndim
    sd = statistics_dtype(x.dtype, [v.dtype for v in affine])
    return cast(y, x.dtype), cast(lax.reshape(mu, stat_shape), sd), cast(lax.reshape(rstd, stat_shape), sd)


def _layer_norm_backward(g: Any, x: Any, mu: Any, rstd: Any, *affine: Any, normalized_ndim: int,
                         has_weight: bool, has_bias: bool) -> tuple[Any, ...]:
    weight, bias = _optional(affine, has_weight, has_bias)
    axes, lead = _layer_norm_axes(x.ndim, normalized_ndim)
    flat = x.shape[:x.ndim - normalized_ndim]
    dx, dw, db = _normalization_backward(g, x, lax.reshape(mu, flat), lax.reshape(rstd, flat), weight, axes,
                                         lead, axes)
    return _present_grads(dx, dw, db, x, weight, bias)


layer_norm_p = define_composite("layer_norm", _layer_norm, multiple_results=True)
layer_norm_backward_p = define_composite("layer_norm_backward", _layer_norm_backward, multiple_results=True)


def layer_norm(x: Any, weight: Any = None, bias: Any = None, *, normalized_ndim: int, eps: float
               ) -> tuple[Any, Any, Any]:
    """(y, mean, rstd) of layer norm over the last ``normalized_ndim`` axes, as ``aten.native_layer_norm``
    (mean and rstd keep the normalised axes as size 1)."""
    affine = [v for v in (weight, bias) if v is not None]
    return lax.bind(layer_norm_p, x, *affine, normalized_ndim=normalized_ndim, eps=float(eps),
                    has_weight=weight is not None, has_bias=bias is not None)


def _statistics_vjp(forward: Any, backward: Any) -> Any:
    """The VJP rule of a ``(y, mean, rstd)`` normalization: its backward equation (the forward's params
    but ``eps``) for ``y``'s cotangent; through the decomposition when the statistics themselves have
    cotangents (they are used downstream)."""
    def rule(cts, primals, outs, *, eps, **params):
        if cts[1] is not None or cts[2] is not None:
            return through_decomposition(forward, cts, primals, outs, eps=eps, **params)
        x, *affine = primals
        return tuple(lax.bind(backward, cts[0], x, outs[1], outs[2], *affine, **params))
    return rule


vjp_rules[layer_norm_p] = _statistics_vjp(layer_norm_p, layer_norm_backward_p)


# ----------------------------------------------------------------------------- group norm

_CHANNEL = (1,)  # the channel axis of an (N, C, *spatial) input: group norm's and batch norm's parameters

def _grouped_shape(shape: Sequence[int], groups: int) -> tuple[int, int, int, int]:
    """(N, groups, channels per group, spatial size) of an (N, C, *spatial) input."""
    n, c = shape[0], shape[1]
    spatial = 1
    for d in shape[2:]:
        spatial *= d
    return n, groups, c // groups, spatial


_GROUP_STATS, _GROUP_AXES, _GROUP_PARAMS = (0, 1), (2, 3), (1, 2)


def _group_norm(x: Any, *affine: Any, groups: int, eps: float, has_weight: bool, has_bias: bool
                ) -> tuple[Any, Any, Any]:
    """(y, mean, rstd) with statistics over each group of ``C // groups`` channels and all positions;
    mean and rstd are (N, groups), as ``aten.native_group_norm``."""
    weight, bias = _optional(affine, has_weight, has_bias)
    xa = lax.reshape(cast(x, accumulation_dtype(x.dtype)), _grouped_shape(x.shape, groups))
    mu = mean(xa, _GROUP_AXES)
    centred = lax.sub(xa, along(mu, xa.shape, _GROUP_STATS))
    rstd = lax.rsqrt(lax.add(mean(lax.mul(centred, centred), _GROUP_AXES), const(eps, xa.dtype)))
    y = lax.reshape(lax.mul(centred, along(rstd, xa.shape, _GROUP_STATS)), x.shape)
    y = _affine(y, weight, bias, _CHANNEL)
    sd = statistics_dtype(x.dtype, [v.dtype for v in affine])
    return cast(y, x.dtype), cast(mu, sd), cast(rstd, sd)


def _group_norm_backward(g: Any, x: Any, mu: Any, rstd: Any, *affine: Any, groups: int, has_weight: bool,
                         has_bias: bool) -> tuple[Any, ...]:
    weight, bias = _optional(affine, has_weight, has_bias)
    grouped = _grouped_shape(x.shape, groups)
    per_group = None if weight is None else lax.reshape(weight, grouped[1:3])
    dx, dw, db = _normalization_backward(lax.reshape(g, grouped), lax.reshape(x, grouped), mu, rstd, per_group,
                                         _GROUP_AXES, _GROUP_STATS, _GROUP_PARAMS)
    channels = (x.shape[1],)
    return _present_grads(lax.reshape(dx, x.shape), lax.reshape(dw, channels), lax.reshape(db, channels), x,
                          weight, bias)


group_norm_p = define_composite("group_norm", _group_norm, multiple_results=True)
group_norm_backward_p = define_composite("group_norm_backward", _group_norm_backward, multiple_results=True)


def group_norm(x: Any, weight: Any = None, bias: Any = None, *, groups: int, eps: float) -> tuple[Any, Any, Any]:
    """(y, mean, rstd) of group norm of an (N, C, *spatial) ``x`` with per-channel ``weight``/``bias``, as
    ``aten.native_group_norm`` (mean and rstd are (N, groups))."""
    affine = [v for v in (weight, bias) if v is not None]
    return lax.bind(group_norm_p, x, *affine, groups=int(groups), eps=float(eps),
                    has_weight=weight is not None, has_bias=bias is not None)


vjp_rules[group_norm_p] = _statistics_vjp(group_norm_p, group_norm_backward_p)


# ----------------------------------------------------------------------------- batch norm

def _batch_norm_train(x: Any, *rest: Any, eps: float, momentum: float, has_weight: bool, has_bias: bool,
                      has_running_stats: bool) -> tuple[Any, ...]:
    """(y, saved mean, saved rstd[, new running mean, new running var]) over every axis but 1."""
    weight, bias, running_mean, running_var = _optional(rest, has_weight, has_bias, has_running_stats,
                                                         has_running_stats)
    acc = accumulation_dtype(x.dtype)
    xa = cast(x, acc)
    axes = tuple(other_axes(x.ndim, _CHANNEL))
    mu = mean(xa, axes)
    centred = lax.sub(xa, along(mu, xa.shape, _CHANNEL))
    var = mean(lax.mul(centred, centred), axes)
    rstd = lax.rsqrt(lax.add(var, const(eps, acc)))
    y = _affine(lax.mul(centred, along(rstd, xa.shape, _CHANNEL)), weight, bias, _CHANNEL)
    sd = statistics_dtype(x.dtype, [v.dtype for v in rest])
    outs = [cast(y, x.dtype), cast(mu, sd), cast(rstd, sd)]
    if has_running_stats:
        n = x.size // x.shape[1]
        keep, m = const(1 - momentum, acc), const(momentum, acc)
        unbiased = lax.mul(var, const(n / max(n - 1, 1), acc))
        # torch's kernel updates the running statistics outside autograd: no gradient flows through them
        outs.append(lax.stop_gradient(cast(lax.add(lax.mul(keep, cast(running_mean, acc)), lax.mul(m, mu)),
                                           running_mean.dtype)))
        outs.append(lax.stop_gradient(cast(lax.add(lax.mul(keep, cast(running_var, acc)), lax.mul(m, unbiased)),
                                           running_var.dtype)))
    return tuple(outs)


def _batch_norm_eval(x: Any, running_mean: Any, running_var: Any, *affine: Any, eps: float, has_weight: bool,
                     has_bias: bool) -> Any:
    weight, bias = _optional(affine, has_weight, has_bias)
    acc = accumulation_dtype(x.dtype)
    rstd = lax.rsqrt(lax.add(cast(running_var, acc), const(eps, acc)))
    y = _affine(_normalize(cast(x, acc), cast(running_mean, acc), rstd, _CHANNEL), weight, bias, _CHANNEL)
    return cast(y, x.dtype)


def _batch_norm_backward(g: Any, x: Any, mu: Any, stat: Any, *affine: Any, eps: float, training: bool,
                         has_weight: bool, has_bias: bool) -> tuple[Any, ...]:
    """(dx[, dweight][, dbias]). In training ``mu``, ``stat`` are the saved mean and rstd (the batch's
    statistics depend on x); in eval they are the running mean and variance (constants in x)."""
    weight, bias = _optional(affine, has_weight, has_bias)
    axes = tuple(other_axes(x.ndim, _CHANNEL))
    if training:
        dx, dw, db = _normalization_backward(g, x, mu, stat, weight, axes, _CHANNEL, _CHANNEL)
    else:
        acc = accumulation_dtype(x.dtype)
        ga = cast(g, acc)
        rstd = lax.rsqrt(lax.add(cast(stat, acc), const(eps, acc)))
        scale = lax.mul(rstd, cast(weight, acc)) if weight is not None else rstd
        dx = lax.mul(ga, along(scale, x.shape, _CHANNEL))
        xhat = _normalize(cast(x, acc), cast(mu, acc), rstd, _CHANNEL)
        dw, db = lax.reduce_sum(lax.mul(ga, xhat), axes), lax.reduce_sum(ga, axes)
    return _present_grads(dx, dw, db, x, weight, bias)


batch_norm_train_p = define_composite("batch_norm_train", _batch_norm_train, multiple_results=True)
batch_norm_eval_p = define_composite("batch_norm_eval", _batch_norm_eval)
batch_norm_backward_p = define_composite("batch_norm_backward", _batch_norm_backward, multiple_results=True)


def batch_norm_train(x: Any, weight: Any = None, bias: Any = None, running_mean: Any = None,
                     running_var: Any = None, *, momentum: float, eps: float) -> tuple[Any, ...]:
    """Training batch norm over every axis of ``x`` but 1: (y, saved mean, saved rstd), plus the new
    running mean and (unbiased) variance when both running statistics are given, as
    ``aten._native_batch_norm_legit_functional``."""
    has_stats = running_mean is not None and running_var is not None
    rest = [v for v in (weight, bias) if v is not None] + ([running_mean, running_var] if has_stats else [])
    return lax.bind(batch_norm_train_p, x, *rest, eps=float(eps), momentum=float(momentum),
                    has_weight=weight is not None, has_bias=bias is not None, has_running_stats=has_stats)


def batch_norm_eval(x: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None, *,
                    eps: float) -> Any:
    """Inference batch norm with the running statistics."""
    affine = [v for v in (weight, bias) if v is not None]
    return lax.bind(batch_norm_eval_p, x, running_mean, running_var, *affine, eps=float(eps),
                    has_weight=weight is not None, has_bias=bias is not None)


def _batch_norm_train_vjp(cts, primals, outs, *, eps, momentum, has_weight, has_bias, has_running_stats):
    if cts[1] is not None or cts[2] is not None:  # the saved statistics themselves are used downstream
        return through_decomposition(batch_norm_train_p, cts, primals, outs, eps=eps, momentum=momentum,
                                     has_weight=has_weight, has_bias=has_bias,
                                     has_running_stats=has_running_stats)
    if cts[0] is None:  # only the running statistics have cotangents: they carry no gradient
        return (None,) * len(primals)
    x = primals[0]
    affine = primals[1:1 + has_weight + has_bias]
    grads = lax.bind(batch_norm_backward_p, cts[0], x, outs[1], outs[2], *affine, eps=eps, training=True,
                     has_weight=has_weight, has_bias=has_bias)
    return (*grads, *(None,) * (2 * has_running_stats))


def _batch_norm_eval_vjp(cts, primals, outs, *, eps, has_weight, has_bias):
    x, running_mean, running_var, *affine = primals
    grads = lax.bind(batch_norm_backward_p, cts[0], x, running_mean, running_var, *affine, eps=eps, training=False,
                     has_weight=has_weight, has_bias=has_bias)
    # the running statistics' cotangents (rarely wanted: they are buffers) come from the decomposition;
    # vjp drops that part of the graph when nothing uses them
    through = through_decomposition(batch_norm_eval_p, cts, primals, outs, eps=eps, has_weight=has_weight,
                                    has_bias=has_bias)
    return (grads[0], through[1], through[2], *grads[1:])


vjp_rules[batch_norm_train_p] = _batch_norm_train_vjp
vjp_rules[batch_norm_eval_p] = _batch_norm_eval_vjp


def _batch_norm_train_without_running_stats(eqn: Eqn) -> tuple[Eqn, tuple[int, ...]] | None:
    """(y, mean, rstd) without the running statistics: what a backward recomputing the batch norm
    reads, from operands the caller does not overwrite after the forward."""
    if not eqn.params["has_running_stats"]:
        return None
    operands = 1 + eqn.params["has_weight"] + eqn.params["has_bias"]
    params = Params({**eqn.params, "has_running_stats": False})
    return Eqn(batch_norm_train_p, eqn.inputs[:operands], eqn.outputs[:3], params), (0, 1, 2)


recompute_rules[batch_norm_train_p] = _batch_norm_train_without_running_stats
