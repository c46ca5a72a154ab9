"""``nn.LSTM`` as one op per layer and direction, ``reftrace::lstm_layer``: the ``lstm_layer`` composite.

ATen's ``lstm`` decomposes, under capture, into one cell per time step (a 200-step sequence was 8 s to
compile and 12x eager's step time). Capture runs ``lstm`` here instead (``static_rewrites``, above
autograd like the user's own code): each layer and direction is one ``lstm_layer_op``, the directions
concatenated, torch's dropout between layers in training, the last states stacked as ``h_n``, ``c_n``.
Projections (``proj_size``), mixed dtypes and autocast keep ATen's decomposition (packed sequences
are refused there: their batch sizes are data).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.library.custom_op("reftrace::lstm_layer", mutates_args=())
def lstm_layer_op(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor, b_hh: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """(hidden states ``(T, B, H)``, last hidden state, last cell state) of one LSTM layer in one direction
    on a ``(T, B, I)`` sequence: what capture records for ``nn.LSTM`` (the ``lstm_layer`` composite). Run
    eagerly, it is ATen's ``lstm``, with no gradient: reftrace differentiates the composite."""
    seq = x.flip(0) if reverse else x
    ys, h, c = torch.lstm(seq, (h0[None], c0[None]), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, False)
    return (ys.flip(0) if reverse else ys), h[0], c[0]


@lstm_layer_op.register_fake
def _lstm_layer_shapes(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                       b_ih: torch.Tensor, b_hh: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         torch.Tensor]:
    return x.new_empty((x.shape[0], x.shape[1], h0.shape[1])), torch.empty_like(h0), torch.empty_like(c0)


def lstm_arguments(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``torch.lstm``'s arguments for a padded (not packed) sequence without projections, in one dtype,
    outside autocast; else None (ATen's own path)."""
    names = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    if len(bound) != len(names) or len(args) + len(kwargs) != len(names):
        return None
    x, hx, params = bound["input"], bound["hx"], bound["params"]
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and isinstance(hx, (tuple, list)) and len(hx) == 2):
        return None
    directions = 2 if bound["bidirectional"] else 1
    per_layer = 4 if bound["has_biases"] else 2
    tensors = [x, *hx, *params]
    if (len(params) != bound["num_layers"] * directions * per_layer or hx[0].shape != hx[1].shape
            or not x.is_floating_point() or any(t.dtype != x.dtype for t in tensors)
            or torch.is_autocast_enabled(x.device.type)):
        return None
    return bound


def lstm(input: torch.Tensor, hx: Sequence[torch.Tensor], params: Sequence[torch.Tensor], has_biases: bool,
         num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.lstm`` (what ``nn.LSTM`` calls) as ``lstm_layer_op`` per layer and direction."""
    directions = 2 if bidirectional else 1
    per_layer = 4 if has_biases else 2
    x = input.transpose(0, 1) if batch_first else input
    h0, c0 = hx
    last_h, last_c = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            weights = list(params[k * per_layer:(k + 1) * per_layer])
            if not has_biases:
                weights += [weights[0].new_zeros(weights[0].shape[0])] * 2
            ys, h, c = lstm_layer_op(x, h0[k], c0[k], *weights, direction == 1)
            outputs.append(ys)
            last_h.append(h)
            last_c.append(c)
        x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        if dropout and train and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, True)
    return (x.transpose(0, 1) if batch_first else x), torch.stack(last_h), torch.stack(last_c)
