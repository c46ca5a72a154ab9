"""Real models, one training step through ``aot_module`` against eager torch.

Every model of ``tests.models.zoo`` is stepped (forward, ``loss.backward()``, SGD, a second
forward) with the compilers of ``PLAN`` — ``nop`` (the emitted FX run as is), ``ts_compile``
(TorchScript) and ``xla_compile`` (one XLA computation through JAX) — and every output,
gradient, updated parameter and buffer must equal a deepcopy stepped in eager torch.
float64 runs check to ~1e-10; float32 runs to what float32 summation order allows.
Every (model, dtype) also runs with the min-cut partition under ``nop``, two under every compiler.
``pytest -v tests/models`` ends with a table of the errors each run showed.
"""
from __future__ import annotations

import copy

import pytest
import torch

from reftrace.compile import default_partition, min_cut_rematerialization_partition, nop, ts_compile, xla_compile
from tests.models.training_step import ERRORS, compare
from tests.models.zoo import CASES

COMPILERS = {"nop": nop, "ts": ts_compile, "xla": xla_compile}
PARTITIONS = {"default": default_partition, "mincut": min_cut_rematerialization_partition}
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
f32, f64 = torch.float32, torch.float64
ALL = ("nop", "ts", "xla")

# model -> dtype -> compilers run with the default partition. XLA compiles dominate the folder's time
# (3-25 s each), so float64 XLA runs on three models that between them cover attention, LayerNorm,
# embeddings, convolutions (plain and transposed), GroupNorm and interpolation.
NOP_TS = ("nop", "ts")
PLAN = {
    # Train-mode BatchNorm; the XLA compiles of these two take 10-25 s each.
    "resnet18": {f32: ALL, f64: ("nop",)},
    "mobilenet_v3_small": {f32: ALL, f64: ("nop",)},
    "vit": {f32: ALL, f64: NOP_TS},
    "upsampling_net": {f32: ALL, f64: ALL},
    "gpt2": {f32: ALL},  # labels=: transformers computes that loss in float32 whatever the model's dtype
    "gpt2_logits_loss": {f64: ALL},
    "bert": {f32: ALL, f64: NOP_TS},
    # No float64 run: LlamaRMSNorm and the rotary embedding cast to float32 inside the model.
    "llama": {f32: ALL},
    # No float64 run: eager torch's CPU grouped matrix product takes float32, bfloat16 and float16 only.
    "mixtral": {f32: ("nop", "xla")},
    "transformer_encoder": {f32: ALL, f64: ALL},
    "lstm": {f32: ALL, f64: NOP_TS},
}

# The min-cut partition runs with nop for every (model, dtype) of PLAN, and with every compiler here.
MINCUT_ALL_COMPILERS = {("gpt2", f32), ("vit", f32)}

# (rtol, atol). float32: the compiled graphs sum in other orders than torch's kernels (observed errors are
# 5-10x below these; run with -v for the table).
TOLERANCE = {f32: (2e-5, 2e-6), f64: (1e-10, 1e-12)}
TOLERANCE_OVERRIDES = {
    # Train-mode BatchNorm over few values per channel (2x2 at the last stage, batch 2) amplifies float32
    # rounding: gradients reach ~10 with errors ~2e-5, about 1e-5 of each tensor's scale. Inputs are 64x64
    # (at 32x32 the last stage normalises 2 values per channel and float32 gradients are noise).
    ("resnet18", f32): (1e-4, 1e-4),
    ("mobilenet_v3_small", f32): (5e-5, 5e-6),
}

# The slowest variants (XLA compiles of the largest graphs); they still run by default.
SLOW = {("resnet18", f32, "xla"), ("mobilenet_v3_small", f32, "xla"), ("mobilenet_v3_small", f32, "ts")}


def _params():
    out = []
    for name, dtypes in PLAN.items():
        for dtype, compilers in dtypes.items():
            for compiler in compilers:
                partitions = ["default"]
                if compiler == "nop" or (name, dtype) in MINCUT_ALL_COMPILERS:
                    partitions.append("mincut")
                for partition in partitions:
                    marks = [pytest.mark.slow] if (name, dtype, compiler) in SLOW else []
                    out.append(pytest.param(name, dtype, compiler, partition, marks=marks,
                                            id=f"{name}-{DTYPES[dtype]}-{compiler}-{partition}"))
    return out


@pytest.mark.parametrize("name,dtype,compiler,partition", _params())
def test_training_step_matches_eager(request, name, dtype, compiler, partition):
    case = CASES[name]
    want = case.eager(dtype)
    got = case.compiled(dtype, COMPILERS[compiler], PARTITIONS[partition], keep=_kept(name, dtype, compiler))
    rtol, atol = TOLERANCE_OVERRIDES.get((name, dtype), TOLERANCE[dtype])
    ERRORS[request.node.callspec.id] = compare(got, want, rtol=rtol, atol=atol)


def _kept(name, dtype, compiler):
    """Runs other tests below inspect again."""
    return dtype == torch.float32 and compiler == "nop" and name in ("gpt2", "resnet18")


@pytest.mark.parametrize("name,dtype", [("resnet18", torch.float32), ("gpt2", torch.float32)])
def test_min_cut_saves_less_than_default(name, dtype):
    case = CASES[name]
    default = case.compiled(dtype, nop, default_partition, keep=True).saved_bytes()
    mincut = case.compiled(dtype, nop, min_cut_rematerialization_partition, keep=True).saved_bytes()
    assert 0 < mincut < default, (mincut, default)


def test_gpt2_tied_embeddings_stay_tied_and_get_the_summed_gradient():
    case = CASES["gpt2"]
    got = case.compiled(torch.float32, nop, keep=True)
    model = got.model
    assert model.lm_head.weight is model.transformer.wte.weight
    # The same model with the tie cut: the tied gradient is the sum of the two uses' gradients.
    base, args, kwargs = case.base(torch.float32)
    untied = copy.deepcopy(base)
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    case.loss_fn(untied(*args, **kwargs)).backward()
    summed = untied.lm_head.weight.grad + untied.transformer.wte.weight.grad
    torch.testing.assert_close(got.tensors["grad transformer.wte.weight"], summed, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(untied.lm_head.weight.grad, summed, rtol=1e-2, atol=1e-4)  # both uses count


def test_batchnorm_running_statistics_are_updated_like_eager():
    case = CASES["resnet18"]
    got = case.compiled(torch.float32, nop, keep=True)
    base, _, _ = case.base(torch.float32)
    buffers = [n for n, _ in base.named_buffers()]
    assert len(buffers) == 3 * 20  # running_mean, running_var, num_batches_tracked per BatchNorm
    for n in buffers:
        if n.endswith("num_batches_tracked"):
            assert got.tensors[f"buffer {n}"].item() == 1
        else:  # moved away from the initial statistics (0 and 1), to eager's values (test above)
            assert not torch.equal(got.tensors[f"buffer {n}"], dict(base.named_buffers())[n])


def test_hardsigmoid_gradient_in_float64_is_eagers():
    """torch's CPU hardsigmoid backward multiplies by the float32 constant ``1.0f / 6.0f`` even in float64
    (3e-8 from 1/6), which mobilenet_v3_small's squeeze-excitation blocks spread upstream: reftrace's
    ``hardsigmoid`` composite has that slope too, so the model meets the float64 tolerance of the others."""
    from reftrace.compile import aot_function
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(aot_function(torch.nn.functional.hardsigmoid, nop)(x).sum(), x)
    (eager,) = torch.autograd.grad(torch.nn.functional.hardsigmoid(x).sum(), x)
    assert torch.equal(g, eager) and torch.equal(g, torch.full_like(g, float(torch.tensor(1 / 6, dtype=torch.float32))))


def test_attention_rows_with_nothing_to_attend_to_are_zero():
    """Left padding under a causal mask leaves query rows with every key masked (gpt2 and llama above):
    torch's CPU attention kernel gives 0 there and a zero gradient; a plain softmax would give NaN."""
    from reftrace.compile import aot_function
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=f64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: 2 key/value heads for 4 query heads
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # batch 1: keys 0 and 1 are padding, so query rows 0 and 1 see nothing

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    results = []
    for fn in (attend, aot_function(attend, nop)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g.manual_seed(1), dtype=f64))
        results.append((out, *grads))
    assert torch.equal(results[1][0][1, :, :2], torch.zeros(4, 2, 8, dtype=f64))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
