"""The decomposition table capture applies: which composite ATen ops become simpler ones first.

torch's ``core_aten_decompositions()``, plus a few of torch's other decompositions that
land on rows reftrace has, minus ops whose reftrace row is more faithful than torch's
decomposition; the caller's ``decompositions=`` win over all of them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

from reftrace.errors import ArgumentError

__all__ = ["decomposition_table"]

# Ops outside torch's core table whose torch decompositions land on rows reftrace has.
_EXTRA_DECOMPOSITIONS = ("grid_sampler_2d.default", "upsample_bicubic2d.default", "upsample_trilinear3d.default",
                         "upsample_nearest2d.vec", "i0.default", "special_i0e.default", "special_i1.default",
                         "special_i1e.default", "special_ndtri.default", "special_erfcx.default", "frexp.Tensor",
                         "ldexp.Tensor", "nextafter.default", "narrow_copy.default",
                         "max_pool2d_with_indices_backward.default")

# Ops whose torch decomposition gives torch's values but not torch's gradients (a NaN where torch's
# own backward masks, a duplicate index counted twice), or that map to a composite primitive:
# reftrace's ATen rows map them instead.
_OWN_ROWS = ("index_fill.int_Tensor", "index_fill.int_Scalar", "_safe_softmax.default",
             "linalg_vector_norm.default", "take.default", "special_log_ndtr.default",
             "_scaled_dot_product_flash_attention_for_cpu.default",
             # torch's gradient at a boundary: std at zero variance, sinc and xlogy at 0, hardswish at NaN
             "std.correction", "std_mean.correction", "sinc.default", "xlogy.Tensor", "hardswish.default",
             "special_xlog1py.default", "special_entr.default",
             "hardsigmoid.default",
             # torch's softplus computes exp(x) on the linear branch too: inf / inf in the gradient at large x;
             # celu's expm1 branch and the smooth L1 / Huber quadratic at infinite x: 0 * inf where eager has 0
             "softplus.default", "celu.default", "smooth_l1_loss.default", "huber_loss.default",
             # composites (reftrace.nn) that run as torch's fused kernels
             "nll_loss_forward.default", "silu.default",
             # torch's gradient at a saturated probability (0 or 1): finite, where the clamped logs give NaN
             "binary_cross_entropy.default",
             # torch's kernel fuses multiply-adds the reference formula rounds twice
             "linspace.default", "logspace.default")


def _ops(names: Sequence[str]) -> list[Any]:
    return [getattr(getattr(torch.ops.aten, packet), overload)
            for packet, overload in (name.split(".") for name in names)]


@functools.lru_cache(maxsize=1)
def _core_table() -> Mapping[Any, Callable[..., Any]]:
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_ops(_EXTRA_DECOMPOSITIONS)))
    for op in _ops(_OWN_ROWS):
        table.pop(op, None)
    return table


def decomposition_table(decompositions: Mapping[Any, Callable[..., Any]] | None = None
                        ) -> dict[Any, Callable[..., Any]]:
    """core ATen decompositions (plus a few of torch's others) merged with ``decompositions`` (the caller's win).

    Keys may be OpOverloads or OpOverloadPackets (a packet stands for all its overloads).
    """
    table = dict(_core_table())
    for op, fn in (decompositions or {}).items():
        if isinstance(op, torch._ops.OpOverloadPacket):
            for name in op.overloads():
                table[getattr(op, name)] = fn
        elif isinstance(op, torch._ops.OpOverload):
            table[op] = fn
        else:
            raise ArgumentError(f"decompositions keys must be torch.ops OpOverloads such as "
                                f"torch.ops.aten.gelu.default, got {op!r}")
        if not callable(fn):
            raise ArgumentError(f"the decomposition for {op} is not callable: {fn!r}")
    return table
