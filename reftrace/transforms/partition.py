"""``partition``: split a joint graph into a forward and a backward graph.

A joint graph (from ``vjp``) maps ``(*primals, *cotangents) -> (*outs, *grads)``;
``joint.joint == (num_primals, num_outputs)`` says where each part ends. The split is

    forward(*primals)            -> (*outs, *saved)
    backward(*saved, *cotangents) -> (*grads)

and composing the two computes exactly what the joint computes. Equations that
depend on cotangents can only run in the backward; every other equation may run
in the forward, in the backward (recomputed from saved values), or both. The
*policy* decides which values cross from forward to backward: see
``reftrace.transforms.policies`` and docs/partition.md.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from reftrace.builder import Builder
from reftrace.errors import ArgumentError, PartitionError
from reftrace.graph import Eqn, Graph, Var
from reftrace.primitives import eqn_is_random
from reftrace.transforms.policies import (MinCut, Policy, default_ban, dots_saveable, resolve_policy, save_all,
                                          save_anything_except_these, save_nothing, save_only_these)
from reftrace.transforms.simplify import simplify

__all__ = ["partition", "Partition", "MinCut", "Policy", "default_ban", "save_all", "save_nothing",
           "save_only_these", "save_anything_except_these", "dots_saveable", "JointAnalysis", "split",
           "policy_saved", "min_cut_saved"]


class _ForwardBackward(NamedTuple):
    forward: Graph
    backward: Graph


class Partition(_ForwardBackward):
    """``(forward, backward)``; unpacks as a pair. ``saved`` are the values the forward hands
    to the backward (its trailing outputs), ``saved_bytes`` their total size."""

    def __new__(cls, forward: Graph, backward: Graph, num_saved: int) -> "Partition":
        self = super().__new__(cls, forward, backward)
        if not 0 <= num_saved <= min(len(forward.outputs), len(backward.inputs)):
            raise PartitionError(f"num_saved={num_saved} does not fit the forward/backward graphs")
        object.__setattr__(self, "_num_saved", num_saved)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Partition is immutable")

    def __getnewargs__(self) -> tuple[Graph, Graph, int]:
        return (self.forward, self.backward, self._num_saved)

    def _replace(self, **changes: Any) -> "Partition":  # type: ignore[override]
        fields = dict(forward=self.forward, backward=self.backward, num_saved=self._num_saved)
        fields.update(changes)
        return Partition(**fields)

    @property
    def num_saved(self) -> int:
        return self._num_saved

    @property
    def saved(self) -> tuple[Var, ...]:
        """The saved values, as the forward graph's output Vars for the saved slots."""
        n = self._num_saved
        return tuple(self.forward.outputs[len(self.forward.outputs) - n:]) if n else ()

    @property
    def saved_bytes(self) -> int:
        return sum(v.nbytes for v in self.saved)

    def __repr__(self) -> str:
        return (f"Partition(forward={self.forward!r}, backward={self.backward!r}, "
                f"saved={len(self.saved)} values, {self.saved_bytes} bytes)")


def partition(joint: Graph, policy: str | Policy | MinCut = "default") -> Partition:
    """Split ``joint`` (a graph with ``joint.joint``) into forward and backward graphs.

    ``policy``: ``"default"`` (compute everything that does not depend on cotangents in the
    forward and save what the backward uses), ``"mincut"`` (save the fewest bytes, recompute
    cheap ops in the backward), a ``MinCut(banned=...)`` value, or a callable
    ``policy(eqn) -> bool`` (True: this forward equation's outputs may be saved; False:
    recompute it in the backward). The joint is simplified first so nothing is saved twice.
    """
    if not isinstance(joint, Graph):
        raise ArgumentError(f"partition expects a reftrace Graph, got {type(joint).__name__}")
    if joint.joint is None:
        raise PartitionError("partition needs a joint graph (one with .joint = (num_primals, num_outputs)); "
                             "make one with rt.vjp(graph)")
    chosen = resolve_policy(policy)
    analysis = JointAnalysis(simplify(joint))
    if isinstance(chosen, MinCut):
        saved = min_cut_saved(analysis, chosen.banned)
    else:
        saved = policy_saved(analysis, chosen)
    return split(analysis, saved)


# ----------------------------------------------------------------------------- analysis

class JointAnalysis:
    """What every policy needs to know about a joint graph: which values depend on
    cotangents, which forward values the backward reads (the boundary), and what the
    forward outputs need."""

    def __init__(self, joint: Graph) -> None:
        num_primals, num_outs = joint.joint
        if not (0 <= num_primals <= len(joint.inputs) and 0 <= num_outs <= len(joint.outputs)):
            raise PartitionError(f"joint spec {joint.joint} does not fit a graph with {len(joint.inputs)} "
                                 f"inputs and {len(joint.outputs)} outputs")
        self.graph = joint
        self.primals = joint.inputs[:num_primals]
        self.cotangents = joint.inputs[num_primals:]
        self.outs = joint.outputs[:num_outs]
        self.grads = joint.outputs[num_outs:]
        self.primal_set = frozenset(self.primals)
        self.producer: dict[Var, Eqn] = {v: e for e in joint.eqns for v in e.outputs}

        tangent: set[Var] = set(self.cotangents)
        for e in joint.eqns:
            if any(isinstance(a, Var) and a in tangent for a in e.inputs):
                tangent.update(e.outputs)
        self.tangent = frozenset(tangent)
        for i, a in enumerate(self.outs):
            if isinstance(a, Var) and a in tangent:
                raise PartitionError(f"forward output {i} depends on the cotangent inputs, so it cannot be "
                                     f"computed by the forward; check the joint spec {joint.joint}")

        boundary: set[Var] = {a for a in self.grads if isinstance(a, Var) and a not in tangent}
        for e in joint.eqns:
            if e.outputs[0] in tangent:
                boundary.update(a for a in e.inputs if isinstance(a, Var) and a not in tangent)
        self.boundary = tuple(sorted(boundary, key=lambda v: v.id))
        self.forward_needed = frozenset(self.ancestors(a for a in self.outs if isinstance(a, Var)))

    def ancestors(self, roots: Iterable[Var]) -> set[Var]:
        """``roots`` and every value they are computed from."""
        seen: set[Var] = set()
        stack = list(roots)
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            eqn = self.producer.get(v)
            if eqn is not None:
                stack.extend(a for a in eqn.inputs if isinstance(a, Var))
        return seen

    def must_save(self, v: Var) -> bool:
        """Primal inputs and random draws are never recomputed by the backward."""
        eqn = self.producer.get(v)
        return eqn is None or eqn_is_random(eqn.primitive)


# ----------------------------------------------------------------------------- callable policies

def policy_saved(analysis: JointAnalysis, policy: Policy) -> set[Var]:
    """The values a callable policy saves: walk back from the boundary; save where the policy
    allows it (or must), recompute (and keep walking) where it does not."""
    decisions: dict[int, bool] = {}
    saved: set[Var] = set()
    seen: set[Var] = set()
    stack = list(analysis.boundary)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        eqn = analysis.producer.get(v)
        if eqn is None or eqn_is_random(eqn.primitive):
            saved.add(v)
            continue
        key = id(eqn)
        if key not in decisions:
            decisions[key] = bool(policy(eqn))
        if decisions[key]:
            saved.add(v)
        else:
            stack.extend(a for a in eqn.inputs if isinstance(a, Var))
    return saved


# ----------------------------------------------------------------------------- min cut

_INT32_MAX = np.iinfo(np.int32).max


def min_cut_saved(analysis: JointAnalysis, banned: Any = default_ban) -> set[Var]:
    """The saved set with the fewest bytes (ties: most primal inputs, then fewest values).

    The flow network splits every relevant forward value ``v`` into ``v_in -> v_out`` with
    capacity ``v.nbytes``; ``u_out -> v_in`` (infinite) for each operand ``u`` of ``v``'s
    equation; ``source -> v_in`` (infinite) for values that must be computed in the forward
    (primal inputs, random draws, banned equations the forward outputs need); ``v_out -> sink``
    (infinite) for values the backward reads. A finite cut saves the values whose split edge
    it cuts; values on the sink side are recomputed by the backward.

    Solved exactly in two phases: a maximum flow over bytes (divided by their gcd), then,
    among the byte-minimal cuts (the sets closed under the residual graph), one minimising the
    tie-break weights. Both phases fit int32 capacities for scipy's Dinic unless the saved
    bytes exceed 2**31 gcd-units, in which case phase one runs on networkx with exact integers.
    """
    boundary = analysis.boundary
    if not boundary:
        return set()
    relevant = sorted(analysis.ancestors(boundary), key=lambda v: v.id)
    index = {v: i for i, v in enumerate(relevant)}

    def v_in(i: int) -> int:
        return 2 + 2 * i

    def v_out(i: int) -> int:
        return 3 + 2 * i

    num_nodes = 2 + 2 * len(relevant)
    sizes = [v.nbytes for v in relevant]
    unit = math.gcd(*sizes) or 1
    boundary_units = sum(sizes[index[v]] // unit for v in boundary)
    inf = boundary_units + 1  # more than the cut that saves the whole boundary

    forced = set()
    banned_cache: dict[int, bool] = {}
    for i, v in enumerate(relevant):
        eqn = analysis.producer.get(v)
        if analysis.must_save(v):
            forced.add(i)
        elif v in analysis.forward_needed:
            key = id(eqn)
            if key not in banned_cache:
                banned_cache[key] = bool(banned(eqn))
            if banned_cache[key]:
                forced.add(i)

    split_edges = [(v_in(i), v_out(i), min(sizes[i] // unit, inf)) for i in range(len(relevant))]
    infinite: set[tuple[int, int]] = {(0, v_in(i)) for i in forced}
    infinite.update((v_out(index[v]), 1) for v in boundary)
    for i, v in enumerate(relevant):
        eqn = analysis.producer.get(v)
        if eqn is not None:
            infinite.update((v_out(index[a]), v_in(i)) for a in eqn.inputs if isinstance(a, Var))
    edges = split_edges + [(u, w, inf) for u, w in sorted(infinite)]

    flows = _max_flow(num_nodes, edges, exact_ints=inf >= _INT32_MAX)

    # Phase two: cuts closed under the residual graph are exactly the byte-minimal cuts.
    num_primal = sum(1 for v in relevant if v in analysis.primal_set)
    tie = [1 if v in analysis.primal_set else num_primal + 1 for v in relevant]
    inf2 = sum(tie) + 1
    phase2: dict[tuple[int, int], int] = {}
    for k, ((u, w, cap), f) in enumerate(zip(edges, flows)):
        if f > 0:
            phase2[(w, u)] = inf2
        if cap - f > 0:
            phase2[(u, w)] = inf2
        elif k < len(split_edges):
            phase2.setdefault((u, w), tie[k])
    edges2 = [(u, w, c) for (u, w), c in sorted(phase2.items())]
    flows2 = _max_flow(num_nodes, edges2, exact_ints=False)
    residual = [(u, w) for (u, w, c), f in zip(edges2, flows2) if c - f > 0]
    residual += [(w, u) for (u, w, c), f in zip(edges2, flows2) if f > 0]
    source_side = _reachable(num_nodes, residual, 0)
    return {v for i, v in enumerate(relevant) if source_side[v_in(i)] and not source_side[v_out(i)]}


def _max_flow(num_nodes: int, edges: Sequence[tuple[int, int, int]], exact_ints: bool) -> list[int]:
    """Flow on each edge of a maximum flow from node 0 to node 1 (edges must be distinct)."""
    if exact_ints:
        return _max_flow_networkx(num_nodes, edges)
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    positive = [(u, w, c) for u, w, c in edges if c > 0]
    if not positive:
        return [0] * len(edges)
    rows = np.fromiter((u for u, _, _ in positive), dtype=np.int32, count=len(positive))
    cols = np.fromiter((w for _, w, _ in positive), dtype=np.int32, count=len(positive))
    caps = np.fromiter((c for _, _, c in positive), dtype=np.int64, count=len(positive))
    assert caps.max() < _INT32_MAX
    matrix = csr_array((caps.astype(np.int32), (rows, cols)), shape=(num_nodes, num_nodes))
    flow = maximum_flow(matrix, 0, 1, method="dinic").flow.tocsr()
    values = np.asarray(flow[rows, cols]).ravel().tolist()
    by_edge = {(u, w): f for (u, w, _), f in zip(positive, values)}
    return [int(by_edge.get((u, w), 0)) for u, w, _ in edges]


def _max_flow_networkx(num_nodes: int, edges: Sequence[tuple[int, int, int]]) -> list[int]:
    """Exact (arbitrary-precision) fallback for capacities that do not fit int32."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(num_nodes))
    for u, w, c in edges:
        g.add_edge(u, w, capacity=int(c))
    _, flow = nx.maximum_flow(g, 0, 1)
    return [int(flow[u][w]) for u, w, _ in edges]


def _reachable(num_nodes: int, edges: Sequence[tuple[int, int]], start: int) -> list[bool]:
    adjacency: list[list[int]] = [[] for _ in range(num_nodes)]
    for u, w in edges:
        adjacency[u].append(w)
    seen = [False] * num_nodes
    seen[start] = True
    stack = [start]
    while stack:
        for w in adjacency[stack.pop()]:
            if not seen[w]:
                seen[w] = True
                stack.append(w)
    return seen


# ----------------------------------------------------------------------------- building the two graphs

def split(analysis: JointAnalysis, saved: Iterable[Var]) -> Partition:
    """The forward and backward graphs for a chosen saved set. Saved values the backward does
    not read are dropped; a backward that would need an unsaved primal is a PartitionError."""
    joint = analysis.graph
    saved_set = set(saved)
    for v in saved_set:
        if v in analysis.tangent:
            raise PartitionError(f"cannot save {v!r}: it depends on the cotangents")

    needed: set[Var] = {a for a in analysis.grads if isinstance(a, Var)}
    backward_eqns: list[Eqn] = []
    for eqn in reversed(joint.eqns):
        if any(v in needed and v not in saved_set for v in eqn.outputs):
            backward_eqns.append(eqn)
            needed.update(a for a in eqn.inputs if isinstance(a, Var))
    missing = [v for v in analysis.primals if v in needed and v not in saved_set]
    if missing:
        raise PartitionError(f"the backward needs primal inputs {missing} that the policy did not save")
    saved_vars = tuple(sorted((v for v in saved_set if v in needed), key=lambda v: v.id))

    # An equation recomputed in the backward may also have a saved output (multiple results):
    # that output is already a backward input, so the recomputed copy gets a fresh name.
    fresh = Builder()
    backward_eqns = [
        e if not any(v in saved_set for v in e.outputs) else
        e.__class__(e.primitive, e.inputs, tuple(fresh.new_var(v.aval) if v in saved_set else v
                                                 for v in e.outputs), e.params)
        for e in reversed(backward_eqns)]
    backward = Graph(tuple(saved_vars) + tuple(analysis.cotangents), tuple(backward_eqns), analysis.grads)

    targets = tuple(analysis.outs) + saved_vars
    live = {a for a in targets if isinstance(a, Var)}
    forward_eqns: list[Eqn] = []
    for eqn in reversed(joint.eqns):
        if any(v in live for v in eqn.outputs):
            forward_eqns.append(eqn)
            live.update(a for a in eqn.inputs if isinstance(a, Var))
    forward = Graph(tuple(analysis.primals), tuple(reversed(forward_eqns)), targets)
    return Partition(forward, backward, len(saved_vars))
