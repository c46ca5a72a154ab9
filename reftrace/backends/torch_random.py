"""Torch lowering of ``random`` and ``random_fold_in``: JAX's threefry2x32 counter-based RNG in
torch integer ops, so a key draws the same bits on both backends. Rows of
``reftrace.backends.torch_rules.torch_rules``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reftrace import primitives as P
from reftrace.backends.torch_dtypes import torch_dtype
from reftrace.backends.torch_rules import _t, torch_rules
from reftrace.errors import UnsupportedOperatorError


_MASK32 = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _add32(a: Any, b: Any) -> Any:
    return torch.bitwise_and(torch.add(a, b), _MASK32)


def _rotl32(x: Any, r: int) -> Any:
    left = torch.bitwise_and(torch.bitwise_left_shift(x, r), _MASK32)
    return torch.bitwise_or(left, torch.bitwise_right_shift(x, 32 - r))


def threefry2x32(k0: Any, k1: Any, x0: Any, x1: Any) -> tuple[Any, Any]:
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., SC'11) on int64 tensors holding u32 words.

    Words live in int64 so every op is plain torch arithmetic; each sum is masked to 32 bits.
    """
    ks = (k0, k1, torch.bitwise_xor(torch.bitwise_xor(k0, k1), 0x1BD11BDA))
    x0, x1 = _add32(x0, ks[0]), _add32(x1, ks[1])
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = _add32(x0, x1)
            x1 = torch.bitwise_xor(_rotl32(x1, r), x0)
        x0 = _add32(x0, ks[(i + 1) % 3])
        x1 = _add32(x1, torch.add(ks[(i + 2) % 3], i + 1))
    return x0, x1


def _random_bits(key: Any, nbits: int, shape: tuple[int, ...]) -> tuple[Any, Any] | Any:
    """JAX's partitionable threefry bits: counter i (row-major) -> threefry(key, (i >> 32, i & mask)).

    For 64 bits returns the (high, low) 32-bit words; otherwise their xor cut to ``nbits``,
    all held in int64 tensors.
    """
    key = _t(key).to(torch.int64)
    size = int(np.prod(shape, dtype=np.int64))
    counter = torch.arange(size, dtype=torch.int64)
    hi, lo = torch.bitwise_right_shift(counter, 32), torch.bitwise_and(counter, _MASK32)
    b0, b1 = threefry2x32(key[0], key[1], hi, lo)
    if nbits == 64:
        return b0, b1
    bits = torch.bitwise_xor(b0, b1)
    return bits if nbits == 32 else torch.bitwise_and(bits, (1 << nbits) - 1)


_FLOAT_BITS = {  # dtype -> (random bits drawn, mantissa bits), as jax.random.uniform draws them
    np.dtype(np.float64): (64, 52),
    np.dtype(np.float32): (32, 23),
    np.dtype(np.float16): (16, 10),
}
try:
    import ml_dtypes

    _FLOAT_BITS[np.dtype(ml_dtypes.bfloat16)] = (8, 7)
except ImportError:  # pragma: no cover
    pass


def _uniform(key: Any, shape: tuple[int, ...], dtype: np.dtype, lo: float, hi: float) -> Any:
    """Uniform [lo, hi) floats from random mantissa bits, exactly as jax.random.uniform.

    JAX bitcasts ``1.m`` and subtracts 1; that equals ``m * 2**-nmant`` exactly, which needs
    no bitcast (TorchScript has no ``Tensor.view(dtype)``).
    """
    try:
        nbits, nmant = _FLOAT_BITS[np.dtype(dtype)]
    except KeyError:
        raise UnsupportedOperatorError(f"random: no torch lowering for dtype {np.dtype(dtype).name}") from None
    bits = _random_bits(key, nbits, shape)
    if nbits == 64:  # the top 52 of the 64 bits (high << 32 | low) >> 12, without overflowing int64
        high, low = bits
        mant = torch.bitwise_or(torch.bitwise_left_shift(high, 20), torch.bitwise_right_shift(low, 12))
    else:
        mant = torch.bitwise_right_shift(bits, nbits - nmant)
    floats = torch.mul(mant.to(torch_dtype(dtype)), 2.0 ** -nmant)
    lo_d, hi_d = np.array(lo, dtype), np.array(hi, dtype)
    scale, low = float(hi_d - lo_d), float(lo_d)  # computed in ``dtype``, as JAX does
    if (scale, low) != (1.0, 0.0):
        floats = torch.clamp_min(torch.add(torch.mul(floats, scale), low), low)
    return floats.reshape(list(shape))


def _random(key: Any, *, shape: tuple[int, ...], dtype: np.dtype, distribution: str) -> Any:
    """Counter-based and Generator-free: the same key gives the same numbers as the JAX backend.

    ``uniform`` matches jax.random.uniform bit for bit; ``normal`` is sqrt(2) * erfinv(u) on
    u ~ U(nextafter(-1, 0), 1) as jax.random.normal, equal up to erfinv's rounding.
    """
    if distribution == "uniform":
        return _uniform(key, shape, dtype, 0.0, 1.0)
    lo = float(np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype)))
    u = _uniform(key, shape, dtype, lo, 1.0)
    return torch.mul(torch.erfinv(u), float(np.sqrt(np.array(2.0, dtype))))


torch_rules[P.random_p] = _random


def _random_fold_in(key: Any, *, data: int) -> Any:
    """jax.random.fold_in for threefry keys: the block cipher on the counter pair ``(0, data)``."""
    k = _t(key).to(torch.int64)
    zero = torch.mul(k[0], 0)  # a 0-d int64 on the key's device
    y0, y1 = threefry2x32(k[0], k[1], zero, torch.add(zero, int(data)))
    return torch.stack([y0, y1]).to(torch.uint32)


torch_rules[P.random_fold_in_p] = _random_fold_in

missing = set(P.registry.values()) - set(torch_rules)
assert not missing, f"primitives without a torch rule: {sorted(p.name for p in missing)}"
