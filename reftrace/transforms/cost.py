"""``cost``: what a graph or a partition costs, in FLOPs and bytes, by one documented model.

The model is deliberately simple and exact (integers, no hardware): it is what the ``optimal``
partition policy minimises, so ``rt.cost`` is both the objective and its referee.

**FLOPs per equation** (``FLOP_RULES``, keyed by primitive name; see docs/partition.md):

- elementwise math, comparisons, ``select``, dtype conversion, ``random``: one per output element
  (``integer_pow``: the multiplications of square-and-multiply, per element);
- reductions, ``arg*``, cumulative scans: one per input element; ``sort``: ``n*ceil(log2 k)`` for
  ``n`` elements sorted along an axis of length ``k``; ``scatter_add``: one per update;
- ``dot_general``: ``2 * out_elements * contracted_size``; ``conv_general_dilated``:
  ``2 * out_elements * (kernel elements per output feature)``;
- pure data movement (``reshape``, ``broadcast_in_dim``, ``transpose``, ``slice``, ``pad``,
  ``concatenate``, ``rev``, ``gather``, ``scatter``, ``iota``, ``stop_gradient``): 0 FLOPs;
  their traffic shows in ``bytes_accessed``;
- linear algebra: the textbook counts (Cholesky ``n^3/3``, LU ``2n^3/3``, ...), per matrix;
- a composite (``layer_norm``, ``batch_norm_train``, ``attention``, ...) costs its decomposition,
  unless the table has its own row; any other primitive costs one FLOP per output element.

**A partition** ``(forward, backward)`` costs: ``saved_bytes`` (the values crossing over),
``activation_bytes`` (those of them the forward computes: saving a primal input costs no memory
since it lives anyway), ``recompute_flops`` (the FLOPs of backward equations that repeat a
forward equation: an equation run by the backward only is moved, not repeated), and
``peak_bytes`` (see ``peak_bytes``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from reftrace.composite import decomposition_graph, is_composite
from reftrace.errors import ArgumentError
from reftrace.graph import Atom, Aval, Eqn, Graph, Params, Var
from reftrace.transforms.recompute_rules import smaller_forms

__all__ = ["Cost", "cost", "eqn_flops", "graph_flops", "recompute_flops", "peak_bytes", "FLOP_RULES",
           "DATA_MOVEMENT", "is_free_to_redo"]


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of a graph or of a partition (whose forward and backward are summed).

    For a single graph the partition-only fields (``saved_bytes``, ``activation_bytes``,
    ``recompute_flops``) are 0."""

    flops: int
    bytes_accessed: int
    peak_bytes: int
    saved_bytes: int = 0
    activation_bytes: int = 0
    recompute_flops: int = 0


def cost(value: Any) -> Cost:
    """The Cost of a ``Graph`` or of a ``Partition`` (see the module docstring for the model)."""
    if isinstance(value, tuple) and hasattr(value, "saved_activation_bytes"):  # a Partition (not imported:
        # partition -> policies -> cost would close a cycle)
        fw, bw = value
        return Cost(flops=graph_flops(fw) + graph_flops(bw),
                    bytes_accessed=_graph_bytes(fw) + _graph_bytes(bw),
                    peak_bytes=peak_bytes(value), saved_bytes=value.saved_bytes,
                    activation_bytes=value.saved_activation_bytes, recompute_flops=recompute_flops(value))
    if isinstance(value, Graph):
        return Cost(flops=graph_flops(value), bytes_accessed=_graph_bytes(value),
                    peak_bytes=_simulate(value.eqns, set(value.inputs), set(_vars(value.outputs)),
                                         sum(v.nbytes for v in value.inputs))[0])
    raise ArgumentError(f"cost takes a Graph or a Partition (rt.partition(...)), got {type(value).__name__}")


# ----------------------------------------------------------------------------- FLOPs

def _out_elements(eqn: Eqn) -> int:
    return sum(v.size for v in eqn.outputs)


def _in_elements(eqn: Eqn) -> int:
    return eqn.inputs[0].size


def _free(eqn: Eqn) -> int:
    return 0


def _integer_pow(eqn: Eqn) -> int:
    y = abs(int(eqn.params["y"]))
    multiplies = max(1, y.bit_length() - 1 + bin(y).count("1") - 1) + (eqn.params["y"] < 0)
    return multiplies * _out_elements(eqn)


def _sort(eqn: Eqn) -> int:
    length = eqn.inputs[0].shape[eqn.params["axis"]] if eqn.inputs[0].ndim else 1
    return eqn.inputs[0].size * max(1, math.ceil(math.log2(max(length, 1))))


def _dot_general(eqn: Eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.inputs[0]
    return 2 * eqn.outputs[0].size * math.prod(lhs.shape[d] for d in lhs_contract)


def _conv(eqn: Eqn) -> int:
    rhs = eqn.inputs[1]
    out_feature_dim = eqn.params["dimension_numbers"][1][0]
    return 2 * eqn.outputs[0].size * (rhs.size // max(1, rhs.shape[out_feature_dim]))


def _per_matrix(flops_of_n: Callable[[int, int], float]) -> Callable[[Eqn], int]:
    """Linear algebra on a batch of ``m x n`` matrices (the first operand's last two dims)."""
    def rule(eqn: Eqn) -> int:
        a = eqn.inputs[0]
        m, n = a.shape[-2], a.shape[-1]
        return int(math.prod(a.shape[:-2]) * flops_of_n(m, n))
    return rule


def _triangular_solve(eqn: Eqn) -> int:
    a, b = eqn.inputs[0], eqn.inputs[1]
    n = a.shape[-1]
    return n * b.size  # n^2 m per matrix


def _fft(eqn: Eqn) -> int:
    n = math.prod(eqn.params["fft_lengths"])
    batch = _out_elements(eqn) // max(1, n)
    return 5 * batch * n * max(1, math.ceil(math.log2(max(n, 2))))


DATA_MOVEMENT = frozenset({"reshape", "broadcast_in_dim", "transpose", "slice", "pad", "concatenate", "rev",
                           "gather", "scatter", "iota", "stop_gradient"})
"""Primitives that only move or replicate data: 0 FLOPs."""
_PER_INPUT = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
              "argmin", "cumsum", "cumprod", "cummax", "cummin")

#: FLOPs of one equation, by primitive name. Missing: a composite costs its decomposition, any
#: other primitive one FLOP per output element (elementwise math, comparisons, select, convert, random).
FLOP_RULES: dict[str, Callable[[Eqn], int]] = {
    **{name: _free for name in DATA_MOVEMENT},
    **{name: _in_elements for name in _PER_INPUT},
    "integer_pow": _integer_pow,
    "sort": _sort,
    "scatter_add": lambda eqn: eqn.inputs[2].size,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "cholesky": _per_matrix(lambda m, n: n ** 3 / 3),
    "lu": _per_matrix(lambda m, n: 2 * n ** 3 / 3),
    "qr": _per_matrix(lambda m, n: 2 * m * n * n - 2 * n ** 3 / 3),
    "eigh": _per_matrix(lambda m, n: 9 * n ** 3),
    "eig": _per_matrix(lambda m, n: 25 * n ** 3),  # Hessenberg QR iteration with eigenvectors (Golub & Van Loan)
    "svd": _per_matrix(lambda m, n: 4 * m * n * n + 22 * n ** 3),
    "pinv": _per_matrix(lambda m, n: 4 * m * n * n + 22 * n ** 3 + 2 * m * n * n),
    "triangular_solve": _triangular_solve,
    "fft": _fft,
}


def eqn_flops(eqn: Eqn) -> int:
    """FLOPs of one equation under the model above."""
    return _flops(eqn.primitive, tuple(a.aval for a in eqn.inputs), tuple(v.aval for v in eqn.outputs),
                  eqn.params)


@functools.lru_cache(maxsize=65536)
def _flops(prim: Any, in_avals: tuple[Aval, ...], out_avals: tuple[Aval, ...], params: Params) -> int:
    rule = FLOP_RULES.get(prim.name)
    if rule is None and is_composite(prim):
        return graph_flops(decomposition_graph(prim, in_avals, params))
    stand_in = _AvalEqn(prim, in_avals, out_avals, params)
    return int(rule(stand_in)) if rule is not None else _out_elements(stand_in)


class _AvalEqn:
    """What a FLOP rule reads of an equation (avals and params), so results cache per signature."""

    __slots__ = ("primitive", "inputs", "outputs", "params")

    def __init__(self, prim: Any, in_avals: tuple[Aval, ...], out_avals: tuple[Aval, ...], params: Params) -> None:
        self.primitive, self.inputs, self.outputs, self.params = prim, in_avals, out_avals, params


def is_free_to_redo(eqn: Eqn) -> bool:
    """Data movement whose output takes at least the bytes of its operands (a transpose, reshape or
    broadcast): redoing it from the operands costs no FLOPs, and keeping them costs no more bytes."""
    if eqn.primitive.name not in DATA_MOVEMENT or len(eqn.outputs) != 1:
        return False
    return eqn.outputs[0].nbytes >= sum(v.nbytes for v in {a for a in eqn.inputs if isinstance(a, Var)})


def graph_flops(graph: Graph) -> int:
    return sum(eqn_flops(e) for e in graph.eqns)


def _eqn_bytes(eqn: Eqn) -> int:
    return sum(a.aval.nbytes for a in eqn.inputs) + sum(v.nbytes for v in eqn.outputs)


def _graph_bytes(graph: Graph) -> int:
    return sum(_eqn_bytes(e) for e in graph.eqns)


def _vars(atoms: Iterable[Atom]) -> list[Var]:
    return [a for a in atoms if isinstance(a, Var)]


# ----------------------------------------------------------------------------- recomputation

def recompute_flops(partition: Any) -> int:
    """FLOPs of the backward equations that repeat a forward equation.

    A backward equation that does not depend on the cotangents reads saved values (or values
    recomputed from them); it repeats the forward's work when the forward runs the same
    primitive, with the same params, on the same values, or when it is the smaller form of a
    forward equation (``recompute_rules``: a batch norm without its running statistics). Matching
    goes through the saved slots (backward input ``k`` is forward output ``saved[k]``), so it needs
    nothing but the partition.
    """
    fw, bw = partition
    num_saved = partition.num_saved
    forward_eqn = {_key(e.primitive, e.inputs, e.params): e for e in fw.eqns}
    for form, _ in smaller_forms(fw.eqns).values():
        forward_eqn[_key(form.primitive, form.inputs, form.params)] = form
    as_forward: dict[Var, Atom] = dict(zip(bw.inputs[:num_saved], partition.saved))
    total = 0
    for e in bw.eqns:
        try:
            inputs = tuple(a if not isinstance(a, Var) else as_forward[a] for a in e.inputs)
        except KeyError:  # reads a cotangent, or a value the forward never computes
            continue
        twin = forward_eqn.get(_key(e.primitive, inputs, e.params))
        if twin is None:
            continue
        total += eqn_flops(e)
        as_forward.update(zip(e.outputs, twin.outputs))
    return total


def _key(prim: Any, inputs: Sequence[Atom], params: Params) -> tuple:
    return (prim, tuple(inputs), params)


# ----------------------------------------------------------------------------- peak memory

def peak_bytes(partition: Any) -> int:
    """Peak live bytes running the forward, then the backward, each in program order.

    Primal inputs (parameters, buffers, arguments) are live throughout; a value is freed after
    its last use; forward outputs stay live until the end (the caller holds them until the
    backward has run); saved values are live from their definition until their last use in the
    backward; cotangents are live throughout the backward, gradients until the end.
    """
    fw, bw = partition
    num_saved = partition.num_saved
    primals = set(fw.inputs)
    primal_bytes = sum(v.nbytes for v in fw.inputs)
    fw_outs = set(_vars(fw.outputs))
    forward_peak, _ = _simulate(fw.eqns, primals, fw_outs, primal_bytes)
    user_outs = set(_vars(fw.outputs[:len(fw.outputs) - num_saved])) - primals
    saved_activations = [b for b, f in zip(bw.inputs[:num_saved], partition.saved) if f not in primals]
    saved_primals = {b for b, f in zip(bw.inputs[:num_saved], partition.saved) if f in primals}
    cotangents = set(bw.inputs[num_saved:])
    base = primal_bytes + sum(v.nbytes for v in user_outs - set(partition.saved)) \
        + sum(v.nbytes for v in cotangents)
    live_at_start = {v: v.nbytes for v in saved_activations}
    backward_peak, _ = _simulate(bw.eqns, saved_primals | cotangents, set(_vars(bw.outputs)), base,
                                 live_at_start)
    return max(forward_peak, backward_peak)


def _simulate(eqns: Sequence[Eqn], pinned: set[Var], kept: set[Var], base: int,
              live: dict[Var, int] | None = None) -> tuple[int, int]:
    """(peak, final) bytes running ``eqns`` in order: ``base`` bytes are always live (``pinned``
    values belong to it), ``live`` values are live at the start, ``kept`` values are never freed."""
    last_use: dict[Var, int] = {}
    for k, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var):
                last_use[a] = k
    live = dict(live or {})
    current = base + sum(live.values())
    peak = current

    def free(v: Var) -> None:
        nonlocal current
        if v in live and v not in kept:
            current -= live.pop(v)

    for v in list(live):
        if v not in last_use:
            free(v)
    for k, e in enumerate(eqns):
        for v in e.outputs:
            if v not in pinned:
                live[v] = v.nbytes
                current += v.nbytes
        peak = max(peak, current)
        for a in e.inputs:
            if isinstance(a, Var) and last_use.get(a) == k:
                free(a)
        for v in e.outputs:
            if v not in last_use:
                free(v)
    return peak, current
