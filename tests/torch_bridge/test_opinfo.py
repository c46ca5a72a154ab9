"""A representative slice of torch's OpInfo database through reftrace (the full sweep is
``python -m reftrace.tools.opinfo``; its results are docs/coverage.md).

Each op runs on its first OpInfo samples eagerly and through ``aot_function(fn, nop)``, with
the same checker as the tool: values and gradients must match eager (or the op must raise a
ReftraceError where it is documented as unsupported).
"""
from __future__ import annotations

import pytest
import torch

from reftrace.tools import opinfo

SAMPLES = 3

SUPPORTED = [
    # elementwise
    "add", "mul", "div.no_rounding_mode", "pow", "exp", "log1p", "sigmoid", "atan2", "where", "clamp",
    "polygamma.polygamma_n_2", "special.i0e", "special.log_ndtr", "nextafter",
    # reductions and scans
    "sum", "prod", "amax", "var", "logsumexp", "cumsum", "cummax", "linalg.vector_norm",
    "linalg.norm.subgradients_at_zero",
    # views and indexing
    "reshape", "permute", "cat", "gather", "scatter_reduce.amax", "index_fill", "take", "masked_scatter",
    # linear algebra
    "addmm", "bmm", "linalg.solve", "linalg.cholesky", "linalg.eigh", "linalg.svd", "linalg.det", "linalg.qr",
    "linalg.pinv.singular", "linalg.lu", "matrix_exp",
    # nn.functional
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.layer_norm", "nn.functional.group_norm",
    "softmax", "nn.functional.cross_entropy", "nn.functional.cosine_similarity", "nn.functional.gelu",
    "nn.functional.embedding", "nn.functional.ctc_loss",
    # the sort family
    "sort", "topk", "kthvalue", "median", "nanmedian", "mode",
]

# Documented as unsupported (docs/coverage.md): the output shape depends on the values.
UNSUPPORTED = ["masked_select", "linalg.lstsq"]

# Ops with kinks, ties or bounds, checked on samples rounded to a grid of halves (``opinfo.on_grid``): repeated
# values and values on the kinks, where the subgradient must be eager's too. Selections whose tied index is an
# accident of torch's algorithm (topk, kthvalue, median with dim) are in tests/torch_bridge/test_subgradients.py.
AT_TIES = ["clamp", "clamp_min", "maximum", "fmax", "max.reduction_with_dim", "max.reduction_no_dim", "amax",
           "nn.functional.relu6", "nn.functional.hardtanh", "nn.functional.hardswish", "nn.functional.leaky_relu",
           "nn.functional.max_pool2d", "nn.functional.adaptive_max_pool2d", "mode", "cummax", "linalg.vector_norm",
           "dist", "cdist", "nn.functional.pdist", "atan2", "std", "pow", "xlogy", "sinc"]

_OPS = {opinfo.variant_name(op): op for op in opinfo.find_ops(SUPPORTED + UNSUPPORTED + AT_TIES)}


@pytest.mark.parametrize("name", SUPPORTED)
def test_matches_eager(name):
    result = opinfo.check_op(_OPS[name], "nop", limit_samples=SAMPLES, time_limit=60)
    assert result.samples > 0, result
    assert result.status in (opinfo.PASS, opinfo.RANDOM, opinfo.EAGER_GRAD_WRONG), result


@pytest.mark.parametrize("name", AT_TIES)
def test_matches_eager_at_ties(name):
    result = opinfo.check_op(_OPS[name], "nop", limit_samples=SAMPLES, time_limit=60, ties=True)
    assert result.samples > 0, result
    assert result.status == opinfo.PASS, result  # no "eager grad wrong": finite differences are moot at kinks


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_ops_say_so(name):
    result = opinfo.check_op(_OPS[name], "nop", limit_samples=SAMPLES, time_limit=60)
    assert result.status == opinfo.UNSUPPORTED, result
    assert "data-dependent" in result.message


def test_the_checker_catches_a_wrong_gradient():
    """A deliberately wrong ATen row is reported as a wrong gradient, not as a pass."""
    from reftrace import lax
    from reftrace.torch_bridge.aten import aten_rules

    op = _OPS["sigmoid"]
    row = aten_rules[torch.ops.aten.sigmoid.default]
    try:  # sigmoid's value, but the gradient of a different function
        aten_rules[torch.ops.aten.sigmoid.default] = lambda x: lax.add(
            lax.stop_gradient(lax.logistic(x)), lax.sub(lax.mul(x, x), lax.stop_gradient(lax.mul(x, x))))
        result = opinfo.check_op(op, "nop", limit_samples=1)
    finally:
        aten_rules[torch.ops.aten.sigmoid.default] = row
    assert result.status == opinfo.WRONG_GRAD, result


def test_in_place_ops_under_no_grad_pass_the_gradient_through():
    """torch does not record in-place ops under no_grad: the mutated tensor's gradient flows to its old value."""
    from reftrace.compile import aot_function, nop

    def f(x):
        y = x * 3
        with torch.no_grad():
            y.clamp_(min=0.5)
            y[1:].mul_(2.0)
        return y * x

    x = torch.tensor([0.1, 1.0, -2.0, 0.4], dtype=torch.float64, requires_grad=True)
    eager, compiled = f(x), aot_function(f, nop)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(compiled.sum(), x)[0], torch.autograd.grad(eager.sum(), x)[0])


@pytest.mark.parametrize("reduction,probabilities", [("mean", False), ("sum", False), ("mean", True)])
def test_fused_linear_cross_entropy_returns_torchs_precomputed_gradients(reduction, probabilities):
    """torch's chunked linear_cross_entropy op also returns the gradients its backward rescales: reftrace's
    row computes them too (callers of the op may read them), and they must be torch's."""
    from reftrace.compile import aot_function, nop

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 4), (5, 4), (5,)))
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    if probabilities:
        target = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    else:
        target = torch.tensor([0, 3, -100, 4, 1, 3])

    def op(x, w, target, b, weight):
        return torch.ops.torch_nn._linear_cross_entropy_batch_chunked(
            x, w, target, b, weight, reduction, -100, 0.0, 4, "compact", torch.float64, False, True, True, True)

    eager = op(x, w, target, b, weight)
    compiled = aot_function(op, nop)(x, w, target, b, weight)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
