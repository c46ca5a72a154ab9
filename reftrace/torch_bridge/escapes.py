"""Tensors that outlive their capture: stored by the function somewhere other than its outputs.

A capture runs the function once, on stand-in tensors (functional wrappers of fake tensors); the
compiled calls after it run no Python. A tensor the function keeps outside its return value (a
forward hook saving an activation in a dict, a list in a closure, a cache object passed in, an
``lru_cache``) would hold a stand-in from then on, where eager holds each call's value: the user
would read a placeholder (torch then fails with "Attempting to use FunctionalTensor on its own"),
or a later capture would read another capture's value. So the capture notes each tensor the function
makes (a weak reference, the user's line) and, once the capture is done and its own references are
gone, refuses any that is still alive, as JAX refuses a leaked tracer. The stand-ins of the inputs are
not watched: a module may keep its parameters' (``nn.LSTM``'s ``_flat_weights`` list), and it renews
them from its parameters at its next call.
"""
from __future__ import annotations

import gc
import weakref
from typing import Any

from reftrace.errors import TracingError


class EscapeWatch:
    """The stand-in tensors of one capture, each with where the user's code made it."""

    def __init__(self) -> None:
        self._made: list[tuple[weakref.ref, str | None]] = []

    def note(self, tensor: Any, location: str | None) -> None:
        self._made.append((weakref.ref(tensor), location))

    def check(self) -> None:
        """Raise if a noted tensor is still alive (after a garbage collection, where one is: a reference
        cycle that nothing outside holds is not an escape)."""
        if not any(ref() is not None for ref, _ in self._made):
            return
        gc.collect()
        alive = [where for ref, where in self._made if ref() is not None]
        self._made.clear()
        if alive:
            where = next((w for w in reversed(alive) if w), None)  # the last: others may be its autograd inputs
            made_at = f" (made at {where})" if where else ""
            raise TracingError(
                f"the function keeps a tensor it computes outside its return value{made_at}: a forward hook or "
                "the function stored it "
                "(in a dict, a list, an attribute, a cache object passed in). The compiled calls run no Python, "
                "so that place would hold a capture-time placeholder instead of each call's value: return the "
                "tensor as an output (a module's forward can return it beside its result), or keep the hook "
                "outside the compiled module")
