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

import inspect
import math
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from reftrace import names
from reftrace.builder import Builder
from reftrace.errors import PartitionError
from reftrace.graph import Eqn, Graph, Var, expect_graph, free_vars, live_eqns
from reftrace.primitives import checked, eqn_is_random
from reftrace.transforms.policies import (MinCut, Policy, PolicyValue, is_solver, default_ban, dots_saveable,
                                          resolve_policy, save_all, save_all_but_copies, save_anything_except_these,
                                          save_nothing, save_only_these)
from reftrace.transforms.recompute_rules import smaller_forms
from reftrace.transforms.simplify import simplify

__all__ = ["partition", "Partition", "MinCut", "Policy", "default_ban", "save_all", "save_all_but_copies",
           "save_nothing", "save_only_these", "save_anything_except_these", "dots_saveable", "JointAnalysis",
           "split", "policy_saved", "min_cut_saved"]


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

    @property
    def saved_input_bytes(self) -> int:
        """Bytes of the saved values that are forward inputs (parameters, buffers, arguments):
        memory the forward does not allocate, only keeps referenced."""
        inputs = set(self.forward.inputs)
        return sum(v.nbytes for v in self.saved if v in inputs)

    @property
    def saved_activation_bytes(self) -> int:
        """Bytes of the saved values the forward computes: the activation memory a partition costs."""
        return self.saved_bytes - self.saved_input_bytes

    def __repr__(self) -> str:
        return (f"Partition(forward={self.forward!r}, backward={self.backward!r}, "
                f"saved={len(self.saved)} values, {self.saved_bytes} bytes)")


def partition(joint: Graph, policy: str | PolicyValue = "default") -> Partition:
    """Split ``joint`` (a graph with ``joint.joint``) into forward and backward graphs.

    ``policy``: ``"default"`` (compute everything that does not depend on cotangents in the
    forward and save what the backward uses, but copies such as a parameter's transpose, which
    the backward redoes), ``"mincut"`` (save the fewest bytes, recompute
    cheap ops in the backward), a ``MinCut(banned=...)`` value, an ``rt.optimal(memory_budget)``
    value (the fewest recomputed FLOPs within a memory budget), or a callable
    ``policy(eqn) -> bool`` (True: this forward equation's outputs may be saved; False:
    recompute it in the backward). The joint is simplified first so nothing is saved twice.
    """
    expect_graph(joint, "partition")
    if joint.joint is None:
        raise PartitionError("partition needs a joint graph (one with .joint = (num_primals, num_outputs)); "
                             "make one with rt.vjp(graph)")
    chosen = resolve_policy(policy)
    if is_solver(chosen):  # rt.optimal(...): the MILP builds the whole partition
        return chosen.split_joint(JointAnalysis(simplify(joint)))
    _check_takes_one_equation(chosen.banned if isinstance(chosen, MinCut) else chosen,
                              "MinCut(banned=...)" if isinstance(chosen, MinCut) else "a policy")
    analysis = JointAnalysis(simplify(joint))
    if isinstance(chosen, MinCut):
        saved = min_cut_saved(analysis, chosen.banned)
    else:
        saved = policy_saved(analysis, chosen)
    return split(analysis, saved)


def _check_takes_one_equation(fn: Any, what: str) -> None:
    """A policy or ban is called as ``fn(eqn)``; say so here rather than fail inside the algorithm."""
    if not callable(fn):
        raise PartitionError(f"{what} must be a callable fn(eqn) -> bool, got {type(fn).__name__} {fn!r:.40}")
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        raise PartitionError(f"{what} must take one argument, the equation: fn(eqn) -> bool; "
                             f"{getattr(fn, '__name__', fn)!s}{inspect.signature(fn)} does not") from None
    except ValueError:  # no signature to inspect (a builtin): the call will tell
        pass


# ----------------------------------------------------------------------------- analysis

class JointAnalysis:
    """What every policy needs to know about a joint graph: which values depend on
    cotangents, which forward values the backward reads (the boundary), and what the
    forward outputs need.

    Values are handled by their canonical ``Var.id`` (a Graph numbers its values 0, 1, 2, ...
    in definition order), so the bookkeeping is lists of ints rather than hashed Vars.
    """

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
        self.num_primals = num_primals

        #: values[i] is the Var with id i; eqn_of[i] the index of the equation defining it (-1: input)
        self.values: list[Var] = list(joint.inputs) + [v for e in joint.eqns for v in e.outputs]
        self.eqn_of: list[int] = [-1] * len(joint.inputs) + [k for k, e in enumerate(joint.eqns) for _ in e.outputs]
        self.operands: list[tuple[int, ...]] = [tuple(a.id for a in e.inputs if isinstance(a, Var))
                                                for e in joint.eqns]
        assert all(v.id == i for i, v in enumerate(self.values)), "graphs number their values canonically"

        tangent = [False] * len(self.values)
        for v in self.cotangents:
            tangent[v.id] = True
        eqn_tangent = []
        for e, ops in zip(joint.eqns, self.operands):
            t = any(tangent[i] for i in ops)
            eqn_tangent.append(t)
            if t:
                for v in e.outputs:
                    tangent[v.id] = True
        self.tangent_ids = tangent
        for i, a in enumerate(self.outs):
            if isinstance(a, Var) and tangent[a.id]:
                raise PartitionError(f"forward output {i} depends on the cotangent inputs, so it cannot be "
                                     f"computed by the forward; check the joint spec {joint.joint}")

        boundary = {a.id for a in self.grads if isinstance(a, Var) and not tangent[a.id]}
        for ops, t in zip(self.operands, eqn_tangent):
            if t:
                boundary.update(i for i in ops if not tangent[i])
        self.boundary_ids: list[int] = sorted(boundary)
        self.forward_needed_ids = self.ancestor_ids(a.id for a in self.outs if isinstance(a, Var))
        self.forward_needed_mask = [False] * len(self.values)
        for i in self.forward_needed_ids:
            self.forward_needed_mask[i] = True
        #: forward equations the backward recomputes in a smaller form (``recompute_rules``), by index
        self.recompute_forms: dict[int, Eqn] = self._smaller_forms(eqn_tangent)
        #: the joint's equations with those forms in place: what a backward is cut from
        self.backward_source: list[Eqn] = [self.recompute_forms.get(k, e) for k, e in enumerate(joint.eqns)]

    def _smaller_forms(self, eqn_tangent: list[bool]) -> dict[int, Eqn]:
        """The forward equations with a smaller form none of whose left-out outputs the backward can
        read (no ancestor of the boundary), so that every partition recomputes that form."""
        candidates = {k: found for k, found in smaller_forms(self.graph.eqns).items() if not eqn_tangent[k]}
        if not candidates:
            return {}
        relevant = [False] * len(self.values)
        for i in self.ancestor_ids(self.boundary_ids):
            relevant[i] = True
        return {k: form for k, (form, kept) in candidates.items()
                if not any(relevant[v.id] for j, v in enumerate(self.graph.eqns[k].outputs) if j not in kept)}

    def recompute_operands(self, k: int) -> tuple[int, ...]:
        """Ids of the values equation ``k`` reads when the backward recomputes it."""
        form = self.recompute_forms.get(k)
        return self.operands[k] if form is None else tuple(a.id for a in form.inputs if isinstance(a, Var))

    # Var-level views (for policies, tests and readers)
    @property
    def boundary(self) -> tuple[Var, ...]:
        """Forward values the backward reads, in definition order."""
        return tuple(self.values[i] for i in self.boundary_ids)

    @property
    def primal_set(self) -> frozenset[Var]:
        return frozenset(self.primals)

    @property
    def forward_needed(self) -> frozenset[Var]:
        return frozenset(self.values[i] for i in self.forward_needed_ids)

    @property
    def tangent(self) -> frozenset[Var]:
        return frozenset(v for v, t in zip(self.values, self.tangent_ids) if t)

    @property
    def producer(self) -> dict[Var, Eqn]:
        return {v: self.graph.eqns[k] for v, k in zip(self.values, self.eqn_of) if k >= 0}

    def ancestors(self, roots: Iterable[Var]) -> set[Var]:
        """``roots`` and every value they are computed from."""
        return {self.values[i] for i in self.ancestor_ids(v.id for v in roots)}

    def ancestor_ids(self, roots: Iterable[int]) -> list[int]:
        """Ids of ``roots`` and of every value they are computed from, sorted."""
        seen = [False] * len(self.values)
        stack = list(roots)
        while stack:
            i = stack.pop()
            if seen[i]:
                continue
            seen[i] = True
            k = self.eqn_of[i]
            if k >= 0:
                stack.extend(self.operands[k])
        return [i for i, s in enumerate(seen) if s]

    def must_save(self, v: Var) -> bool:
        """Primal inputs and random draws are never recomputed by the backward."""
        return self._must_save(v.id)

    def _must_save(self, i: int) -> bool:
        k = self.eqn_of[i]
        return k < 0 or eqn_is_random(self.graph.eqns[k].primitive)


# ----------------------------------------------------------------------------- callable policies

def policy_saved(analysis: JointAnalysis, policy: Policy) -> set[Var]:
    """The values a callable policy saves: walk back from the boundary; save where the policy
    allows it (or must), recompute (and keep walking) where it does not."""
    eqns = analysis.graph.eqns
    decisions: dict[int, bool] = {}
    saved: set[int] = set()
    seen = [False] * len(analysis.values)
    stack = list(analysis.boundary_ids)
    while stack:
        i = stack.pop()
        if seen[i]:
            continue
        seen[i] = True
        if analysis._must_save(i):
            saved.add(i)
            continue
        k = analysis.eqn_of[i]
        if k not in decisions:
            decisions[k] = bool(policy(eqns[k]))
        if decisions[k]:
            saved.add(i)
        else:
            stack.extend(analysis.recompute_operands(k))
    return {analysis.values[i] for i in saved}


# ----------------------------------------------------------------------------- min cut

_INT32_MAX = int(np.iinfo(np.int32).max)


def min_cut_saved(analysis: JointAnalysis, banned: Callable[[Eqn], bool] = default_ban) -> set[Var]:
    """The saved set with the fewest bytes (ties: fewer non-primal values, then fewer primal inputs
    and forward values the backward computes again).

    The flow network splits every relevant forward value ``v`` into ``v_in -> v_out`` with
    capacity ``v.nbytes``; ``u_out -> v_in`` (infinite) for each operand ``u`` of ``v``'s
    equation; ``source -> v_in`` (infinite) for values that must be computed in the forward
    (primal inputs, random draws, banned equations the forward outputs need); ``v_out -> sink``
    (infinite) for values the backward reads. A finite cut saves the values whose split edge
    it cuts; values on the sink side are recomputed by the backward.

    Solved exactly in two phases: a maximum flow over bytes (divided by their gcd), then,
    among the byte-minimal cuts (the sets closed under the residual graph), one minimising the
    tie-break weights. Both phases use scipy's Dinic with int32 capacities; a phase whose
    capacities do not fit (saved bytes beyond 2**31 gcd-units) runs on networkx with exact
    Python integers instead.
    """
    if not analysis.boundary_ids:
        return set()
    eqns = analysis.graph.eqns
    relevant = analysis.ancestor_ids(analysis.boundary_ids)   # value ids, sorted
    node = {vid: i for i, vid in enumerate(relevant)}          # value id -> index in relevant
    count = len(relevant)
    num_nodes = 2 + 2 * count                                  # 0 source, 1 sink, 2+2i in, 3+2i out

    sizes = [analysis.values[vid].nbytes for vid in relevant]
    unit = math.gcd(*sizes) or 1
    units = [s // unit for s in sizes]
    inf = sum(units[node[vid]] for vid in analysis.boundary_ids) + 1  # beats saving the whole boundary

    banned_cache: dict[int, bool] = {}

    def forced(vid: int) -> bool:
        if analysis._must_save(vid):
            return True
        k = analysis.eqn_of[vid]
        # a banned equation the forward runs anyway gives all its outputs there (attention's
        # log-sum-exp is saved, not recomputed by running attention again in the backward)
        if not any(analysis.forward_needed_mask[o.id] for o in eqns[k].outputs):
            return False
        if k not in banned_cache:
            banned_cache[k] = bool(banned(eqns[k]))
        return banned_cache[k]

    split_edges = [(2 + 2 * i, 3 + 2 * i, min(u, inf)) for i, u in enumerate(units)]
    infinite: set[tuple[int, int]] = {(0, 2 + 2 * i) for i, vid in enumerate(relevant) if forced(vid)}
    infinite.update((3 + 2 * node[vid], 1) for vid in analysis.boundary_ids)
    for i, vid in enumerate(relevant):
        k = analysis.eqn_of[vid]
        if k >= 0:
            infinite.update((3 + 2 * node[op], 2 + 2 * i) for op in analysis.recompute_operands(k))
    edges = np.array(split_edges + [(u, w, inf) for u, w in sorted(infinite)], dtype=np.int64).reshape(-1, 3)
    flows = _max_flow(num_nodes, edges)

    # Phase two: the cuts closed under the residual graph of phase one are exactly the
    # byte-minimal cuts; among them, find the one with the smallest tie-break weight: each
    # saved non-primal value outweighs all the rest, then each saved primal input and each
    # value the forward computes that the backward computes again (``source -> v_in`` with
    # capacity 1, cut where ``v_in`` is on the sink side) weigh one: of ``relu(conv(x))``'s
    # input and output, which are the same size, the output is saved, not recomputed.
    primal = np.array([vid < analysis.num_primals for vid in relevant], dtype=bool)  # inputs come first
    u, w, cap = edges[:, 0], edges[:, 1], edges[:, 2]
    unsaturated = cap - flows > 0
    saturated_split = ~unsaturated[:count]
    residual1 = np.concatenate([np.stack([w[flows > 0], u[flows > 0]], axis=1),
                                np.stack([u[unsaturated], w[unsaturated]], axis=1)])
    # a value whose side every byte-minimal cut fixes adds the same to each: no edge for it
    fixed = _reachable(num_nodes, residual1, 0) | _reachable(num_nodes, residual1[:, ::-1], 1)
    recomputable = [2 + 2 * i for i, vid in enumerate(relevant)
                    if analysis.forward_needed_mask[vid] and not forced(vid) and not fixed[2 + 2 * i]]
    tie = np.where(primal, 1, int((primal & saturated_split).sum()) + len(recomputable) + 1).astype(np.int64)
    inf2 = int(tie[saturated_split].sum()) + len(recomputable) + 1
    edges2 = np.concatenate([
        np.concatenate([residual1, np.full((len(residual1), 1), inf2)], axis=1),
        np.stack([u[:count][saturated_split], w[:count][saturated_split], tie[saturated_split]], axis=1),
        np.array([(0, v_in, 1) for v_in in recomputable], dtype=np.int64).reshape(-1, 3),
    ]).astype(np.int64)
    edges2 = _merge_parallel(edges2)
    flows2 = _max_flow(num_nodes, edges2)
    residual = np.concatenate([edges2[edges2[:, 2] - flows2 > 0, :2], edges2[flows2 > 0][:, 1::-1]])
    source_side = _reachable(num_nodes, residual, 0)
    return {analysis.values[vid] for i, vid in enumerate(relevant)
            if source_side[2 + 2 * i] and not source_side[3 + 2 * i]}


def _merge_parallel(edges: np.ndarray) -> np.ndarray:
    """One edge per (u, w) pair, keeping the largest capacity (a solver would add them up)."""
    if len(edges) == 0:
        return edges
    order = np.lexsort((-edges[:, 2], edges[:, 1], edges[:, 0]))
    edges = edges[order]
    first = np.ones(len(edges), dtype=bool)
    first[1:] = (edges[1:, 0] != edges[:-1, 0]) | (edges[1:, 1] != edges[:-1, 1])
    return edges[first]


def _max_flow(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Flow on each edge (rows ``u, w, capacity``, pairs distinct) of a maximum flow from
    node 0 to node 1: scipy's Dinic when capacities fit int32, exact networkx otherwise."""
    if len(edges) == 0:
        return np.zeros(0, dtype=np.int64)
    if int(edges[:, 2].max()) >= _INT32_MAX:
        return _max_flow_networkx(num_nodes, edges)
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    positive = edges[:, 2] > 0
    flows = np.zeros(len(edges), dtype=np.int64)
    if not positive.any():
        return flows
    u, w, c = (edges[positive, j] for j in range(3))
    matrix = csr_array((c.astype(np.int32), (u.astype(np.int32), w.astype(np.int32))),
                       shape=(num_nodes, num_nodes))
    flow = maximum_flow(matrix, 0, 1, method="dinic").flow.tocsr()
    flows[positive] = np.asarray(flow[u, w]).ravel()
    return flows


def _max_flow_networkx(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Exact (arbitrary-precision) fallback for capacities that do not fit int32."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(num_nodes))
    for u, w, c in edges.tolist():
        g.add_edge(u, w, capacity=int(c))
    _, flow = nx.maximum_flow(g, 0, 1)
    return np.array([flow[u][w] for u, w, _ in edges.tolist()], dtype=np.int64)


def _reachable(num_nodes: int, edges: np.ndarray, start: int) -> np.ndarray:
    """Which nodes a path of ``edges`` (rows ``u, w``) reaches from ``start``."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import breadth_first_order

    seen = np.zeros(num_nodes, dtype=bool)
    if len(edges) == 0:
        seen[start] = True
        return seen
    matrix = csr_array((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(num_nodes, num_nodes))
    seen[breadth_first_order(matrix, start, directed=True, return_predecessors=False)] = True
    return seen


# ----------------------------------------------------------------------------- building the two graphs

def _split_names(analysis: JointAnalysis, saved: tuple[Var, ...]) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """(input, output) names of the forward and of the backward, from the joint's: a saved primal
    keeps its input's name, a saved activation is ``saved[k]``."""
    joint = analysis.graph
    if joint.input_names is None and joint.output_names is None:
        return (None, None), (None, None)
    p, o = analysis.num_primals, len(analysis.outs)
    in_names = names.or_default(joint.input_names, len(joint.inputs), "args")
    out_names = names.or_default(joint.output_names, len(joint.outputs), "out")
    saved_names = tuple(in_names[v.id] if v.id < p else names.saved(k) for k, v in enumerate(saved))
    return (in_names[:p], out_names[:o] + saved_names), (saved_names + in_names[p:], out_names[o:])


def split(analysis: JointAnalysis, saved: Iterable[Var]) -> Partition:
    """The forward and backward graphs for a chosen saved set. Saved values the backward does
    not read are dropped; a backward that would need an unsaved primal is a PartitionError."""
    backward_eqns, saved_vars = _backward_eqns(analysis, saved)
    fw_names, bw_names = _split_names(analysis, saved_vars)
    backward = Graph(saved_vars + tuple(analysis.cotangents), _just_in_time(analysis, backward_eqns), analysis.grads,
                     None, *bw_names)

    targets = tuple(analysis.outs) + saved_vars
    forward = Graph(tuple(analysis.primals), tuple(live_eqns(analysis.graph.eqns, targets)), targets, None,
                    *fw_names)
    return Partition(checked(forward, "partition (forward)"), checked(backward, "partition (backward)"),
                     len(saved_vars))


def _just_in_time(analysis: JointAnalysis, eqns: list[Eqn]) -> tuple[Eqn, ...]:
    """The backward's equations with each recomputation moved to just before its first use.

    In the joint, the forward comes first, so the backward's recomputed forward equations would
    all run before any gradient: every recomputed value would be live at once, and recomputing
    would save no memory over saving (as torch's partitioner, which reorders to mimic the autograd
    engine). The equations that read the cotangents keep their order; each other equation runs
    as late as its first reader allows."""
    producer: dict[Var, Eqn] = {v: e for e in eqns for v in e.outputs}
    done: set[int] = set()
    order: list[Eqn] = []

    def emit(root: Eqn) -> None:
        stack = [(root, False)]
        while stack:
            e, ready = stack.pop()
            if id(e) in done:
                continue
            if ready:
                done.add(id(e))
                order.append(e)
                continue
            stack.append((e, True))
            for a in reversed(e.inputs):
                p = producer.get(a) if isinstance(a, Var) else None
                if p is not None and id(p) not in done:
                    stack.append((p, False))

    for e in eqns:
        if any(analysis.tangent_ids[v.id] for v in e.outputs if v.id < len(analysis.tangent_ids)):
            emit(e)
    for e in eqns:  # what no gradient equation reads (a gradient that is a forward value)
        emit(e)
    return tuple(order)


def saved_values(analysis: JointAnalysis, saved: Iterable[Var]) -> tuple[Var, ...]:
    """The values ``split(analysis, saved)`` would hand to the backward (``Partition.saved``),
    without building the graphs: what a policy's choice costs, cheaply."""
    return _backward_eqns(analysis, saved)[1]


def _backward_eqns(analysis: JointAnalysis, saved: Iterable[Var]) -> tuple[list[Eqn], tuple[Var, ...]]:
    """The backward's equations for a saved set, and the saved values they read (in value order)."""
    is_saved = [False] * len(analysis.values)
    for v in saved:
        if analysis.tangent_ids[v.id]:
            raise PartitionError(f"cannot save {v!r}: it depends on the cotangents")
        is_saved[v.id] = True

    saved_set = {v for v in analysis.values if is_saved[v.id]}
    backward_eqns = live_eqns(analysis.backward_source, analysis.grads, available=saved_set)
    # An equation recomputed in the backward may also have a saved output (multiple results):
    # that output is a backward input, so the recomputed copy gets a fresh name (before asking
    # which saved values the backward reads: the saved one is read, not the copy).
    fresh = Builder()
    backward_eqns = [
        e if not any(is_saved[v.id] for v in e.outputs) else
        Eqn(e.primitive, e.inputs, tuple(fresh.new_var(v.aval) if is_saved[v.id] else v for v in e.outputs),
            e.params)
        for e in backward_eqns]
    needed = free_vars(backward_eqns, analysis.grads)
    missing = [v for v in analysis.primals if v in needed and not is_saved[v.id]]
    if missing:
        raise PartitionError(f"the backward needs primal inputs {missing} that the policy did not save")
    return backward_eqns, tuple(v for v in analysis.values if is_saved[v.id] and v in needed)
