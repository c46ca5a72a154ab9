"""The CTC loss as a composite, with torch's values and torch's gradient.

``ctc_loss(log_probs, targets, input_lengths, target_lengths)`` on ``(T, N, C)`` log-probabilities,
``(N, S)`` padded integer targets and ``(N,)`` integer lengths returns each sequence's loss, ``(N,)``
(the reduction is the caller's). The decomposition is torch's CPU recursion over the frames, unrolled:
per state ``log(exp(a1 - m) + exp(a2 - m) + exp(a3 - m)) + m + log_prob`` with ``m`` the largest (0 if
all are ``-inf``), the loss ``-logaddexp`` of the last two states at each sequence's last frame. Padded
positions (frames past ``input_lengths``, states past ``2 * target_lengths``) are masked, never read as
values, so the recursion runs on the full padded shape. A length past the shape (torch raises) is not
checked: lengths are data.

The gradient is torch's. ``ctc_loss_backward`` returns ``exp(log_probs) - (the true slope)`` (its
alpha-beta formula assumes the inputs come out of ``log_softmax``, through whose backward the extra
``exp(log_probs)`` cancels), so the decomposition's loss carries ``exp(lp) - stop_gradient(exp(lp))``
over each sequence's frames: 0 in value, that ``exp(log_probs)`` in slope. With ``zero_infinity`` an
impossible alignment (an infinite loss) gets a loss of 0 and no gradient; the log-sum-exps see a finite
stand-in where all their terms are ``-inf``, so no ``0 * inf`` reaches the gradient. Without it, its
loss is inf and its slope NaN (torch's kernel makes every class NaN on its frames, the decomposition
the classes of its targets and blank: the same after ``log_softmax``'s backward).

The recursion is three stages (``ctc_stages``): a prologue (the extended label sequence and its
log-probabilities per frame), one frame's step, an epilogue (the loss). The decomposition runs the step
once per frame; the JAX row runs the same step graph under ``lax.scan``, so XLA compiles one frame, not
``T`` of them.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from reftrace import lax
from reftrace.composite import define_composite, traced_graph
from reftrace.errors import ShapeError
from reftrace.graph import Aval, Graph
from reftrace.nn._util import along, cast
from reftrace.primitives import is_float, is_int
from reftrace.transforms.vjp import through_decomposition
from reftrace.transforms.vjp_rules import vjp_rules


def _shifted(alpha: Any, k: int) -> Any:
    """``alpha`` moved ``k`` states to the right along its last axis, ``-inf`` coming in."""
    n, states = alpha.shape
    if k >= states:
        return lax.full(alpha.shape, -np.inf, alpha.dtype)
    return lax.pad(lax.slice(alpha, (0, 0), (n, states - k)), -np.inf, ((0, 0, 0), (k, 0, 0)))


def _log_add(terms: Sequence[Any]) -> Any:
    """``log(sum exp(t - m)) + m`` in torch's kernel's order, ``m`` the largest term (0 if all are
    ``-inf``); where every term is ``-inf`` the log sees 1 and the result is ``-inf``, so the gradient
    there is 0 rather than ``inf * 0``."""
    d = terms[0].dtype
    m = terms[0]
    for t in terms[1:]:
        m = lax.max(m, t)
    dead = lax.eq(m, lax.full(m.shape, -np.inf, d))
    m = lax.select(dead, lax.full(m.shape, 0, d), m)
    total = lax.exp(lax.sub(terms[0], m))
    for t in terms[1:]:
        total = lax.add(total, lax.exp(lax.sub(t, m)))
    safe = lax.select(dead, lax.full(m.shape, 1, d), total)
    return lax.select(dead, lax.full(m.shape, -np.inf, d), lax.add(lax.log(safe), m))


def _prologue(lp: Any, targets: Any, il: Any, tl: Any, *, blank: int) -> tuple[Any, Any, Any, Any, Any]:
    """(the log-probabilities of the extended labels per frame ``(T, N, L)``, which frames each sequence
    has ``(T, N)``, which states may skip the blank before them ``(N, L)``, which states a sequence has
    ``(N, L)``, alpha at the first frame ``(N, L)``), ``L = 2 S + 1``."""
    steps, n, _ = lp.shape
    width = targets.shape[1]
    states = 2 * width + 1
    d = lp.dtype
    s = lax.iota(np.int64, (n, states), 1)
    used = lax.lt(s, along(lax.add(lax.mul(tl, lax.full(tl.shape, 2, np.int64)), lax.full(tl.shape, 1, np.int64)),
                           (n, states), (0,)))
    if width:
        position = np.clip((np.arange(states) - 1) // 2, 0, width - 1)
        label = lax.gather(targets, along(lax.constant(position, np.int64), (n, states), (1,)), 1)
    else:
        label = lax.full((n, states), 0, np.int64)
    odd = along(lax.constant(np.arange(states) % 2 == 1), (n, states), (1,))
    extended = lax.select(lax.logical_and(odd, used), label, lax.full((n, states), blank, np.int64))
    before = lax.pad(lax.slice(extended, (0, 0), (n, max(states - 2, 0))), -1, ((0, 0, 0), (min(2, states), 0, 0)))
    skip = lax.logical_and(lax.logical_and(lax.ge(s, lax.full(s.shape, 2, np.int64)), lax.ne(extended, before)), used)
    gathered = lax.gather(lp, along(extended, (steps, n, states), (1, 2)), 2)
    frames = lax.lt(lax.iota(np.int64, (steps, n), 0), along(il, (steps, n), (1,)))
    first = lax.reshape(lax.slice(gathered, (0, 0, 0), (1, n, states)), (n, states))
    start = lax.logical_and(lax.lt(s, lax.full(s.shape, 2, np.int64)), used)
    alpha = lax.select(start, first, lax.full((n, states), -np.inf, d))
    return gathered, frames, skip, used, alpha


def _step(alpha: Any, gathered_t: Any, frames_t: Any, skip: Any, used: Any) -> Any:
    """alpha at the next frame, from alpha at this one: each state from itself, the state before it and
    (where it may skip a blank) the one before that; frozen past a sequence's last frame."""
    two = lax.select(skip, _shifted(alpha, 2), lax.full(alpha.shape, -np.inf, alpha.dtype))
    step = lax.add(_log_add([alpha, _shifted(alpha, 1), two]), gathered_t)
    active = lax.logical_and(along(frames_t, alpha.shape, (0,)), used)
    return lax.select(active, step, alpha)


def _pick(alpha: Any, index: Any) -> Any:
    n, states = alpha.shape
    index = lax.min(index, lax.full(index.shape, states - 1, np.int64))  # a target length past S: not checked
    return lax.reshape(lax.gather(alpha, lax.reshape(index, (n, 1)), 1), (n,))


def _epilogue(alpha: Any, lp: Any, frames: Any, tl: Any, *, zero_infinity: bool) -> Any:
    """Each sequence's loss from alpha at the last frame, plus torch's slope term (see the module
    docstring), which is 0 in value."""
    d = alpha.dtype
    two = lax.full(tl.shape, 2, np.int64)
    last_blank = _pick(alpha, lax.mul(tl, two))
    last_label = lax.select(lax.gt(tl, lax.full(tl.shape, 0, np.int64)),
                            _pick(alpha, lax.max(lax.sub(lax.mul(tl, two), lax.full(tl.shape, 1, np.int64)),
                                                 lax.full(tl.shape, 0, np.int64))),
                            lax.full(tl.shape, -np.inf, d))
    if zero_infinity:
        nll = lax.neg(_log_add([last_blank, last_label]))
    else:  # torch's kernel: an impossible alignment's loss is inf and its slope NaN (log of 0 at the end)
        m = lax.max(last_blank, last_label)
        m = lax.select(lax.eq(m, lax.full(m.shape, -np.inf, d)), lax.full(m.shape, 0, d), m)
        total = lax.add(lax.exp(lax.sub(last_blank, m)), lax.exp(lax.sub(last_label, m)))
        nll = lax.neg(lax.add(lax.log(total), m))
    probs = lax.exp(lp)
    inside = along(frames, lp.shape, (0, 1))
    slope = lax.select(inside, lax.sub(probs, lax.stop_gradient(probs)), lax.full(lp.shape, 0, d))
    loss = lax.add(nll, lax.reduce_sum(slope, (0, 2)))
    if zero_infinity:  # no gradient for an impossible alignment, and a loss of 0
        loss = lax.select(lax.eq(nll, lax.full(nll.shape, np.inf, d)), lax.full(nll.shape, 0, d), loss)
    return loss


def _ctc_loss(lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    gathered, frames, skip, used, alpha = _prologue(lp, targets, il, tl, blank=blank)
    steps, n, states = gathered.shape
    for t in range(1, steps):
        gathered_t = lax.reshape(lax.slice(gathered, (t, 0, 0), (t + 1, n, states)), (n, states))
        frames_t = lax.reshape(lax.slice(frames, (t, 0), (t + 1, n)), (n,))
        alpha = _step(alpha, gathered_t, frames_t, skip, used)
    return _epilogue(alpha, lp, frames, tl, zero_infinity=zero_infinity)


def _ctc_loss_backward(g: Any, lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    # the decomposition's own gradient (torch's, by its slope term); ``g`` stands for the forward's output
    # too, whose aval it has: only the aval is read
    return through_decomposition(ctc_loss_p, (g,), (lp, targets, il, tl), (g,), blank=blank,
                                 zero_infinity=zero_infinity)[0]


def _ctc_loss_aval(lp: Aval, targets: Aval, il: Aval, tl: Aval, *, blank: int, zero_infinity: bool) -> Aval:
    """Each sequence's loss, ``(N,)``: the decomposition's aval without tracing it, which takes time
    growing with ``T`` (and the backward's would trace its gradient too)."""
    n = lp.shape[1] if lp.ndim == 3 else None
    if (n is None or not is_float(lp.dtype) or targets.ndim != 2 or targets.shape[0] != n
            or any(x.shape != (n,) or not is_int(x.dtype) for x in (targets, il, tl)[1:])
            or not is_int(targets.dtype) or not 0 <= blank < lp.shape[2]):
        raise ShapeError(f"ctc_loss: expects (T, N, C) floating log-probabilities, (N, S) integer targets, (N,) "
                         f"integer lengths and a blank class in [0, C), got {lp.str_short()}, {targets.str_short()}, "
                         f"{il.str_short()}, {tl.str_short()}, blank={blank}")
    return Aval((n,), lp.dtype)


def _ctc_loss_backward_aval(g: Aval, lp: Aval, *rest: Aval, **params: Any) -> Aval:
    if g != _ctc_loss_aval(lp, *rest, **params):
        raise ShapeError(f"ctc_loss_backward: the cotangent {g.str_short()} must be the loss's aval")
    return lp


ctc_loss_p = define_composite("ctc_loss", _ctc_loss, compute_intensive=True, shape_rule=_ctc_loss_aval)
ctc_loss_backward_p = define_composite("ctc_loss_backward", _ctc_loss_backward, compute_intensive=True,
                                       shape_rule=_ctc_loss_backward_aval)


def _ctc_loss_vjp(cts, primals, outs, *, blank, zero_infinity):
    grad = lax.bind(ctc_loss_backward_p, cts[0], *primals, blank=blank, zero_infinity=zero_infinity)
    return (grad, None, None, None)


vjp_rules[ctc_loss_p] = _ctc_loss_vjp


@functools.lru_cache(maxsize=64)
def ctc_stages(lp: Aval, targets: Aval, lengths: Aval, *, blank: int, zero_infinity: bool
               ) -> tuple[Graph, Graph, Graph]:
    """The recursion's three stages as graphs at these avals (the lengths' avals are the same): the
    prologue ``(lp, targets, il, tl) -> (gathered, frames, skip, used, alpha)``, one frame's step
    ``(alpha, gathered_t, frames_t, skip, used) -> alpha`` and the epilogue ``(alpha, lp, frames, tl) ->
    loss``; the decomposition is the prologue, the step for frames 1 to T - 1, the epilogue."""
    prologue = traced_graph(functools.partial(_prologue, blank=blank), (lp, targets, lengths, lengths))
    steps, n, _ = lp.shape
    states = 2 * targets.shape[1] + 1
    pair, row = Aval((n, states), lp.dtype), Aval((n, states), np.dtype(bool))
    step = traced_graph(_step, (pair, pair, Aval((n,), np.dtype(bool)), row, row))
    epilogue = traced_graph(functools.partial(_epilogue, zero_infinity=zero_infinity),
                            (pair, lp, Aval((steps, n), np.dtype(bool)), lengths))
    return prologue, step, epilogue


def ctc_loss(log_probs: Any, targets: Any, input_lengths: Any, target_lengths: Any, blank: int = 0,
             zero_infinity: bool = False) -> Any:
    """Each sequence's CTC loss, ``(N,)``, with torch's gradient; see the module docstring."""
    return lax.bind(ctc_loss_p, log_probs, cast(targets, np.int64), cast(input_lengths, np.int64),
                    cast(target_lengths, np.int64), blank=int(blank), zero_infinity=bool(zero_infinity))
