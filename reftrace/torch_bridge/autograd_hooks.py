"""Autograd hooks inside a captured function are refused, by name, where eager would run them.

A hook on a value the function computes (``h.register_hook(...)``, ``h.retain_grad()``) or a module's
backward hook runs inside torch autograd's backward of that value. reftrace derives the backward
with its own rules, so there is no such backward to run it in: ignoring the hook would change the
gradients (a hook that scales or clips them) or leave a ``.grad`` unset, without a word. Hooks on the
compiled function's inputs and on parameters, registered outside it, run as in eager: autograd
reaches them through the compiled backward's results. ``torch.compile(backend='reftrace')`` runs the
refused hooks too: Dynamo handles them before reftrace sees a graph.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

from reftrace.errors import TracingError
from reftrace.torch_bridge.user_frames import innermost_user_frame

_TENSOR_HOOKS = {
    torch.Tensor.register_hook: "registers a gradient hook on",
    torch.Tensor.register_post_accumulate_grad_hook: "registers a post-accumulate-grad hook on",
    torch.Tensor.retain_grad: "asks to retain the gradient of",
}

_WHAT_TO_DO = ("register the hook on the compiled function's inputs, outputs or parameters (outside it), "
               "or return the value and hook it there; or compile with torch.compile(backend='reftrace'), "
               "where Dynamo runs such hooks itself")


class _TensorHooksRefused(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        verb = _TENSOR_HOOKS.get(func)
        if verb is not None and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            raise TracingError(f"the function {verb} a tensor it computes (at {innermost_user_frame()}): reftrace "
                               "derives the backward with its own rules and cannot run autograd hooks inside "
                               f"it, so gradients would differ from eager; {_WHAT_TO_DO}")
        return func(*args, **(kwargs or {}))


def _refuse_module_backward_hooks(module: torch.nn.Module, _args: Any) -> None:
    if (module._backward_hooks or module._backward_pre_hooks or torch_module._global_backward_hooks
            or torch_module._global_backward_pre_hooks):
        raise TracingError(f"{type(module).__name__} has a backward hook (register_full_backward_hook, "
                           f"register_full_backward_pre_hook or register_backward_hook; called at "
                           f"{innermost_user_frame()}): reftrace derives the backward with its own rules and "
                           "cannot run it, so gradients would differ from eager; remove the hook from the "
                           "compiled module or hook the compiled module's output instead, or compile with "
                           "torch.compile(backend='reftrace'), where Dynamo runs such hooks itself")


@contextlib.contextmanager
def autograd_hooks_refused() -> Iterator[None]:
    """While a function is captured: tensor hooks and module backward hooks raise ``TracingError``."""
    handle = torch_module.register_module_forward_pre_hook(_refuse_module_backward_hooks)
    try:
        with _TensorHooksRefused():
            yield
    finally:
        handle.remove()
