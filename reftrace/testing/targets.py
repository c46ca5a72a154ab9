"""Targets: what ``check`` runs programs through — a callable ``fn -> fn`` or one of the named ones.

A named target also knows how a repro script spells it (``setup`` and ``compile`` lines, torch
only plus the target's own import) and whether it claims double backward: torch.compile's
AOTAutograd refuses ``create_graph=True`` backward ("does not currently support double
backward"), so ``inductor`` is not asked for second-order gradients unless the caller insists.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from reftrace.errors import ArgumentError

Compile = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Target:
    """A resolved target: ``compile(fn) -> fn``, its name, and its spelling in a repro script."""

    name: str
    compile: Compile
    setup: str            # import lines
    spelling: str         # an expression of ``program`` giving the compiled function
    double_backward: bool = True


def _dynamo(backend: str) -> Compile:
    def compile_with(fn: Callable[..., Any]) -> Callable[..., Any]:
        torch._dynamo.reset()   # one program's guards and caches never meet another's
        return torch.compile(fn, backend=backend)
    return compile_with


def _functorch(fn: Callable[..., Any]) -> Callable[..., Any]:
    from functorch.compile import aot_function, nop
    return aot_function(fn, fw_compiler=nop)


def _reftrace(compiler_name: str) -> Compile:
    def compile_with(fn: Callable[..., Any]) -> Callable[..., Any]:
        from reftrace import compile as rc
        return rc.aot_function(fn, fw_compiler=getattr(rc, compiler_name))
    return compile_with


NAMED: dict[str, Target] = {t.name: t for t in [
    Target("eager", lambda fn: fn, "", "program"),
    Target("aot_eager", _dynamo("aot_eager"), "", 'torch.compile(program, backend="aot_eager")'),
    Target("inductor", _dynamo("inductor"), "", 'torch.compile(program, backend="inductor")',
           double_backward=False),
    Target("functorch", _functorch, "from functorch.compile import aot_function, nop",
           "aot_function(program, fw_compiler=nop)"),
    Target("reftrace", _reftrace("nop"), "from reftrace.compile import aot_function, nop",
           "aot_function(program, fw_compiler=nop)"),
    Target("reftrace-xla", _reftrace("xla_compile"), "from reftrace.compile import aot_function, xla_compile",
           "aot_function(program, fw_compiler=xla_compile)"),
    Target("reftrace-ts", _reftrace("ts_compile"), "from reftrace.compile import aot_function, ts_compile",
           "aot_function(program, fw_compiler=ts_compile)"),
]}


def resolve(target: str | Compile | Target) -> Target:
    """A ``Target`` for a name in ``NAMED``, a ``module:attribute`` path, or a callable ``fn -> fn``."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target in NAMED:
            return NAMED[target]
        if ":" in target:
            module, _, attr = target.partition(":")
            try:
                fn = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
            except (ImportError, AttributeError) as err:
                raise ArgumentError(f"target {target!r} does not import ({err})") from None
            return Target(target, fn, f"from {module} import {attr.split('.')[0]}", f"{attr}(program)")
        raise ArgumentError(f"unknown target {target!r}; use one of {sorted(NAMED)}, a 'module:function' path, "
                            "or pass a callable fn -> compiled fn")
    if not callable(target):
        raise ArgumentError(f"target must be a name or a callable fn -> fn, got {type(target).__name__}")
    return Target(getattr(target, "__qualname__", repr(target)), target, *_spell_callable(target))


def _spell_callable(fn: Any) -> tuple[str, str]:
    """Import lines and call for a user's callable, when it is importable by name."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and module != "__main__" and qualname and "<" not in qualname:
        top = qualname.split(".")[0]
        return f"from {module} import {top}", f"{qualname}(program)"
    return ("# the target is a callable fn -> fn that is not importable by name; define `target` here\n"
            "target = ...", "target(program)")
