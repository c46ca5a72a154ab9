"""Composite primitives (``reftrace.nn``): each fused lowering equals the decomposition, each VJP rule
equals the decomposition's gradient (and JAX's, and finite differences), to second order.

The decomposition is the meaning; the fused torch rows (ATen kernels), the JAX rows and the
composite backward equations must agree with it at every shape and parameter drawn.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
from reftrace import lax
from reftrace.composite import decompose, is_composite
from reftrace.nn import activations as A
from reftrace.nn import norms as N
from reftrace.transforms.vjp import vjp
from tests.transforms.test_vjp import check_gradients, random_cotangents

Case = tuple[str, Callable[..., Any], list[np.ndarray]]


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _affine_args(rng, n_features: tuple[int, ...], has_weight: bool, has_bias: bool, dtype) -> list[np.ndarray]:
    return ([_normal(rng, n_features, dtype)] if has_weight else []) + \
           ([_normal(rng, n_features, dtype)] if has_bias else [])


def _split_affine(affine: tuple[Any, ...], has_weight: bool) -> tuple[Any, Any]:
    """(weight, bias) from the operands present, None for the absent ones."""
    if has_weight:
        return affine[0], affine[1] if len(affine) > 1 else None
    return None, affine[0] if affine else None


@st.composite
def convolution_cases(draw: st.DrawFn, rng: np.random.Generator, dtype: Any) -> Case:
    """torch convolutions with 1-3 spatial dims, strides, padding, dilation, groups, with and without bias."""
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    stride = [draw(st.integers(1, 2)) for _ in range(n)]
    dilation = [draw(st.integers(1, 2)) for _ in range(n)]
    padding = [draw(st.integers(0, 2)) for _ in range(n)]
    size = [(k - 1) * d + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation)]
    has_bias = draw(st.booleans())
    args = [_normal(rng, (draw(st.integers(1, 2)), cin, *size), dtype),
            _normal(rng, (cout, cin // groups, *kernel), dtype)] + ([_normal(rng, (cout,), dtype)] if has_bias else [])

    def convolution(x, w, *bias):
        return rt.nn.convolution(x, w, *bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (f"convolution(stride={stride}, padding={padding}, dilation={dilation}, groups={groups}, "
            f"bias={has_bias}) {args[0].shape} * {args[1].shape}", convolution, args)


@st.composite
def max_pool_cases(draw: st.DrawFn, rng: np.random.Generator, dtype: Any) -> Case:
    """torch's max pools (2 or 3 spatial dims, batched or not) with padding, dilation, ceil_mode,
    and ties: the whole gradient goes to the first maximum of each window, as torch's kernel."""
    n = draw(st.integers(2, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    stride = [draw(st.integers(1, 2)) for _ in range(n)]
    dilation = [draw(st.integers(1, 2)) for _ in range(n)]
    padding = [draw(st.integers(0, k // 2)) for k in kernel]
    size = [(k - 1) * d + 1 + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation)]
    ceil_mode = draw(st.booleans())
    lead = (2, 2) if draw(st.booleans()) else (2,)
    x = _normal(rng, (*lead, *size), dtype)
    x.reshape(-1)[:3] = 0.5  # ties
    pool = torch.nn.functional.max_pool2d if n == 2 else torch.nn.functional.max_pool3d
    out_spatial = tuple(pool(torch.from_numpy(x), kernel, stride, padding, dilation, ceil_mode).shape[-n:])

    def max_pool(x):
        return rt.nn.max_pool(x, kernel, stride, padding, dilation, ceil_mode, out_spatial)
    return (f"max_pool(kernel={kernel}, stride={stride}, padding={padding}, dilation={dilation}, "
            f"ceil_mode={ceil_mode}) {x.shape}", max_pool, [x])


@st.composite
def ctc_cases(draw: st.DrawFn, rng: np.random.Generator, dtype: Any) -> Case:
    """CTC losses: padded targets with repeats, empty targets, sequences shorter than the padding; an
    impossible alignment (more labels than frames) only with ``zero_infinity``, whose NaN slope torch's
    kernel spreads over every class and the decomposition over the sequence's own."""
    steps, n, classes, width = (draw(st.integers(lo, hi)) for lo, hi in ((1, 6), (1, 3), (2, 5), (0, 3)))
    blank, zero_infinity = draw(st.integers(0, classes - 1)), draw(st.booleans())
    targets = (blank + rng.integers(1, classes, (n, width))) % classes
    if width > 1:
        targets[0, 1] = targets[0, 0]  # a repeat: a blank must pass between them
    target_lengths = rng.integers(0, width + 1, n)
    input_lengths = rng.integers(1, steps + 1, n)
    if not zero_infinity:
        target_lengths = np.minimum(target_lengths, (input_lengths - 1) // 2)
    x = _normal(rng, (steps, n, classes), dtype)
    lp = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(dtype)
    fn = lambda *a: rt.nn.ctc_loss(*a, blank=blank, zero_infinity=zero_infinity)  # noqa: E731
    return (f"ctc_loss(blank={blank}, zero_infinity={zero_infinity}) {lp.shape} targets {targets.shape} "
            f"lengths {input_lengths} {target_lengths}", fn, [lp, targets, input_lengths, target_lengths])


@st.composite
def lstm_cases(draw: st.DrawFn, rng: np.random.Generator, dtype: Any) -> Case:
    """One LSTM layer, either direction, down to one step (and zero steps)."""
    steps, batch, features, hidden = (draw(st.integers(lo, hi)) for lo, hi in ((0, 5), (1, 3), (1, 3), (1, 3)))
    reverse = draw(st.booleans())
    shapes = [(steps, batch, features), (batch, hidden), (batch, hidden), (4 * hidden, features), (4 * hidden, hidden),
              (4 * hidden,), (4 * hidden,)]
    fn = lambda *a: rt.nn.lstm_layer(*a, reverse=reverse)  # noqa: E731
    return f"lstm_layer(reverse={reverse}) {shapes[0]} hidden {hidden}", fn, [_normal(rng, s, dtype) for s in shapes]


@st.composite
def forward_cases(draw: st.DrawFn, dtype: Any = np.float64) -> Case:
    """A forward composite at a drawn shape and drawn parameters, with its operands."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["gelu", "silu", "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm_train",
                                 "batch_norm_eval", "attention", "linear", "embedding",
                                 "nll_loss", "relu", "convolution", "max_pool", "xlogy", "binary_cross_entropy",
                                 "vector_norm", "ctc_loss", "lstm_layer"]))
    if kind == "ctc_loss":
        return draw(ctc_cases(rng, dtype))
    if kind == "lstm_layer":
        return draw(lstm_cases(rng, dtype))
    if kind == "attention":
        return draw(attention_cases(rng, dtype))
    if kind == "embedding":
        num, features = draw(st.integers(1, 6)), draw(st.integers(1, 4))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        indices = rng.integers(0, num, shape)
        padding_idx = draw(st.sampled_from([-1, 0, num - 1]))
        by_freq = draw(st.booleans())
        fn = lambda w, i: rt.nn.embedding(w, i, padding_idx, by_freq)  # noqa: E731
        return (f"embedding(padding_idx={padding_idx}, scale_grad_by_freq={by_freq}) {num}x{features}[{shape}]",
                fn, [_normal(rng, (num, features), dtype), indices])
    if kind == "nll_loss":
        classes, rows = draw(st.integers(1, 5)), draw(st.sampled_from([None, 1, 4]))
        logp = _normal(rng, (classes,) if rows is None else (rows, classes), dtype)
        target = rng.integers(0, classes, () if rows is None else (rows,))
        if rows and rows > 1:
            target[0] = -100  # ignored
        reduction, weighted = draw(st.sampled_from(["none", "mean", "sum"])), draw(st.booleans())
        args = [logp, target] + ([rng.uniform(0.1, 2, classes).astype(dtype)] if weighted else [])
        fn = lambda x, t, *w: rt.nn.nll_loss(x, t, *w, reduction=reduction)  # noqa: E731
        return f"nll_loss({reduction}, weighted={weighted}) {logp.shape}", fn, args
    if kind == "convolution":
        return draw(convolution_cases(rng, dtype))
    if kind == "max_pool":
        return draw(max_pool_cases(rng, dtype))
    if kind == "vector_norm":
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
        order = draw(st.sampled_from([2.0, 1.0, 3.0, 1.5, 0.5, np.inf, -np.inf, 0.0, -1.0]))
        x = _normal(rng, shape, dtype)
        fn = lambda x: rt.nn.vector_norm(x, order, axes)  # noqa: E731
        return f"vector_norm(ord={order}, axes={axes}) {shape}", fn, [x]
    if kind == "linear":
        m, k, n = (draw(st.integers(1, 6)) for _ in range(3))
        args = [_normal(rng, (m, k), dtype), _normal(rng, (k, n), dtype), _normal(rng, (n,), dtype)]
        return f"linear {m}x{k}x{n}", rt.nn.linear, args
    rank = draw(st.integers(1 if kind in ("gelu", "silu", "softmax", "log_softmax") else 2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    x = _normal(rng, shape, dtype) * 2
    if kind == "relu":
        x.flat[0] = 0.0  # the tie: slope 0 there, as torch's
        return f"relu {shape}", rt.nn.relu, [x]
    if kind == "binary_cross_entropy":  # probabilities inside (0, 1): at 0 and 1 only torch's rule is finite
        p, t = rng.uniform(0.05, 0.95, shape).astype(dtype), rng.uniform(0, 1, shape).astype(dtype)
        reduction, weighted = draw(st.sampled_from(["none", "mean", "sum"])), draw(st.booleans())
        fn = lambda p, t, *w: rt.nn.binary_cross_entropy(p, t, *w, reduction=reduction)  # noqa: E731
        return (f"binary_cross_entropy({reduction}, weighted={weighted}) {shape}", fn,
                [p, t] + ([rng.uniform(0.5, 2, shape).astype(dtype)] if weighted else []))
    if kind == "xlogy":  # with zeros in both operands (y < 0: NaN, as torch's)
        y = np.abs(_normal(rng, shape, dtype)) if draw(st.booleans()) else _normal(rng, shape, dtype)
        x.flat[0], y.flat[-1] = 0.0, 0.0
        return f"xlogy {shape}", rt.nn.xlogy, [x, y]
    if kind == "silu":
        return f"silu {shape}", rt.nn.silu, [x]
    if kind == "gelu":
        approximate = draw(st.sampled_from(["none", "tanh"]))
        return f"gelu({approximate}) {shape}", lambda x: rt.nn.gelu(x, approximate), [x]
    if kind in ("softmax", "log_softmax"):
        axis = draw(st.integers(0, rank - 1))
        fn = rt.nn.softmax if kind == "softmax" else rt.nn.log_softmax
        return f"{kind}(axis={axis}) {shape}", lambda x: fn(x, axis), [x]
    has_weight, has_bias = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    if kind == "layer_norm":
        k = draw(st.integers(1, rank))
        if np.dtype(dtype) == np.float32 and int(np.prod(shape[rank - k:])) == 1:
            # one element per group: rstd = eps**-0.5 amplifies float32 rounding in the kernel's dx
            # (eager's own value) to ~1e-5 where the decomposition cancels exactly to 0
            x = np.concatenate([x, x * 0.5 + 1], axis=rank - 1)
            shape = x.shape
        affine = _affine_args(rng, shape[rank - k:], has_weight, has_bias, dtype)

        def layer_norm(x, *affine):
            w, b = _split_affine(affine, has_weight)
            return rt.nn.layer_norm(x, w, b, normalized_ndim=k, eps=eps)
        return f"layer_norm(k={k}, w={has_weight}, b={has_bias}) {shape}", layer_norm, [x, *affine]
    if kind == "group_norm":
        groups = draw(st.sampled_from([g for g in range(1, shape[1] + 1) if shape[1] % g == 0]))
        if int(np.prod(shape[2:])) * shape[1] // groups < 2:  # one value per group: rstd = eps**-0.5
            x = np.concatenate([x, x * 0.5 + 1], axis=1)
            shape = x.shape
        affine = _affine_args(rng, (shape[1],), has_weight, has_bias, dtype)

        def group_norm(x, *affine):
            w, b = _split_affine(affine, has_weight)
            return rt.nn.group_norm(x, w, b, groups=groups, eps=eps)
        return f"group_norm(groups={groups}, w={has_weight}, b={has_bias}) {shape}", group_norm, [x, *affine]
    channels = (shape[1],)
    affine = _affine_args(rng, channels, has_weight, has_bias, dtype)
    if kind == "batch_norm_eval":
        stats = [_normal(rng, channels, dtype), rng.uniform(0.5, 2.0, channels).astype(dtype)]

        def batch_norm_eval(x, rm, rv, *affine):
            w, b = _split_affine(affine, has_weight)
            return rt.nn.batch_norm_eval(x, rm, rv, w, b, eps=eps)
        return f"batch_norm_eval(w={has_weight}, b={has_bias}) {shape}", batch_norm_eval, [x, *stats, *affine]
    if int(np.prod(shape)) // shape[1] < 2:  # one value per channel: the variance is 0 and rstd = eps**-0.5
        x = np.concatenate([x, x * 0.5 + 1], axis=0)
    running = draw(st.booleans())
    stats = [_normal(rng, channels, dtype), rng.uniform(0.5, 2.0, channels).astype(dtype)] if running else []

    def batch_norm_train(x, *rest):
        affine, stats = rest[:has_weight + has_bias], rest[has_weight + has_bias:]
        w, b = _split_affine(affine, has_weight)
        return rt.nn.batch_norm_train(x, w, b, *(stats or (None, None)), momentum=0.1, eps=eps)
    return (f"batch_norm_train(w={has_weight}, b={has_bias}, running={running}) {x.shape}", batch_norm_train,
            [x, *affine, *stats])


@st.composite
def attention_cases(draw: st.DrawFn, rng: np.random.Generator, dtype: Any) -> Case:
    b, h, length, source, e, ev = (draw(st.integers(1, n)) for n in (2, 3, 5, 5, 4, 4))
    q, k, v = (_normal(rng, s, dtype) for s in ((b, h, length, e), (b, h, source, e), (b, h, source, ev)))
    causal, masked = draw(st.booleans()), draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3]))
    args = [q, k, v]
    if masked:
        mask = _normal(rng, (b, h, length, source), dtype)
        mask[..., 0, :] = -np.inf  # a row that attends to nothing
        args.append(mask)
    fn = lambda *a: rt.nn.dot_product_attention(*a[:3], *a[3:], causal=causal, scale=scale)  # noqa: E731
    return f"attention(causal={causal}, mask={masked}, scale={scale}) {q.shape} {v.shape}", fn, args


def _outputs(fn: Callable[..., Any]) -> Callable[..., tuple[Any, ...]]:
    def wrapped(*args: Any) -> tuple[Any, ...]:
        out = fn(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return wrapped


def _run(graph: rt.Graph, backend: str, args: list[np.ndarray]) -> list[np.ndarray]:
    outs = rt.lower(graph, backend)(*args)
    return [np.asarray(o.detach().numpy() if isinstance(o, torch.Tensor) else o) for o in outs]


def _assert_all_close(got: list[np.ndarray], want: list[np.ndarray], what: str, rtol: float, atol: float) -> None:
    assert len(got) == len(want), what
    for j, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, j, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what}: output {j}")


def _composites_in(graph: rt.Graph) -> set[str]:
    return {e.primitive.name for e in graph.eqns if is_composite(e.primitive)}


@given(forward_cases())
def test_fused_lowerings_and_vjp_rules_match_the_decomposition(case):
    """float64: torch's ATen kernels and the JAX rows compute the decomposition, and the joint graph
    built with the composite VJP rules (composite backward equations, lowered to ATen backward
    kernels) computes the decomposition's joint graph."""
    label, fn, args = case
    graph = rt.trace(_outputs(fn), *args)
    assert _composites_in(graph), label
    plain = decompose(graph)
    assert not _composites_in(plain), label
    want = _run(plain, "jax", args)
    _assert_all_close(_run(graph, "torch", args), want, f"{label}, torch kernels", 1e-10, 1e-12)
    _assert_all_close(_run(graph, "jax", args), want, f"{label}, jax rows", 1e-10, 1e-12)

    # the data output's cotangent alone takes the fused backward equation; cotangents on the saved
    # statistics (the norms' later outputs) too take the decomposition's
    statistics = tuple(range(1, len(graph.outputs)))
    for skip in (statistics, ()):
        cts = random_cotangents(graph, np.random.default_rng(1), skip)
        joint = vjp(graph, nondiff_outputs=skip)
        # linear's VJP is two dots; xlogy's is xlogy again; vector_norm's is torch's formula in plain ops
        if (skip or len(graph.outputs) == 1) and not label.startswith(("linear", "xlogy", "vector_norm")):
            assert _composites_in(joint) - _composites_in(graph), f"{label}: no composite backward equation"
        want = _run(vjp(plain, nondiff_outputs=skip), "jax", [*args, *cts])
        _assert_all_close(_run(joint, "torch", [*args, *cts]), want, f"{label}, fused joint", 1e-9, 1e-11)
        _assert_all_close(_run(joint, "jax", [*args, *cts]), want, f"{label}, jax joint", 1e-9, 1e-11)


@given(forward_cases(dtype=np.float32))
def test_fused_lowerings_in_float32(case):
    """float32: the fused joint (ATen kernels) against the decomposition's joint run in float64 on the
    same values. A float32 result can miss by its rounding times the size of the terms it cancels: a
    layer norm over two values cancels almost all of its input gradient, and ATen's own float32 kernel
    (what eager runs) then misses by 0.4% (found by the deep profile). So each output may also miss by
    four times the decomposition's own float32 error, and by 64 float32 roundings of the largest value
    the float64 joint computes along the way. Wiring errors (a wrong operand, flag or epsilon) are the
    float64 test's to catch, at 1e-10."""
    label, fn, args = case
    graph = rt.trace(_outputs(fn), *args)
    skip = tuple(range(1, len(graph.outputs)))
    cts = random_cotangents(graph, np.random.default_rng(2), skip)
    joint = vjp(graph, nondiff_outputs=skip)
    in_float32 = _run(vjp(decompose(graph), nondiff_outputs=skip), "jax", [*args, *cts])
    wide = [a.astype(np.float64) if a.dtype == np.float32 else a for a in [*args, *cts]]
    graph64 = rt.trace(_outputs(fn), *wide[:len(args)])
    joint64 = vjp(decompose(graph64), nondiff_outputs=skip)
    exact = _run(joint64, "jax", wide)
    intermediates = [v for e in joint64.eqns for v in e.outputs if v.aval.dtype == np.float64]
    largest = max((_finite_max(np.abs(a)) for a in _run(dataclasses.replace(joint64, outputs=tuple(intermediates),
                                                                            output_names=None, joint=None),
                                                        "jax", wide)), default=0.0)
    got = _run(joint, "torch", [*args, *cts])
    assert len(got) == len(exact), label
    for j, (g, e, d) in enumerate(zip(got, exact, in_float32)):
        assert g.shape == e.shape and g.dtype == d.dtype, (label, j)
        with np.errstate(invalid="ignore"):  # inf - inf: a masked-out row
            own_error = _finite_max(np.abs(d.astype(np.float64) - e))
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5 + 4 * own_error + 64 * 2.0**-23 * largest,
                                   err_msg=f"{label}, float32: output {j}")


def _finite_max(miss: np.ndarray) -> float:
    """The largest finite difference (inf - inf is NaN: a masked-out row)."""
    return float(np.max(miss[np.isfinite(miss)], initial=0.0))


@pytest.mark.parametrize("seed", range(8))
def test_gradients_against_jax_and_finite_differences(seed):
    """JAX differentiates the JAX lowering (jax.nn.gelu/softmax, the norms' lax chains) on its own."""
    label, fn, args = _fixed_case(seed)
    graph = rt.trace(_outputs(fn), *args)
    check_gradients(graph, args, rtol=1e-8, atol=1e-10, labels=[f"{label} operand {i}" for i in range(len(args))])


def _fixed_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    x = _normal(rng, (3, 4, 5), np.float64)
    w, b = _normal(rng, (5,), np.float64), _normal(rng, (5,), np.float64)
    wc, bc = _normal(rng, (4,), np.float64), _normal(rng, (4,), np.float64)
    rm, rv = _normal(rng, (4,), np.float64), rng.uniform(0.5, 2, (4,))
    cases = [
        ("gelu", lambda x: (rt.nn.gelu(x), rt.nn.gelu(x, "tanh")), [x]),
        ("softmax", lambda x: (rt.nn.softmax(x, 2), rt.nn.log_softmax(x, 1)), [x]),
        ("layer_norm", lambda x, w, b: rt.nn.layer_norm(x, w, b, normalized_ndim=1, eps=1e-5)[0], [x, w, b]),
        ("layer_norm stats used", lambda x, w: rt.nn.layer_norm(x, w, normalized_ndim=2, eps=1e-5), [x, _normal(
            rng, (4, 5), np.float64)]),
        # the new running statistics carry no gradient (as torch's), so finite differences leave them out
        ("batch_norm_train", lambda x, w, b, rm, rv: rt.nn.batch_norm_train(x, w, b, rm, rv, momentum=0.1,
                                                                             eps=1e-5)[:3], [x, wc, bc, rm, rv]),
        ("batch_norm_eval", lambda x, rm, rv, w: rt.nn.batch_norm_eval(x, rm, rv, w, eps=1e-5), [x, rm, rv, wc]),
        ("silu", lambda x: rt.nn.silu(x), [x]),
        ("group_norm", lambda x, w, b: rt.nn.group_norm(x, w, b, groups=2, eps=1e-5), [x, wc, bc]),
    ]
    return cases[seed]


def test_attention_gradients_against_jax_and_finite_differences():
    rng = np.random.default_rng(5)
    q, k, v, mask = (_normal(rng, s, np.float64) for s in ((2, 2, 4, 3), (2, 2, 5, 3), (2, 2, 5, 2), (2, 2, 4, 5)))
    graph = rt.trace(lambda q, k, v, m: rt.nn.dot_product_attention(q, k, v, m, causal=True, scale=0.7), q, k, v, mask)
    check_gradients(graph, [q, k, v, mask], rtol=1e-8, atol=1e-10, labels=["q", "k", "v", "mask"])


def test_second_order_through_composite_backward_equations():
    """vjp(vjp(g)): the composite backward equations have no VJP rule and are differentiated through
    their decompositions; the result equals the decomposed graph's second-order joint."""
    rng = np.random.default_rng(3)
    x, w, b = _normal(rng, (4, 6), np.float64), _normal(rng, (6,), np.float64), _normal(rng, (6,), np.float64)

    def fn(x, w, b):
        y = rt.nn.layer_norm(x, w, b, normalized_ndim=1, eps=1e-5)[0]
        z = rt.nn.batch_norm_train(rt.nn.gelu(y, "tanh"), w, b, momentum=0.1, eps=1e-5)[0]
        return rt.nn.log_softmax(lax.mul(rt.nn.softmax(z, 1), rt.nn.gelu(z)), 0)

    graph = rt.trace(fn, x, w, b)
    second = vjp(vjp(graph))
    assert {"layer_norm_backward", "batch_norm_backward", "gelu_backward"} <= _composites_in(second)
    args = [x, w, b, _normal(rng, (4, 6), np.float64)]
    args += [_normal(rng, a.shape, np.float64) for a in [args[3], x, w, b]]
    want = _run(vjp(vjp(decompose(graph))), "jax", args)
    _assert_all_close(_run(second, "torch", args), want, "second order, torch", 1e-8, 1e-10)
    check_gradients(vjp(graph), args[:4], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["lstm_layer", "ctc_loss"])
def test_second_order_through_the_scanned_composites(name):
    """vjp(vjp(g)) of the composites whose JAX rows scan (and whose torch rows are ATen's and oneDNN's
    kernels) equals the decomposed graph's second-order joint, on both backends."""
    rng = np.random.default_rng(4)
    if name == "lstm_layer":
        fn = lambda *a: rt.nn.lstm_layer(*a, reverse=True)  # noqa: E731
        args = [_normal(rng, s, np.float64) for s in ((3, 2, 2), (2, 2), (2, 2), (8, 2), (8, 2), (8,), (8,))]
    else:
        fn = lambda lp, t, il, tl: rt.nn.ctc_loss(lp, t, il, tl, blank=0, zero_infinity=True)  # noqa: E731
        args = [_normal(rng, (5, 2, 4), np.float64), np.array([[1, 1], [2, 3]]), np.array([5, 4]), np.array([2, 1])]
    graph = rt.trace(_outputs(fn), *args)
    second = vjp(vjp(graph))
    args += [_normal(rng, v.aval.shape, np.float64) for v in second.inputs[len(args):]]
    want = _run(vjp(vjp(decompose(graph))), "jax", args)
    for backend in ("torch", "jax"):
        _assert_all_close(_run(second, backend, args), want, f"{name}, second order, {backend}", 1e-9, 1e-11)


def test_decompose_is_a_pure_graph_transform():
    x = np.random.default_rng(0).standard_normal((2, 3))
    graph = rt.trace(lambda x: rt.nn.softmax(rt.nn.gelu(x), 1), x)
    plain = rt.decompose(graph)
    assert [e.primitive.name for e in graph.eqns] == ["gelu", "softmax"]
    assert "exp" in {e.primitive.name for e in plain.eqns} and not _composites_in(plain)
    assert rt.decompose(plain) == plain
    only_gelu = rt.decompose(graph, which=lambda p: p is A.gelu_p)
    assert _composites_in(only_gelu) == {"softmax"}
    with pytest.raises(rt.ArgumentError):
        rt.decompose(graph, which="gelu")


def test_shape_rule_is_the_decompositions():
    x = rt.Aval((2, 3, 4), np.float32)
    out, mean, rstd = rt.primitives.infer_avals(N.layer_norm_p, [x], dict(
        normalized_ndim=2, eps=1e-5, has_weight=False, has_bias=False))
    assert out == x and mean.shape == rstd.shape == (2, 1, 1)
    with pytest.raises(rt.ShapeError):
        rt.primitives.infer_avals(A.softmax_p, [x], dict(axis=3))


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_the_ctc_losss_own_shape_rules_are_its_decompositions(zero_infinity):
    """The CTC composites' shape rules skip tracing the recursion (unrolled over the frames); they
    give the decompositions' avals, and refuse what the decomposition cannot take."""
    from reftrace.composite import decomposition_graph
    from reftrace.graph import Params
    from reftrace.nn.ctc import ctc_loss_backward_p, ctc_loss_p
    lp, targets, lengths = rt.Aval((5, 3, 4), np.float32), rt.Aval((3, 2), np.int64), rt.Aval((3,), np.int64)
    params = dict(blank=1, zero_infinity=zero_infinity)
    forward = [lp, targets, lengths, lengths]
    loss = rt.primitives.infer_avals(ctc_loss_p, forward, params)
    assert loss == decomposition_graph(ctc_loss_p, tuple(forward), Params(params)).out_avals
    backward = [loss[0], *forward]
    assert rt.primitives.infer_avals(ctc_loss_backward_p, backward, params) == decomposition_graph(
        ctc_loss_backward_p, tuple(backward), Params(params)).out_avals
    for bad in ([lp, rt.Aval((2, 2), np.int64), lengths, lengths], [lp, targets, lengths, rt.Aval((3,), np.float32)],
                [rt.Aval((5, 3, 4), np.int64), targets, lengths, lengths]):
        with pytest.raises(rt.ShapeError, match="ctc_loss"):
            rt.primitives.infer_avals(ctc_loss_p, bad, params)
    with pytest.raises(rt.ShapeError, match="blank"):
        rt.primitives.infer_avals(ctc_loss_p, forward, dict(params, blank=4))


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x):
        y = torch.nn.functional.gelu(self.bn(self.grouped(torch.relu(self.conv(x)))))
        y = torch.nn.functional.silu(self.gn(y))
        return torch.log_softmax(self.ln(y).softmax(-1) * 3, dim=1)


def test_torch_modules_compile_to_aten_kernels_and_match_eager():
    """Captured modules keep the composites; the compiled step calls ATen's fused forward and backward
    kernels and gives eager's values, gradients and running statistics."""
    from reftrace.compile import aot_module
    torch.manual_seed(0)
    eager, block = _Block(), _Block()
    block.load_state_dict(eager.state_dict())
    codes = []

    def keep_code(gm, _):
        codes.append(gm.code)
        return gm
    compiled = aot_module(block, keep_code, keep_code)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        out, want = compiled(x), eager(x)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        ct = torch.randn_like(want)
        out.backward(ct)
        want.backward(ct)
    for (name, p), q in zip(block.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(block.bn.running_var, eager.bn.running_var)
    forward, backward = codes
    for kernel in ("native_layer_norm", "_native_batch_norm_legit_functional", "gelu", "_softmax",
                   "_log_softmax", "native_group_norm", "silu"):
        assert f"aten.{kernel}(" in forward, kernel
    for kernel in ("native_layer_norm_backward", "native_batch_norm_backward", "gelu_backward",
                   "_softmax_backward_data", "_log_softmax_backward_data", "threshold_backward",
                   "native_group_norm_backward", "silu_backward"):
        assert f"aten.{kernel}(" in backward, kernel
    assert forward.count("torch.conv2d(") == 2 and "torch.relu(" in forward
    # as eager: one convolution_backward per convolution, input and weight gradients together
    assert "[True, True, False]" in backward and backward.count("aten.convolution_backward(") == 2


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 2)])
def test_a_convolutions_input_and_weight_gradients_are_one_call_with_the_same_bits(stride, groups):
    """The torch backend merges the two convolution_backward calls of one convolution (input and
    weight gradients on the same cotangent) into one, as eager runs it; the bits do not change."""
    from reftrace.backends.torch import eval_torch, to_fx
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    joint = rt.vjp(rt.trace(lambda x, w, b: torch.relu(torch.nn.functional.conv2d(
        x, w, b, stride=stride, padding=1, groups=groups)) * 2, x, conv.weight, conv.bias))
    _, backward = rt.partition(joint, "default")
    assert all(v.dtype == np.float32 for v in backward.inputs)
    args = [torch.randn(v.shape) for v in backward.inputs]
    gm = to_fx(backward)
    assert gm.code.count("aten.convolution_backward(") == 1 and "[True, True, False]" in gm.code
    for merged, separate in zip(gm(*args), eval_torch(backward, *args), strict=True):
        assert torch.equal(merged, separate)


@pytest.mark.parametrize("size2", [9, 10])
def test_two_convolutions_sharing_a_cotangent_keep_their_own_gradients(size2):
    """Summed convolution outputs share one cotangent, so the merge could pair one convolution's
    input gradient with the other's weight gradient: right when the shapes agree (size 9: the
    same input shape), wrong when they do not (size 10: stride 2 gives the same output size from
    a different input), which the merge checks. The gradients are eager's either way."""
    torch.manual_seed(0)
    c1, c2 = torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Conv2d(3, 4, 3, stride=2)
    x1, x2 = torch.randn(2, 3, 9, 9, requires_grad=True), torch.randn(2, 3, size2, size2, requires_grad=True)

    def fn(x1, x2, w1, w2):
        return torch.tanh(torch.nn.functional.conv2d(x1, w1, stride=2) + torch.nn.functional.conv2d(x2, w2, stride=2))

    from reftrace.compile import aot_function, nop
    leaves = [x1, x2, c1.weight, c2.weight]
    codes = []

    def spy(gm, _):
        codes.append(gm.code)
        return gm
    aot_function(fn, nop, spy)(*leaves).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    fn(*leaves).sum().backward()
    for a, t in zip(got, leaves, strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)
    assert codes[0].count("[True, True, False]") == 2  # each convolution's pair, whatever the order


def test_the_merge_pairs_only_calls_whose_operands_have_their_stand_ins_shapes():
    """On one cotangent, the first input-gradient call (input 9x9) meets a weight-gradient call
    whose input is 10x10 (stride 2 maps both to 4x4): merging those would give the 9x9 input a
    10x10 gradient. The merge pairs each call with its own convolution instead; the results are
    the separate calls' bit for bit."""
    import copy
    import operator
    from torch import fx
    from reftrace.backends.torch_fx_passes import merge_convolution_backwards
    from reftrace.backends.torch_rules import AVAL_META
    from reftrace.graph import Aval
    conv_backward = torch.ops.aten.convolution_backward
    graph = fx.Graph()
    shapes = {"g": (2, 4, 4, 4), "x1": (2, 3, 9, 9), "x2": (2, 3, 10, 10), "w1": (4, 3, 3, 3), "w2": (4, 3, 3, 3)}
    nodes = {}
    for name, shape in shapes.items():
        nodes[name] = graph.placeholder(name)
        nodes[name].meta[AVAL_META] = Aval(shape, np.float32)
    g = nodes["g"]
    params = (None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1)

    def call(x, w, which):
        mask = [which == 0, which == 1, False]
        return graph.call_function(operator.getitem, (graph.call_function(conv_backward, (g, x, w, *params, mask)),
                                                      which))

    def stand_in(shape):
        return graph.call_method("new_empty", (g, list(shape)))
    outs = [call(stand_in(shapes["x1"]), nodes["w1"], 0), call(nodes["x2"], stand_in(shapes["w2"]), 1),
            call(stand_in(shapes["x2"]), nodes["w2"], 0), call(nodes["x1"], stand_in(shapes["w1"]), 1)]
    graph.output(tuple(outs))
    separate = fx.GraphModule(torch.nn.Module(), copy.deepcopy(graph))
    merge_convolution_backwards(graph)
    merged = fx.GraphModule(torch.nn.Module(), graph)
    assert merged.code.count("[True, True, False]") == 2 and "new_empty" not in merged.code
    torch.manual_seed(0)
    args = [torch.randn(shape) for shape in shapes.values()]
    for a, b in zip(merged(*args), separate(*args), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
