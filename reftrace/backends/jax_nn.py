"""JAX lowerings of the composites in ``reftrace.nn`` that ``jax.nn`` has as one function.

The others (the norms, every backward equation) run as their decompositions: a chain of
lax ops in one jitted computation, which XLA fuses as well as a hand-written twin. The CTC loss is
the exception the other way: its decomposition is unrolled over the frames, which XLA compiles in
time growing with their number, so its row runs the decomposition's one-frame step under ``lax.scan``,
and its backward row differentiates that with ``jax.vjp``.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from reftrace.backends.jax_graph import graph_function
from reftrace.backends.jax_rules import computed_in_float32, jax_rules
from reftrace.graph import Aval
from reftrace.nn import activations as A
from reftrace.nn.ctc import ctc_loss_backward_p, ctc_loss_p, ctc_stages

jax_rules[A.gelu_p] = computed_in_float32(lambda x, *, approximate: jax.nn.gelu(x, approximate=approximate == "tanh"))
jax_rules[A.silu_p] = computed_in_float32(jax.nn.silu)
jax_rules[A.softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.softmax(x, axis=axis))
jax_rules[A.log_softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.log_softmax(x, axis=axis))


def _ctc_loss(lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    def aval(x: Any) -> Aval:  # of a jax array or tracer
        return Aval(tuple(x.shape), np.dtype(x.dtype))
    prologue, step, epilogue = (graph_function(g) for g in ctc_stages(
        aval(lp), aval(targets), aval(il), blank=blank, zero_infinity=zero_infinity))
    gathered, frames, skip, used, alpha = prologue(lp, targets, il, tl)

    def frame(alpha: Any, inputs: tuple[Any, Any]) -> tuple[Any, None]:
        return step(alpha, *inputs, skip, used)[0], None
    alpha, _ = jax.lax.scan(frame, alpha, (gathered[1:], frames[1:]))
    return epilogue(alpha, lp, frames, tl)[0]


def _ctc_loss_backward(g: Any, lp: Any, targets: Any, il: Any, tl: Any, *, blank: int, zero_infinity: bool) -> Any:
    _, pullback = jax.vjp(lambda x: _ctc_loss(x, targets, il, tl, blank=blank, zero_infinity=zero_infinity), lp)
    return pullback(g)[0]


jax_rules[ctc_loss_p] = _ctc_loss
jax_rules[ctc_loss_backward_p] = _ctc_loss_backward
