"""Gradients at ties, kinks and boundaries follow eager torch exactly.

Random inputs almost never land on a tie (``x.max(dim)`` with two equal maxima), a kink
(``relu`` at 0) or a boundary (``clamp`` at its bounds), so every case here is built to sit
on one. Each runs eagerly and through ``aot_function(fn, nop)`` in float64 with a
position-dependent cotangent (so it matters *which* tied element gets the gradient); the
outputs (integer indices included) and the gradient of every differentiable input must be
equal, and where eager gives an input no gradient (``None``) reftrace must give none either.
The choices themselves are listed in docs/autodiff.md ("Choices at non-differentiable points").
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import pytest
import torch
import torch.nn.functional as F

from reftrace.compile import aot_function, nop, xla_compile

f64 = torch.float64
inf, nan = math.inf, math.nan


def t(values: Any, grad: bool = True) -> torch.Tensor:
    """A float64 leaf (requiring grad unless ``grad=False``)."""
    return torch.tensor(values, dtype=f64).requires_grad_(grad)


def cotangent_like(out: torch.Tensor) -> torch.Tensor:
    """1, 2, 3, ... in the output's shape, so a gradient sent to the wrong tied element shows."""
    return torch.arange(1, out.numel() + 1, dtype=out.dtype).reshape(out.shape)


def _outputs(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _grads(outs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """d(sum cotangent * out)/d input for every input that requires grad (None where none reaches it)."""
    pairs = [(o, cotangent_like(o)) for o in outs if o.requires_grad]
    wrt = [x for x in inputs if x.requires_grad]
    if not pairs or not wrt:
        return ()
    return torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)


def _copies(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]


def compare(fn: Callable[..., Any], *inputs: torch.Tensor, rtol: float = 1e-13, atol: float = 1e-14,
            compiler: Callable[..., Any] = nop) -> None:
    """Outputs and gradients of ``fn`` through ``aot_function(fn, compiler)`` equal eager's."""
    eager_in, compiled_in = _copies(inputs), _copies(inputs)
    want = _outputs(fn(*eager_in))
    got = _outputs(aot_function(fn, compiler)(*compiled_in))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"output {i}: {g.dtype}{list(g.shape)} vs eager's"
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"output {i}: {m}")
        else:
            assert torch.equal(g, w), f"output {i} (indices): {g.tolist()} vs eager {w.tolist()}"
    want_grads, got_grads = _grads(want, eager_in), _grads(got, compiled_in)
    assert len(got_grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        if w is None:
            assert g is None, f"grad {i}: eager has none, reftrace gives {g.tolist()}"
            continue
        assert g is not None, f"grad {i}: reftrace gives none, eager {w.tolist()}"
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"grad {i}: {m}\nreftrace {g.tolist()}\neager    {w.tolist()}")


class Case(NamedTuple):
    fn: Callable[..., Any]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    rtol: float = 1e-13


# on both sides of, and exactly at, the usual kinks and bounds: 0, +-1, +-3, 6
EDGES = [-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 6.0, 7.0]
TIED_ROWS = [[2.0, 1.0, 2.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
DISTINCT_ROWS = [[2.0, 1.5, -1.0, 0.5, 3.0], [0.25, -2.0, 4.0, 1.0, 0.0]]

CASES: dict[str, Case] = {
    # clamp with scalar bounds: x's gradient strictly between them (0 at the bounds and at NaN)
    "clamp": Case(lambda x: x.clamp(-1, 1), lambda: (t(EDGES + [nan]),)),
    "clamp_min": Case(lambda x: x.clamp(min=-1), lambda: (t(EDGES + [nan]),)),
    "clamp_max": Case(lambda x: x.clamp(max=1), lambda: (t(EDGES + [nan]),)),
    "clamp_min_op": Case(lambda x: torch.clamp_min(x, 0.5), lambda: (t(EDGES),)),
    "clamp_empty_range": Case(lambda x: x.clamp(1, -1), lambda: (t([-2.0, -1.0, 0.0, 1.0, 2.0]),)),
    "clamp_nan_bound": Case(lambda x: x.clamp(nan, 1), lambda: (t([-1.0, 2.0]),)),
    # clamp with tensor bounds: ties split like maximum/minimum; lo == hi and lo > hi as torch
    "clamp_tensor": Case(lambda x, lo, hi: torch.clamp(x, lo, hi),
                         lambda: (t([-2.0, -1.0, 0.0, 1.0, 2.0, 1.0, 0.5, -1.0, 0.0, 2.0, 0.0, 0.0]),
                                  t([-1.0, -1.0, 0.0, -1.0, -1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
                                  t([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0]))),
    "clamp_tensor_nan": Case(lambda x, lo, hi: torch.clamp(x, lo, hi),
                             lambda: (t([nan, nan, 0.0, 2.0, 0.0, -2.0, nan]),
                                      t([-1.0, 1.0, nan, nan, -1.0, -1.0, nan]),
                                      t([1.0, -1.0, 1.0, 1.0, nan, nan, nan]))),
    "clamp_tensor_min_only": Case(lambda x, lo: torch.clamp(x, min=lo),
                                  lambda: (t([-2.0, -1.0, 0.0, nan, 1.0]), t([-1.0, -1.0, -1.0, 0.0, nan]))),
    "clamp_tensor_max_only": Case(lambda x, hi: torch.clamp(x, max=hi),
                                  lambda: (t([2.0, 1.0, 0.0, nan, 1.0]), t([1.0, 1.0, 1.0, 0.0, nan]))),
    "clamp_min_tensor": Case(lambda x, lo: torch.clamp_min(x, lo),
                             lambda: (t([-2.0, -1.0, 0.0]), t([-1.0, -1.0, -1.0]))),
    "clamp_max_tensor": Case(lambda x, hi: torch.clamp_max(x, hi), lambda: (t([2.0, 1.0, 0.0]), t([1.0, 1.0, 1.0]))),
    "clamp_tensor_bounds_without_grad": Case(lambda x, lo, hi: torch.clamp(x, lo, hi),
                                             lambda: (t([-2.0, -1.0, 0.0, 1.0]), t([-1.0] * 4, grad=False),
                                                      t([1.0] * 4, grad=False))),
    "clamp_tensor_broadcast_bound": Case(lambda x, lo: torch.clamp(x, min=lo),
                                         lambda: (t([[-1.0, 0.0], [1.0, -1.0]]), t(-1.0))),
    # hardtanh / relu6: 0 at the bounds, NaN passes its gradient
    "hardtanh": Case(lambda x: F.hardtanh(x), lambda: (t(EDGES + [nan]),)),
    "hardtanh_range": Case(lambda x: F.hardtanh(x, -2.0, 3.0), lambda: (t(EDGES),)),
    "relu6": Case(lambda x: F.relu6(x), lambda: (t(EDGES + [nan]),)),
    # activations at their kinks
    "relu": Case(lambda x: torch.relu(x), lambda: (t(EDGES + [nan]),)),
    "leaky_relu": Case(lambda x: F.leaky_relu(x, 0.2), lambda: (t(EDGES + [nan]),)),
    "elu": Case(lambda x: F.elu(x, 1.5), lambda: (t(EDGES + [nan, 800.0]),)),
    "celu": Case(lambda x: F.celu(x, 0.5), lambda: (t(EDGES),)),
    "selu": Case(lambda x: F.selu(x), lambda: (t(EDGES + [nan, 800.0]),)),
    # torch's hardsigmoid backward multiplies by a float32 1/6 even in float64
    "hardsigmoid": Case(lambda x: F.hardsigmoid(x), lambda: (t(EDGES + [nan]),), rtol=1e-7),
    "hardswish": Case(lambda x: F.hardswish(x), lambda: (t(EDGES + [nan]),)),
    "hardshrink": Case(lambda x: F.hardshrink(x, 1.0), lambda: (t(EDGES + [nan]),)),
    "softshrink": Case(lambda x: F.softshrink(x, 1.0), lambda: (t(EDGES),)),
    "threshold": Case(lambda x: F.threshold(x, 1.0, -5.0), lambda: (t(EDGES + [nan]),)),
    "softplus_threshold": Case(lambda x: F.softplus(x, beta=2.0, threshold=4.0), lambda: (t([1.0, 2.0, 3.0, nan]),)),
    "logsigmoid": Case(lambda x: F.logsigmoid(x), lambda: (t([-1.0, 0.0, 1.0]),)),
    "prelu": Case(lambda x, w: F.prelu(x, w), lambda: (t([[-1.0, 0.0, 1.0, nan]]), t([0.25]))),
    "abs": Case(lambda x: x.abs(), lambda: (t([-1.0, 0.0, 1.0]),)),
    "sgn": Case(lambda x: torch.sgn(x) * x, lambda: (t([-1.0, 0.0, 1.0]),)),
    # elementwise extrema with equal operands (and NaN, which both operands of maximum/minimum get)
    "maximum": Case(lambda x, y: torch.maximum(x, y),
                    lambda: (t([1.0, 2.0, 3.0, nan, 1.0]), t([1.0, 3.0, 2.0, 1.0, nan]))),
    "minimum": Case(lambda x, y: torch.minimum(x, y),
                    lambda: (t([1.0, 2.0, 3.0, nan, 1.0]), t([1.0, 3.0, 2.0, 1.0, nan]))),
    "max_binary": Case(lambda x, y: torch.max(x, y), lambda: (t([1.0, 2.0, 3.0]), t([1.0, 3.0, 2.0]))),
    "maximum_broadcast": Case(lambda x, y: torch.maximum(x, y), lambda: (t([1.0, 2.0, 1.0]), t(1.0))),
    "fmax": Case(lambda x, y: torch.fmax(x, y), lambda: (t([1.0, 2.0, 3.0, nan]), t([1.0, 3.0, 2.0, nan]))),
    "fmin": Case(lambda x, y: torch.fmin(x, y), lambda: (t([1.0, 2.0, 3.0, nan]), t([1.0, 3.0, 2.0, nan]))),
    # reductions with ties: without dim (and amax/amin) split evenly; with dim the returned index takes all
    "max_all": Case(lambda x: x.max(), lambda: (t([[1.0, 3.0, 3.0], [0.0, 3.0, 2.0]]),)),
    "min_all": Case(lambda x: x.min(), lambda: (t([[1.0, 3.0, -1.0], [-1.0, 3.0, 2.0]]),)),
    "max_all_nan": Case(lambda x: x.max(), lambda: (t([1.0, nan, 3.0, nan]),)),
    "max_all_neg_inf": Case(lambda x: x.max(), lambda: (t([-inf, -inf]),)),
    "max_dim": Case(lambda x: x.max(1), lambda: (t([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 0.0]]),)),
    "max_dim_keepdim": Case(lambda x: x.max(0, keepdim=True), lambda: (t([[1.0, 3.0], [1.0, 3.0], [0.0, 3.0]]),)),
    "min_dim": Case(lambda x: x.min(1), lambda: (t([[1.0, -3.0, -3.0], [2.0, 2.0, 2.0], [0.0, 1.0, 0.0]]),)),
    "max_dim_nan": Case(lambda x: x.max(1), lambda: (t([[1.0, nan, nan], [nan, 2.0, 2.0]]),)),
    "min_dim_nan": Case(lambda x: x.min(1), lambda: (t([[1.0, nan, nan], [-inf, -inf, 2.0]]),)),
    "amax": Case(lambda x: x.amax(1), lambda: (t([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, -1.0, 0.0]]),)),
    "amin": Case(lambda x: x.amin((0, 1)), lambda: (t([[1.0, -3.0, -3.0], [-3.0, 2.0, 2.0]]),)),
    "amax_keepdim": Case(lambda x: x.amax(0, keepdim=True), lambda: (t([[1.0, 3.0], [1.0, 3.0], [0.0, 3.0]]),)),
    "aminmax": Case(lambda x: torch.aminmax(x, dim=1), lambda: (t([[1.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]]),)),
    "logsumexp_neg_inf": Case(lambda x: torch.logsumexp(x, 1), lambda: (t([[-inf, -inf], [-inf, 0.0], [1.0, 1.0]]),)),
    "logsumexp_pos_inf": Case(lambda x: torch.logsumexp(x, 1), lambda: (t([[inf, 0.0], [inf, inf]]),)),
    # pooling with ties inside (and across overlapping) windows: torch's index takes the gradient
    "max_pool1d": Case(lambda x: F.max_pool1d(x, 2, 1), lambda: (t([[[1.0, 1.0, 1.0, 0.0, 2.0, 2.0]]]),)),
    "max_pool1d_indices": Case(lambda x: F.max_pool1d(x, 3, 2, return_indices=True),
                               lambda: (t([[[1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]]]),)),
    "max_pool2d": Case(lambda x: F.max_pool2d(x, 2, 1),
                       lambda: (t([[[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]]]),)),
    "max_pool2d_indices": Case(lambda x: F.max_pool2d(x, 2, 2, return_indices=True),
                               lambda: (t([[[[1.0, 1.0, 2.0, 0.0], [1.0, 0.0, 2.0, 2.0]]]]),)),
    "max_pool2d_padded": Case(lambda x: F.max_pool2d(x, 3, 2, padding=1), lambda: (t([[[[0.0] * 4] * 4]]),)),
    "max_pool2d_dilated": Case(lambda x: F.max_pool2d(x, 2, 1, dilation=2, return_indices=True),
                               lambda: (t([[[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]]),)),
    "max_pool2d_nan": Case(lambda x: F.max_pool2d(x, 2, 1, return_indices=True),
                           lambda: (t([[[[1.0, nan, 0.0], [nan, 1.0, 1.0]]]]),)),
    "max_pool3d": Case(lambda x: F.max_pool3d(x, 2, 1, return_indices=True),
                       lambda: (t([[[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]],
                                     [[1.0, 1.0], [0.0, 1.0]]]]]),)),
    "adaptive_max_pool1d": Case(lambda x: F.adaptive_max_pool1d(x, 3, return_indices=True),
                                lambda: (t([[[1.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0]]]),)),
    "adaptive_max_pool2d": Case(lambda x: F.adaptive_max_pool2d(x, 2, return_indices=True),
                                lambda: (t([[[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]]),)),
    "adaptive_max_pool2d_nan": Case(lambda x: F.adaptive_max_pool2d(x, 1, return_indices=True),
                                    lambda: (t([[[[1.0, nan], [nan, 1.0]]]]),)),
    "adaptive_max_pool3d": Case(lambda x: F.adaptive_max_pool3d(x, 1), lambda: (t([[[[[1.0, 1.0], [1.0, 1.0]]]]]),)),
    "fractional_max_pool2d": Case(lambda x: F.fractional_max_pool2d(x, 2, output_size=2, return_indices=True,
                                                                    _random_samples=torch.full((1, 1, 2), 0.5,
                                                                                               dtype=f64)),
                                  lambda: (t([[[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]]),)),
    # sorting and selection: ties whose index torch fixes by a stable rule
    "sort": Case(lambda x: torch.sort(x, 1), lambda: (t(TIED_ROWS),)),
    "sort_descending": Case(lambda x: torch.sort(x, 1, descending=True), lambda: (t(TIED_ROWS),)),
    "sort_stable": Case(lambda x: torch.sort(x, stable=True), lambda: (t([2.0, 1.0, 2.0, 1.0, 2.0]),)),
    "topk_distinct": Case(lambda x: torch.topk(x, 3, 1), lambda: (t(DISTINCT_ROWS),)),
    "kthvalue_distinct": Case(lambda x: torch.kthvalue(x, 2, 1), lambda: (t(DISTINCT_ROWS),)),
    "median_dim_distinct": Case(lambda x: x.median(1), lambda: (t(DISTINCT_ROWS),)),
    "median_all": Case(lambda x: x.median(), lambda: (t([2.0, 1.0, 2.0, 1.0, 2.0, 2.0]),)),
    "median_all_nan": Case(lambda x: x.median(), lambda: (t([2.0, nan, 1.0, nan]),)),
    "median_all_neg_inf": Case(lambda x: x.median(), lambda: (t([-inf, -inf, 1.0]),)),
    "median_all_pos_inf": Case(lambda x: x.median(), lambda: (t([inf, inf, 1.0]),)),
    "nanmedian_all": Case(lambda x: x.nanmedian(), lambda: (t([2.0, nan, 2.0, 1.0, 2.0]),)),
    "nanmedian_all_nan": Case(lambda x: x.nanmedian(), lambda: (t([nan, nan]),)),
    "mode": Case(lambda x: torch.mode(x, 1), lambda: (t([[2.0, 1.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]),)),
    "cummax": Case(lambda x: torch.cummax(x, 1), lambda: (t([[1.0, 1.0, 0.0, 2.0, 2.0], [1.0, nan, 1.0, nan, 2.0]]),)),
    "cummin": Case(lambda x: torch.cummin(x, 1), lambda: (t([[1.0, 1.0, 2.0, 0.0, 0.0], [1.0, 1.0, nan, 0.0, 0.0]]),)),
    # norms and distances at zero, and with tied largest entries
    "vector_norm_2_zero": Case(lambda x: torch.linalg.vector_norm(x), lambda: (t([0.0, 0.0, 0.0]),)),
    "vector_norm_1_zero": Case(lambda x: torch.linalg.vector_norm(x, 1), lambda: (t([0.0, 1.0, -1.0]),)),
    "vector_norm_inf_ties": Case(lambda x: torch.linalg.vector_norm(x, inf), lambda: (t([2.0, -2.0, 1.0]),)),
    "vector_norm_inf_zero": Case(lambda x: torch.linalg.vector_norm(x, inf), lambda: (t([0.0, 0.0]),)),
    "vector_norm_neg_inf_ties": Case(lambda x: torch.linalg.vector_norm(x, -inf), lambda: (t([1.0, -1.0, 2.0]),)),
    "vector_norm_3_zero": Case(lambda x: torch.linalg.vector_norm(x, 3), lambda: (t([0.0, 0.0]),)),
    "vector_norm_half_zero_entry": Case(lambda x: torch.linalg.vector_norm(x, 0.5), lambda: (t([0.0, 1.0]),)),
    "norm_zero": Case(lambda x: torch.norm(x), lambda: (t([[0.0, 0.0], [0.0, 0.0]]),)),
    "norm_dim_zero_row": Case(lambda x: torch.norm(x, dim=1), lambda: (t([[0.0, 0.0], [3.0, 4.0]]),)),
    "matrix_norm_inf_ties": Case(lambda x: torch.linalg.matrix_norm(x, inf), lambda: (t([[1.0, -2.0], [2.0, 1.0]]),)),
    "dist_zero": Case(lambda x, y: torch.dist(x, y), lambda: (t([1.0, 2.0]), t([1.0, 2.0]))),
    "dist_1_zero": Case(lambda x, y: torch.dist(x, y, 1), lambda: (t([1.0, 2.0]), t([1.0, 3.0]))),
    "dist_inf_ties": Case(lambda x, y: torch.dist(x, y, inf), lambda: (t([1.0, 2.0, 0.0]), t([2.0, 1.0, 0.0]))),
    "dist_3_zero": Case(lambda x, y: torch.dist(x, y, 3), lambda: (t([1.0, 2.0]), t([1.0, 2.0]))),
    "cdist_same_points": Case(lambda x, y: torch.cdist(x, y),
                              lambda: (t([[0.0, 1.0], [1.0, 1.0]]), t([[0.0, 1.0], [2.0, 1.0]]))),
    "cdist_1_same_points": Case(lambda x, y: torch.cdist(x, y, 1),
                                lambda: (t([[0.0, 1.0], [1.0, 1.0]]), t([[0.0, 1.0], [2.0, 1.0]]))),
    "cdist_3_same_points": Case(lambda x, y: torch.cdist(x, y, 3),
                                lambda: (t([[0.0, 1.0], [1.0, 1.0]]), t([[0.0, 1.0], [2.0, 1.0]]))),
    "cdist_inf_ties": Case(lambda x, y: torch.cdist(x, y, inf),
                           lambda: (t([[0.0, 1.0], [1.0, 1.0]]), t([[1.0, 2.0], [2.0, 0.0]]))),
    "pdist_same_rows": Case(lambda x: F.pdist(x), lambda: (t([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]),)),
    "pdist_inf_ties": Case(lambda x: F.pdist(x, inf), lambda: (t([[0.0, 1.0], [1.0, 2.0], [2.0, 0.0]]),)),
    "pairwise_distance_same": Case(lambda x, y: F.pairwise_distance(x, y), lambda: (t([[0.0, 1.0]]), t([[0.0, 1.0]]))),
    "normalize_zero": Case(lambda x: F.normalize(x, dim=1), lambda: (t([[0.0, 0.0], [3.0, 4.0]]),)),
    "std_constant": Case(lambda x: x.std(), lambda: (t([2.0, 2.0, 2.0]),)),
    "std_mean_constant_rows": Case(lambda x: torch.std_mean(x, 1), lambda: (t([[0.0, 0.0], [3.0, 3.0], [1.0, 2.0]]),)),
    # elementwise functions at singular points
    "atan2_origin": Case(lambda y, x: torch.atan2(y, x),
                         lambda: (t([0.0, -0.0, 0.0, -0.0, 1.0, 0.0]), t([0.0, 0.0, -0.0, -0.0, 0.0, -1.0]))),
    "hypot_origin": Case(lambda x, y: torch.hypot(x, y), lambda: (t([0.0, 3.0]), t([0.0, 4.0]))),
    "sqrt_zero": Case(lambda x: x.sqrt(), lambda: (t([0.0, 4.0]),)),
    "pow_scalar_exponents_at_zero": Case(
        lambda x: torch.stack([x ** 2, x ** 0.5, x ** 0, x ** -1, x ** 1.5, x ** 3, x ** -0.5, x ** 1, x ** 2.5,
                               x ** -2]),
        lambda: (t([0.0, 1.0]),)),
    "pow_tensor_tensor_at_zero": Case(lambda x, y: torch.pow(x, y),
                                      lambda: (t([0.0, 0.0, 0.0, 0.0, 2.0, -1.0]), t([2.0, 0.0, -1.0, 0.5, 0.0, 2.0]))),
    "pow_scalar_base_zero": Case(lambda y: torch.pow(0.0, y), lambda: (t([2.0, 0.0, -1.0]),)),
    "sinc_zero": Case(lambda x: torch.sinc(x), lambda: (t([0.0, 1.0, -0.5]),)),
    # the pole at 0: -inf at +0.0, inf at -0.0 (XLA's digamma is NaN there), slope inf. rtol: torch's
    # trigamma(1.5) is 4.6e-10 off pi^2/2 - 4, reftrace's is not
    "digamma_at_the_pole": Case(lambda x: (torch.digamma(x), torch.polygamma(0, x)), lambda: (t([0.0, -0.0, 1.5]),),
                                rtol=1e-9),
    # d/dx at x == 0 is log(y) (torch's decomposition selects 0 and would give 0); d/dy at (0, 0) below
    "xlogy_x_zero": Case(lambda x, y: torch.xlogy(x, y),
                         lambda: (t([0.0, 0.0, 0.0, 1.0, 2.0, nan, 0.0]), t([2.0, 0.5, -1.0, 0.0, 3.0, 1.0, nan]))),
    "xlogy_origin_y_fixed": Case(lambda x, y: torch.xlogy(x, y), lambda: (t([0.0, 0.0]), t([0.0, 0.5], grad=False))),
    # a zero cotangent where log(y) is -inf (a loss masking its non-finite terms): torch's slope xlogy(g, y) is 0
    "xlogy_masked_minus_inf": Case(lambda x, y: torch.where(torch.isfinite(v := torch.xlogy(x, y)), v, 0.0),
                                   lambda: (t([2.0, 1.0, 0.0]), t([0.0, 3.0, 0.0], grad=False))),
    "xlog1py_masked_minus_inf": Case(
        lambda x, y: torch.where(torch.isfinite(v := torch.special.xlog1py(x, y)), v, 0.0),
        lambda: (t([2.0, 1.0, 0.0, 0.0]), t([-1.0, 3.0, -1.0, 0.5], grad=False))),
    "entr_at_zero": Case(lambda x: torch.special.entr(x), lambda: (t([0.0, 0.5, 1.0, 2.0]),)),
    "logaddexp_ties": Case(lambda x, y: torch.logaddexp(x, y), lambda: (t([1.0, -inf]), t([1.0, -inf]))),
    "where": Case(lambda x, y: torch.where(x > y, x, y), lambda: (t([1.0, 2.0, 3.0]), t([1.0, 3.0, 2.0]))),
    "where_condition_only": Case(lambda x, y: torch.where(y > 0, x, 0.0), lambda: (t([1.0, 2.0]), t([0.0, 1.0]))),
    "masked_fill": Case(lambda x: x.masked_fill(x == 0, 1.0), lambda: (t([0.0, 1.0]),)),
    # losses at their kinks
    "binary_cross_entropy_saturated": Case(lambda p, t: F.binary_cross_entropy(p, t, reduction="none"),
                                           lambda: (t([0.0, 1.0, 0.0, 1.0, 0.3]), t([1.0, 0.0, 0.0, 1.0, 0.5]))),
    "binary_cross_entropy_of_a_saturated_sigmoid": Case(lambda z, t: F.binary_cross_entropy(torch.sigmoid(z), t),
                                                         lambda: (t([-800.0, 0.3, 800.0]), t([1.0, 1.0, 0.0]))),
    # no target counts: the mean is 0/0 (NaN) and eager's gradient 0 (ATen skips ignored rows)
    "cross_entropy_all_ignored": Case(lambda x: F.cross_entropy(x, torch.tensor([-100, -100])),
                                      lambda: (t([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]]),)),
    "cross_entropy_all_ignored_smoothed": Case(
        lambda x: F.cross_entropy(x, torch.tensor([-100, -100]), label_smoothing=0.1),
        lambda: (t([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]]),)),
    "nll_loss_ignored_row_at_minus_inf": Case(lambda x: F.nll_loss(x, torch.tensor([-100, 1])),
                                              lambda: (t([[-inf, 0.0, 1.0], [0.5, 0.2, 0.1]]),)),
    "l1_loss_zero": Case(lambda x, y: F.l1_loss(x, y), lambda: (t([1.0, 2.0]), t([1.0, 3.0]))),
    "smooth_l1_at_beta": Case(lambda x, y: F.smooth_l1_loss(x, y, beta=0.5, reduction="none"),
                              lambda: (t([0.5, -0.5, 0.0, 1.0]), t([0.0, 0.0, 0.0, 0.0]))),
    "smooth_l1_beta_zero": Case(lambda x, y: F.smooth_l1_loss(x, y, beta=0.0, reduction="none"),
                                lambda: (t([0.0, 1.0]), t([0.0, 0.0]))),
    "huber_at_delta": Case(lambda x, y: F.huber_loss(x, y, delta=0.5, reduction="none"),
                           lambda: (t([0.5, -0.5, 0.0, 1.0]), t([0.0, 0.0, 0.0, 0.0]))),
    # a term masked out downstream (a missing label stored as NaN, an infinite residual): eager's slope at the
    # masked position is 0 for these (abs's sgn(NaN) is 0; the quadratic sides are not evaluated there)
    "l1_masked_nan_target": Case(lambda x, y: torch.where(y.isnan(), 0.0, F.l1_loss(x, y, reduction="none")),
                                 lambda: (t([1.0, 2.0, 3.0]), t([0.5, nan, 4.0], grad=False))),
    "abs_at_nan_and_inf": Case(lambda x: torch.where(torch.isfinite(x), x.abs(), 0.0), lambda: (t([nan, inf, -inf, -2.0]),)),
    "smooth_l1_masked_infinite": Case(
        lambda x, y: torch.where(torch.isfinite(x - y), F.smooth_l1_loss(x, y, reduction="none"), 0.0),
        lambda: (t([inf, -inf, 0.5, 3.0, nan]), t([0.0, 0.0, 0.0, 0.0, 0.0]))),
    "huber_masked_infinite": Case(
        lambda x, y: torch.where(torch.isfinite(x - y), F.huber_loss(x, y, reduction="none", delta=0.5), 0.0),
        lambda: (t([inf, -inf, 0.25, 3.0, nan]), t([0.0, 0.0, 0.0, 0.0, 0.0]))),
    "smooth_l1_nan": Case(lambda x, y: F.smooth_l1_loss(x, y, reduction="none"), lambda: (t([nan, 1.0]), t([0.0, nan]))),
    "acosh_masked_below_one": Case(lambda x: torch.where(x >= 1, torch.acosh(x), 0.0),
                                   lambda: (t([-inf, -2.5, 1.0, 2.0]),)),
    "celu_masked_non_finite": Case(lambda x: torch.where(torch.isfinite(x), F.celu(x, 0.5), 0.0),
                                   lambda: (t([nan, inf, -inf, -1.0, 0.0, 2.0]),)),
    "hinge_embedding_at_margin": Case(lambda x: F.hinge_embedding_loss(x, torch.tensor([-1.0, -1.0, 1.0], dtype=f64)),
                                      lambda: (t([1.0, 0.5, 2.0]),)),
    "margin_ranking_at_margin": Case(
        lambda x, y: F.margin_ranking_loss(x, y, torch.ones(2, dtype=f64), reduction="none"),
        lambda: (t([1.0, 1.0]), t([1.0, 0.0]))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_eager(name: str) -> None:
    case = CASES[name]
    compare(case.fn, *case.inputs(), rtol=case.rtol)


# The JAX backend agrees: NaN in argmax, max and comparisons, signed zeros in atan2, ignored targets (one XLA
# compile each).
THROUGH_XLA = ["clamp_tensor_nan", "maximum", "max_all_nan", "max_dim_nan", "max_pool2d_nan", "median_all_nan",
               "cummax", "atan2_origin", "cdist_inf_ties", "pow_tensor_tensor_at_zero", "hardswish", "elu",
               "cross_entropy_all_ignored", "cross_entropy_all_ignored_smoothed", "nll_loss_ignored_row_at_minus_inf",
               "digamma_at_the_pole", "l1_masked_nan_target", "smooth_l1_masked_infinite", "celu_masked_non_finite"]


@pytest.mark.parametrize("name", THROUGH_XLA)
def test_matches_eager_through_xla(name: str) -> None:
    case = CASES[name]
    compare(case.fn, *case.inputs(), rtol=max(case.rtol, 1e-12), atol=1e-13, compiler=xla_compile)


# ----------------------------------------------------------------------------- selections among ties

SELECTIONS = {
    "topk": lambda x: torch.topk(x, 3, 1),
    "topk_smallest": lambda x: torch.topk(x, 2, 1, largest=False),
    "kthvalue": lambda x: torch.kthvalue(x, 2, 1),
    "median_dim": lambda x: x.median(1),
    "nanmedian_dim": lambda x: x.nanmedian(1),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_selection_ties_send_the_gradient_to_the_returned_index(name: str) -> None:
    """Among tied values, which index torch's CPU selection returns (quickselect, ``std::nth_element``,
    ``std::partial_sort``) is an accident of its algorithm; reftrace returns the stable sort's choice.
    The values are eager's, the index holds that value, and the whole gradient goes to it (torch's
    backward for these ops, applied to reftrace's index)."""
    fn = SELECTIONS[name]
    x = t(TIED_ROWS + [[3.0, nan, 3.0, 1.0, 1.0]])
    values, index = aot_function(fn, nop)(x)
    want_values, _ = fn(x.detach())
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)
    dim_index = index if index.ndim == 2 else index.unsqueeze(1)
    torch.testing.assert_close(x.detach().gather(1, dim_index).reshape(values.shape), values.detach(), rtol=0, atol=0,
                               equal_nan=True)
    ct = cotangent_like(values)
    (grad,) = torch.autograd.grad(values, x, ct)
    expected = torch.zeros_like(x).scatter_add(1, dim_index, ct.reshape(dim_index.shape))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- documented differences

def test_fmax_with_one_nan_operand_sends_the_gradient_to_the_other():
    """Eager also gives the NaN operand the whole gradient although the result does not depend on it;
    a value-exact composition of primitives cannot (docs/autodiff.md)."""
    x, y = t([nan, 1.0, nan]), t([2.0, nan, nan])
    out = aot_function(torch.fmax, nop)(x, y)
    torch.testing.assert_close(out, torch.fmax(x.detach(), y.detach()), equal_nan=True)
    gx, gy = torch.autograd.grad(out, (x, y), torch.tensor([1.0, 2.0, 3.0], dtype=f64))
    assert gx.tolist() == [0.0, 2.0, 3.0] and gy.tolist() == [1.0, 0.0, 3.0]


def test_xlogy_at_the_origin_gives_y_no_gradient():
    """Eager's slope in ``y`` is ``x / y``, ``0/0`` at ``x == y == 0``; reftrace's VJP rule gives 0 there."""
    x, y = t([0.0, 0.0]), t([0.0, 2.0])
    out = aot_function(torch.xlogy, nop)(x, y)
    gx, gy = torch.autograd.grad(out, (x, y), torch.ones(2, dtype=f64))
    assert out.tolist() == [0.0, 0.0] and gy.tolist() == [0.0, 0.0]
    assert gx.tolist() == [0.0, math.log(2.0)]


def test_amax_of_a_slice_with_nan_splits_the_gradient_among_the_nans():
    """Eager's amax backward compares ``x == result`` (false at NaN) and divides by a zero count, so a
    NaN slice gets NaN gradients everywhere; reftrace splits it among the NaNs, as eager's ``max()``."""
    x = t([[1.0, nan, nan], [1.0, 2.0, 2.0]])
    out = aot_function(lambda v: v.amax(1), nop)(x)
    (grad,) = torch.autograd.grad(out, x, torch.tensor([2.0, 4.0], dtype=f64))
    assert grad.tolist() == [[0.0, 1.0, 1.0], [0.0, 2.0, 2.0]]


# ----------------------------------------------------------------------------- second order

SECOND_ORDER = {
    "hardswish": (F.hardswish, lambda: (t(EDGES),)),
    "relu6_squared": (lambda x: F.relu6(x) ** 2, lambda: (t(EDGES),)),
    "clamp_tensor_squared": (lambda x, lo, hi: torch.clamp(x, lo, hi) ** 2,
                             lambda: (t([-2.0, -1.0, 0.0, 1.0, 2.0]), t([-1.0] * 5), t([1.0] * 5))),
    "max_dim_squared": (lambda x: x.max(1)[0] ** 2, lambda: (t([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]),)),
    "max_pool2d_squared": (lambda x: F.max_pool2d(x, 2, 1) ** 2,
                           lambda: (t([[[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]]]),)),
    "median_squared": (lambda x: x.median() ** 2, lambda: (t([2.0, 1.0, 2.0, 1.0, 2.0, 2.0]),)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_at_ties_match_eager(name: str) -> None:
    """Double backward (``create_graph=True``) through the tie-breaking constructions equals eager's."""
    fn, make_inputs = SECOND_ORDER[name]
    results = []
    for f in (fn, aot_function(fn, nop)):
        xs = _copies(make_inputs())
        out = f(*xs)
        grads = torch.autograd.grad(out, xs, cotangent_like(out), create_graph=True)
        weighted = sum((g * torch.linspace(0.5, 2.0, g.numel(), dtype=f64).reshape(g.shape)).sum() for g in grads)
        results.append(torch.autograd.grad(weighted, xs, allow_unused=True, materialize_grads=True))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
