"""Complex models through the torch bridge: values and every gradient (complex parameters included)
equal eager torch's, on the nop (torch) and xla backends; a few steps of Adam train identically; ops
whose rules are written for real tensors refuse complex ones instead of dropping imaginary parts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reftrace.compile import aot_function, aot_module, nop, xla_compile
from reftrace.errors import UnsupportedOperatorError

COMPILERS = {"nop": nop, "xla": xla_compile}


class SpectralConv1d(nn.Module):
    """A Fourier neural operator layer: rfft, complex weights on the lowest modes, irfft, plus a 1x1 conv."""

    def __init__(self, channels: int = 3, out: int = 4, modes: int = 5) -> None:
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(channels, out, modes, dtype=torch.cdouble) / (channels * out))
        self.skip = nn.Conv1d(channels, out, 1, dtype=torch.double)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        spectrum = torch.fft.rfft(x)
        mixed = torch.zeros(x.shape[0], self.weight.shape[1], n // 2 + 1, dtype=torch.cdouble)
        mixed[:, :, :self.modes] = torch.einsum("bix,iox->box", spectrum[:, :, :self.modes], self.weight)
        return F.gelu(torch.fft.irfft(mixed, n=n) + self.skip(x))


class SpectralConv2d(nn.Module):
    def __init__(self, channels: int = 2, modes: int = 3) -> None:
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(channels, channels, modes, modes, dtype=torch.cdouble) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft2(x, norm="ortho")
        m = self.modes
        mixed = torch.zeros_like(spectrum)
        mixed[..., :m, :m] = torch.einsum("bixy,ioxy->boxy", spectrum[..., :m, :m], self.weight)
        return torch.fft.irfft2(mixed, s=x.shape[-2:], norm="ortho")


class StftLoss(nn.Module):
    """Spectral convergence plus log-magnitude distance between STFTs of a prediction and a target."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64, dtype=torch.double)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(16, dtype=torch.double)
        pred = torch.stft(self.proj(x), 16, hop_length=4, window=window, return_complex=True).abs()
        ref = torch.stft(target, 16, hop_length=4, window=window, return_complex=True).abs()
        return (pred - ref).norm() / ref.norm() + (torch.log(pred + 1e-7) - torch.log(ref + 1e-7)).abs().mean()


class ComplexRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8, dtype=torch.cdouble))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        z = torch.fft.ifft(torch.fft.fft(z) * self.scale)
        z = z * z.conj().exp() + torch.polar(z.abs(), z.angle()) + torch.complex(z.imag, z.real.sin())
        return torch.view_as_real(z).reshape(x.shape)


def _models():
    torch.manual_seed(0)
    return {
        "fno1d": (SpectralConv1d(), (torch.randn(2, 3, 16, dtype=torch.double),)),
        "fno2d": (SpectralConv2d(), (torch.randn(2, 2, 8, 8, dtype=torch.double),)),
        "stft_loss": (StftLoss(), (torch.randn(2, 64, dtype=torch.double), torch.randn(2, 64, dtype=torch.double))),
        "round_trip": (ComplexRoundTrip(), (torch.randn(3, 16, dtype=torch.double),)),
    }


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out.abs() if out.is_complex() else out).pow(2).sum()


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
@pytest.mark.parametrize("name", ["fno1d", "fno2d", "stft_loss", "round_trip"])
def test_values_and_gradients_equal_eager(name, compiler):
    model, args = _models()[name]
    eager = copy.deepcopy(model)
    args = [a.clone().requires_grad_() for a in args]
    eager_args = [a.detach().clone().requires_grad_() for a in args]
    compiled = aot_module(model, COMPILERS[compiler])
    out, expected = compiled(*args), eager(*eager_args)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    _loss(out).backward()
    _loss(expected).backward()
    for (pname, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None and p.grad.dtype == q.grad.dtype, pname
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=pname)
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_adam_training_on_complex_weights_matches_eager():
    """Five Adam steps (complex parameters: Adam treats them as pairs of reals) stay on eager's path."""
    model, (x,) = _models()["fno1d"]
    eager = copy.deepcopy(model)
    compiled = aot_module(model, nop)
    opt, eager_opt = torch.optim.Adam(model.parameters(), 1e-2), torch.optim.Adam(eager.parameters(), 1e-2)
    target = torch.randn(2, 4, 16, dtype=torch.double)
    for _ in range(5):
        for m, o, optimizer in ((compiled, model, opt), (eager, eager, eager_opt)):
            optimizer.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            optimizer.step()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
def test_complex_inputs_and_outputs(compiler):
    """A complex input that requires grad, complex outputs: the gradient is torch's (conjugate Wirtinger)."""
    def fn(z, w):
        y = torch.fft.fft(z * w.conj()) / (z.abs() + 1)
        return y, torch.sgn(z) * torch.sqrt(z), (y * y).real.sum()

    z = torch.randn(6, dtype=torch.cdouble, requires_grad=True)
    w = torch.randn(6, dtype=torch.cdouble, requires_grad=True)
    zc, wc = z.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected, got = fn(z, w), aot_function(fn, COMPILERS[compiler])(zc, wc)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    cts = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(expected, cts)
    torch.autograd.backward(got, cts)
    torch.testing.assert_close(zc.grad, z.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(wc.grad, w.grad, rtol=1e-9, atol=1e-10)


def test_real_only_rules_refuse_complex_tensors():
    """A rule written for real tensors refuses a complex one with a clear error, never its real part."""
    a = torch.randn(3, 3, dtype=torch.cdouble, requires_grad=True)
    with pytest.raises(UnsupportedOperatorError, match="logcumsumexp.*complex"):
        aot_function(lambda x: torch.logcumsumexp(x, 0), nop)(a)
