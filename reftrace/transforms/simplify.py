"""``simplify``: a Graph -> Graph cleanup that every later stage can rely on.

Five rewrites, all value-preserving:

1. **Forwarding of identities**: an equation that returns its operand unchanged
   (``reshape`` to the same shape, ``convert_element_type`` to the same dtype,
   ``transpose`` by the identity permutation, ``broadcast_in_dim`` to the same
   shape, a full ``slice``, an all-zero ``pad``, ``rev`` of no dimensions, a
   reduction over no axes, ``concatenate`` of one operand) is replaced by that
   operand. ``stop_gradient`` is *not* forwarded: it is an identity on values but
   carries meaning for a later ``vjp``.
2. **Constant folding** of equations whose operands are all Literals, for the
   documented subset in ``FOLDABLE`` (exactly rounded elementwise arithmetic,
   comparisons, logic, ``select``, safe dtype conversions and shape ops). The
   result becomes a Literal only if it has at most ``FOLD_LIMIT`` elements, so
   graphs do not fill up with big constants. Transcendental functions are never
   folded: numpy and XLA may round them differently, and folding must not change
   a graph's values.
3. **Common-subexpression elimination**: two equations with the same primitive,
   parameters and operand atoms compute the same value; the second reuses the
   first. This includes ``random``, which is a pure function of its key.
4. **Slices put back together**: ``pad(a) + pad(b)``, zero paddings along one axis
   whose kept ranges are adjacent (a VJP's cotangent of a split), becomes
   ``pad(concatenate(a, b))``, the pad dropped when the pieces cover the axis.
5. **Dead-code elimination**: equations none of whose outputs is needed are
   dropped (``random`` included, for the same reason).

The graph's inputs, outputs and ``joint`` spec are kept, so a joint graph stays a
joint graph. Equations are re-emitted through a ``Builder`` by ``eval_graph``: the
interpreter idiom with an ``apply`` that rewrites instead of computing.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.graph import Atom, Eqn, Graph, Literal, Params, Var, expect_graph, live_eqns
from reftrace.interpreter import eval_graph
from reftrace.primitives import Primitive, checked, infer_avals

FOLD_LIMIT = 64
"""Largest number of elements a folded constant may have."""

# dtypes numpy computes on exactly as XLA does for the folded operations
_FOLD_DTYPES = frozenset(np.dtype(d) for d in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float32, np.float64))


def simplify(graph: Graph) -> Graph:
    """``graph`` with identities forwarded, small constants folded, common subexpressions
    shared and dead code removed. The result computes the same outputs from the same inputs."""
    expect_graph(graph, "simplify")
    eqns, outputs = _rewrite(graph, fold=True)
    return checked(Graph(graph.inputs, tuple(live_eqns(eqns, outputs)), tuple(outputs), graph.joint,
                         graph.input_names, graph.output_names), "simplify")


def rewrite(graph: Graph, fold: bool = True) -> Graph:
    """One forward pass: forward identities, fold constants (if ``fold``), and share
    common subexpressions. Dead code is left in place (see ``eliminate_dead_code``)."""
    eqns, outputs = _rewrite(graph, fold)
    return Graph(graph.inputs, tuple(eqns), tuple(outputs), graph.joint, graph.input_names, graph.output_names)


def eliminate_dead_code(graph: Graph) -> Graph:
    """``graph`` without the equations that no output needs."""
    kept = live_eqns(graph.eqns, graph.outputs)
    return graph if len(kept) == len(graph.eqns) else graph.replace(eqns=tuple(kept))


def _rewrite(graph: Graph, fold: bool) -> tuple[list[Eqn], list[Atom]]:
    builder = Builder()
    seen: dict[tuple, tuple[Var, ...]] = {}
    made_by: dict[Var, tuple[Primitive, tuple[Atom, ...], Params]] = {}

    def bind(prim: Primitive, atoms: Sequence[Atom], params: Params) -> tuple[Var, ...]:
        key = (prim, params, tuple(atoms))
        outs = seen.get(key)
        if outs is None:
            outs = seen[key] = builder.bind(prim, atoms, params)
            for v in outs:
                made_by[v] = (prim, tuple(atoms), params)
        return outs

    def apply(eqn: Eqn, atoms: Sequence[Atom]) -> Sequence[Atom]:
        prim, params = eqn.primitive, eqn.params
        same = forwarded_operand(prim, atoms, params)
        if same is not None:
            return (same,)
        if fold:
            folded = fold_constants(prim, atoms, params)
            if folded is not None:
                return folded
        if prim is P.add_p:
            joined = _sum_of_adjacent_pads(atoms, made_by, bind)
            if joined is not None:
                return (joined,)
        return bind(prim, atoms, params)

    outputs = eval_graph(graph, graph.inputs, apply, literal=lambda lit: lit)
    return builder.eqns, outputs


# ----------------------------------------------------------------------------- slices put back

def _sum_of_adjacent_pads(atoms: Sequence[Atom], made_by: dict, bind: Callable[..., tuple[Var, ...]]) -> Atom | None:
    """``pad(a) + pad(b)``, two zero paddings along one axis whose kept ranges are adjacent, as one
    ``pad(concatenate(a, b))``. A VJP writes a split's cotangent this way: each slice's cotangent
    padded back to the full size, then summed (three full-size passes and two adds for a
    query/key/value split, against one concatenation). Where the ranges meet exactly, adding the
    other's zeros leaves each value unchanged, save that ``-0.0 + 0.0`` is ``+0.0``: the
    concatenation keeps a cotangent's ``-0.0``, as eager's split backward does."""
    ranges = [_padded_range(a, made_by) for a in atoms]
    if None in ranges:
        return None
    (axis_a, lo_a, hi_a, a), (axis_b, lo_b, hi_b, b) = ranges
    if axis_a != axis_b or atoms[0].aval != atoms[1].aval:
        return None
    size = atoms[0].shape[axis_a]
    if size - hi_a == lo_b:
        first, second, lo, hi = a, b, lo_a, hi_b
    elif size - hi_b == lo_a:
        first, second, lo, hi = b, a, lo_b, hi_a
    else:
        return None
    parts = [p for x in (first, second) for p in _concatenated_parts(x, axis_a, made_by)]
    (joined,) = bind(P.concatenate_p, parts, Params({"dimension": axis_a}))
    if lo == 0 and hi == 0:
        return joined
    zero = made_by[atoms[0]][1][1]
    config = tuple((lo, hi, 0) if d == axis_a else (0, 0, 0) for d in range(joined.ndim))
    return bind(P.pad_p, (joined, zero), Params({"padding_config": config}))[0]


def _padded_range(atom: Atom, made_by: dict) -> tuple[int, int, int, Atom] | None:
    """(axis, lo, hi, operand) when ``atom`` is a zero ``pad`` of ``operand`` along one axis by
    non-negative lo/hi, without interior padding; else None."""
    if not isinstance(atom, Var) or atom not in made_by:
        return None
    prim, operands, params = made_by[atom]
    if prim is not P.pad_p:
        return None
    operand, value = operands
    if not isinstance(value, Literal) or not _is_positive_zero(value.value):
        return None
    padded = [(d, lo, hi) for d, (lo, hi, interior) in enumerate(params["padding_config"])
              if (lo, hi, interior) != (0, 0, 0)]
    if len(padded) != 1:
        return None
    axis, lo, hi = padded[0]
    if lo < 0 or hi < 0 or params["padding_config"][axis][2] != 0:
        return None
    return axis, lo, hi, operand


def _is_positive_zero(value: Any) -> bool:
    """``+0`` exactly (for complex, both parts): outside both ranges the sum is ``+0 + +0``."""
    parts = [np.real(value), np.imag(value)] if np.iscomplexobj(value) else [value]
    return all(p == 0 and not (np.issubdtype(np.asarray(p).dtype, np.floating) and np.signbit(p)) for p in parts)


def _concatenated_parts(atom: Atom, axis: int, made_by: dict) -> list[Atom]:
    """The operands of ``atom`` if it is a concatenation along ``axis`` (flattened), else [atom]."""
    if isinstance(atom, Var) and atom in made_by:
        prim, operands, params = made_by[atom]
        if prim is P.concatenate_p and params["dimension"] == axis:
            return list(operands)
    return [atom]


# ----------------------------------------------------------------------------- identities

def forwarded_operand(prim: Primitive, atoms: Sequence[Atom], params: Params) -> Atom | None:
    """The operand an equation returns unchanged, or None if it is not such an identity."""
    if prim is P.reshape_p:
        return atoms[0] if tuple(params["new_sizes"]) == atoms[0].shape else None
    if prim is P.convert_element_type_p:
        return atoms[0] if np.dtype(params["new_dtype"]) == atoms[0].dtype else None
    if prim is P.transpose_p:
        perm = tuple(params["permutation"])
        return atoms[0] if perm == tuple(range(len(perm))) else None
    if prim is P.broadcast_in_dim_p:
        # broadcast_dimensions must increase, so an equal shape means the identity mapping
        return atoms[0] if tuple(params["shape"]) == atoms[0].shape else None
    if prim is P.slice_p:
        full = (all(s == 0 for s in params["start_indices"]) and tuple(params["limit_indices"]) == atoms[0].shape
                and all(s == 1 for s in params["strides"]))
        return atoms[0] if full else None
    if prim is P.pad_p:
        return atoms[0] if all(tuple(c) == (0, 0, 0) for c in params["padding_config"]) else None
    if prim is P.rev_p:
        return atoms[0] if not params["dimensions"] else None
    if prim in P.REDUCTIONS:
        return atoms[0] if not params["axes"] else None
    if prim is P.concatenate_p:
        return atoms[0] if len(atoms) == 1 else None
    return None



# ----------------------------------------------------------------------------- folding

def fold_constants(prim: Primitive, atoms: Sequence[Atom], params: Params) -> tuple[Literal, ...] | None:
    """The equation's result as Literals, if every operand is a Literal, the primitive is in
    ``FOLDABLE``, the dtypes are ones numpy computes exactly like XLA, and the result is small."""
    rule = FOLDABLE.get(prim)
    if rule is None or not all(isinstance(a, Literal) for a in atoms):
        return None
    out_avals = infer_avals(prim, [a.aval for a in atoms], params)
    if any(av.size > FOLD_LIMIT for av in out_avals):
        return None
    if any(a.dtype not in _FOLD_DTYPES for a in atoms) or any(av.dtype not in _FOLD_DTYPES for av in out_avals):
        return None
    with np.errstate(all="ignore"):
        result = rule(*[a.value for a in atoms], **dict(params))
    if result is None:  # the rule declined (e.g. integer division by zero)
        return None
    (aval,) = out_avals
    arr = np.asarray(result)
    if arr.shape != aval.shape:
        arr = np.broadcast_to(arr, aval.shape)
    return (Literal.of(arr.astype(aval.dtype, copy=False), aval.dtype),)


def _is_int(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.integer)


def _div(x: np.ndarray, y: np.ndarray) -> Any:
    if not _is_int(x):
        return np.true_divide(x, y)
    if np.any(y == 0) or (np.issubdtype(y.dtype, np.signedinteger) and np.any(y == -1)):
        return None  # XLA defines x/0 and INT_MIN/-1 its own way; keep the equation
    q = np.floor_divide(x, y)
    return q + ((np.remainder(x, y) != 0) & ((x < 0) != (y < 0))).astype(x.dtype)  # round toward zero


def _rem(x: np.ndarray, y: np.ndarray) -> Any:
    if _is_int(x) and (np.any(y == 0) or (np.issubdtype(y.dtype, np.signedinteger) and np.any(y == -1))):
        return None
    return np.fmod(x, y)  # sign of the dividend, as C and lax


def _int_or_bool_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Float max/min are left alone: signed zeros and NaN payloads are not worth the risk."""
    def rule(x: np.ndarray, y: np.ndarray) -> Any:
        return None if np.issubdtype(x.dtype, np.floating) else fn(x, y)
    return rule


def _logical(bool_fn: Callable[..., Any], int_fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda x, y: bool_fn(x, y) if x.dtype == np.bool_ else int_fn(x, y)


def _convert(x: np.ndarray, *, new_dtype: np.dtype) -> Any:
    new_dtype = np.dtype(new_dtype)
    if np.issubdtype(x.dtype, np.floating) and np.issubdtype(new_dtype, np.integer):
        info = np.iinfo(new_dtype)
        if not np.all(np.isfinite(x)):
            return None
        t = np.trunc(x)
        if np.any(t < info.min) or np.any(t > info.max):
            return None  # out of range: XLA saturates, numpy does not
    return x.astype(new_dtype)


def _reduction(fn: Callable[..., Any], ints_only: bool = False) -> Callable[..., Any]:
    def rule(x: np.ndarray, *, axes: tuple[int, ...]) -> Any:
        if ints_only and np.issubdtype(x.dtype, np.floating):
            return None  # float summation order is the backend's business
        if x.size == 0 and fn in (np.max, np.min):
            return None  # the identity of an empty max/min is the backend's business
        return fn(x, axis=tuple(axes))
    return rule


def _broadcast_in_dim(x: np.ndarray, *, shape: tuple[int, ...], broadcast_dimensions: tuple[int, ...]) -> Any:
    expanded = [1] * len(shape)
    for d, od in zip(x.shape, broadcast_dimensions):
        expanded[od] = d
    return np.broadcast_to(x.reshape(expanded), shape)


def _slice(x: np.ndarray, *, start_indices, limit_indices, strides) -> Any:
    return x[tuple(slice(s, l, st) for s, l, st in zip(start_indices, limit_indices, strides))]


def _iota(*, dtype: np.dtype, shape: tuple[int, ...], dimension: int) -> Any:
    index = np.arange(shape[dimension], dtype=dtype).reshape([-1 if i == dimension else 1
                                                              for i in range(len(shape))])
    return np.broadcast_to(index, shape)


FOLDABLE: dict[Primitive, Callable[..., Any]] = {
    P.neg_p: np.negative, P.abs_p: np.abs, P.floor_p: np.floor, P.ceil_p: np.ceil, P.sqrt_p: np.sqrt,
    P.is_finite_p: np.isfinite,
    P.not_p: lambda x: np.logical_not(x) if x.dtype == np.bool_ else np.invert(x),
    P.add_p: np.add, P.sub_p: np.subtract, P.mul_p: np.multiply, P.div_p: _div, P.rem_p: _rem,
    P.max_p: _int_or_bool_only(np.maximum), P.min_p: _int_or_bool_only(np.minimum),
    P.and_p: _logical(np.logical_and, np.bitwise_and), P.or_p: _logical(np.logical_or, np.bitwise_or),
    P.xor_p: _logical(np.logical_xor, np.bitwise_xor),
    P.eq_p: np.equal, P.ne_p: np.not_equal, P.lt_p: np.less, P.le_p: np.less_equal,
    P.gt_p: np.greater, P.ge_p: np.greater_equal,
    P.select_p: np.where,
    P.convert_element_type_p: _convert,
    P.reduce_sum_p: _reduction(np.sum, ints_only=True), P.reduce_max_p: _reduction(np.max, ints_only=True),
    P.reduce_min_p: _reduction(np.min, ints_only=True), P.reduce_and_p: _reduction(np.all),
    P.reduce_or_p: _reduction(np.any),
    P.broadcast_in_dim_p: _broadcast_in_dim,
    P.reshape_p: lambda x, *, new_sizes: x.reshape(new_sizes),
    P.transpose_p: lambda x, *, permutation: np.transpose(x, permutation),
    P.slice_p: _slice,
    P.rev_p: lambda x, *, dimensions: np.flip(x, axis=tuple(dimensions)),
    P.concatenate_p: lambda *xs, dimension: np.concatenate(xs, axis=dimension),
    P.iota_p: _iota,
}
"""Primitives ``simplify`` folds when all operands are Literals (a deliberate subset)."""
