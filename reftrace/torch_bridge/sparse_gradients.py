"""Sparse gradients for the tables of ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)``.

Eager torch gives such a table a sparse COO gradient holding only the looked-up rows (``SparseAdam``
requires it; ``Adam`` refuses it). reftrace's graphs hold dense arrays, so the backward computes the
dense gradient, and the bridge hands it back sparse: the rows the indices name (``padding_idx``
left out), each once, in order (a coalesced tensor; eager's holds one row per lookup, summed when
coalesced, which every optimizer does first). That needs the indices when the backward runs, so it
is done where they are arguments of the compiled function (or their values rearranged: a view, a
cast); a table whose every use is a sparse lookup but whose indices are computed inside, or a table
computed or written inside (``max_norm`` renormalises it in place), gets its dense gradient, with
``SparseGradientWarning``.
A table also read otherwise (tied to an output layer) gets a dense gradient in eager as well.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from reftrace import primitives as P
from reftrace.graph import Atom, Eqn, Var
from reftrace.torch_bridge.aten._common import SparseLookup


_SAME_VALUES = (P.reshape_p, P.transpose_p, P.broadcast_in_dim_p, P.convert_element_type_p)
"""Primitives whose result holds its operand's values, rearranged: indices made by them name the same rows."""


class SparseGradientWarning(UserWarning):
    """An embedding table eager gives a sparse gradient gets a dense one (its indices, or the table itself, are
    computed inside the function)."""


@dataclass(frozen=True)
class SparseGradient:
    """Graph input ``weight``'s gradient is sparse: the rows named by graph inputs ``indices`` (each with
    its lookup's ``padding_idx``, -1 for none)."""

    weight: int
    indices: tuple[tuple[int, int], ...]


def find_sparse_gradients(inputs: Sequence[Var], eqns: Sequence[Eqn], outputs: Sequence[Atom],
                          lookups: Sequence[SparseLookup]) -> tuple[SparseGradient, ...]:
    """The inputs whose every use (in the live ``eqns``) is a sparse lookup, with the inputs holding their
    indices. Takes the builder's values before a Graph renumbers them."""
    position = {id(v): i for i, v in enumerate(inputs)}
    made_by = {id(out): e for e in eqns for out in e.outputs}

    def source(value: Any) -> int | None:
        """The input whose values ``value`` holds, rearranged (``input_ids.view(-1)``, an int cast), if any."""
        while id(value) not in position:
            eqn = made_by.get(id(value))
            if eqn is None or eqn.primitive not in _SAME_VALUES:
                return None
            value = eqn.inputs[0]
        return position[id(value)]

    by_weight: dict[int, list[SparseLookup]] = {}
    for lookup in lookups:
        i = position.get(id(lookup.weight.atom))
        if i is not None:
            by_weight.setdefault(i, []).append(lookup)
        elif any(any(a is lookup.output.atom for a in e.inputs) for e in eqns) or any(
                o is lookup.output.atom for o in outputs):
            warnings.warn(f"an embedding table looked up with sparse=True (at {lookup.location}) is computed or "
                          "written inside the function (max_norm renormalises it in place): its gradient is "
                          "dense, where eager's is sparse", SparseGradientWarning, stacklevel=2)
    found = []
    for i, mine in by_weight.items():
        weight = inputs[i]
        readers = [e for e in eqns if any(a is weight for a in e.inputs)]
        used = [lookup for lookup in mine if any(e.outputs[0] is lookup.output.atom for e in readers)]
        if any(o is weight for o in outputs) or len(used) != len(readers):
            continue  # read otherwise too: eager sums a dense gradient in, which makes it dense
        computed = [lookup for lookup in used if source(lookup.indices.atom) is None]
        if computed:
            warnings.warn(f"an embedding table (input {i} of the captured function) gets a dense gradient where "
                          f"eager's is sparse (sparse=True): the indices it is looked up with are computed inside "
                          f"the function (at {computed[0].location}), and the sparse gradient is made from "
                          "them after the backward; pass them as an argument", SparseGradientWarning, stacklevel=2)
            continue
        if used:
            found.append(SparseGradient(i, tuple((source(lookup.indices.atom), lookup.padding_idx)
                                                 for lookup in used)))
    return tuple(found)


def sparse_rows(dense: torch.Tensor, indices: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``dense`` (a table's gradient) as a coalesced sparse COO tensor of the rows ``indices`` name."""
    named = []
    for index, padding_idx in indices:
        flat = index.reshape(-1).to(torch.int64)
        named.append(flat[flat != padding_idx] if padding_idx >= 0 else flat)
    rows = torch.unique(torch.cat(named))  # sorted
    return torch.sparse_coo_tensor(rows.unsqueeze(0), dense.index_select(0, rows), dense.shape,
                                   is_coalesced=True, check_invariants=False)
