"""One LSTM layer in one direction as a composite, so a recurrent network is a few equations, not
one cell per time step.

``lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=False)`` on a ``(T, B, I)`` sequence, ``(B, H)``
initial states and torch's weights (``(4H, I)``, ``(4H, H)``, ``(4H,)``; gates in torch's order: input,
forget, cell, output) returns the hidden states ``(T, B, H)`` and the last hidden and cell states.
``reverse`` runs the sequence backwards (the second direction of a bidirectional layer), its outputs
in the sequence's order. The decomposition is torch's native cell: the input projection of every
step at once, then per step ``gates = x_t W_ih^T + b_ih + h W_hh^T + b_hh``, ``c = f * c + i * g``,
``h = o * tanh(c)``; it is unrolled over the steps (``lstm_stages``), so the torch backend runs
oneDNN's fused layer (``aten.mkldnn_rnn_layer``, eager's float32 kernel) and its backward, and the
JAX backend the one-step graph under ``lax.scan``.
"""
from __future__ import annotations

import functools
from typing import Any

from reftrace import lax
from reftrace.composite import define_composite, traced_graph
from reftrace.errors import ShapeError
from reftrace.graph import Aval, Graph
from reftrace.nn._util import along
from reftrace.primitives import is_float
from reftrace.transforms.vjp import through_decomposition
from reftrace.transforms.vjp_rules import vjp_rules

_BY_ROW = (((1,), (1,)), ((), ()))  # (n, k) x (m, k) -> (n, m): x W^T


def _input_projection(x: Any, w_ih: Any, b_ih: Any) -> Any:
    """``x W_ih^T + b_ih`` for every step at once, ``(T, B, 4H)``."""
    steps, batch, features = x.shape
    rows = lax.dot_general(lax.reshape(x, (steps * batch, features)), w_ih, _BY_ROW)
    rows = lax.add(rows, along(b_ih, rows.shape, (1,)))
    return lax.reshape(rows, (steps, batch, w_ih.shape[0]))


def _cell(h: Any, c: Any, projected_t: Any, w_hh: Any, b_hh: Any) -> tuple[Any, Any]:
    """One step: the next hidden and cell states from this step's input projection ``(B, 4H)``."""
    batch, hidden = h.shape
    recurrent = lax.add(lax.dot_general(h, w_hh, _BY_ROW), along(b_hh, (batch, 4 * hidden), (1,)))
    gates = lax.add(projected_t, recurrent)
    i, f, g, o = (lax.slice(gates, (0, k * hidden), (batch, (k + 1) * hidden)) for k in range(4))
    c = lax.add(lax.mul(lax.logistic(f), c), lax.mul(lax.logistic(i), lax.tanh(g)))
    return lax.mul(lax.logistic(o), lax.tanh(c)), c


def _lstm_layer(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, *, reverse: bool
                ) -> tuple[Any, Any, Any]:
    projected = _input_projection(x, w_ih, b_ih)
    steps, batch, gates = projected.shape
    h, c = h0, c0
    outputs: list[Any] = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        projected_t = lax.reshape(lax.slice(projected, (t, 0, 0), (t + 1, batch, gates)), (batch, gates))
        h, c = _cell(h, c, projected_t, w_hh, b_hh)
        outputs[t] = lax.reshape(h, (1, *h.shape))
    ys = lax.concatenate(outputs, 0) if outputs else lax.full((0, *h0.shape), 0, x.dtype)
    return ys, h, c


def _lstm_layer_backward(g_ys: Any, g_h: Any, g_c: Any, *primals: Any, reverse: bool) -> tuple[Any, ...]:
    # the decomposition's gradient; the cotangents stand for the outputs too, whose avals they have
    cts = (g_ys, g_h, g_c)
    return through_decomposition(lstm_layer_p, cts, primals, cts, reverse=reverse)


def _lstm_layer_avals(x: Aval, h0: Aval, c0: Aval, w_ih: Aval, w_hh: Aval, b_ih: Aval, b_hh: Aval, *,
                      reverse: bool) -> tuple[Aval, Aval, Aval]:
    """The outputs' avals without tracing the decomposition (unrolled over the steps)."""
    ok = x.ndim == 3 and h0.ndim == 2 and all(is_float(a.dtype) and a.dtype == x.dtype
                                               for a in (h0, c0, w_ih, w_hh, b_ih, b_hh))
    if ok:
        steps, batch, features = x.shape
        hidden = h0.shape[1]
        ok = (h0.shape == c0.shape == (batch, hidden) and w_ih.shape == (4 * hidden, features)
              and w_hh.shape == (4 * hidden, hidden) and b_ih.shape == b_hh.shape == (4 * hidden,))
    if not ok:
        raise ShapeError(f"lstm_layer: expects a floating (T, B, I) sequence, (B, H) states and torch's LSTM weights "
                         f"(4H, I), (4H, H), (4H,), (4H,), all of one dtype, got {x.str_short()}, "
                         f"{h0.str_short()}, {c0.str_short()}, {w_ih.str_short()}, {w_hh.str_short()}, "
                         f"{b_ih.str_short()}, {b_hh.str_short()}")
    return Aval((steps, batch, hidden), x.dtype), h0, c0


def _lstm_layer_backward_avals(g_ys: Aval, g_h: Aval, g_c: Aval, *primals: Aval, reverse: bool) -> tuple[Aval, ...]:
    if (g_ys, g_h, g_c) != _lstm_layer_avals(*primals, reverse=reverse):
        raise ShapeError(f"lstm_layer_backward: the cotangents {g_ys.str_short()}, {g_h.str_short()}, "
                         f"{g_c.str_short()} must have the outputs' avals")
    return tuple(primals)


lstm_layer_p = define_composite("lstm_layer", _lstm_layer, multiple_results=True, compute_intensive=True,
                                shape_rule=_lstm_layer_avals)
lstm_layer_backward_p = define_composite("lstm_layer_backward", _lstm_layer_backward, multiple_results=True,
                                         compute_intensive=True, shape_rule=_lstm_layer_backward_avals)


def _lstm_layer_vjp(cts, primals, outs, *, reverse):
    given = [ct if ct is not None else lax.zeros(o.aval) for ct, o in zip(cts, outs)]
    return tuple(lax.bind(lstm_layer_backward_p, *given, *primals, reverse=reverse))


vjp_rules[lstm_layer_p] = _lstm_layer_vjp


@functools.lru_cache(maxsize=64)
def lstm_stages(x: Aval, h0: Aval, w_ih: Aval, w_hh: Aval) -> tuple[Graph, Graph]:
    """The layer's two stages as graphs: the input projection ``(x, w_ih, b_ih) -> projected`` and one
    step ``(h, c, projected_t, w_hh, b_hh) -> (h, c)``; the decomposition is the projection, then the
    step for each time step in order (or in reverse)."""
    bias = Aval((w_ih.shape[0],), x.dtype)
    projection = traced_graph(_input_projection, (x, w_ih, bias))
    step = traced_graph(_cell, (h0, h0, Aval((x.shape[1], w_ih.shape[0]), x.dtype), w_hh, bias))
    return projection, step


def lstm_layer(x: Any, h0: Any, c0: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, reverse: bool = False
               ) -> tuple[Any, Any, Any]:
    """(hidden states ``(T, B, H)``, last hidden state, last cell state) of one LSTM layer; see the
    module docstring."""
    return tuple(lax.bind(lstm_layer_p, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=bool(reverse)))


