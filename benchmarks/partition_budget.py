"""Saved activation memory, measured, under each partitioner: reftrace's policies and torch's.

    .venv/bin/python benchmarks/partition_budget.py [--models resnet18,mlp] [--repeat 10]

For each model (``examples/models.py``: resnet18 on 2x3x64x64, the MLP on 8x512, training mode) and
each system, one training step ``model(x).sum().backward()`` runs under
``torch.autograd.graph.saved_tensors_hooks``; the bytes of the tensors autograd saves are added
up per storage, leaving out the storages of parameters, buffers and the input (a saved view of a
parameter, such as its transpose, costs no memory). Systems, all with ``nop`` compilers (torch
ops run eagerly, so only the partition differs):

- ``functorch default`` / ``functorch mincut``: ``functorch.compile.aot_module`` with
  ``default_partition`` / ``min_cut_rematerialization_partition``;
- ``torch.compile budget 1.0`` / ``0.5``: ``torch.compile(backend="aot_eager_decomp_partition")``
  (AOTAutograd with functorch's min-cut partitioner, no code generation) with
  ``torch._functorch.config.activation_memory_budget`` = 1.0 / 0.5 (below 1, torch solves a
  knapsack over what to save);
- ``reftrace default`` / ``mincut`` / ``optimal(0.5)``: ``reftrace.compile.aot_module`` with
  ``partition_fn="default"``, ``"mincut"``, ``rt.optimal(memory_budget=0.5)``.

Each row also gives the step time (median of ``--repeat`` steps after two warm-ups), the largest
deviation of the outputs and gradients from eager torch, and, for reftrace, the modelled
activation bytes and recompute FLOPs of the partition (``rt.cost``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import reftrace as rt  # noqa: E402
from models import mlp, resnet18  # noqa: E402

MODELS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "resnet18": (resnet18, (2, 3, 64, 64)),
    "mlp": (mlp, (8, 512)),
}


def saved_activation_bytes(step: Callable[[], Any], kept: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during ``step()``, except those of ``kept``."""
    skip = {t.untyped_storage().data_ptr() for t in kept}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def systems() -> dict[str, Callable[[torch.nn.Module], torch.nn.Module]]:
    import functorch.compile as fc
    import reftrace.compile as rc

    def functorch_with(partition_fn: Any) -> Callable[[torch.nn.Module], torch.nn.Module]:
        return lambda m: fc.aot_module(m, fw_compiler=fc.nop, bw_compiler=fc.nop, partition_fn=partition_fn)

    def torch_compile(m: torch.nn.Module) -> Any:
        torch._dynamo.reset()
        return torch.compile(m, backend="aot_eager_decomp_partition")

    def reftrace_with(policy: Any) -> Callable[[torch.nn.Module], torch.nn.Module]:
        return lambda m: rc.aot_module(m, fw_compiler=rc.nop, bw_compiler=rc.nop, partition_fn=policy)

    return {
        "eager": lambda m: m,
        "functorch default": functorch_with(fc.default_partition),
        "functorch mincut": functorch_with(fc.min_cut_rematerialization_partition),
        "torch.compile budget 1.0": torch_compile,
        "torch.compile budget 0.5": torch_compile,
        "reftrace default": reftrace_with("default"),
        "reftrace mincut": reftrace_with("mincut"),
        "reftrace optimal(0.5)": reftrace_with(rt.optimal(memory_budget=0.5)),
    }


def measure(name: str, wrap: Callable[[torch.nn.Module], torch.nn.Module], model_name: str,
            repeat: int) -> dict[str, Any]:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    reference = _outputs_and_grads(model, model, x)
    budget = 0.5 if name.endswith("budget 0.5") else 1.0
    with torch._functorch.config.patch(activation_memory_budget=budget):
        compiled = wrap(model)
        got = _outputs_and_grads(model, compiled, x)  # compiles (outside the hooks)
        kept = [*model.parameters(), *model.buffers(), x]
        saved = saved_activation_bytes(lambda: compiled(x).sum().backward(), kept)
        times = []
        for i in range(repeat + 2):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            compiled(x).sum().backward()
            if i >= 2:
                times.append(time.perf_counter() - start)
    deviation = max(float((a - b).abs().max()) for a, b in zip(reference, got))
    return {"saved": saved, "ms": 1000 * statistics.median(times), "deviation": deviation}


def _outputs_and_grads(model: torch.nn.Module, run: Any, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = run(x)
    out.sum().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def modelled(model_name: str) -> dict[str, rt.Cost]:
    """rt.cost of reftrace's partitions of the model's joint graph (same model, same input)."""
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    joint = rt.vjp(rt.trace(build(), torch.randn(shape)))
    policies = {"reftrace default": "default", "reftrace mincut": "mincut",
                "reftrace optimal(0.5)": rt.optimal(memory_budget=0.5)}
    return {name: rt.cost(rt.partition(joint, policy)) for name, policy in policies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mlp")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for model_name in args.models.split(","):
        print(f"== {model_name} {MODELS[model_name][1]}", flush=True)
        costs = modelled(model_name)
        print(f"| system | saved activations, measured (MiB) | step (ms) | max deviation from eager "
              f"| modelled activations (MiB) | modelled recompute (MFLOP) |")
        print("|---|---|---|---|---|---|")
        for name, wrap in systems().items():
            print(f"  ... {name}", end="\r", file=sys.stderr, flush=True)
            row = measure(name, wrap, model_name, args.repeat)
            c = costs.get(name)
            model_cols = (f"{c.activation_bytes / 2**20:.2f} | {c.recompute_flops / 1e6:.2f}" if c else "- | -")
            print(f"| {name} | {row['saved'] / 2**20:.2f} | {row['ms']:.1f} | {row['deviation']:.1e} | "
                  f"{model_cols} |", flush=True)


if __name__ == "__main__":
    main()
