"""What a module's forward writes into the module itself, seen while it is captured.

In eager, a forward may update the module besides computing outputs: a buffer in place
(``self.count.add_(1)``, which functionalization captures as an input mutation), a buffer by
reassignment (``self.count = self.count + 1``, an EMA ``self.avg = 0.9 * self.avg + ...``, a
cache rebuilt at a new length), or a plain attribute (old-style ``weight_norm`` and
``spectral_norm`` recompute ``self.weight`` in a forward pre-hook; ``self.attn = weights`` kept for
a later look). A capture runs the forward once on tracing tensors: whatever it stores would stay a
tracing tensor, and a compiled call would never store anything again. So, per kind:

- a buffer reassigned to a tensor of its shape and dtype is written into its input in place: the
  capture sees the buffer's update, as it sees ``add_``, and the compiled call writes it back;
- a buffer reassigned to another shape or dtype, or set where it was ``None``, and a tensor stored
  in a plain attribute, are *rebound*: the new value is an extra output, and the compiled module
  puts it in place after each call, as eager leaves it (a rebound buffer is a new buffer to the
  module's guard, which then captures again with it).

The module is left as it was before the capture.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from reftrace.errors import TracingError


class ForwardWrites:
    """A snapshot of a module's attributes and buffers taken before its forward is captured."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.before = [(prefix, m, dict(m.__dict__), dict(m._buffers)) for prefix, m in module.named_modules()]

    def settle(self, names: Sequence[str], inputs: Sequence[torch.Tensor], after: dict[str, Any],
               rebound: dict[str, torch.Tensor] | None) -> None:
        """After the forward ran with ``inputs`` as the state ``names`` (``after``: what ``functional_module``
        found in their places afterwards): write same-form reassignments into the inputs, collect the other
        buffer writes into ``rebound`` (a capture that cannot rebind passes ``None``: they raise), and refuse
        tensors stored in plain attributes. The module is left as it was before the forward."""
        for prefix, m, old_dict, old_buffers in self.before:
            for key, value in list(m.__dict__.items()):
                if isinstance(value, torch.Tensor) and old_dict.get(key) is not value:
                    _rebind(rebound, f"{prefix}.{key}" if prefix else key, value, "attribute")
                    _restore(m.__dict__, old_dict, key)
            for key, value in list(m._buffers.items()):
                if old_buffers.get(key, None) is None and value is not None:  # set where it was None (or new)
                    _rebind(rebound, f"{prefix}.{key}" if prefix else key, value, "buffer, was None")
                    _restore(m._buffers, old_buffers, key)
        for name, before in zip(names, inputs):
            value = after[name]
            if value is before:
                continue
            if isinstance(value, torch.Tensor) and value.shape == before.shape and value.dtype == before.dtype:
                before.copy_(value)  # an update of the buffer, captured as one
            else:
                _rebind(rebound, name, value, f"buffer, was {tuple(before.shape)} {before.dtype}")


def _restore(current: dict[str, Any], old: dict[str, Any], key: str) -> None:
    if key in old:
        current[key] = old[key]
    else:
        del current[key]


def _rebind(rebound: dict[str, torch.Tensor] | None, name: str, value: Any, what: str) -> None:
    if rebound is not None and isinstance(value, torch.Tensor):
        rebound[name] = value
        return
    got = f"a {tuple(value.shape)} {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
    raise TracingError(f"the forward sets {name!r} ({what}) to {got}; a captured graph cannot put a tensor in a "
                       "module: keep a buffer's shape and dtype (the update is then written back in place), or "
                       "compile the module with reftrace.compile.aot_module, which puts such values in place "
                       "after each call")


def rebind(module: torch.nn.Module, rebound: dict[str, torch.Tensor]) -> None:
    """Put each compiled call's new buffer and attribute values in place, as the forward did in eager."""
    for name, value in rebound.items():
        owner, _, key = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if key in target._buffers:
            target._buffers[key] = value
        else:
            target.__dict__[key] = value
