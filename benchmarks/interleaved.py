"""Training steps of reftrace, functorch and eager, interleaved step by step in one process.

    .venv/bin/python benchmarks/interleaved.py [--models mlp,resnet18,cos-chain,convnet] [--steps 30]

``step.py`` times each system's steps in a block, so a drift of the shared machine's speed between
blocks shows up as a ratio. Here the systems take turns, one step each (the order reversed every
round), so drift hits them alike. Same models and step as ``step.py`` (``nop`` compilers, default
partition; with ``--xla``, the default, also ``xla_compile`` and the hand-written JAX twin where
``step.py`` has one, and that twin split into a jitted forward and a jitted backward, ``jax split``);
prints the 10th percentile and the median per system, and reftrace's ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as step.py, before torch starts

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import step as S  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet18,cos-chain,convnet")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                        help="also reftrace xla_compile against the hand-written JAX twin, where there is one")
    args = parser.parse_args()
    import functorch.compile as fc
    import reftrace.compile as rc
    for name in args.models.split(","):
        torch.manual_seed(0)
        case = S.MODELS[name]()
        model, inputs, leaves = case.target, case.inputs, case.leaves()
        module = isinstance(model, torch.nn.Module)
        systems = {"reftrace nop": (rc.aot_module if module else rc.aot_function)(model, rc.nop, rc.nop),
                   "functorch nop": (fc.aot_module if module else fc.aot_function)(model, fc.nop, fc.nop),
                   "eager": model}
        if args.xla and name in S.JAX_TWINS:
            systems["reftrace xla"] = (rc.aot_module if module else rc.aot_function)(model, rc.xla_compile)

        def torch_step(fn):
            def run():
                for leaf in leaves:
                    leaf.grad = None
                fn(*inputs).sum().backward()
            return run
        steps = {k: torch_step(fn) for k, fn in systems.items()}
        if "reftrace xla" in steps:
            steps["jax"] = jax_step(S.JAX_TWINS[name], case)
            steps["jax split"] = jax_split_step(S.JAX_TWINS[name], case)
        for k, step in list(steps.items()):  # the first step compiles
            try:
                step()
                step()
            except Exception as e:  # noqa: BLE001 - functorch rejects tied weights (GPT-2)
                print(f"{name:10s} {k:14s} fails ({type(e).__name__})")
                del steps[k]
        times: dict[str, list[float]] = {k: [] for k in steps}
        for i in range(args.steps):
            for k in (list(steps) if i % 2 else list(steps)[::-1]):
                t0 = time.perf_counter()
                steps[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k, v in times.items():
            print(f"{name:10s} {k:14s} p10 {np.percentile(v, 10):8.2f} ms  median {med[k]:8.2f} ms", flush=True)
        ratios = [f"reftrace / {k.split()[0]} {med['reftrace nop'] / med[k]:.2f}"
                  for k in ("functorch nop", "eager") if k in med and "reftrace nop" in med]
        if "reftrace xla" in med and "jax" in med:
            ratios.append(f"reftrace xla / jax {med['reftrace xla'] / med['jax']:.2f}")
        if "reftrace xla" in med and "jax split" in med:
            ratios.append(f"reftrace xla / jax split {med['reftrace xla'] / med['jax split']:.2f}, "
                          f"jax split / jax {med['jax split'] / med['jax']:.2f}")
        print(f"{name:10s} {', '.join(ratios)}", flush=True)


def jax_step(twin: Callable[[S.Case], tuple[Callable[..., Any], tuple[Any, ...]]],
             case: S.Case) -> Callable[[], Any]:
    """One step of the hand-written JAX twin: ``jax.jit(jax.value_and_grad(loss))``, waited for."""
    import jax
    loss, args = twin(case)
    step = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(step(*args))


def jax_split_step(twin: Callable[[S.Case], tuple[Callable[..., Any], tuple[Any, ...]]],
                   case: S.Case) -> Callable[[], Any]:
    """The same twin split where torch's autograd splits a step: a jitted forward that returns the loss
    and ``jax.vjp``'s residuals, waited for, then a jitted backward. What XLA can do for any system that
    hands control back to Python between forward and backward (reftrace's ``xla_compile`` is one)."""
    import jax
    import jax.numpy as jnp
    loss, args = twin(case)
    forward = jax.jit(lambda first, *rest: jax.vjp(lambda p: loss(p, *rest), first))
    backward = jax.jit(lambda pullback, ct: pullback(ct))

    def run() -> Any:
        value, pullback = jax.block_until_ready(forward(*args))
        return jax.block_until_ready(backward(pullback, jnp.ones_like(value)))
    return run


if __name__ == "__main__":
    main()
