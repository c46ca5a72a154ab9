"""Where compile time goes: capture, vjp, simplify, partition and FX emission, timed one by one.

    .venv/bin/python benchmarks/phases.py

As in ``aot_function``, the garbage collector is paused while compiling.
"""
from __future__ import annotations

import gc
import time

import torch

from run import first_call_seconds, make_gpt2, make_resnet18, seed_fn  # noqa: F401 - same models as run.py

import reftrace.compile as rc
from reftrace.backends.torch import to_fx
from reftrace.torch_bridge.capture import capture_flat
from reftrace.torch_bridge.modules import module_state
from reftrace.transforms.partition import partition
from reftrace.transforms.simplify import simplify
from reftrace.transforms.vjp import vjp


def phases(model: torch.nn.Module, args: tuple) -> dict[str, float]:
    state = module_state(model)
    n = len(state.names)

    def fn(ts):
        return torch.func.functional_call(model, dict(zip(state.names, ts[:n])), tuple(ts[n:]))

    tensors = list(state.tensors) + list(args)
    times: dict[str, float] = {}

    def timed(name, f, *a, **k):
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = f(*a, **k)
            times[name] = time.perf_counter() - t0
        finally:
            gc.enable()
        return out

    cap = timed("capture", capture_flat, fn, tensors)
    wrt = [i for i, t in enumerate(tensors) if t.requires_grad]
    joint = timed("vjp", vjp, cap.graph, wrt=wrt, nondiff_outputs=range(cap.num_outputs, len(cap.graph.outputs)))
    timed("simplify", simplify, joint)
    p = timed("partition (incl. simplify)", partition, joint, "default")
    timed("to_fx forward", to_fx, p.forward)
    timed("to_fx backward", to_fx, p.backward)
    return times


def main() -> None:
    first_call_seconds(lambda f: rc.aot_function(f, rc.nop, rc.nop), seed_fn, (torch.randn(3, requires_grad=True),))
    for make in (make_resnet18, make_gpt2):
        model, args = make()
        print(make.__name__[5:], {k: round(v, 3) for k, v in phases(model, args).items()})


if __name__ == "__main__":
    main()
