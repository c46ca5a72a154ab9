"""reftrace: AOT Autograd as a small, pure-functional reference implementation.

    g  = rt.trace(fn, *example_args)          # Graph (immutable value)
    g0 = rt.decompose(g)                      # composites (layer_norm, softmax, ...) as core primitives
    j  = rt.vjp(g)                            # joint Graph
    p  = rt.partition(j, policy="mincut")     # Partition(forward, backward)
    f  = rt.lower(g, backend="jax")           # callable
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from reftrace.errors import (ArgumentError, CompilerError, DataDependentControlFlowError, GraphError,
                             PartitionError, ReftraceError, ShapeError, TracingError, UnsupportedOperatorError)
from reftrace.graph import Aval, Eqn, Graph, Literal, Params, Var, expect_graph
from reftrace.primitives import Primitive, typecheck
from reftrace import lax
from reftrace import numpy as _numpy  # noqa: F401 - installs TracedArray's numpy operators
from reftrace import nn  # noqa: F401 - registers the composite primitives (layer_norm, softmax, ...)
from reftrace import sharding  # noqa: F401 - registers sharding_constraint (graphs load anywhere)
from reftrace.composite import decompose
from reftrace.transforms import trace as _numpy_trace

__version__ = "0.1.0"


def trace(fn: Callable[..., Any], *example_args: Any, **options: Any) -> Graph:
    """The Graph of ``fn`` at the shapes/dtypes of ``example_args``.

    torch tensors and ``nn.Module``s go to the torch bridge (``reftrace.torch_bridge.capture``:
    a module's parameters and buffers become leading inputs; ``options`` such as
    ``decompositions=`` are passed there); numpy arrays and Python numbers go to the
    ``reftrace.numpy`` tracer (``reftrace.transforms.trace``).
    """
    if _is_torch(fn) or any(_is_torch(a) for a in example_args):
        from reftrace.torch_bridge.capture import capture
        return capture(fn, *example_args, **options)
    return _numpy_trace.trace(fn, *example_args, **options)


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch value implies torch is imported: never import it here
    return torch is not None and isinstance(x, (torch.Tensor, torch.nn.Module))


def _evaluate_with_jax(prim: Primitive, args: Any, params: dict[str, Any]) -> Any:
    """How ``reftrace.lax``/``reftrace.numpy`` run on concrete arrays outside a trace: one XLA call."""
    try:
        from reftrace.backends.jax import apply_eager
    except ModuleNotFoundError as err:
        raise UnsupportedOperatorError(
            f"{prim.name} on concrete arrays (outside rt.trace) runs through the JAX backend, and "
            f"{err.name} is not installed: pip install jax, or call it inside rt.trace") from None
    return apply_eager(prim, args, params)


lax.set_eager_evaluator(_evaluate_with_jax)


def lower(graph: Graph, backend: str = "jax", *, mesh: Any = None, in_shardings: Any = None,
          out_shardings: Any = None) -> Callable[..., tuple[Any, ...]]:
    """A callable running ``graph``: arrays in, tuple of arrays out.

    ``"jax"``: one jitted XLA computation (returns JAX arrays). ``"torch"``: torch ops
    through a generated ``fx.GraphModule`` (returns torch tensors). Both take the same
    positional arguments: numpy arrays, torch tensors, JAX arrays, and Python scalars for
    rank-0 inputs, checked against the graph's inputs (``reftrace.backends.signature``).

    On a device mesh (JAX only; ``docs/sharding.md``): ``mesh`` is a ``jax.sharding.Mesh``,
    ``in_shardings``/``out_shardings`` one ``PartitionSpec`` (or ``None`` = replicated) per input /
    output; the result is one SPMD program (``reftrace.backends.jax_sharded``) returning
    ``jax.Array``s with those shardings, and its ``.compiled_text(*args)`` is the partitioned HLO.
    """
    expect_graph(graph, "lower")
    sharded = mesh is not None or in_shardings is not None or out_shardings is not None
    if backend == "jax" and sharded:
        from reftrace.backends.jax_sharded import lower_sharded
        return lower_sharded(graph, mesh, in_shardings, out_shardings)
    if backend == "jax":
        from reftrace.backends.jax import lower_jax
        return lower_jax(graph)
    if backend == "torch" and sharded:
        raise ArgumentError("mesh=, in_shardings= and out_shardings= are options of the 'jax' backend (XLA's SPMD "
                            "partitioner); use rt.lower(graph, 'jax', mesh=...), or drop them for 'torch'")
    if backend == "torch":
        from reftrace.backends.torch import lower_torch
        return lower_torch(graph)
    raise ArgumentError(f"unknown backend {backend!r}; use 'jax' or 'torch'")


def __getattr__(name: str) -> Any:
    """Transforms are imported on first use to keep ``import reftrace`` light."""
    lazy = {
        "vjp": ("reftrace.transforms.vjp", "vjp"),
        "jvp": ("reftrace.transforms.jvp", "jvp"),
        "partition": ("reftrace.transforms.partition", "partition"),
        "Partition": ("reftrace.transforms.partition", "Partition"),
        "simplify": ("reftrace.transforms.simplify", "simplify"),
        "cost": ("reftrace.transforms.cost", "cost"),
        "Cost": ("reftrace.transforms.cost", "Cost"),
        "optimal": ("reftrace.transforms.optimal", "optimal"),
        "pareto": ("reftrace.transforms.optimal", "pareto"),
        "parse": ("reftrace.graph_text", "parse"),
        "save": ("reftrace.graph_text", "save"),
        "load": ("reftrace.graph_text", "load"),
        "numpy": ("reftrace.numpy", None),
        "lax": ("reftrace.lax", None),
        "with_sharding": ("reftrace.sharding", "with_sharding"),
    }
    if name in lazy:
        import importlib
        mod_name, attr = lazy[name]
        mod = importlib.import_module(mod_name)
        return getattr(mod, attr) if attr else mod
    raise AttributeError(f"module 'reftrace' has no attribute {name!r}")


__all__ = ["trace", "decompose", "nn", "vjp", "jvp", "partition", "Partition", "simplify", "cost", "Cost", "optimal", "pareto", "parse", "save", "load", "lower", "typecheck",
           "with_sharding", "sharding", "Graph", "Eqn", "Var",
           "Literal", "Aval", "Params", "Primitive", "ReftraceError", "GraphError", "ShapeError", "TracingError",
           "DataDependentControlFlowError", "UnsupportedOperatorError", "ArgumentError", "PartitionError",
           "CompilerError"]
