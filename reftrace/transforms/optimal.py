"""``optimal`` and ``pareto``: the partitions that recompute the fewest FLOPs within a memory budget.

``rt.optimal(memory_budget)`` is a policy value for ``rt.partition``: of all the partitions
``split`` can make from a joint graph, it picks one that minimises ``rt.cost(p).recompute_flops``
subject to ``rt.cost(p).activation_bytes <= memory_budget``, exactly, by solving a mixed-integer
program with HiGHS (``highspy``). With ``fewest_bytes=True`` (always in ``pareto``) ties go to
fewer activation bytes (a second solve with the FLOPs fixed at their optimum), so the answer is a
point of the Pareto frontier, which ``pareto`` walks.

The program, over the *relevant* forward values (the boundary the backward reads and their
ancestors; everything else is outside any partition's choice):

- ``s_v`` (binary, one per relevant computed value): ``v`` is saved;
- ``r_e`` (binary, one per relevant equation that is not a random draw): the backward runs ``e``;
- ``f_e`` (continuous in [0, 1], one per relevant equation the forward outputs do not need):
  the forward runs ``e`` anyway, because a saved value depends on it;
- ``y_e`` (continuous, one per such equation with FLOPs): ``e`` runs in both.

Constraints: a boundary value is saved or recomputed (``s_v + r_e(v) >= 1``); an equation the
backward runs has every operand saved or recomputed (``s_u + r_e(u) >= r_e``; operands and FLOPs
are those of the smaller form the backward runs, where ``recompute_rules`` gives one); primal inputs are
always available and cost nothing (they live anyway), random draws can only be saved; the forward
runs an equation whose output is saved and everything a forward equation reads
(``f_e >= s_v``, ``f_e(u) >= f_e``); ``y_e >= r_e + f_e - 1``; the budget
``sum(bytes(v) * s_v) <= memory_budget``, and that row rounded (``_rounding_divisors``).
Objective: ``sum(flops(e) * r_e)`` over equations the forward outputs need, plus
``sum(flops(e) * y_e)`` over the others: exactly the FLOPs of backward equations that repeat
forward ones, as ``rt.cost`` counts them. ``f`` and ``y`` take integral
values at an optimum once ``s`` and ``r`` are integral, so only ``s`` and ``r`` are branched on.

Reduction before solving: only ancestors of the boundary get variables; primal inputs get none
(always available, free to save); random draws get no ``r``; equations the forward outputs need
get no ``f``/``y`` (the forward runs them anyway, so recomputing them costs their FLOPs); bytes
and FLOPs are divided by their gcds (integral coefficients, so ``mip_rel_gap=0`` proves the true
optimum). HiGHS solves it in two searches, a short one for a good solution and an exact one cut
off just above it (``_Highs.minimise``). The answer is turned into a partition by ``split`` and
re-measured with ``rt.cost`` (integers): the budget is checked exactly, and tightened and re-solved
if floating point let a byte through.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reftrace.errors import PartitionError
from reftrace.graph import Graph, Var, expect_graph
from reftrace.primitives import eqn_is_random
from reftrace.transforms.cost import eqn_flops, peak_bytes
from reftrace.transforms.partition import (JointAnalysis, Partition, min_cut_saved, policy_saved, saved_values,
                                           split)
from reftrace.transforms.policies import save_all_but_copies
from reftrace.transforms.simplify import simplify

__all__ = ["optimal", "Optimal", "pareto", "RecomputeProgram", "within_peak"]


@dataclass(frozen=True)
class Optimal:
    """Recompute the fewest FLOPs (``rt.cost``'s model) within ``memory_budget`` activation bytes.

    ``memory_budget``: an int (bytes), a float in (0, 1] (that fraction of the ``"default"``
    policy's activation bytes, like torch's ``activation_memory_budget``), or None (min-cut's
    activation bytes). Make one with ``rt.optimal(...)``, which checks the budget.
    """

    memory_budget: int | float | None = None
    #: primal inputs the caller overwrites after the forward (a module's running statistics): a
    #: saved one is copied first, so saving it costs its bytes (the torch bridge fills this in)
    overwritten: tuple[int, ...] = ()
    #: among the partitions with the fewest FLOPs, one with the fewest bytes (a second solve)
    fewest_bytes: bool = False
    #: ``rt.cost(p).peak_bytes`` at most this (bytes, or a fraction of the default policy's peak);
    #: approximate: searched along the activation-bytes frontier (see ``within_peak``)
    peak_budget: int | float | None = None

    def __repr__(self) -> str:
        tie = ", fewest_bytes=True" if self.fewest_bytes else ""
        peak = f", peak_budget={self.peak_budget!r}" if self.peak_budget is not None else ""
        return f"optimal(memory_budget={self.memory_budget!r}{tie}{peak})"

    def split_joint(self, analysis: JointAnalysis) -> Partition:
        """``rt.partition``'s path for this policy (the joint already simplified and analysed)."""
        program = RecomputeProgram(analysis, overwritten=self.overwritten)
        budget = _budget_bytes(program, self.memory_budget)
        if self.peak_budget is None:
            return program.best_within(budget, fewest_bytes=self.fewest_bytes)
        return within_peak(program, budget, _peak_bytes_budget(analysis, self.peak_budget))


def optimal(memory_budget: int | float | None = None, *, fewest_bytes: bool = False,
            peak_budget: int | float | None = None) -> Optimal:
    """The policy saving at most ``memory_budget`` activation bytes while recomputing the fewest FLOPs.

    ``memory_budget``: bytes (an int), a fraction in (0, 1] of the ``"default"`` policy's
    activation bytes (a float, as torch's ``activation_memory_budget``), or None: min-cut's
    activation bytes. ``fewest_bytes``: among the partitions with the fewest FLOPs, take one with
    the fewest bytes (a second solve; without it, any within the budget). ``peak_budget``: also
    keep ``rt.cost(p).peak_bytes`` within this many bytes (an int) or this fraction of the default
    policy's peak (a float); approximate, see ``within_peak``. Use it as
    ``rt.partition(joint, rt.optimal(0.5))`` or ``aot_module(..., partition_fn=rt.optimal(0.5))``.
    """
    return Optimal(_checked_budget("memory_budget", memory_budget, "activation bytes"), fewest_bytes=bool(fewest_bytes),
                   peak_budget=_checked_budget("peak_budget", peak_budget, "peak bytes"))


def _checked_budget(name: str, budget: Any, measure: str) -> int | float | None:
    """``budget`` as an int (bytes), a float in (0, 1] (a fraction of the default policy's
    ``measure``) or None; a PartitionError says what is wrong with anything else."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise PartitionError(f"rt.optimal: {name} must be bytes (an int), a fraction in (0, 1] "
                             f"(a float) or None, got {type(budget).__name__} {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if not 0.0 < float(budget) <= 1.0:
            raise PartitionError(f"rt.optimal: a float {name} is a fraction of the default policy's "
                                 f"{measure}, in (0, 1]; got {budget}. Pass bytes as an int")
        return float(budget)
    if budget < 0:
        raise PartitionError(f"rt.optimal: {name}={budget} bytes is negative")
    return int(budget)


def pareto(joint: Graph, points: int | None = 12) -> tuple[Partition, ...]:
    """Partitions on the activation-bytes / recompute-FLOPs Pareto frontier, fewest bytes first.

    Each is the ``optimal`` partition for some budget, so activation bytes strictly increase and
    recompute FLOPs strictly decrease along the tuple. ``points``: how many budgets to try, evenly
    spaced from the smallest feasible one to the fewest bytes with no recomputation (duplicates
    merge, so fewer may come back); None walks the whole frontier, one point per solve pair.
    """
    expect_graph(joint, "pareto")
    if joint.joint is None:
        raise PartitionError("pareto needs a joint graph; make one with rt.vjp(graph)")
    if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points < 2):
        raise PartitionError(f"pareto: points must be an int >= 2 or None (the whole frontier), got {points!r}")
    program = RecomputeProgram(JointAnalysis(simplify(joint)))
    cheapest = program.best_within(None)               # fewest bytes among the least recomputation
    smallest = program.best_within(program.min_bytes())
    found = {_key(cheapest): cheapest, _key(smallest): smallest}
    lo, hi = smallest.saved_activation_bytes, cheapest.saved_activation_bytes
    if points is None:
        budget = hi - 1
        while budget >= lo:
            p = program.best_within(budget)
            found[_key(p)] = p
            budget = p.saved_activation_bytes - 1
    else:
        for budget in np.linspace(lo, hi, points)[1:-1]:
            p = program.best_within(int(budget))
            found[_key(p)] = p
    return _frontier(found.values())


def _key(p: Partition) -> tuple[int, int]:
    from reftrace.transforms.cost import recompute_flops
    return (p.saved_activation_bytes, recompute_flops(p))


def _frontier(parts: Any) -> tuple[Partition, ...]:
    """The non-dominated partitions, fewest bytes first (so FLOPs strictly decrease)."""
    out: list[Partition] = []
    for p in sorted(parts, key=_key):
        if not out or _key(p)[1] < _key(out[-1])[1]:
            out.append(p)
    return tuple(out)


def _budget_bytes(program: "RecomputeProgram", memory_budget: int | float | None) -> int:
    analysis = program.analysis
    if memory_budget is None:
        return program.activation_bytes(saved_values(analysis, min_cut_saved(analysis)))
    if isinstance(memory_budget, float):
        default = program.activation_bytes(saved_values(analysis, policy_saved(analysis, save_all_but_copies)))
        return int(math.floor(memory_budget * default))
    return int(memory_budget)


def _peak_bytes_budget(analysis: JointAnalysis, peak_budget: int | float) -> int:
    if isinstance(peak_budget, float):
        default = peak_bytes(split(analysis, policy_saved(analysis, save_all_but_copies)))
        return int(math.floor(peak_budget * default))
    return int(peak_budget)


def within_peak(program: "RecomputeProgram", budget: int, peak_budget: int, probes: int = 12) -> Partition:
    """A partition with few recomputed FLOPs within ``budget`` activation bytes whose
    ``rt.cost(p).peak_bytes`` is at most ``peak_budget``: approximate, searched along the
    activation-bytes frontier.

    Exact would need the program to model when each value dies in both passes. Peak memory is not
    monotone along the frontier (saving nothing recomputes the whole forward inside the backward,
    which can peak higher than saving everything), so this solves ``probes`` evenly spaced
    budgets, takes the fitting point with the fewest FLOPs, and bisects the budget between it and
    the next point up. The answer is a frontier point whose peak fits; between probes a point
    with fewer FLOPs may fit too. When no probe fits, a PartitionError names the smallest peak seen."""
    best = program.best_within(budget)
    if peak_bytes(best) <= peak_budget:
        return best
    spent = program.activation_bytes
    probed = (program.best_within(int(b)) for b in np.linspace(program.min_bytes(), spent(best.saved), probes))
    seen = {spent(p.saved): p for p in probed}
    seen[spent(best.saved)] = best
    peaks = {b: peak_bytes(p) for b, p in seen.items()}
    fitting = [b for b in peaks if peaks[b] <= peak_budget]
    if not fitting:
        smallest = min(peaks.values())
        raise PartitionError(f"rt.optimal: none of the partitions tried on the activation-bytes frontier peaks "
                             f"at or under {peak_budget} bytes; the smallest peak among those {len(peaks)} is "
                             f"{smallest} bytes (inputs, parameters and outputs included). "
                             f"Pass peak_budget >= {smallest}")
    fits_to = max(fitting)
    low, high = seen[fits_to], min(b for b in peaks if b > fits_to)
    while high - fits_to > program.byte_unit:  # low fits, the point at high does not
        candidate = program.best_within((fits_to + high) // 2)
        if peak_bytes(candidate) <= peak_budget:
            low, fits_to = candidate, (fits_to + high) // 2
        else:
            high = spent(candidate.saved)
    return low


# ----------------------------------------------------------------------------- the program

@dataclass(frozen=True)
class _Solution:
    saved_ids: tuple[int, ...]
    flops_units: int


class RecomputeProgram:
    """The mixed-integer program of one analysed joint (see the module docstring); solve it for
    any budget with ``best_within``."""

    def __init__(self, analysis: JointAnalysis, overwritten: Sequence[int] = ()) -> None:
        self.analysis = a = analysis
        eqns = a.graph.eqns
        num_inputs = len(a.graph.inputs)
        #: primal inputs whose saving costs their bytes (the caller overwrites them: a copy is saved)
        self.charged = frozenset(i for i in overwritten if 0 <= i < a.num_primals)
        relevant = a.ancestor_ids(a.boundary_ids) if a.boundary_ids else []
        computed = [vid for vid in relevant if vid >= num_inputs]
        random = {a.eqn_of[vid] for vid in computed if eqn_is_random(eqns[a.eqn_of[vid]].primitive)}
        # what the backward runs to recompute equation k: its smaller form where it has one
        flops = {k: eqn_flops(a.backward_source[k]) for k in {a.eqn_of[vid] for vid in computed} if k not in random}
        stand_in = _stand_ins(a, computed, flops, self.charged)
        self.savable = [vid for vid in relevant if stand_in[vid] == vid]
        relevant_eqns = sorted({a.eqn_of[vid] for vid in self.savable} - {-1})
        fwd = {k for k in relevant_eqns if any(a.forward_needed_mask[v.id] for v in eqns[k].outputs)}

        columns = 0

        def new_columns(keys: Sequence[int]) -> dict[int, int]:
            nonlocal columns
            out = {key: columns + i for i, key in enumerate(keys)}
            columns += len(keys)
            return out

        s = new_columns(self.savable)
        r = new_columns([k for k in relevant_eqns if k not in random])
        f = new_columns([k for k in relevant_eqns if k not in fwd])
        y = new_columns([k for k in relevant_eqns if k not in fwd and k not in random and flops[k] > 0])
        self.num_columns = columns
        self.s_columns = np.array([s[vid] for vid in self.savable], dtype=np.int64)
        self.integrality = np.zeros(columns)
        self.integrality[:len(s) + len(r)] = 1

        rows: list[list[tuple[int, float]]] = []
        lower: list[float] = []

        def available(vid: int) -> list[tuple[int, float]] | None:
            """Terms of "vid is available to the backward"; None: always (free to recompute)."""
            vid = stand_in[vid]
            if vid is None:
                return None
            k = a.eqn_of[vid]
            return [(s[vid], 1.0)] + ([(r[k], 1.0)] if k in r else [])

        for vid in a.boundary_ids:
            terms = available(vid)
            if terms is not None:
                rows.append(terms)
                lower.append(1.0)
        for k in r:
            for u in set(a.recompute_operands(k)):
                terms = available(u)
                if terms is not None:
                    rows.append(terms + [(r[k], -1.0)])
                    lower.append(0.0)
        for k in f:
            for v in eqns[k].outputs:
                if v.id in s:
                    rows.append([(f[k], 1.0), (s[v.id], -1.0)])
                    lower.append(0.0)
            for u in set(a.operands[k]):
                producer = a.eqn_of[stand_in[u]] if stand_in[u] is not None else -1
                if producer in f:
                    rows.append([(f[producer], 1.0), (f[k], -1.0)])
                    lower.append(0.0)
        for k in y:
            rows.append([(y[k], 1.0), (r[k], -1.0), (f[k], -1.0)])
            lower.append(-1.0)

        self.rows = _sparse(rows, columns)
        self.lower = np.array(lower)

        sizes = [a.values[vid].nbytes for vid in self.savable]
        self.byte_unit = math.gcd(*sizes) or 1
        self.bytes_objective = np.zeros(columns)
        self.bytes_objective[self.s_columns] = [n // self.byte_unit for n in sizes]
        #: the rounded budget rows' divisors; see ``_rounding_divisors``
        self.cut_divisors = _rounding_divisors([n // self.byte_unit for n in sizes])
        costs = {**{r[k]: flops[k] for k in r if k in fwd}, **{y[k]: flops[k] for k in y}}
        self.flop_unit = math.gcd(*costs.values()) or 1
        self.flops_objective = np.zeros(columns)
        for col, c in costs.items():
            self.flops_objective[col] = c // self.flop_unit
        self._model: _Highs | None = None

    # -- solving

    def best_within(self, budget: int | None, fewest_bytes: bool = True) -> Partition:
        """The partition with the fewest recomputed FLOPs (then, with ``fewest_bytes``, the fewest
        activation bytes) within ``budget`` activation bytes (None: unbounded). A PartitionError
        names the smallest feasible budget when there is none."""
        units = None if budget is None else budget // self.byte_unit
        for _ in range(4):
            fewest = self._solve(self.flops_objective, units, None)
            if fewest is None:
                floor = self._fewest_bytes_saved()
                smallest = self.activation_bytes(floor)
                raise PartitionError(
                    f"rt.optimal: no partition saves at most {budget} activation bytes; the smallest feasible "
                    f"budget is {smallest} bytes. It pays for {self._floor_reason(floor)}. "
                    f"Pass memory_budget >= {smallest}")
            best = (self._solve(self.bytes_objective, units, fewest.flops_units) if fewest_bytes else None) or fewest
            saved = self._saved_set(best)
            spent = self.activation_bytes(saved_values(self.analysis, saved))
            if budget is None or spent <= budget:
                return split(self.analysis, saved)
            # floating point let a fraction of a byte through: tighten by the excess and solve again
            units -= max(1, -(-(spent - budget) // self.byte_unit))
        raise PartitionError(f"rt.optimal: the solver's answers keep exceeding {budget} bytes; "
                             "report this joint graph as a bug")

    def min_bytes(self) -> int:
        """The fewest activation bytes any partition saves (at whatever recomputation)."""
        return self.activation_bytes(self._fewest_bytes_saved())

    def _fewest_bytes_saved(self) -> tuple[Var, ...]:
        """The values a partition with the fewest activation bytes hands to the backward."""
        solution = self._solve(self.bytes_objective, None, None)
        return () if solution is None else saved_values(self.analysis, self._saved_set(solution))

    def _floor_reason(self, floor: Sequence[Var]) -> str:
        """What the smallest feasible budget (``floor``, the fewest-bytes saved values) pays for: values
        the backward reads that no partition recomputes (random draws) or that live only as copies
        (overwritten inputs)."""
        random = _random_dependent(self.analysis)
        charged = {self.analysis.primals[i] for i in self.charged}
        parts = []
        draws = [v for v in floor if random[v.id]]
        if draws:
            parts.append(f"random draws, or values computed from them, that the backward reads ({_values(draws)}; "
                         "a draw is saved, never recomputed)")
        copies = [v for v in floor if v in charged]
        if copies:
            parts.append(f"inputs the function overwrites in place ({_values(copies)}): the backward reads their "
                         "values from before the forward's update, so they are saved as copies")
        return " and for ".join(parts) or "values the backward reads that cannot be recomputed"

    def activation_bytes(self, saved: Sequence[Var]) -> int:
        """What the values a backward reads (``Partition.saved``, or ``saved_values``) cost here:
        the bytes of the computed ones, plus the overwritten inputs among them (with nothing
        overwritten, ``Partition.saved_activation_bytes``)."""
        a = self.analysis
        free = set(a.primals) - {a.primals[i] for i in self.charged}
        return sum(v.nbytes for v in saved if v not in free)

    def _saved_set(self, solution: _Solution) -> set[Var]:
        """The saved set a solution stands for: its saved values and the inputs that are free to save."""
        a = self.analysis
        free = [v for i, v in enumerate(a.primals) if i not in self.charged]
        return set(free) | {a.values[vid] for vid in solution.saved_ids}

    def _solve(self, objective: np.ndarray, budget_units: int | None, flops_cap: int | None) -> _Solution | None:
        """Minimise ``objective`` within the budget (and the FLOPs cap); None if infeasible."""
        if self.num_columns == 0:
            return _Solution((), 0)
        bounds = [budget_units, flops_cap]
        extra_rows = [self.bytes_objective, self.flops_objective]
        for d in self.cut_divisors:  # the budget row divided by ``d`` and rounded down
            bounds.append(None if budget_units is None else budget_units // d)
            extra_rows.append(np.floor(self.bytes_objective / d))
        if self._model is None:
            self._model = _Highs(self.rows, self.lower, self.integrality, extra_rows)
        x = self._model.minimise(objective, bounds)
        if x is None:
            return None
        saved = tuple(vid for vid, col in zip(self.savable, self.s_columns) if x[col] > 0.5)
        return _Solution(saved, int(round(float(self.flops_objective @ np.round(x)))))


def _random_dependent(a: JointAnalysis) -> list[bool]:
    """Per value id: whether the value is a random draw or computed from one."""
    out = [False] * len(a.values)
    for e, operands in zip(a.graph.eqns, a.operands):
        if eqn_is_random(e.primitive) or any(out[i] for i in operands):
            for v in e.outputs:
                out[v.id] = True
    return out


def _values(vs: Sequence[Var]) -> str:
    n = len(vs)
    return f"{n} value{'s' if n != 1 else ''}, {sum(v.nbytes for v in vs)} bytes"


def _rounding_divisors(weights: Sequence[int], share: float = 0.9) -> tuple[int, ...]:
    """The divisors ``d`` of the rounded budget rows ``sum(floor(w / d) * s) <= floor(budget / d)``.

    Each row is a Chvatal-Gomory cut: valid for binary ``s`` (``floor(w / d) <= w / d`` and the left
    side is an integer), and it cuts off fractional knapsack solutions the LP bound rests on under a
    tight budget. Two divisors, when more than one unit: the largest size that divides the sizes of at
    least ``share`` of the bytes (the row then loses almost nothing: on a stack of identical blocks,
    the one activation size), and the size holding the most bytes (where the LP's fractional value
    most likely is). On the 5,043-equation MLP joint they take the budget-0.2 solve from 2.6-4.0 s to
    0.13-0.18 s (five HiGHS seeds); on three other joints they are faster or within the seeds'
    spread (docs/partition.md, "Speed").
    """
    bytes_of_size = Counter(weights)
    for size in bytes_of_size:
        bytes_of_size[size] *= size
    total = sum(bytes_of_size.values())
    common = next((d for d in sorted(bytes_of_size, reverse=True)
                   if d > 0 and sum(b for w, b in bytes_of_size.items() if w % d == 0) >= share * total), 1)
    largest = max(bytes_of_size, key=lambda w: (bytes_of_size[w], w), default=1)
    return tuple(sorted({common, largest} - {0, 1}, reverse=True))


class _Highs:
    """One HiGHS model: ``rows x >= lower`` plus one ``<=`` row per extra coefficient vector, whose
    bounds each solve sets; variables in [0, 1], integral where ``integrality`` says so."""

    def __init__(self, rows: Any, lower: np.ndarray, integrality: np.ndarray, extra_rows: list[np.ndarray]) -> None:
        import highspy
        from scipy.sparse import csr_array, vstack

        matrix = vstack([rows] + [csr_array(r[None, :]) for r in extra_rows], format="csr")
        inf = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = matrix.shape[1], matrix.shape[0]
        lp.col_cost_ = np.zeros(lp.num_col_)
        lp.col_lower_, lp.col_upper_ = np.zeros(lp.num_col_), np.ones(lp.num_col_)
        lp.row_lower_ = np.concatenate([lower, np.full(len(extra_rows), -inf)])
        lp.row_upper_ = np.full(lp.num_row_, inf)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = matrix.indptr, matrix.indices, matrix.data
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in integrality]
        # the private constructor: the public highspy.Highs() prints a banner to stdout
        self.highs = highspy._core._Highs() if hasattr(highspy, "_core") else highspy.Highs()
        for option, value in _OPTIONS.items():
            self.highs.setOptionValue(option, value)
        self.highs.passModel(lp)
        self.num_columns = lp.num_col_
        self.first_extra_row = len(lower)
        #: nodes of the short first search of ``minimise``; None: one exact search
        self.scout_nodes: int | None = _SCOUT_NODES
        self.status = highspy.HighsModelStatus

    def minimise(self, objective: np.ndarray, bounds: list[int | None]) -> np.ndarray | None:
        """The optimal column values, or None when infeasible.

        Two searches (``_SCOUT``): a short one, branching on at most ``scout_nodes`` nodes with
        HiGHS's sub-MIP heuristics on, which ends most solves; then, if it stopped with a solution
        of objective ``U``, the exact search with its cutoff at ``U + 0.5`` (objectives are
        integral): the root's reduced-cost fixing then removes most columns at once, where a
        single search finds the same solution early but carries the whole program until one of
        its own restarts. The cutoff is sound because a solution of value ``U`` exists; below the
        optimum HiGHS reports its best solution above the cutoff as optimal, so a guessed cutoff is
        never used. The solver's state is cleared between the two, so the scout's solution does not
        become the exact search's MIP start (below).

        No MIP start is given: HiGHS can value a start in its presolved program below the true
        optimum and stop at it, calling it optimal (a pareto walk on a 9-variable program returned 64
        bytes where 40 did, at the same FLOPs; brute force caught it; docs/partition.md).
        """
        columns = np.arange(self.num_columns, dtype=np.int32)
        self.highs.changeColsCost(self.num_columns, columns, objective.astype(float))
        for i, bound in enumerate(bounds):
            upper = float("inf") if bound is None else bound + 0.5  # integral rows: half a unit is slack enough
            self.highs.changeRowBounds(self.first_extra_row + i, -float("inf"), upper)
        cutoff = float("inf")
        if self.scout_nodes is not None:
            status = self._run({**_SCOUT, "mip_max_nodes": self.scout_nodes})
            if status in (self.status.kOptimal, self.status.kInfeasible):
                return self._solution(status)
            if self.highs.getInfo().primal_solution_status == _FEASIBLE:
                cutoff = round(self.highs.getInfo().objective_function_value) + 0.5
            self.highs.clearSolver()  # else HiGHS hands the scout's solution to the next search as a MIP start
        status = self._run({"objective_bound": cutoff})
        if cutoff < float("inf") and not (status == self.status.kOptimal
                                          and self.highs.getInfo().objective_function_value < cutoff):
            raise PartitionError(f"rt.optimal: HiGHS found no solution under {cutoff} after finding one "
                                 "just under it; report this joint graph as a bug")
        return self._solution(status)

    def _run(self, options: dict[str, Any]) -> Any:
        """Run HiGHS with ``options`` over ``_OPTIONS``, then restore ``_OPTIONS``; its model status."""
        for option, value in options.items():
            self.highs.setOptionValue(option, value)
        try:
            self.highs.run()
        finally:
            for option in options:
                self.highs.setOptionValue(option, _OPTIONS.get(option, _DEFAULTS.get(option)))
        return self.highs.getModelStatus()

    def _solution(self, status: Any) -> np.ndarray | None:
        if status == self.status.kInfeasible:
            return None
        if status != self.status.kOptimal:
            reason = self.highs.modelStatusToString(status)
            raise PartitionError(f"rt.optimal: HiGHS stopped without an optimum ({reason}); "
                                 "report this joint graph as a bug")
        return np.asarray(self.highs.getSolution().col_value)


# Exact: no relative gap, and objectives are integral so a gap under one unit proves the optimum.
# In the exact search HiGHS's sub-MIP heuristics cost more than they save (the LP bound is tight;
# the scout's incumbent and reduced-cost fixing finish the job). Under tight budgets the time goes
# to strong branching among near-identical blocks; branching on pseudocosts at once halves it
# (benchmarks/partition_speed.py).
_OPTIONS: dict[str, Any] = {"output_flag": False, "mip_rel_gap": 0.0, "mip_abs_gap": 0.5,
                            "mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False,
                            "mip_heuristic_run_root_reduced_cost": False, "mip_pscost_minreliable": 0}
# The short first search of ``_Highs.minimise``: looking for good solutions pays there. Settled on
# the 5,022-equation GPT-block joint (budgets 0.3-0.85, three seeds; docs/partition.md, "Speed").
_SCOUT: dict[str, Any] = {"mip_heuristic_run_rins": True, "mip_heuristic_run_rens": True,
                          "mip_heuristic_effort": 0.3}
# HiGHS's own values of the options the two searches change that ``_OPTIONS`` leaves alone
_DEFAULTS: dict[str, Any] = {"objective_bound": float("inf"), "mip_max_nodes": 2**31 - 1,
                             "mip_heuristic_effort": 0.05}
_SCOUT_NODES = 200
_FEASIBLE = 2  # HiGHS's solution status "feasible"


def _stand_ins(a: JointAnalysis, computed: list[int], flops: dict[int, int],
               charged: frozenset[int]) -> dict[int, int | None]:
    """For each relevant value, the value that stands in for it in the program: itself; None when
    it is free to recompute (a primal input not ``charged``, or 0-FLOP data movement of free
    values); or, for 0-FLOP
    data movement of one other value ``u`` at least as large as ``u`` (reshape, broadcast,
    transpose...), ``u``'s stand-in: saving that is never worse (no more bytes, no FLOPs to rebuild)."""
    eqns = a.graph.eqns
    stand_in: dict[int, int | None] = {v.id: (v.id if i in charged else None) for i, v in enumerate(a.primals)}
    for vid in computed:  # definition order: operands first
        k = a.eqn_of[vid]
        stand_in[vid] = vid
        if flops.get(k) != 0 or len(eqns[k].outputs) != 1:
            continue
        sources = {stand_in[u] for u in a.operands[k]} - {None}
        if not sources:
            stand_in[vid] = None
        elif len(sources) == 1:
            (u,) = sources
            if a.values[u].nbytes <= a.values[vid].nbytes:
                stand_in[vid] = u
    return stand_in


def _sparse(rows: list[list[tuple[int, float]]], columns: int) -> Any:
    """Rows of (column, coefficient) pairs as a CSR matrix."""
    from scipy.sparse import csr_array
    data = [c for row in rows for _, c in row]
    cols = [j for row in rows for j, _ in row]
    indptr = np.cumsum([0] + [len(row) for row in rows])
    return csr_array((np.array(data, dtype=float), np.array(cols, dtype=np.int64), indptr),
                     shape=(len(rows), columns))
