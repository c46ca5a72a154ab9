"""Partition policies: plain values that decide what the forward saves for the backward.

A policy is one of

- a **callable** ``policy(eqn) -> bool``, like JAX's remat policies: for a forward
  equation (one that does not depend on cotangents) whose value the backward needs,
  ``True`` means "its outputs may be saved", ``False`` means "recompute it in the
  backward from its inputs" (which are then needed in turn, recursively). Primal
  inputs have no equation and are always saved when needed; ``random`` equations
  are always computed in the forward and saved, whatever the policy says, so a
  random draw is never recomputed;
- a **MinCut** value: choose the saved set by a minimum cut over byte sizes, with
  ``banned(eqn)`` naming the equations that must not be recomputed;
- a **solver** value such as ``rt.optimal(memory_budget)`` (``reftrace.transforms.optimal``):
  the saved set that recomputes the fewest FLOPs within a budget on activation bytes, solved
  exactly as a mixed-integer program; a solver builds the partition itself (``split_joint``);
- one of the names in ``POLICIES`` (``"default"`` = ``save_all_but_copies``, ``"mincut"`` =
  ``MinCut()``).

Writing a policy is writing a function of an ``Eqn``: look at ``eqn.primitive``,
``eqn.params`` and the avals of ``eqn.inputs`` / ``eqn.outputs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from reftrace import primitives as P
from reftrace.composite import is_composite, is_compute_intensive
from reftrace.errors import PartitionError
from reftrace.graph import Eqn
from reftrace.primitives import Primitive
from reftrace.transforms.cost import is_free_to_redo

Policy = Callable[[Eqn], bool]


def save_all(eqn: Eqn) -> bool:
    """Save every forward value the backward uses (the ``"default"`` policy)."""
    return True


def save_all_but_copies(eqn: Eqn) -> bool:
    """The ``"default"`` policy: save every forward value the backward uses, except copies (data
    movement that does not shrink its operands: a transpose, reshape or broadcast), which the
    backward redoes for free from their operands. A parameter's transpose is then not saved as a
    second copy of the parameter (functorch's default saves it as a view, which costs nothing)."""
    return not is_free_to_redo(eqn)


def save_nothing(eqn: Eqn) -> bool:
    """Recompute everything in the backward; only primal inputs (and random draws) are saved."""
    return False


def _primitive_set(primitives: Iterable[Primitive | str]) -> frozenset[Primitive]:
    out = set()
    for p in primitives:
        if isinstance(p, str):
            p = P.primitive(p)
        if not isinstance(p, Primitive):
            raise PartitionError(f"expected a Primitive or a primitive name, got {p!r}")
        out.add(p)
    return frozenset(out)


def _flatten(primitives: tuple) -> list:
    if len(primitives) == 1 and not isinstance(primitives[0], (str, Primitive)) \
            and hasattr(primitives[0], "__iter__"):
        return list(primitives[0])
    return list(primitives)


def save_only_these(*primitives: Primitive | str | Iterable[Primitive | str]) -> Policy:
    """A policy saving only outputs of the given primitives (objects or names); the rest is
    recomputed. ``save_only_these("dot_general")`` is JAX's ``dots_saveable``."""
    chosen = _primitive_set(_flatten(primitives))

    def policy(eqn: Eqn) -> bool:
        return eqn.primitive in chosen
    policy.__name__ = policy.__qualname__ = f"save_only_these({', '.join(sorted(p.name for p in chosen))})"
    return policy


def save_anything_except_these(*primitives: Primitive | str | Iterable[Primitive | str]) -> Policy:
    """A policy recomputing outputs of the given primitives and saving everything else."""
    chosen = _primitive_set(_flatten(primitives))

    def policy(eqn: Eqn) -> bool:
        return eqn.primitive not in chosen
    policy.__name__ = policy.__qualname__ = (
        f"save_anything_except_these({', '.join(sorted(p.name for p in chosen))})")
    return policy


_NOT_RECOMPUTED = frozenset(P.COMPUTE_INTENSIVE)


def dots_saveable(eqn: Eqn) -> bool:
    """Save matmuls and convolutions (also as composites: ``linear``, ``convolution``, attention),
    recompute the (cheap, elementwise) rest."""
    return eqn.primitive in _NOT_RECOMPUTED or is_compute_intensive(eqn.primitive)

_SHRINKING = frozenset(P.REDUCTIONS + P.INDEX_REDUCTIONS)


def default_ban(eqn: Eqn) -> bool:
    """Equations ``MinCut`` never recomputes, as PyTorch's min-cut partitioner: matmuls,
    convolutions and compute-intensive composites such as attention (too expensive to run twice), reductions whose output is more than 4x smaller
    than their input (recomputing would need the big input in the backward, defeating the
    point of saving the small result), and random draws."""
    if eqn.primitive in _NOT_RECOMPUTED or P.eqn_is_random(eqn.primitive) or is_compute_intensive(eqn.primitive):
        return True
    if eqn.primitive in _SHRINKING:
        in_bytes = eqn.inputs[0].nbytes
        out_bytes = sum(v.nbytes for v in eqn.outputs)
        return in_bytes > 4 * out_bytes
    return False


@dataclass(frozen=True)
class MinCut:
    """Min-cut rematerialization: save the set of values with the fewest bytes from which the
    backward can recompute everything else it needs.

    ``banned(eqn)`` says which forward equations must not be recomputed; their values are
    saved if the backward needs them (an equation the forward outputs do not need may still be
    computed once, in the backward only). ``random`` is always banned.
    """

    banned: Callable[[Eqn], bool] = default_ban

    def __repr__(self) -> str:
        name = getattr(self.banned, "__name__", repr(self.banned))
        return f"MinCut(banned={name})"


def fusion_ban(eqn: Eqn) -> bool:
    """``default_ban``, and every composite (``layer_norm``, ``softmax``, ``gelu``, ...): the bans of the
    ``"fusion"`` min cut. A compiler that fuses elementwise code (XLA) runs a recomputed chain of core
    primitives inside the backward's own loops, where it costs less than writing the chain's values
    out in the forward and reading them back; a composite is a whole kernel of its own to run again."""
    return default_ban(eqn) or is_composite(eqn.primitive)


POLICIES: dict[str, Policy | MinCut] = {"default": save_all_but_copies, "mincut": MinCut(),
                                        "fusion": MinCut(banned=fusion_ban)}

PolicyValue = Any
"""A policy name's value, a ``MinCut``, a callable ``policy(eqn)``, or a *solver* value: one with a
``split_joint(analysis) -> Partition`` method (``rt.optimal(...)``, ``reftrace.transforms.optimal``),
which chooses the whole partition itself."""


def is_solver(policy: Any) -> bool:
    return callable(getattr(policy, "split_joint", None))


def resolve_policy(policy: str | PolicyValue) -> PolicyValue:
    """The policy value for a name, or the value itself; a PartitionError for anything else."""
    if isinstance(policy, str):
        try:
            return POLICIES[policy]
        except KeyError:
            raise PartitionError(f"unknown partition policy {policy!r}; use one of {sorted(POLICIES)}, "
                                 "a MinCut(...) value, or a callable policy(eqn) -> bool") from None
    if isinstance(policy, MinCut) or is_solver(policy) or callable(policy):
        return policy
    raise PartitionError(f"a partition policy must be a name {sorted(POLICIES)}, a MinCut(...) or "
                         f"rt.optimal(...) value, or a callable policy(eqn) -> bool; got {type(policy).__name__}")
