"""Single ops at the edges of their domains, against eager bit for bit where torch's CPU kernel fixes the
bits: grid ties, infinities, NaN, signed zeros, float16/bfloat16 rounding, static-shape variants of ops
whose shape usually depends on values."""
from __future__ import annotations

import pytest
import torch

from reftrace.compile import aot_function, nop, xla_compile

COMPILERS = {"nop": nop, "xla": xla_compile}


def test_half_precision_norms_are_computed_in_float32_and_rounded_once():
    """Rounding ``x * x`` (or ``|x| ** p``) to float16/bfloat16 first, as a per-op graph did, moved 11% of
    the 2-norms and 85% of the 3-norms by a rounding; summed in float32 in another order, a norm falls on
    the other side of a float16 rounding boundary about once in 3,000."""
    torch.manual_seed(0)
    differ = 0
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        x = torch.randn(64, 37, dtype=dtype) * 3
        for p in (2, 3, 0.5):
            f = lambda x: torch.linalg.vector_norm(x, p, dim=1)  # noqa: E731, B023
            for compiler in COMPILERS.values():
                mine, eager = aot_function(f, compiler)(x), f(x)
                torch.testing.assert_close(mine, eager, rtol=ulp, atol=0)
                differ += int((mine != eager).sum())
    assert differ <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_vector_norms_and_their_gradients_are_eagers_bits_through_nop(dtype):
    """One composite run as torch's kernel, differentiated with torch's formula: a zero row, zero entries
    (p < 1) and a tie of the inf-norm included. ``ord=0``: eager's backward returns no tensor (None)."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 7, dtype=dtype) * 3
    x0[0], x0[1, :3] = 0, 0
    x0[2, 1] = x0[2, 2] = 5
    weights = torch.arange(1.0, 7.0, dtype=dtype)
    for order in (2, 1, 3, 1.5, 0.5, float("inf"), -float("inf"), -1):
        f = lambda x: torch.linalg.vector_norm(x, order, dim=1)  # noqa: E731, B023
        mine, eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        out, expected = aot_function(f, nop)(mine), f(eager)
        assert torch.equal(out, expected), order
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        assert torch.equal(mine.grad.nan_to_num(), eager.grad.nan_to_num()), order


_QUANTIZE_SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e10, 0.05, 0.15, 0.25, -0.05, 0.75,
                      -1.15, -1.05, 0.0]


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fake_quantization_is_eagers_to_the_bit_with_its_straight_through_gradient(dtype, compiler):
    """Quantization-aware training's rounding: values at grid ties, past the range, infinite and NaN,
    per tensor (scale as a number or a tensor) and per channel (whose kernel sends values past int64
    to ``quant_min``); the gradient is 1 inside the range and 0 where the value was clamped."""
    torch.manual_seed(0)
    x = torch.cat([torch.tensor(_QUANTIZE_SPECIALS), torch.randn(202) * 0.5]).to(dtype)  # 216 = 4 * 54
    scales, zero_points = torch.tensor([0.1, 0.0137, 0.3, 0.0071]), torch.tensor([3, 5, -2, 1], dtype=torch.int32)
    cases = [lambda x: torch.fake_quantize_per_tensor_affine(x, 0.1, 3, -8, 7),
             lambda x: torch.fake_quantize_per_tensor_affine(x, 0.0137, 128, 0, 255),
             lambda x: torch.fake_quantize_per_tensor_affine(x, scales[1:2], zero_points[1:2], -128, 127),
             lambda x: torch.fake_quantize_per_channel_affine(x.reshape(4, -1), scales, zero_points, 0, -8, 7),
             lambda x: torch.fake_quantize_per_channel_affine(x.reshape(-1, 4), scales, zero_points, 1, -128, 127)]
    for f in cases:
        mine, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = aot_function(f, COMPILERS[compiler])(mine), f(eager)
        assert out.dtype == expected.dtype and torch.equal(out.nan_to_num(), expected.nan_to_num())
        weights = torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape)
        (out.double() * weights).sum().backward()
        (expected.double() * weights).sum().backward()
        assert torch.equal(mine.grad, eager.grad)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_repeat_interleave_with_tensor_repeats_and_an_output_size(compiler):
    """With ``output_size`` the shape is static (MoE token routing, ragged batches): runs of zero length,
    a 0-d ``repeats`` and the bare index form, values and gradients as eager's."""
    for repeats, n in (([1, 2, 0], 3), ([0, 0, 3], 3), ([2, 1, 1], 4), ([0, 0, 0], 0)):
        r = torch.tensor(repeats)
        f = lambda x: x.repeat_interleave(r, dim=0, output_size=n) * 2  # noqa: E731, B023
        x = torch.randn(3, 2, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        out, expected = aot_function(f, COMPILERS[compiler])(x), f(x_eager)
        assert torch.equal(out, expected)
        out.sum().backward()
        expected.sum().backward()
        assert torch.equal(x.grad, x_eager.grad)
    x = torch.randn(3, 2)
    f = lambda x: x.repeat_interleave(torch.tensor(2), dim=1, output_size=4)  # noqa: E731
    assert torch.equal(aot_function(f, COMPILERS[compiler])(x), f(x))
    f = lambda x: torch.repeat_interleave(torch.tensor([1, 3]), output_size=4) + x  # noqa: E731
    x = torch.arange(4)
    assert torch.equal(aot_function(f, COMPILERS[compiler])(x), f(x))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_nextafter_from_infinities_and_to_zero(compiler):
    """From an infinity toward anything else: the largest finite value of its sign (the step had stayed
    at inf); a step from the smallest subnormal that lands on zero keeps its sign (XLA flushes
    subnormals to zero, so only through ``nop``)."""
    inf, nan = float("inf"), float("nan")
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([inf, -inf, inf, -inf, inf, 1.0, 0.0, -0.0, nan, 3.0], dtype=dtype)
        y = torch.tensor([0.0, 0.0, inf, inf, -inf, inf, -1.0, 1.0, 0.0, nan], dtype=dtype)
        if compiler == "nop":
            tiny = torch.nextafter(torch.zeros(2, dtype=dtype), torch.tensor([1.0, -1.0], dtype=dtype))
            x, y = torch.cat([x, tiny]), torch.cat([y, torch.tensor([-1.0, 1.0], dtype=dtype)])
        out, expected = aot_function(torch.nextafter, COMPILERS[compiler])(x, y), torch.nextafter(x, y)
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())
        assert torch.equal(torch.signbit(out), torch.signbit(expected))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_linspace_and_logspace_are_the_kernels_values(compiler):
    """torch's kernel counts from both ends with fused multiply-adds: the middle of ``linspace(-1, 1, 7)``
    is -3e-8 in float32, not the 0 of the reference formula."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64):
        for args in ((-1, 1, 7), (0.3, 17.9, 23), (5, -3, 4), (2, 2, 1), (0, 1, 0)):
            for f in (lambda x: torch.linspace(*args, dtype=dtype) + x,  # noqa: B023
                      lambda x: torch.logspace(*args, base=2.5, dtype=dtype) + x):  # noqa: B023
                x = torch.zeros((), dtype=dtype)
                assert torch.equal(aot_function(f, COMPILERS[compiler])(x), f(x))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_signbit(compiler):
    """Negative zero counts; a NaN's sign bit cannot be read in a graph (every NaN counts as positive)."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.int32, torch.uint8, torch.bool):
        if dtype.is_floating_point:
            x = torch.tensor([-1.5, -0.0, 0.0, 2.0, float("inf"), -float("inf")], dtype=dtype)
        else:
            x = torch.tensor([-3, 0, 4]).to(dtype)
        assert torch.equal(aot_function(torch.signbit, COMPILERS[compiler])(x), torch.signbit(x))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_integer_shifts_as_torchs_kernel(compiler):
    """Every integer type, values at its limits, shifts negative, zero, up to and past its width: a left
    shift loses the bits it pushes out (and may set the sign bit), a right shift of a signed value fills
    in its sign, and a shift out of range gives the kernel's limit."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        info = torch.iinfo(dtype)
        values = torch.tensor([info.min, info.min + 1, -7, -1, 0, 1, 5, 100, info.max - 1, info.max]).clamp(
            info.min, info.max).to(dtype)
        shifts = torch.tensor([-3, -1, 0, 1, 2, info.bits - 2, info.bits - 1, info.bits, info.bits + 1, 70]).clamp(
            info.min, info.max).to(dtype)
        a = values[:, None].expand(-1, len(shifts)).contiguous()
        b = shifts[None, :].expand(len(values), -1).contiguous()
        for f in (lambda a, b: a << b, lambda a, b: a >> b, lambda a, b: a << 3, lambda a, b: a >> 2,
                  lambda a, b: torch.bitwise_left_shift(3, b)):
            out, expected = aot_function(f, COMPILERS[compiler])(a, b), f(a, b)
            assert out.dtype == expected.dtype and torch.equal(out, expected)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_the_older_scatter_with_reduce(compiler):
    """``scatter_(dim, index, src, reduce="add" | "multiply")``, a tensor or a number as the source,
    repeated indices included: integers exactly, floats to rounding (eager adds in index order)."""
    torch.manual_seed(0)
    index = torch.tensor([[0, 1, 3], [0, 0, 2], [3, 1, 1]])
    columns = torch.tensor([[0, 1], [2, 2], [1, 1]])
    for reduce in ("add", "multiply"):
        for dtype in (torch.float64, torch.int64):
            x, src = (torch.randn(4, 3) * 3).to(dtype), (torch.randn(3, 3) * 3).to(dtype)
            number = 2.5 if dtype.is_floating_point else 3
            for f in (lambda x, s: x.clone().scatter_(0, index, s, reduce=reduce),  # noqa: B023
                      lambda x, s: x.clone().scatter_(1, columns, number, reduce=reduce)):  # noqa: B023
                torch.testing.assert_close(aot_function(f, COMPILERS[compiler])(x, src), f(x, src),
                                           rtol=1e-12, atol=0)


def test_an_out_tensor_the_op_resizes_is_refused_by_name():
    """``torch.mul(x, 2, out=o)`` with ``o`` of another size resizes ``o`` in eager; a graph's inputs keep
    their shapes. The wrapper kept the old shape, so the resize reached the run as a bare RuntimeError."""
    from reftrace.errors import TracingError
    with pytest.raises(TracingError, match=r"input 1 had its shape changed in place \(\(0,\) -> \(3,\)\)"):
        aot_function(lambda x, o: torch.mul(x, 2, out=o), nop)(torch.randn(3), torch.zeros(0))
    x, o = torch.randn(3), torch.zeros(3)
    aot_function(lambda x, o: torch.mul(x, 2, out=o), nop)(x, o)
    assert torch.equal(o, x * 2)


_FLOAT32_BLOCKS = {
    "rms_norm": lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w),
    "swiglu": lambda x, w: torch.nn.functional.silu(x * w) * x,
    "manual_layer_norm": lambda x, w: (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5) * w,
    "normalize": lambda x, w: torch.nn.functional.normalize(x, dim=-1) / (w.abs() + 1),
    "log": lambda x, w: torch.log(x.abs() + 0.1) + torch.log1p(w.abs()),
    "group_norm": lambda x, w: torch.nn.functional.group_norm(x.transpose(1, 2), 4, w, w),
}


@pytest.mark.parametrize("block", _FLOAT32_BLOCKS)
def test_float32_blocks_of_real_models_have_eagers_bits(block):
    """RMSNorm, SwiGLU, a hand-written layer norm, ``normalize``, logs and group norm in float32 under
    ``nop``: values and gradients are eager's bits. The VJP rules of sqrt, rsqrt, log, log1p and
    division follow torch's formulas' order of operations, silu and group norm are composites lowered
    to their kernels. Before, each was an ulp or a few off."""
    torch.manual_seed(0)
    fn = _FLOAT32_BLOCKS[block]
    x, w = torch.randn(4, 8, 32), torch.randn(32)
    cotangent = torch.randn(fn(x, w).shape)
    grads = []
    for f in (fn, aot_function(fn, nop)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(xs, ws)
        out.backward(cotangent)
        grads.append((out, xs.grad, ws.grad))
    for got, want in zip(grads[1], grads[0]):
        assert (got is None and want is None) or torch.equal(got, want)


def test_float32_var_and_std_sum_in_float64_as_torchs_kernel():
    """torch's CPU ``var``/``std``/``var_mean`` accumulate float32 in float64: the values are its bits
    (a float32 two-pass sum was an ulp off). The gradients are not: the graph's are float64, rounded once."""
    torch.manual_seed(0)
    x = torch.randn(6, 9, 40) * 3 + 1
    for fn in (lambda x: x.var(-1), lambda x: x.std(0, correction=0), lambda x: torch.var_mean(x, (0, 2)),
               lambda x: x.var()):
        for got, want in zip(*(torch.utils._pytree.tree_leaves(f(x)) for f in (aot_function(fn, nop), fn))):
            assert torch.equal(got, want)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_the_mean_of_an_empty_loss_is_nan_as_torchs(compiler):
    """0/0: the BCE composite's decomposition (the JAX backend's) divided by max(count, 1) and gave 0."""
    p, t = torch.zeros(0, dtype=torch.float64).requires_grad_(), torch.zeros(0, dtype=torch.float64)
    for loss in (torch.nn.functional.binary_cross_entropy, torch.nn.functional.smooth_l1_loss,
                 torch.nn.functional.huber_loss, torch.nn.functional.l1_loss):
        got = aot_function(loss, COMPILERS[compiler])(p, t)
        assert got.isnan() and loss(p, t).isnan(), loss.__name__
        got.backward()
        assert p.grad.shape == (0,)
