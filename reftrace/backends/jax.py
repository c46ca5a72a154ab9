"""The JAX backend: the whole graph runs as one ``jax.jit`` computation (one XLA program).

64-bit fidelity: each call runs inside ``jax.enable_x64(True)``, a thread-local
context, so float64/int64 stay 64-bit without flipping the user's global JAX config.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from reftrace.backends.jax_rules import jax_rules
from reftrace.backends.signature import check_args
from reftrace.errors import UnsupportedOperatorError
from reftrace.graph import Aval, Eqn, Graph, Literal, Params, Var
from reftrace.interpreter import eval_graph
from reftrace.primitives import Primitive, infer_avals


def _apply(prim: Primitive, args: Sequence[Any], params: Params) -> Sequence[Any]:
    try:
        rule = jax_rules[prim]
    except KeyError:
        raise UnsupportedOperatorError(f"primitive {prim.name} has no JAX lowering") from None
    out = rule(*args, **dict(params))
    return out if prim.multiple_results else (out,)


def _literal(lit: Literal) -> Any:
    import jax.numpy as jnp
    return jnp.asarray(np.array(lit.value))


def graph_function(graph: Graph):
    """A plain Python function running ``graph`` with jax ops (jit it, vmap it, grad it)."""
    def run(*args: Any) -> tuple[Any, ...]:
        return tuple(eval_graph(graph, args, _apply, _literal))
    return run


class JaxExecutable:
    """``graph`` compiled by XLA; call with numpy/JAX arrays, get a tuple of JAX arrays."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._jitted = jax.jit(graph_function(graph))

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        check_args(self.graph, args, "JAX-lowered graph")
        args = [np.asarray(a, dtype=v.dtype) if isinstance(a, (bool, int, float)) else a
                for a, v in zip(args, self.graph.inputs)]
        with jax.enable_x64(True):
            # block: inputs may alias caller memory (numpy, DLPack) that the caller may overwrite next
            return tuple(jax.block_until_ready(self._jitted(*args)))

    def __repr__(self) -> str:
        return f"<JaxExecutable {self.graph!r}>"


@functools.lru_cache(maxsize=256)
def lower_jax(graph: Graph) -> JaxExecutable:
    """Compile ``graph`` once (per graph value); XLA caches per input signature inside."""
    return JaxExecutable(graph)


def apply_eager(prim: Primitive, args: Sequence[np.ndarray], params: dict[str, Any]) -> Any:
    """Run a single primitive on concrete arrays (used by reftrace.lax outside a trace)."""
    ins = [Var(i, Aval(a.shape, a.dtype)) for i, a in enumerate(args)]
    frozen = Params(params)
    outs = [Var(len(ins) + i, av) for i, av in enumerate(infer_avals(prim, [v.aval for v in ins], frozen))]
    g = Graph(tuple(ins), (Eqn(prim, tuple(ins), tuple(outs), frozen),), tuple(outs))
    res = [np.asarray(r) for r in lower_jax(g)(*args)]
    return tuple(res) if prim.multiple_results else res[0]
