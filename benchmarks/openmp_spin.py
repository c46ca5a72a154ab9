"""What torch's spinning OpenMP workers cost an XLA training step, and what sleeping workers cost eager.

    .venv/bin/python benchmarks/openmp_spin.py [--models mlp,convnet] [--eager mlp,resnet18,convnet] [--runs 2] [--steps 40]

Each measurement runs in a fresh process (the wait policy is fixed when torch starts; the throttle is
one-way), in three settings, taking turns run by run so drift hits them alike:

- ``spin``: torch's default (libgomp workers spin 300,000 iterations after each parallel op);
- ``throttled``: ``reftrace.compile.throttle_openmp_spinning()`` called after ``import torch``;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` set before torch starts (what ``step.py`` uses).

Per model: a training step with Adam through ``aot_module(model, xla_compile)`` and the hand-written
JAX step (``step.py``'s twin, no optimizer: it shows what the spins cost XLA work in the same
process) taking turns, then eager steps with SGD. Medians in ms, one cell per process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

SETTINGS = ("spin", "throttled", "passive")


def child(setting: str, models: list[str], eager: list[str], steps: int) -> dict[str, float]:
    """One process's medians: ``xla <model>``, ``jax <model>``, ``eager <model>``."""
    import time

    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import jax
    import step as S
    if setting != "passive":  # step.py sets it for its own runs (too late for this process's torch)
        os.environ.pop("OMP_WAIT_POLICY", None)

    import reftrace.compile as rc
    if setting == "throttled":
        assert rc.throttle_openmp_spinning(), "the throttle does not apply in this process"

    def median_of(runs: dict[str, Any]) -> dict[str, float]:
        for run in runs.values():
            run()
            run()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(steps):
            for k in (list(runs) if i % 2 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        return {k: float(np.median(v)) for k, v in times.items()}

    def training_step(fn: Any, params: list[torch.Tensor], inputs: tuple, optimizer: Any) -> Any:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            fn(*inputs).sum().backward()
            optimizer.step()
        return run

    out: dict[str, float] = {}
    for name in models:
        torch.manual_seed(0)
        case = S.MODELS[name]()
        leaves = case.leaves()
        loss, args = S.JAX_TWINS[name](case)
        jitted = jax.jit(jax.value_and_grad(loss))
        out.update(median_of({
            f"xla {name}": training_step(rc.aot_module(case.target, rc.xla_compile), leaves, case.inputs,
                                         torch.optim.Adam(leaves, lr=1e-6)),
            f"jax {name}": lambda: jax.block_until_ready(jitted(*args))}))
    for name in eager:
        torch.manual_seed(0)
        case = S.MODELS[name]()
        leaves = case.leaves()
        out.update(median_of({f"eager {name}": training_step(case.target, leaves, case.inputs,
                                                              torch.optim.SGD(leaves, lr=1e-6))}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,convnet", help="XLA step against the JAX twin")
    parser.add_argument("--eager", default="mlp,resnet18,convnet", help="eager steps")
    parser.add_argument("--runs", type=int, default=2, help="processes per setting")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    eager = [m for m in args.eager.split(",") if m]
    if args.child:
        print(json.dumps(child(args.child, models, eager, args.steps)))
        return
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for run in range(args.runs):
        for setting in (SETTINGS if run % 2 == 0 else SETTINGS[::-1]):
            env = dict(base, OMP_WAIT_POLICY="PASSIVE") if setting == "passive" else base
            print(f"run {run + 1}/{args.runs}: {setting}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--child", setting, "--models", args.models,
                                   "--eager", args.eager, "--steps", str(args.steps)],
                                  env=env, capture_output=True, text=True, check=True)
            results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = list(results[SETTINGS[0]][0])
    print("| step (ms, median per process) | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for row in rows:
        cells = [" / ".join(f"{r[row]:.1f}" for r in results[s]) for s in SETTINGS]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
