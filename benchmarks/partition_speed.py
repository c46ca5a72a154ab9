"""How long ``partition`` takes on a joint graph of about 5,000 equations.

    .venv/bin/python benchmarks/partition_speed.py [--eqns 5000] [--repeat 3]

Builds the joint graph (``vjp``) of a deep residual MLP with LayerNorm-like
normalisation and tanh/GELU-style activations written with ``reftrace.numpy``,
grown until the joint has at least ``--eqns`` equations, then times
``simplify`` and ``partition`` under each policy (best of ``--repeat``, wall and
process CPU time). Tracing
and ``vjp`` are not timed. The targets: under a second for ``"mincut"``, under two seconds for
``rt.optimal`` (budgets None and 0.5; tight budgets take longer, see docs/partition.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import reftrace as rt
import reftrace.numpy as rnp
from reftrace.transforms.policies import dots_saveable, save_nothing


def block(x, w, b, gamma):
    h = x @ w + b
    mean = rnp.mean(h, axis=-1, keepdims=True)
    centered = h - mean
    var = rnp.mean(centered * centered, axis=-1, keepdims=True)
    normed = centered / rnp.sqrt(var + 1e-5) * gamma
    act = 0.5 * normed * (1.0 + rnp.tanh(0.79788456 * (normed + 0.044715 * normed * normed * normed)))
    return x + act


def model_graph(depth: int, batch: int = 32, width: int = 128) -> rt.Graph:
    def fn(x, *params):
        for i in range(depth):
            w, b, gamma = params[3 * i: 3 * i + 3]
            x = block(x, w, b, gamma)
        return rnp.sum(x * x)

    rng = np.random.default_rng(0)
    args = [rng.standard_normal((batch, width)).astype(np.float32)]
    for _ in range(depth):
        args += [rng.standard_normal((width, width)).astype(np.float32),
                 np.zeros(width, np.float32), np.ones(width, np.float32)]
    return rt.trace(fn, *args)


def joint_with_at_least(num_eqns: int) -> rt.Graph:
    depth = 1
    while True:
        joint = rt.vjp(model_graph(depth))
        if len(joint.eqns) >= num_eqns:
            return joint
        per_block = max(1, len(joint.eqns) // depth)
        depth = max(depth + 1, -(-num_eqns // per_block))


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time and best CPU time of this process (CPU time is steadier on a busy machine)."""
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eqns", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    joint = joint_with_at_least(args.eqns)
    print(f"joint graph: {len(joint.eqns)} equations, {len(joint.inputs)} inputs, {len(joint.outputs)} outputs")
    wall, cpu, simple = best_time(lambda: rt.simplify(joint), args.repeat)
    print(f"simplify                wall {wall * 1000:6.1f} ms  cpu {cpu * 1000:6.1f} ms  "
          f"({len(simple.eqns)} equations after)")
    for name, policy in [("default", "default"), ("mincut", "mincut"), ("dots_saveable", dots_saveable),
                         ("save_nothing", save_nothing), ("optimal(None)", rt.optimal()),
                         ("optimal(1.0)", rt.optimal(1.0)), ("optimal(0.5)", rt.optimal(0.5)),
                         ("optimal(0.35)", rt.optimal(0.35)), ("optimal(0.2)", rt.optimal(0.2))]:
        wall, cpu, part = best_time(lambda: rt.partition(joint, policy), args.repeat)
        print(f"partition {name:<14}wall {wall * 1000:6.1f} ms  cpu {cpu * 1000:6.1f} ms  "
              f"saved {len(part.saved):4d} values, "
              f"{part.saved_bytes / 2**20:8.2f} MiB  (forward {len(part.forward.eqns)} eqns, "
              f"backward {len(part.backward.eqns)} eqns)")


if __name__ == "__main__":
    main()
