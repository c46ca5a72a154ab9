"""One training step of a real model, compiled by reftrace and in eager torch, compared tensor by tensor.

A step is: forward, a scalar loss, ``loss.backward()``, one ``torch.optim.SGD`` step, then a
second forward. The second forward must see the updated parameters (the compiled module
reads the module's live tensors; nothing is baked in as a constant). Compared: every
forward output of both forwards, the loss, every parameter's gradient, every parameter
after the update and every buffer (BatchNorm running statistics) — against a deepcopy of
the same model run with plain torch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from reftrace.compile import aot_module, default_partition

LossFn = Callable[[Any], torch.Tensor]

LEARNING_RATE = 0.1

# Achieved errors per test id, printed by conftest's terminal summary under ``-v``.
ERRORS: dict[str, "Errors"] = {}


@dataclass
class StepResult:
    """Everything one training step produces, detached, keyed by a readable name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    model: torch.nn.Module | None = None  # the stepped model
    compiled: Any = None  # the AOTModule that ran it (None in eager)

    def saved_bytes(self) -> int:
        """Bytes the compiled forward saves for the backward (one compiled signature expected)."""
        (entry,) = self.compiled._compiled.cache.values()
        run = entry.run
        forward = run.fw_gm.reftrace_graph
        saved = forward.outputs[run.num_outputs:]
        return sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in saved)


@dataclass
class Errors:
    """The largest absolute error and the largest error relative to each tensor's own scale."""

    max_abs: float = 0.0
    max_rel: float = 0.0  # max over tensors of max|got - want| / max(max|want|, 1e-3) (normwise)
    needed_rtol: float = 0.0  # the smallest rtol that passes with atol = rtol / 10
    worst: str = ""
    compared: int = 0


def _flat_tensors(prefix: str, tree: Any) -> dict[str, torch.Tensor]:
    leaves, _ = pytree.tree_flatten(tree)
    return {f"{prefix}[{i}]": t.detach().clone() for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}


def training_step(model: torch.nn.Module, args: Sequence[Any], loss_fn: LossFn, *,
                  compiler: Callable[..., Any] | None = None, partition: Any = default_partition,
                  kwargs: dict[str, Any] | None = None) -> StepResult:
    """Run one step on ``model`` (changed in place); ``compiler=None`` runs it in eager torch."""
    kwargs = kwargs or {}
    run = model if compiler is None else aot_module(model, compiler, partition_fn=partition)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    result = StepResult(model=model, compiled=None if compiler is None else run)
    out = run(*args, **kwargs)
    loss = loss_fn(out)
    loss.backward()
    result.tensors.update(_flat_tensors("out", out))
    result.tensors["loss"] = loss.detach().clone()
    for name, p in model.named_parameters():
        if p.grad is not None:
            result.tensors[f"grad {name}"] = p.grad.detach().clone()
    opt.step()
    for name, p in model.named_parameters():
        result.tensors[f"param {name}"] = p.detach().clone()
    for name, b in model.named_buffers():
        result.tensors[f"buffer {name}"] = b.detach().clone()
    result.tensors.update(_flat_tensors("second out", run(*args, **kwargs)))
    if compiler is not None:  # the second step reuses the first compile: the guards see nothing new
        assert len(run._compiled.cache) == 1, "the second forward recompiled"
    return result


def compare(got: StepResult, want: StepResult, *, rtol: float, atol: float) -> Errors:
    """Assert every tensor of ``got`` equals ``want`` (same names, shapes, dtypes; values to rtol/atol)."""
    assert sorted(got.tensors) == sorted(want.tensors), (
        f"different tensors: only compiled {sorted(set(got.tensors) - set(want.tensors))}, "
        f"only eager {sorted(set(want.tensors) - set(got.tensors))}")
    errors = Errors()
    for name, w in want.tensors.items():
        g = got.tensors[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        if not w.is_floating_point():
            assert torch.equal(g, w), name
            continue
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        scale = w.double().abs().max().item() if w.numel() else 0.0
        rel = diff / max(scale, 1e-3)  # gradients that are mathematically zero have no scale of their own
        if w.numel():
            needed = ((g.double() - w.double()).abs() / (0.1 + w.double().abs())).max().item()
            errors.needed_rtol = max(errors.needed_rtol, needed)
        errors.compared += 1
        errors.max_abs = max(errors.max_abs, diff)
        if rel >= errors.max_rel:
            errors.max_rel, errors.worst = rel, name
    return errors


class StepCase:
    """A model factory plus its inputs and loss; the eager step is computed once and shared."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], make_args: Callable[[], tuple],
                 loss_fn: LossFn, *, make_kwargs: Callable[[], dict] | None = None) -> None:
        self.make_model = make_model
        self.make_args = make_args
        self.make_kwargs = make_kwargs or dict
        self.loss_fn = loss_fn
        self._base: dict[torch.dtype, tuple[torch.nn.Module, tuple, dict]] = {}
        self._eager: dict[torch.dtype, StepResult] = {}
        self._compiled: dict[tuple, StepResult] = {}

    def base(self, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple, dict]:
        """The pristine model and inputs in ``dtype`` (never stepped; copies are)."""
        if dtype not in self._base:
            torch.manual_seed(0)
            model = self.make_model().to(dtype)
            torch.manual_seed(1)
            args = tuple(_cast(a, dtype) for a in self.make_args())
            kwargs = {k: _cast(v, dtype) for k, v in self.make_kwargs().items()}
            self._base[dtype] = (model, args, kwargs)
        return self._base[dtype]

    def eager(self, dtype: torch.dtype) -> StepResult:
        if dtype not in self._eager:
            model, args, kwargs = self.base(dtype)
            self._eager[dtype] = training_step(copy.deepcopy(model), args, self.loss_fn, kwargs=kwargs)
        return self._eager[dtype]

    def compiled(self, dtype: torch.dtype, compiler: Callable[..., Any], partition: Any = default_partition, *,
                 keep: bool = False) -> StepResult:
        """The step through ``aot_module``. ``keep`` memoizes it, for runs several tests inspect
        (others are dropped: a stepped model and its compiled graphs are not small)."""
        key = (dtype, compiler, partition)
        result = self._compiled.get(key)
        if result is None:
            model, args, kwargs = self.base(dtype)
            result = training_step(copy.deepcopy(model), args, self.loss_fn, compiler=compiler,
                                   partition=partition, kwargs=kwargs)
            if keep:
                self._compiled[key] = result
        return result


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x
