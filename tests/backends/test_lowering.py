"""The lowering contract, on both backends: the FX module ``to_fx`` emits (pickling, deepcopy,
TorchScript, placement), what a lowered graph accepts and returns, and argument checking.

Primitive semantics are pinned one by one in ``test_backends.py``; this file checks what holds
for whole graphs.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import reftrace as rt
from reftrace import lax
from reftrace import primitives as P
from reftrace.backends.jax import lower_jax
from reftrace.backends.torch import apply_torch, eval_torch, lower_torch, to_fx
from reftrace.backends.torch_dtypes import numpy_dtype, torch_dtype
from reftrace.errors import ArgumentError

from tests.backends.test_backends import BIG, BOOL, F32, F64, I32, I64, assert_close, check, rng

def mixed_program(x, w, idx, key):
    """Many primitives in one graph: conv, gather, scatter_add, pad, scans, dot, select, random..."""
    y = lax.bind(P.mul_p, lax.bind(P.cos_p, x), np.array(2.0))
    img = lax.reshape(y, (1, 1, 4, 6))
    conv = lax.conv_general_dilated(img, w, (1, 2), ((1, 0), (-1, 1)), (2, 1), (1, 1))
    g = lax.gather(x, idx, 1)
    s = lax.scatter_add(x, idx, lax.bind(P.sub_p, np.array(1.0), g), 1)
    p = lax.pad(x, -1.0, ((1, -1, 1), (0, 2, 0)))
    c = lax.bind(P.cumsum_p, x, axis=1, reverse=True)
    m = lax.bind(P.cummax_p, x, axis=0, reverse=False)
    d = lax.dot_general(x, lax.transpose(x, (1, 0)), (((1,), (0,)), ((), ())))
    am = lax.argmax(x, 1, np.int32)
    sel = lax.select(lax.bind(P.gt_p, x, np.array(0.0)), x, lax.full(x.shape, 0.5, x.dtype))
    io = lax.convert_element_type(lax.iota(np.int64, (4, 6), 1), np.float64)
    big = lax.bind(P.add_p, lax.convert_element_type(idx, np.int64), np.array(BIG, I64))
    q = lax.bind(P.div_p, big, np.array(-3, I64))
    sl = lax.slice(x, (0, 1), (4, 6), (2, 2))
    mx = lax.reduce_max(x, (1,))
    cat = lax.concatenate([x, lax.rev(x, (0,))], 0)
    lit = lax.bind(P.mul_p, x, np.linspace(0, 1, 24).reshape(4, 6))
    rnd = lax.bind(P.random_p, key, shape=(3,), dtype=np.dtype(F64), distribution="uniform")
    rd = lax.bind(P.round_p, lax.bind(P.erf_p, x))
    return conv, g, s, p, c, m, d, am, sel, io, q, sl, mx, cat, lit, rnd, rd


def _mixed_args():
    r = rng(23)
    return (r.standard_normal((4, 6)), r.standard_normal((2, 1, 2, 2)), r.integers(0, 6, (4, 3)).astype(I32),
            np.array([1, 2], np.uint32))


def test_fx_module_is_readable_and_scriptable():
    args = _mixed_args()
    g = rt.trace(mixed_program, *args)
    gm = to_fx(g)
    assert copy.deepcopy(gm).reftrace_graph == g and pickle.loads(pickle.dumps(gm)).reftrace_graph == g
    code = gm.code
    assert "torch.conv2d(" in code and "torch.gather(" in code and "torch.scatter_add(" in code
    assert "torch.mul(cos, 2.0)" in code  # rank-0 literals inline as Python scalars
    assert "torch.full([], 1.0, dtype = torch.float64)" in code  # or become 0-d tensors
    assert "Proxy" not in code and "aten" not in code
    assert gm.reftrace_graph is g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(gm)
        frozen = torch.jit.freeze(scripted.eval())
    tensors = [torch.from_numpy(a) for a in args]
    eager = gm(*tensors)
    want = [np.asarray(o) for o in lower_jax(g)(*args)]
    for module in (scripted, frozen):
        for a, b, w, aval in zip(module(*tensors), eager, want, g.out_avals):
            assert a.dtype == torch_dtype(aval.dtype) and tuple(a.shape) == aval.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            assert_close(a.numpy(), w, aval.dtype, "scripted vs jax")


def every_primitive_program(x, y, b, idx, key):
    """One graph binding every registered primitive at least once."""
    outs = []
    for name in P.FLOAT_UNARY:
        operand = lax.bind(P.add_p, x, np.array(1.5)) if name == "acosh" else x
        outs.append(lax.bind(P.registry[name], operand))
    outs += [lax.bind(p, x) for p in (P.neg_p, P.sign_p, P.abs_p, P.is_finite_p)]
    outs += [lax.bind(P.not_p, b), lax.bind(P.integer_pow_p, x, y=3)]
    outs += [lax.bind(p, x, y) for p in (P.add_p, P.sub_p, P.mul_p, P.div_p, P.rem_p, P.pow_p, P.max_p, P.min_p,
                                         P.atan2_p) + P.COMPARISONS]
    outs += [lax.bind(p, b, lax.bind(P.lt_p, x, y)) for p in (P.and_p, P.or_p, P.xor_p)]
    outs += [lax.bind(P.select_p, b, x, y), lax.convert_element_type(x, np.float32), lax.stop_gradient(x)]
    outs.append(rt.with_sharding(x, ("data", None)))  # the identity off a mesh
    outs += [lax.bind(p, x, axes=(1,)) for p in (P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p)]
    outs += [lax.bind(p, b, axes=(0,)) for p in (P.reduce_and_p, P.reduce_or_p)]
    outs += [lax.argmax(x, 1), lax.argmin(x, 0, np.int32)]
    outs += [lax.bind(p, x, axis=1, reverse=r) for p in (P.cumsum_p, P.cumprod_p, P.cummax_p, P.cummin_p)
             for r in (False, True)]
    outs += [lax.broadcast_in_dim(x, (2, 4, 6), (1, 2)), lax.reshape(x, (6, 4)), lax.transpose(x, (1, 0)),
             lax.slice(x, (1, 0), (4, 5), (2, 3)), lax.pad(x, 0.0, ((1, -1, 1), (-2, 3, 0))),
             lax.concatenate([x, y], 1), lax.rev(x, (0, 1)), lax.iota(np.int32, (3, 4), 1)]
    outs.append(lax.dot_general(x, y, (((1,), (1,)), ((), ()))))
    img = lax.reshape(x, (2, 2, 2, 3))
    outs.append(lax.conv_general_dilated(img, img, (1, 1), ((1, 1), (0, 0)), None, (1, 2), None, 1, 2))
    g = lax.gather(x, idx, 1)
    outs += [g, lax.scatter_add(x, idx, g, 1), lax.scatter(y, idx, g, 1)]
    outs += [lax.bind(P.random_p, key, shape=(2, 3), dtype=np.dtype(F32), distribution=d)
             for d in ("uniform", "normal")]
    outs.append(lax.bind(P.random_fold_in_p, key, data=3))
    outs += list(lax.sort(x, 1, True))
    spd = lax.add(lax.dot_general(x, x, (((1,), (1,)), ((), ()))), lax.full((4, 4), 6.0, x.dtype))
    outs += [lax.cholesky(spd), lax.triangular_solve(spd, x, left_side=True, lower=False, transpose_a=True)]
    outs += list(lax.lu(x)) + list(lax.qr(x)) + list(lax.eigh(spd)) + list(lax.svd(x))
    outs.append(lax.pinv(x, np.array(0.0), np.array(1e-12)))
    outs += list(lax.eig(lax.dot_general(x, y, (((1,), (1,)), ((), ())))))  # a non-symmetric matrix
    z = lax.complex(x, y)
    outs += [lax.real(lax.conj(z)), lax.imag(z), lax.fft(z, "fft", (6,)), lax.fft(x, "rfft", (4, 6)),
             lax.fft(lax.fft(z, "ifft", (4, 6)), "irfft", (4, 10))]
    return tuple(outs) + composite_calls(x, y, idx)


def composite_calls(x, y, idx):
    """Every composite primitive of ``reftrace.nn`` on (4, 6) floating operands."""
    from reftrace.nn import activations as A, norms as N
    from reftrace.nn import attention as T, embeddings as E, losses as L
    w, b = lax.slice(y, (0, 0), (1, 6)), lax.slice(x, (1, 0), (2, 6))
    w, b = lax.reshape(w, (6,)), lax.reshape(b, (6,))
    outs = [rt.nn.gelu(x), rt.nn.gelu(x, "tanh"), rt.nn.softmax(x, 1), rt.nn.log_softmax(x, 0)]
    outs += [lax.bind(A.gelu_backward_p, y, x, approximate=a) for a in ("none", "tanh")]
    outs += [lax.bind(A.softmax_backward_p, y, outs[2], axis=1), lax.bind(A.log_softmax_backward_p, y, outs[3], axis=0)]
    ln = rt.nn.layer_norm(x, w, b, normalized_ndim=1, eps=1e-5)
    outs += [*ln, *rt.nn.layer_norm(x, normalized_ndim=2, eps=1e-3)]
    outs += lax.bind(N.layer_norm_backward_p, y, x, ln[1], ln[2], w, b, normalized_ndim=1, has_weight=True,
                     has_bias=True)
    bn = rt.nn.batch_norm_train(x, w, b, lax.mul(w, 0.5), lax.add(lax.mul(b, b), 1.0), momentum=0.1, eps=1e-5)
    outs += [*bn, *rt.nn.batch_norm_train(x, eps=1e-5, momentum=0.1)]
    outs += lax.bind(N.batch_norm_backward_p, y, x, bn[1], bn[2], w, eps=1e-5, training=True, has_weight=True,
                     has_bias=False)
    outs += lax.bind(N.batch_norm_backward_p, y, x, w, lax.add(lax.mul(b, b), 1.0), b, eps=1e-5, training=False,
                     has_weight=False, has_bias=True)
    outs.append(rt.nn.batch_norm_eval(x, w, lax.add(lax.mul(b, b), 1.0), None, b, eps=1e-5))
    q, k = lax.reshape(x, (1, 2, 2, 6)), lax.reshape(y, (1, 2, 2, 6))
    for mask in (None, lax.reshape(lax.slice(x, (0, 0), (2, 4)), (1, 2, 2, 2))):
        attended = rt.nn.dot_product_attention(q, k, k, mask, causal=mask is None)
        outs += [*attended, *lax.bind(T.attention_backward_p, q, q, k, k, *attended, *([] if mask is None else [mask]),
                                      causal=mask is None, scale=0.5, has_mask=mask is not None)]
    outs.append(rt.nn.linear(x, lax.transpose(y, (1, 0)), lax.reshape(lax.slice(x, (0, 0), (1, 4)), (4,))))
    from reftrace.nn.convolution import conv_input_grad_p, conv_weight_grad_p
    outs += [rt.nn.relu(x), lax.bind(A.relu_backward_p, y, x)]
    outs += [rt.nn.silu(x), lax.bind(A.silu_backward_p, y, x)]
    channels = lax.reshape(x, (2, 6, 2))
    gn = rt.nn.group_norm(channels, w, b, groups=3, eps=1e-5)
    outs += [*gn, *rt.nn.group_norm(channels, groups=2, eps=1e-3)]
    outs += lax.bind(N.group_norm_backward_p, lax.reshape(y, (2, 6, 2)), channels, gn[1], gn[2], w, groups=3,
                     has_weight=True, has_bias=False)
    outs += [rt.nn.hardsigmoid(x), lax.bind(A.hardsigmoid_backward_p, y, x)]
    img, kernel = lax.reshape(x, (1, 2, 3, 4)), lax.reshape(y, (4, 1, 3, 2))  # 2 groups of 1 in-feature
    conv = dict(stride=(1, 2), padding=(1, 0), dilation=(1, 1), groups=2)
    out = rt.nn.convolution(img, kernel, lax.reshape(lax.slice(x, (0, 0), (1, 4)), (4,)), **conv)
    outs += [out, lax.bind(conv_input_grad_p, out, kernel, input_shape=img.shape, **conv),
             lax.bind(conv_weight_grad_p, out, img, weight_shape=kernel.shape, **conv)]
    from reftrace.nn.pooling import max_pool_backward_p
    pool = dict(kernel=(2, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 1), ceil_mode=False, out_spatial=(4, 2))
    pooled = rt.nn.max_pool(img, **{k: v for k, v in pool.items()})
    outs += [*pooled, lax.bind(max_pool_backward_p, pooled[0], img, pooled[1], **pool)]
    rows = lax.slice(idx, (0, 0), (2, 3))
    outs += [rt.nn.embedding(lax.transpose(x, (1, 0)), rows, 1, True),
             lax.bind(E.embedding_backward_p, lax.reshape(lax.slice(y, (0, 0), (4, 6)), (2, 2, 6)),
                      lax.slice(idx, (0, 0), (2, 2)), num_weights=6, padding_idx=2, scale_grad_by_freq=True)]
    target = lax.reshape(lax.slice(idx, (0, 0), (4, 1)), (4,))
    for reduction, weight in (("mean", lax.reshape(lax.slice(y, (0, 0), (1, 6)), (6,))), ("none", None)):
        loss = rt.nn.nll_loss(x, target, weight, reduction)
        outs += [*loss, lax.bind(L.nll_loss_backward_p, lax.full(loss[0].shape, 1.0, x.dtype), x, target,
                                 *([] if weight is None else [weight]), loss[1], reduction=L.REDUCTIONS[reduction],
                                 ignore_index=-100, has_weight=weight is not None)]
    outs += [rt.nn.xlogy(x, y), rt.nn.xlog1py(x, y), rt.nn.entr(x), rt.nn.binary_cross_entropy(x, y, y, "sum"),
             lax.bind(L.binary_cross_entropy_backward_p, lax.full((), 1.0, x.dtype), x, y,
                      reduction=L.REDUCTIONS["mean"], has_weight=False)]
    outs += [rt.nn.vector_norm(x, 2.0, (1,)), rt.nn.vector_norm(x, float("inf"), (0, 1)),
             rt.nn.vector_norm(x, 0.5, (0,))]
    from reftrace.nn.ctc import ctc_loss_backward_p
    log_probs, labels = lax.reshape(lax.log(x), (2, 2, 6)), lax.slice(idx, (0, 0), (2, 3))
    lengths = (lax.full((2,), 2, np.int64), lax.full((2,), 1, np.int64))
    for zero_infinity in (False, True):
        loss = rt.nn.ctc_loss(log_probs, labels, *lengths, blank=5, zero_infinity=zero_infinity)
        outs += [loss, lax.bind(ctc_loss_backward_p, loss, log_probs, labels, *lengths, blank=5,
                                zero_infinity=zero_infinity)]
    outs += lstm_calls(lax.reshape(x, (2, 2, 6)), lax.slice(y, (0, 0), (2, 2)), lax.slice(y, (2, 0), (4, 2)),
                       lax.reshape(lax.slice(y, (0, 0), (4, 6)), (8, 3)))
    return tuple(outs)


def lstm_calls(x, h0, c0, w):
    """``lstm_layer`` and its backward equation, both directions, on a ``(2, 2, 6)`` sequence, hidden size 2."""
    from reftrace.nn.rnn import lstm_layer_backward_p
    w_ih = lax.concatenate([w, w], 1)  # (8, 6)
    w_hh, bias = lax.slice(w, (0, 0), (8, 2)), lax.reshape(lax.slice(w, (0, 0), (8, 1)), (8,))
    outs = []
    for reverse in (False, True):
        ys, h, c = rt.nn.lstm_layer(x, h0, c0, w_ih, w_hh, bias, bias, reverse)
        outs += [ys, h, c, *lax.bind(lstm_layer_backward_p, ys, h, c, x, h0, c0, w_ih, w_hh, bias, bias,
                                     reverse=reverse)]
    return outs


def test_onednn_lstm_rows_script_and_freeze():
    """float32 on the CPU, ``lstm_layer`` runs oneDNN's layer and its backward (a reftrace op that runs its
    forward with gradients on, for the workspace): the module scripts, freezes and computes the same."""
    r = rng(7)
    args = [r.standard_normal(s).astype(np.float32) for s in ((2, 2, 6), (2, 2), (2, 2), (8, 3))]
    g = rt.trace(lstm_calls, *args)
    gm = to_fx(g)
    code = gm.code
    assert "mkldnn_rnn_layer" in code and "onednn_lstm_layer_backward" in code
    tensors = [torch.from_numpy(a) for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.script(gm).eval())
    with torch.no_grad():  # as a backward runs
        for a, b, c in zip(frozen(*tensors), gm(*tensors), rt.lower(g, "jax")(*args)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            np.testing.assert_allclose(b.numpy(), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_every_primitive_scripts_and_freezes():
    r = rng(24)
    args = (r.uniform(0.1, 0.9, (4, 6)), r.uniform(0.1, 0.9, (4, 6)), r.random((4, 6)) < 0.5,
            np.stack([r.permutation(6)[:3] for _ in range(4)]), np.array([5, 6], np.uint32))
    g = rt.trace(every_primitive_program, *args)
    assert {e.primitive for e in g.eqns} == set(P.registry.values())
    gm = to_fx(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.script(gm).eval())
    tensors = [torch.from_numpy(a) for a in args]
    for a, b, aval in zip(frozen(*tensors), gm(*tensors), g.out_avals):
        assert a.dtype == torch_dtype(aval.dtype) and tuple(a.shape) == aval.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_special_float_literals_script():
    x = np.array([1.0, -2.0])
    fn = lambda x: (lax.bind(P.add_p, x, np.array(np.inf)), lax.bind(P.mul_p, x, np.array(np.nan)),  # noqa
                    lax.bind(P.max_p, x, np.array(-np.inf)), lax.bind(P.reduce_max_p, lax.pad(x, 0.0, ((0, -2, 0),)),
                                                                      axes=(0,)))
    g = check(fn, (x,), lambda x: (x + np.inf, x * np.nan, x, np.array(-np.inf)))
    gm = to_fx(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.script(gm).eval())
    for a, b in zip(frozen(torch.from_numpy(x)), gm(torch.from_numpy(x))):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_to_fx_names_and_list_outputs():
    x = np.ones((2, 3))
    g = rt.trace(lambda a, b: (lax.bind(P.add_p, a, b), lax.bind(P.exp_p, a)), x, x)
    gm = to_fx(g, input_names=["primals_1", "tangents_1"], output_as_list=True)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["primals_1", "tangents_1"]
    out = gm(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    assert isinstance(out, list) and len(out) == 2
    assert isinstance(to_fx(g)(*[torch.ones(2, 3, dtype=torch.float64)] * 2), tuple)
    with pytest.raises(ArgumentError):
        to_fx(g, input_names=["only_one"])


def test_lowering_does_not_change_its_graph():
    args = _mixed_args()
    g = rt.trace(mixed_program, *args)
    text, h, eqns = str(g), hash(g), g.eqns
    to_fx(g)
    lower_torch(g)(*args)
    assert str(g) == text and hash(g) == h and g.eqns is eqns
    assert g == rt.trace(mixed_program, *args)
    assert lower_torch(g) is lower_torch(rt.trace(mixed_program, *args))  # cached per graph value


def test_wrong_arguments_raise_argument_error():
    x = np.ones((2, 3))
    g = rt.trace(lambda a, b: lax.bind(P.add_p, a, b), x, x)
    f = lower_torch(g)
    with pytest.raises(ArgumentError, match="takes 2 arguments"):
        f(x)
    with pytest.raises(ArgumentError, match="argument 1"):
        f(x, np.ones((3, 2)))
    with pytest.raises(ArgumentError, match="argument 0"):
        f(x.astype(F32), x)
    with pytest.raises(ArgumentError, match="argument 1"):
        f(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float32))
    with pytest.raises(ArgumentError):
        eval_torch(g, x)


def test_inputs_are_shared_not_copied_and_scalars_accepted():
    x = np.arange(6, dtype=F64).reshape(2, 3)
    g = rt.trace(lambda a, s: (lax.bind(P.mul_p, a, s), a), x, np.array(2.0))
    assert rt.lower(g, backend="torch") is lower_torch(g)
    out, same = lower_torch(g)(x, 3.0)
    np.testing.assert_array_equal(out.numpy(), 3 * x)
    assert same.data_ptr() == x.ctypes.data  # torch.from_numpy, no copy
    t = torch.ones(2, 3, dtype=torch.float64)
    assert lower_torch(g)(t, torch.tensor(2.0, dtype=torch.float64))[1] is t


def test_apply_torch_eager():
    a = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)
    (out,) = apply_torch(P.mul_p, [a, np.array(2.0)], {})
    assert out.dtype == torch.float64 and out.tolist() == [2.0, -4.0, 7.0]
    (out,) = apply_torch(P.div_p, [torch.tensor([7, -7], dtype=torch.int64), np.array(2, I64)], {})
    assert out.tolist() == [3, -3]  # rounds toward zero
    (out,) = apply_torch(P.rem_p, [torch.tensor([7, -7]), torch.tensor([2, 2])], {})
    assert out.tolist() == [1, -1]  # sign of the dividend


def test_device_placement_of_created_tensors():
    """With a device, factory calls and buffers are placed there; 'meta' runs shapes only."""
    args = _mixed_args()
    g = rt.trace(mixed_program, *args)
    gm = to_fx(g, device="meta")
    assert "device = 'meta'" in gm.code
    outs = gm(*[torch.from_numpy(a).to("meta") for a in args])
    assert all(o.device.type == "meta" for o in outs)
    assert [(tuple(o.shape), numpy_dtype(o.dtype)) for o in outs] == [(a.shape, a.dtype) for a in g.out_avals]
    f = lower_torch(g)
    metas = f(*[torch.from_numpy(a).to("meta") for a in args])
    assert metas[0].device.type == "meta" and f(*args)[0].device.type == "cpu"


# ----------------------------------------------------------------------------- argument kinds, both backends

def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


# values each dtype keeps only if nothing rounds them through another dtype on the way in
EXACT_VALUES = {
    "float64": np.array([1 + 2**-52, -1e300, 5e-324]),
    "int64": np.array([BIG + 1, -BIG - 3, 2**63 - 1]),
    "bool": np.array([True, False, True]),
    "bfloat16": np.array([1.0078125, -3.0, 65280.0]),  # 1 + 2**-7: the smallest step above 1 in bfloat16
    "float32": np.array([1 + 2**-23, -3.5, 1e-30]),
    "int32": np.array([2**31 - 1, -(2**31), 7]),
}


def _as_kind(arr: np.ndarray, kind: str):
    """``arr`` as a numpy array, a torch tensor (bfloat16 bit for bit) or a JAX array."""
    if kind == "numpy":
        return arr
    if kind == "torch":
        if arr.dtype == _bf16():
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(arr.copy())
    import jax
    with jax.enable_x64(True):
        return jax.numpy.asarray(arr)


def _to_numpy(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        if out.dtype == torch.bfloat16:
            return out.view(torch.int16).numpy().view(_bf16())
        return out.numpy()
    return np.asarray(out)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("dtype", sorted(EXACT_VALUES))
def test_every_backend_takes_every_array_kind_bit_exactly(backend, kind, dtype):
    dtype = _bf16() if dtype == "bfloat16" else np.dtype(dtype)
    x = EXACT_VALUES[dtype.name].astype(dtype)
    g = rt.trace(lambda a: (a, lax.stop_gradient(a)), x)  # one copy through an equation, one forwarded
    for out in rt.lower(g, backend)(_as_kind(x, kind)):
        got = _to_numpy(out)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8))  # bits, not values


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_both_backends_take_python_scalars_for_rank0_inputs_at_the_input_dtype(backend):
    g = rt.trace(lambda i, f, b: (i, f, b), np.array(1, I64), np.array(1.0, F32), np.array(True))
    i, f, b = (_to_numpy(o) for o in rt.lower(g, backend)(2**62 + 1, 3, False))
    assert (i.dtype, f.dtype, b.dtype) == (np.dtype(I64), np.dtype(F32), np.dtype(BOOL))
    assert int(i) == 2**62 + 1 and float(f) == 3.0 and not bool(b)


def test_jax_backend_detaches_tensors_that_require_grad():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g = rt.trace(lambda a: lax.bind(P.mul_p, a, a), np.ones(2, F64))
    (out,) = rt.lower(g, "jax")(x)
    np.testing.assert_array_equal(np.asarray(out), [1.0, 4.0])
    assert x.grad is None and x.requires_grad  # the caller's tensor is untouched


def test_jax_backend_falls_back_to_numpy_when_dlpack_refuses(monkeypatch):
    import jax.dlpack

    def refuse(*_args, **_kwargs):
        raise RuntimeError("no DLPack today")
    monkeypatch.setattr(jax.dlpack, "from_dlpack", refuse)
    cases = [(torch.bfloat16, [1.0078125, -3.0]), (torch.int64, [BIG + 1, -1]), (torch.bool, [True, False])]
    for dtype, values in cases:
        t = torch.tensor(values, dtype=dtype, requires_grad=dtype.is_floating_point)
        g = rt.trace(lambda a: lax.stop_gradient(a), np.zeros(2, numpy_dtype(dtype)))
        (out,) = rt.lower(g, "jax")(t)
        want = _to_numpy(t.detach())
        assert _to_numpy(out).dtype == want.dtype
        np.testing.assert_array_equal(_to_numpy(out).view(np.uint8), want.view(np.uint8))


def test_jax_backend_names_a_tensor_on_a_device_it_cannot_read():
    g = rt.trace(lambda a: lax.stop_gradient(a), np.zeros(2, F32))
    with pytest.raises(ArgumentError, match=r"argument 0 .* torch tensor on meta.*tensor\.cpu\(\)"):
        rt.lower(g, "jax")(torch.zeros(2, device="meta"))


def test_a_quotient_that_is_rounded_is_divided_as_torch_divides():
    """XLA multiplies by the reciprocal of a broadcast or constant divisor (one unit in the last place
    off for a third of the quotients). Where the quotient is rounded to an integer, compared or
    converted, that moves results by one (``trunc(0.3 / 0.1)`` is 2 in torch, 3 through a reciprocal
    here and there): those divisions are IEEE divisions in XLA too. A quotient kept as a value may
    still differ by one unit in the last place (XLA's own rounding)."""
    from reftrace.compile import aot_function, xla_compile
    x = torch.arange(0, 3000, dtype=torch.float64) * 0.1
    cases = {"trunc division": lambda x: torch.div(x, 0.1, rounding_mode="trunc"),
             "floor of a quotient": lambda x: (x / 0.1).floor(),
             "quotient to int": lambda x: (x / 0.3).long(),
             "quotient compared": lambda x: x / 0.7 < torch.arange(3000, dtype=torch.float64) / 7,
             "round to tens": lambda x: torch.round(x * 7, decimals=-1),
             "histogram": lambda x: torch.histc(x, 37)}
    for name, fn in cases.items():
        assert torch.equal(aot_function(fn, xla_compile)(x), fn(x)), name
    graph = rt.trace(lambda a, b: (lax.floor(lax.div(a, b)), lax.div(a, b)), np.ones(3), np.ones(3))
    from reftrace.backends.jax_graph import rounded_divisions
    assert [e.primitive for e in graph.eqns if id(e) in rounded_divisions(graph)] == [P.div_p]


def test_a_composite_run_as_its_decomposition_keeps_its_array_constants_as_buffers():
    """ATen's CTC kernels are float32/float64 only, so the float16 ``ctc_loss`` runs as its decomposition,
    whose array constants (where each state reads its label) become buffers as the graph's own do: the
    module runs, scripts, and computes what the decomposition computes under JAX."""
    from reftrace.composite import decompose
    r = rng(3)
    x = r.standard_normal((4, 2, 3))
    lp = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float16)
    args = (lp, np.array([[1, 2], [2, 0]]), np.array([4, 3]), np.array([2, 1]))
    g = rt.trace(lambda lp, t, il, tl: rt.nn.ctc_loss(lp, t, il, tl, blank=0), *args)
    gm = to_fx(g)
    assert any(name.startswith("_literal_") for name, _ in gm.named_buffers())
    tensors = [torch.from_numpy(a) for a in args]
    got = gm(*tensors)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch.jit.script(gm)(*tensors)[0], got, rtol=0, atol=0)
    want = np.asarray(rt.lower(decompose(g), "jax")(*args)[0])
    np.testing.assert_allclose(got.numpy().astype(np.float64), want.astype(np.float64), rtol=2e-3)
