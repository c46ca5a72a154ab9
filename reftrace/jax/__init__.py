"""reftrace on JAX, beyond running one graph: a torch model's whole training step as one SPMD program.

    step = reftrace.jax.train_step(model, loss_fn, ids, optimizer=optax.adamw(1e-4), mesh=mesh, strategy="fsdp")
    state = step.init()                 # parameters and optimizer state as sharded jax.Arrays
    state, loss = step(state, ids)      # forward + backward + update: one jitted program
    state.copy_to(model)                # the trained values back in the torch module

See ``reftrace.jax.training`` and docs/sharding.md. (Inside this package ``import jax`` is still
JAX itself: imports are absolute.)
"""
from reftrace.jax.training import TrainState, TrainStep, train_step

__all__ = ["train_step", "TrainStep", "TrainState"]
