"""Outputs that are views of inputs, or of other outputs, come back as views, as in eager.

``return x.t()``, ``return x[0]``, ``return x`` hand back memory the caller already owns, and
``return y, y.view(-1)`` two tensors sharing theirs: in eager, changing one in place changes the
other. A graph value is a fresh array, so a compiled function would return copies and the change
would silently miss its aliases. Functionalization knows which outputs share storage and records
the view operations that made each (its ``ViewMeta`` sequence); the runtime drops those outputs from
the graph and replays the views on the real input, or on the output they view, after each call,
as AOTAutograd does. Autograd then records the views themselves, so gradients and in-place rules
are eager's. Outputs that are views of an intermediate the function does not return stay copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch._C import _functionalization
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.multiprocessing.reductions import StorageWeakRef


@dataclass(frozen=True, eq=False)
class OutputView:
    """Flat output ``output`` is ``views`` (a functionalization ``ViewMeta`` sequence) replayed on graph
    input ``base``, or, with ``of_output``, on flat output ``base``. ``requires_grad``: whether the
    captured output required grad (``x.detach()[0]`` does not, though ``x`` does)."""

    output: int
    base: int
    of_output: bool
    views: tuple[Any, ...]
    requires_grad: bool

    def replay(self, base: torch.Tensor) -> torch.Tensor:
        """The view of the real tensor ``base``."""
        out = _functionalization.apply_view_meta_sequence(base, list(self.views)) if self.views else base
        if out.requires_grad and not self.requires_grad:
            out = out.detach()
        return out


def find_output_views(outputs: Sequence[Any], inputs: Sequence[FunctionalTensor]) -> tuple[OutputView, ...]:
    """The functionalized ``outputs`` that share storage with an input, or with an earlier output that is
    its storage's base (not itself a view), each with how to rebuild it."""
    bases: dict[StorageWeakRef, tuple[int, bool]] = {
        StorageWeakRef(t.untyped_storage()): (i, False) for i, t in enumerate(inputs)}
    found = []
    for k, out in enumerate(outputs):
        if not isinstance(out, FunctionalTensor):
            continue
        storage = StorageWeakRef(out.untyped_storage())
        views = tuple(_functionalization.get_view_meta_sequence(out.elem))
        base = bases.get(storage)
        if base is None:
            if not views:  # a fresh value: later outputs viewing it are rebuilt from this one
                bases[storage] = (k, True)
            continue
        index, of_output = base
        if not of_output and out is inputs[index]:
            views = ()
        if any(v.has_symbolic_inputs for v in views):  # pragma: no cover - shapes are static here
            continue
        found.append(OutputView(k, index, of_output, views, bool(out.requires_grad)))
    return tuple(found)


def rebuild_outputs(computed: Sequence[torch.Tensor], views: Sequence[OutputView],
                    inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The flat outputs: ``computed`` in the positions ``views`` leave free, and each view replayed on
    its base (an input, or an output placed before it)."""
    by_position = {v.output: v for v in views}
    values = iter(computed)
    flat: list[torch.Tensor] = []
    for k in range(len(computed) + len(views)):
        view = by_position.get(k)
        if view is None:
            flat.append(next(values))
        else:
            flat.append(view.replay(flat[view.base] if view.of_output else inputs[view.base]))
    return flat
