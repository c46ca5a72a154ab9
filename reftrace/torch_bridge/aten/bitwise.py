"""Logical and bitwise ATen ops: and/or/xor/not (on truth values, or bit by bit on integers and bools)
and integer shifts, as torch's CPU kernels define them."""
from __future__ import annotations

from typing import Any

import numpy as np

from reftrace import lax
from reftrace import primitives as P
from reftrace.torch_bridge.aten._common import (aten, bcast, broadcast_shapes, cast, elementwise, literal, out_aval,
                                                register, unsupported)
from reftrace.torch_bridge.aten.elementwise import floor_div_int, same_shape, to_bool


def _logical(prim: P.Primitive):
    def rule(x: Any, y: Any) -> Any:
        shape = broadcast_shapes(x, y)
        return lax.bind(prim, bcast(to_bool(x), shape), bcast(to_bool(y), shape))
    return rule


register(aten.logical_and.default)(_logical(P.and_p))
register(aten.logical_or.default)(_logical(P.or_p))
register(aten.logical_xor.default)(_logical(P.xor_p))


@register(aten.logical_not.default)
def logical_not(x: Any) -> Any:
    return lax.bitwise_not(to_bool(x))


def _bitwise(prim: P.Primitive):
    def rule(x: Any, y: Any) -> Any:
        return elementwise(prim, x, y, dtype=out_aval().dtype)
    return rule


register(aten.bitwise_and.Tensor, aten.bitwise_and.Scalar)(_bitwise(P.and_p))
register(aten.bitwise_or.Tensor, aten.bitwise_or.Scalar)(_bitwise(P.or_p))
register(aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar)(_bitwise(P.xor_p))


def _powers_of_two(shift: Any, d: np.dtype) -> Any:
    """``2 ** shift`` in ``d``, wrapped as the integer type wraps (``1 << 7`` is -128 in int8), for shifts
    clamped into ``[0, bits)``: a gather from the table of them."""
    bits = d.itemsize * 8
    table = np.array([(1 << k) & ((1 << bits) - 1) for k in range(bits)], dtype=np.uint64).astype(d)
    index = lax.min(lax.max(cast(shift, np.int64), literal(0, np.int64)), literal(bits - 1, np.int64))
    flat = lax.reshape(index, (index.size,))
    return lax.reshape(lax.gather(lax.constant(table), flat, 0), shift.shape)


@register(aten.__lshift__.Tensor, aten.__lshift__.Scalar, aten.bitwise_left_shift.Tensor,
          aten.bitwise_left_shift.Tensor_Scalar, aten.bitwise_left_shift.Scalar_Tensor)
def left_shift(x: Any, y: Any) -> Any:
    """torch's CPU kernel: ``a << b`` on the unsigned twin of the type (bits shifted out are lost, the sign
    bit may be set), and 0 for a negative shift or one of the type's width or more. A product with a
    power of two that wraps as the type does."""
    d = out_aval().dtype
    if not P.is_int(d):
        raise unsupported(f"a {d} shift (torch shifts integers)")
    a, b = same_shape(x, y, d)
    bits = d.itemsize * 8
    in_range = lax.logical_and(lax.ge(b, literal(0, d)), lax.lt(cast(b, np.int64), literal(bits, np.int64)))
    return lax.select(in_range, lax.mul(a, _powers_of_two(b, d)), lax.full(a.shape, 0, d))


@register(aten.__rshift__.Tensor, aten.__rshift__.Scalar, aten.bitwise_right_shift.Tensor,
          aten.bitwise_right_shift.Tensor_Scalar, aten.bitwise_right_shift.Scalar_Tensor)
def right_shift(x: Any, y: Any) -> Any:
    """torch's CPU kernel: arithmetic for signed types (the sign fills in), logical for unsigned; a negative
    shift or one of ``bits - 1`` or more (``bits`` unsigned) shifts by that limit: -1 or 0 for signed
    values, 0 for unsigned. A floor division by a power of two."""
    d = out_aval().dtype
    if not P.is_int(d):
        raise unsupported(f"a {d} shift (torch shifts integers)")
    a, b = same_shape(x, y, d)
    signed = d.kind == "i"
    limit = d.itemsize * 8 - (1 if signed else 0)
    in_range = lax.logical_and(lax.ge(b, literal(0, d)), lax.lt(cast(b, np.int64), literal(limit, np.int64)))
    quotient = floor_div_int(a, _powers_of_two(lax.select(in_range, b, lax.full(b.shape, 0, d)), d))
    beyond = (lax.select(lax.lt(a, literal(0, d)), lax.full(a.shape, -1, d), lax.full(a.shape, 0, d)) if signed
              else lax.full(a.shape, 0, d))
    return lax.select(in_range, quotient, beyond)


@register(aten.bitwise_not.default)
def bitwise_not(x: Any) -> Any:
    return lax.bitwise_not(x)
