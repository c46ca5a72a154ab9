"""JAX lowerings of the composites in ``reftrace.nn`` that ``jax.nn`` has as one function.

The others (the norms, every backward equation) run as their decompositions: a chain of
lax ops in one jitted computation, which XLA fuses as well as a hand-written twin. The CTC loss and
the LSTM layer are the exception the other way: their decompositions are unrolled over the time steps,
which XLA compiles in time growing with their number, so their rows run the decomposition's one-step
graph under ``lax.scan``, and their backward rows differentiate that with ``jax.vjp``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from reftrace.backends.jax_graph import graph_function
from reftrace.backends.jax_rules import computed_in_float32, jax_rules
from reftrace.graph import Aval
from reftrace.nn import activations as A
from reftrace.nn.ctc import ctc_loss_backward_p, ctc_loss_p, ctc_stages
from reftrace.nn.rnn import lstm_layer_backward_p, lstm_layer_p, lstm_stages

jax_rules[A.gelu_p] = computed_in_float32(lambda x, *, approximate: jax.nn.gelu(x, approximate=approximate == "tanh"))
jax_rules[A.silu_p] = computed_in_float32(jax.nn.silu)
jax_rules[A.softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.softmax(x, axis=axis))
jax_rules[A.log_softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.log_softmax(x, axis=axis))


def _aval(x: Any) -> Aval:
    """The aval of a jax array or tracer."""
    return Aval(tuple(x.shape), np.dtype(x.dtype))


def _pullback(forward: Any, primals: tuple[Any, ...], wrt: int, cotangents: Any) -> tuple[Any, ...]:
    """The backward row of a scanned composite: ``jax.vjp`` of its forward row, with respect to the first
    ``wrt`` operands (the others, integers, are held)."""
    held = primals[wrt:]
    _, pullback = jax.vjp(lambda *xs: forward(*xs, *held), *primals[:wrt])
    return pullback(cotangents)


def _ctc_loss(lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    prologue, step, epilogue = (graph_function(g) for g in ctc_stages(
        _aval(lp), _aval(targets), _aval(il), blank=blank, zero_infinity=zero_infinity))
    gathered, frames, skip, used, alpha = prologue(lp, targets, il, tl)

    def frame(alpha: Any, inputs: tuple[Any, Any]) -> tuple[Any, None]:
        return step(alpha, *inputs, skip, used)[0], None
    alpha, _ = jax.lax.scan(frame, alpha, (gathered[1:], frames[1:]))
    return epilogue(alpha, lp, frames, tl)[0]


def _ctc_loss_backward(g: Any, lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    forward = functools.partial(_ctc_loss, blank=blank, zero_infinity=zero_infinity)
    return _pullback(forward, (lp, targets, il, tl), 1, g)[0]


jax_rules[ctc_loss_p] = _ctc_loss
jax_rules[ctc_loss_backward_p] = _ctc_loss_backward


def _lstm_layer(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, *, reverse: bool
                ) -> tuple[Any, Any, Any]:
    projection, step = (graph_function(g) for g in lstm_stages(_aval(x), _aval(h0), _aval(w_ih), _aval(w_hh)))
    projected = projection(x, w_ih, b_ih)[0]

    def cell(carry: tuple[Any, Any], projected_t: Any) -> tuple[tuple[Any, Any], Any]:
        h, c = step(*carry, projected_t, w_hh, b_hh)
        return (h, c), h
    (h, c), ys = jax.lax.scan(cell, (h0, c0), projected, reverse=reverse)
    return ys, h, c


def _lstm_layer_backward(g_ys: Any, g_h: Any, g_c: Any, *primals: Any, reverse: bool) -> tuple[Any, ...]:
    return _pullback(functools.partial(_lstm_layer, reverse=reverse), primals, len(primals), (g_ys, g_h, g_c))


jax_rules[lstm_layer_p] = _lstm_layer
jax_rules[lstm_layer_backward_p] = _lstm_layer_backward
