"""Autocast: captured as the caller has it on, and kept out of the compiled graphs' runs.

Capture runs under the caller's autocast, so the graph holds autocast's casts as explicit
conversions (``addmm`` in bfloat16, ``layer_norm`` in float32 with float32 statistics). The state
is part of the guard (a graph captured without autocast computes in float32 throughout), and the
compiled forward and backward run with autocast off: torch would otherwise cast the graph's own
ops a second time (a backward kernel handed bfloat16 statistics refused them; a matmul a model
keeps in float32 under ``autocast(enabled=False)`` would run in bfloat16).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

_DEVICES = ("cpu", "cuda")


def autocast_state() -> Any:
    """What a compiled graph is guarded on: ``None`` with autocast off everywhere (the common case,
    one C call), else each device type's (enabled, dtype)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _DEVICES)


def autocast_off() -> Any:
    """A context with autocast off, for running a compiled graph; a no-op context when it is off already."""
    if not torch._C._is_any_autocast_enabled():
        return contextlib.nullcontext()
    return torch._C._DisableAutocast()
