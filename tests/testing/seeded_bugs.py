"""Targets with one realistic compiler bug each, for testing the oracle (``fn -> fn`` like torch.compile)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

Fn = Callable[..., Any]


class _Replace(TorchFunctionMode):
    """Run ``fn`` with some torch functions replaced: a compiler that lowers one op wrongly."""

    def __init__(self, table: dict[Any, Fn]) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = self.table.get(func) or self.table.get(getattr(func, "__name__", None))
        if replacement is not None:
            return replacement(*args, **kwargs)
        return func(*args, **kwargs)


def _with(table: dict[Any, Fn]) -> Callable[[Fn], Fn]:
    def compile_(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            with _Replace(table):
                return fn(*args)
        return run
    return compile_


def _sigmoid_off(x, *a, **k):   # a kernel with a wrong constant
    return 1.0 / (1.0 + torch.exp(-x * 1.001))


class _TanhWrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)           # should be 1 - y * y


class _AddBroadcastGrad(torch.autograd.Function):
    """x + y whose backward reduces a broadcast operand with mean instead of sum."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.shapes = (x.shape, y.shape)
        return x + y

    @staticmethod
    def backward(ctx, g):
        def reduce(shape):
            r = g
            while r.dim() > len(shape):
                r = r.mean(0)
            for d, s in enumerate(shape):
                if s == 1 and r.shape[d] != 1:
                    r = r.mean(d, keepdim=True)
            return r
        return reduce(ctx.shapes[0]), reduce(ctx.shapes[1])


def _add(x, y, *a, **k):
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not a and not k:
        return _AddBroadcastGrad.apply(x, y)
    return torch.add(x, y, *a, **k)


def _naive_softmax(x, dim=None, *a, **k):
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


wrong_value = _with({torch.sigmoid: _sigmoid_off})
wrong_grad = _with({torch.tanh: _TanhWrongGrad.apply})
wrong_broadcast_grad = _with({"__add__": _add, "add": _add})
naive_softmax = _with({torch.softmax: _naive_softmax})


def lost_float64(fn: Fn) -> Fn:
    """Computes in float32 whatever the inputs' dtype."""
    def run(*args: Any) -> Any:
        outs = fn(*[_Down.apply(a) if a.dtype == torch.float64 else a for a in args])
        return tuple(o.double() if o.dtype == torch.float32 and any(a.dtype == torch.float64 for a in args) else o
                     for o in outs)
    return run


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.float()

    @staticmethod
    def backward(ctx, g):
        return g.double()


def lost_mutation(fn: Fn) -> Fn:
    """Runs on copies of the inputs that do not require grad: writes to inputs are lost."""
    def run(*args: Any) -> Any:
        return fn(*[a if a.requires_grad else a.clone() for a in args])
    return run


def stale_cache(fn: Fn) -> Fn:
    """Caches results by input shapes (a guard that forgot values matter)."""
    cache: dict[Any, Any] = {}

    def run(*args: Any) -> Any:
        key = tuple(tuple(a.shape) for a in args)
        if key not in cache:
            cache[key] = fn(*args)
            return cache[key]
        outs = cache[key]
        return tuple(o.detach().requires_grad_(o.requires_grad) if o.requires_grad else o for o in outs)
    return run


def once_differentiable(fn: Fn) -> Fn:
    """A correct first-order backward that is not itself differentiable (computed under no_grad)."""
    def run(*args: Any) -> Any:
        class Whole(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *xs):
                with torch.enable_grad():
                    leaves = [x.detach().requires_grad_(x.requires_grad) for x in xs]
                    outs = fn(*leaves)
                ctx.leaves, ctx.outs = leaves, outs
                return tuple(o.detach() for o in outs)

            @staticmethod
            def backward(ctx, *gs):
                pairs = [(o, g) for o, g in zip(ctx.outs, gs) if o.requires_grad and g is not None]
                wrt = [x for x in ctx.leaves if x.requires_grad]
                grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                                 allow_unused=True)) if pairs and wrt else iter(())
                return tuple(next(grads) if x.requires_grad else None for x in ctx.leaves)
        return Whole.apply(*args)
    return run


SEEDED = {
    "value": wrong_value,
    "grad": wrong_grad,
    "grad_broadcast": wrong_broadcast_grad,
    "naive_softmax": naive_softmax,
    "float64": lost_float64,
    "mutation": lost_mutation,
    "recompile": stale_cache,
    "second_order": once_differentiable,
}
EXPECTED_KIND = {"value": "value", "grad": "grad", "grad_broadcast": "grad", "naive_softmax": "value",
                 "float64": "value", "mutation": "mutation", "recompile": "recompile", "second_order": "second_order"}
