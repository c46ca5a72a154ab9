"""Random ATen ops through reftrace's functional RNG: the key input, dropout's values and gradients,
reproducibility under torch.manual_seed, distribution statistics, and a model with dropout."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reftrace as rt
from reftrace.compile import (aot_function, aot_module, default_partition, min_cut_rematerialization_partition, nop,
                              ts_compile, xla_compile)
from reftrace.graph import Aval
from reftrace.torch_bridge import capture_flat, capture_tree

COMPILERS = {"nop": nop, "ts": ts_compile, "xla": xla_compile}
PARTITIONS = {"default": default_partition, "mincut": min_cut_rematerialization_partition}
KEY = Aval((2,), np.uint32)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
        yield


def positive(*shape, dtype=torch.float32, seed=0):
    """Values in [0.5, 1.5): never zero, so a zero output means a dropped element."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=dtype) + 0.5).requires_grad_()


def cache_entry(compiled):
    (entry,) = compiled.cache.values()
    return entry


def eqn_names(graph):
    return [e.primitive.name for e in graph.eqns]


# ----------------------------------------------------------------------------- the key input

def test_trace_makes_the_key_the_last_input():
    x = torch.randn(5, 3)
    g = rt.trace(lambda x: F.dropout(x, 0.5, training=True), x)
    assert [v.aval for v in g.inputs] == [Aval((5, 3), np.float32), KEY]
    assert eqn_names(g)[:2] == ["random_fold_in", "random"] and "random_fold_in[data=0]" in str(g)

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    c = capture_tree(model, x)
    assert c.num_state == 4 and c.key_input == 5 == len(c.graph.inputs) - 1
    assert c.graph.inputs[-1].aval == KEY
    assert capture_tree(model.eval(), x).key_input is None  # eval-mode dropout never reaches a random op
    assert capture_flat(lambda ts: ts[0].sin(), [x]).key_input is None


def test_same_key_same_values_and_each_op_its_own_stream():
    x = torch.randn(64, 64)
    c = capture_flat(lambda ts: (torch.rand_like(ts[0]), torch.rand_like(ts[0]), F.dropout(ts[0], 0.5, True)), [x])
    assert c.key_input == 1 and eqn_names(c.graph).count("random") == 3
    assert len(rt.simplify(c.graph).eqns) == len(c.graph.eqns)  # distinct streams: CSE merges no draw
    run = rt.lower(c.graph, "torch")
    key = np.array([7, 11], np.uint32)
    a, b, d = run(x, key)
    a2, b2, d2 = run(x, key)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(d, d2)
    assert not torch.equal(a, b)
    assert abs(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]) < 0.05
    a3, *_ = run(x, np.array([7, 12], np.uint32))
    assert not torch.equal(a, a3)


def test_torch_and_jax_lowerings_draw_the_same_bits():
    x = torch.randn(33, 17, dtype=torch.float64)
    c = capture_flat(lambda ts: (torch.rand_like(ts[0]), F.dropout(ts[0], 0.3, True), torch.randint(0, 9, (40,)),
                                 torch.bernoulli(torch.full((50,), 0.5)), torch.randn(300)), [x])
    key = np.array([123, 2**32 - 5], np.uint32)
    torch_outs = rt.lower(c.graph, "torch")(x, key)
    jax_outs = rt.lower(c.graph, "jax")(x.numpy(), key)
    for t, j in zip(torch_outs[:4], jax_outs[:4]):
        np.testing.assert_array_equal(t.numpy(), np.asarray(j))
    # normal draws go through erfinv, whose rounding differs between the two libraries
    np.testing.assert_allclose(torch_outs[4].numpy(), np.asarray(jax_outs[4]), rtol=1e-5, atol=1e-6)


def test_random_fold_in_is_jax_fold_in():
    import jax
    from reftrace import lax
    from reftrace import primitives as P
    for key, data in [(np.array([0, 42], np.uint32), 0), (np.array([2**32 - 1, 9], np.uint32), 2**32 - 1)]:
        g = rt.trace(lambda k: lax.bind(P.random_fold_in_p, k, data=data), key)
        want = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), data)))
        (t,) = rt.lower(g, "torch")(key)
        assert t.dtype == torch.uint32 and np.array_equal(t.numpy(), want)
        np.testing.assert_array_equal(np.asarray(rt.lower(g, "jax")(key)[0]), want)
    with pytest.raises(rt.ShapeError, match="data must be"):
        rt.trace(lambda k: lax.bind(P.random_fold_in_p, k, data=2**32), key)
    with pytest.raises(rt.ShapeError, match="u32"):
        rt.trace(lambda k: lax.bind(P.random_fold_in_p, k, data=1), np.zeros(2, np.int32))


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("compiler", COMPILERS)
def test_dropout_values_and_gradient_use_one_mask(compiler, partition):
    p = 0.3
    f = aot_function(lambda x: F.dropout(x, p, training=True), COMPILERS[compiler],
                     partition_fn=PARTITIONS[partition])
    x = positive(128, 96)
    y = f(x)
    kept = y != 0
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y.detach(), torch.where(kept, x.detach() * scale, 0.0))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02  # 12288 draws: ~5 standard deviations
    ct = torch.randn_like(y)
    y.backward(ct)
    assert torch.equal(x.grad, ct * (kept.float() * scale))
    fn = cache_entry(f).run
    assert not {"random", "random_fold_in"} & set(eqn_names(fn.bw_gm.reftrace_graph)), "the backward never redraws"
    assert "random" in eqn_names(fn.fw_gm.reftrace_graph)


@pytest.mark.parametrize("compiler", ["nop", "xla"])
def test_fresh_mask_per_call_and_reproducible_under_manual_seed(compiler):
    f = aot_function(lambda x: F.dropout(x, 0.5, training=True), COMPILERS[compiler])
    x = positive(1000)
    torch.manual_seed(1234)
    y1, y2 = f(x), f(x)
    assert not torch.equal(y1 != 0, y2 != 0)
    torch.manual_seed(1234)
    assert torch.equal(f(x), y1)
    with torch.no_grad():  # the inference graph draws from the key the same way
        torch.manual_seed(1234)
        assert torch.equal(f(x), y1)


def test_eval_mode_and_p_zero_are_the_identity_and_p_one_gives_zeros():
    x = positive(4, 6)
    model = aot_module(torch.nn.Dropout(0.5).eval(), nop)
    y = model(x)
    assert torch.equal(y, x) and cache_entry(model._compiled).key_input is None
    f0 = aot_function(lambda x: F.dropout(x, 0.0, training=True), nop)
    assert torch.equal(f0(x), x) and cache_entry(f0).key_input is None
    f1 = aot_function(lambda x: F.dropout(x, 1.0, training=True), nop)
    y1 = f1(x)
    y1.backward(torch.ones_like(y1))
    assert torch.equal(y1, torch.zeros_like(x)) and torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(F.dropout(x, 1.0, training=True), y1)  # as eager torch


@pytest.mark.parametrize("compiler", ["nop", "xla"])
def test_double_backward_draws_the_forward_mask(compiler):
    p = 0.4
    s = 1 / (1 - p)
    f = aot_function(lambda x: F.dropout(x, p, training=True) ** 3, COMPILERS[compiler])
    x = positive(2048, dtype=torch.float64)
    y = f(x)
    kept = y != 0
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # recomputed from the joint graph and its key
    xd = x.detach()
    torch.testing.assert_close(g.detach(), torch.where(kept, 3 * (xd * s) ** 2 * s, 0.0), rtol=1e-12, atol=0)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, torch.where(kept, 6 * xd * s ** 3, 0.0), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- distributions

N = 200_000


def draw(fn, *tensors):
    with torch.no_grad():
        return aot_function(fn, nop)(*tensors)


def test_uniform_and_normal_statistics():
    x = torch.zeros(N)
    u = draw(lambda x: torch.rand_like(x), x)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.003
    u64 = draw(lambda x: torch.rand(N, dtype=torch.float64) + x, x.double())
    assert u64.dtype == torch.float64 and abs(u64.mean() - 0.5) < 0.005
    z = draw(lambda x: torch.randn_like(x), x)
    assert abs(z.mean()) < 0.015 and abs(z.var() - 1) < 0.02
    n = draw(lambda x: torch.empty_like(x).normal_(2.0, 3.0), x)
    assert abs(n.mean() - 2) < 0.05 and abs(n.std() - 3) < 0.05
    a = draw(lambda x: torch.empty_like(x).uniform_(-2.0, 3.0), x)
    assert -2 <= a.min() and a.max() <= 3 and abs(a.mean() - 0.5) < 0.03
    e = draw(lambda x: torch.empty_like(x).exponential_(2.0), x)
    assert 0 <= e.min() and torch.isfinite(e).all() and abs(e.mean() - 0.5) < 0.01


def test_bernoulli_and_randint_statistics():
    probs = torch.cat([torch.full((N // 2,), 0.2), torch.full((N // 2,), 0.9)])
    b = draw(lambda p: torch.bernoulli(p), probs)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b[:N // 2].mean() - 0.2) < 0.01 and abs(b[N // 2:].mean() - 0.9) < 0.01
    bp = draw(lambda x: torch.empty_like(x).bernoulli_(0.3), probs)
    assert abs(bp.mean() - 0.3) < 0.01
    r = draw(lambda x: torch.randint(3, 7, (N,)) + x, torch.zeros((), dtype=torch.int64))
    assert r.dtype == torch.int64 and set(r.unique().tolist()) == {3, 4, 5, 6}
    counts = torch.bincount(r - 3).double() / N
    assert (counts - 0.25).abs().max() < 0.01


# ----------------------------------------------------------------------------- a model with dropout

def _set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def test_mobilenet_v3_small_training_with_dropout():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).double().train()
    eager = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)

    _set_dropout(model, 0.0)  # no draws: exactly the eager model's function
    _set_dropout(eager, 0.0)
    compiled = aot_module(model, nop)
    y = compiled(x)
    y.sum().backward()
    y_eager = eager(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-9, atol=1e-12)
    scale = max(b.grad.abs().max().item() for b in eager.parameters())
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        # rtol: torch's hardsigmoid backward multiplies by a float32 1/6 even in float64;
        # atol: some gradients are zero up to rounding (biases of a BatchNorm feeding a BatchNorm)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9 * scale, msg=name)

    p = 0.2
    _set_dropout(model, p)
    model.zero_grad()
    compiled = aot_module(model, nop)
    y = compiled(x)
    y.sum().backward()
    assert cache_entry(compiled._compiled).key_input is not None
    assert torch.isfinite(y).all() and all(torch.isfinite(q.grad).all() for q in model.parameters())
    # classifier: Linear(576, 1024) -> Hardswish -> Dropout -> Linear(1024, 10). With one sample and
    # cotangent ones, every row of the last weight's gradient is the dropout output d.
    w2 = model.classifier[3]
    d = w2.weight.grad[0]
    assert torch.equal(w2.weight.grad, d.expand_as(w2.weight.grad))
    torch.testing.assert_close(y.detach()[0], d @ w2.weight.detach().T + w2.bias.detach(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        feats = eager.avgpool(eager.features(x)).flatten(1)[0]
        z = eager.classifier[0](feats)
        h = F.hardswish(z)
    kept = d != 0
    assert 0.6 < kept.double().mean() < 0.95
    s = 1 / (1 - p)
    torch.testing.assert_close(d, torch.where(kept, h * s, 0.0), rtol=1e-9, atol=1e-12)
    # the backward through dropout uses the same mask: d(loss)/dz = (W2^T 1) * mask * s * hardswish'(z)
    dh = torch.where(kept, w2.weight.detach().sum(0) * s, 0.0)
    dz = torch.where(z < -3, 0.0, torch.where(z > 3, 1.0, (2 * z + 3) / 6)) * dh
    torch.testing.assert_close(model.classifier[0].bias.grad, dz, rtol=1e-9, atol=1e-12)
