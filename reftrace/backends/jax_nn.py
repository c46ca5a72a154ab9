"""JAX lowerings of the composites in ``reftrace.nn`` that ``jax.nn`` has as one function.

The others (the norms, every backward equation) run as their decompositions: a chain of
lax ops in one jitted computation, which XLA fuses as well as a hand-written twin.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from reftrace.backends.jax_rules import jax_rules
from reftrace.nn import activations as A


def _in_float32(fn):
    """``fn`` of a float16/bfloat16 array computed in float32 and rounded once, as torch's CPU kernels do
    (their opmath type): in bfloat16 throughout, a softmax is one unit in the last place off here and there."""
    def rule(x, **params):
        x = jnp.asarray(x)
        if x.dtype in (jnp.float16, jnp.bfloat16):
            return fn(x.astype(jnp.float32), **params).astype(x.dtype)
        return fn(x, **params)
    return rule


jax_rules[A.gelu_p] = _in_float32(lambda x, *, approximate: jax.nn.gelu(x, approximate=approximate == "tanh"))
jax_rules[A.softmax_p] = _in_float32(lambda x, *, axis: jax.nn.softmax(x, axis=axis))
jax_rules[A.log_softmax_p] = _in_float32(lambda x, *, axis: jax.nn.log_softmax(x, axis=axis))
