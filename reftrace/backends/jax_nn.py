"""JAX lowerings of the composites in ``reftrace.nn`` that ``jax.nn`` has as one function.

The others (the norms, every backward equation) run as their decompositions: a chain of
lax ops in one jitted computation, which XLA fuses as well as a hand-written twin.
"""
from __future__ import annotations

import jax

from reftrace.backends.jax_rules import computed_in_float32, jax_rules
from reftrace.nn import activations as A

jax_rules[A.gelu_p] = computed_in_float32(lambda x, *, approximate: jax.nn.gelu(x, approximate=approximate == "tanh"))
jax_rules[A.silu_p] = computed_in_float32(jax.nn.silu)
jax_rules[A.softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.softmax(x, axis=axis))
jax_rules[A.log_softmax_p] = computed_in_float32(lambda x, *, axis: jax.nn.log_softmax(x, axis=axis))
