"""``train_step``: a torch module's forward, backward and optimizer update as one jitted SPMD program.

The module and its loss are captured once by the torch bridge (``rt.trace``: parameters and
buffers become named leading inputs), differentiated by ``rt.vjp`` with respect to the
parameters, and the joint graph runs with an optax update inside one ``jax.jit`` over a mesh:

- ``strategy="dp"``: parameters and optimizer state replicated, the batch split (``data_parallel``);
  GSPMD all-reduces the gradients;
- ``strategy="fsdp"``: parameters, gradients and optimizer state split along each parameter's
  largest divisible dimension, the batch split too (``fsdp``); GSPMD all-gathers each parameter
  where it is used and reduce-scatters its gradient.

Between steps the parameters and the optimizer state stay on the devices as sharded
``jax.Array``s (their buffers donated to the next step): no torch round trip per step.
``TrainState.copy_to(module)`` writes them back into the torch module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import reftrace as rt
from reftrace import names
from reftrace.backends.jax import graph_function, tensor_to_jax
from reftrace.backends.jax_sharded import auto_mesh
from reftrace.backends.signature import arg_aval, describe, is_torch_tensor
from reftrace.backends.torch_dtypes import tensor_from_numpy
from reftrace.errors import ArgumentError
from reftrace.graph import Graph
from reftrace.primitives import is_float
from reftrace.sharding import ShardingPlan, data_parallel, fsdp

__all__ = ["train_step", "TrainStep", "TrainState"]

_MODEL = "model"  # the attribute the module gets inside _WithLoss: its state is named model.<name>


class _WithLoss(torch.nn.Module):
    """The module and its loss as one module, so the capture lifts the module's parameters and
    buffers to named inputs (``model.<name>``) and the graph's one output is the loss."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, *batch)


def _module_name(input_name: str) -> str:
    """``model.fc.weight`` / ``buffer(model.bn.running_mean)`` -> the name inside the user's module."""
    inner = input_name[len("buffer("):-1] if names.is_buffer(input_name) else input_name
    return inner[len(_MODEL) + 1:]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which joint-graph input each part of the state is, and the module names to copy back to."""

    trainable: tuple[int, ...]  # float parameters: differentiated and updated
    fixed: tuple[int, ...]  # buffers (and non-float parameters): read, updated only by update(...) outputs
    batch: tuple[int, ...]
    key: int | None
    fixed_updates: tuple[tuple[int, int], ...]  # (joint output, position in fixed) for each update(...) output
    param_names: tuple[str, ...]
    fixed_names: tuple[str, ...]
    fixed_are_buffers: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, module buffers and optimizer state as (sharded) ``jax.Array``s, and the step count."""

    params: tuple[jax.Array, ...]
    fixed: tuple[jax.Array, ...]
    opt_state: Any
    step: int
    layout: _Layout = dataclasses.field(repr=False)

    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the parameters and buffers into ``module`` (the one ``train_step`` captured), in place."""
        with torch.no_grad():
            for name, value in zip(self.layout.param_names, self.params):
                _copy_into(module.get_parameter(name), value, name)
            for name, is_buffer, value in zip(self.layout.fixed_names, self.layout.fixed_are_buffers, self.fixed):
                target = module.get_buffer(name) if is_buffer else module.get_parameter(name)
                _copy_into(target, value, name)

    def param_bytes_per_device(self) -> dict[Any, int]:
        """Bytes of parameter shards each device holds (total / mesh size under FSDP)."""
        held: dict[Any, int] = {}
        for p in self.params:
            for shard in p.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        return held


def _copy_into(target: torch.Tensor, value: jax.Array, name: str) -> None:
    host = np.asarray(jax.device_get(value))
    if tuple(host.shape) != tuple(target.shape):
        raise ArgumentError(f"copy_to: {name} is {tuple(target.shape)} in the module but {host.shape} in the state; "
                            "copy to the module train_step captured")
    target.copy_(tensor_from_numpy(np.array(host, order="C")).to(target.device))


class TrainStep:
    """The compiled training step of one module; call ``step(state, *batch) -> (state, loss)``."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], example_batch: Sequence[Any],
                 optimizer: Any, mesh: Mesh | None, strategy: str, data_axis: Any, param_axis: Any,
                 seed: int) -> None:
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ArgumentError(f"optimizer is {type(optimizer).__name__}; pass an optax GradientTransformation "
                                "(optax.adamw(1e-4), optax.sgd(0.1))")
        if strategy not in ("dp", "fsdp"):
            raise ArgumentError(f"strategy {strategy!r}: use 'dp' (replicated parameters) or 'fsdp' (sharded ones)")
        self.module, self.optimizer, self.seed = module, optimizer, seed
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()[:1]), ("data",))
        forward = rt.trace(_WithLoss(module, loss_fn), *example_batch)
        self.layout = _layout(forward)
        self.graph: Graph = rt.vjp(forward, wrt=self.layout.trainable)
        self.plan: ShardingPlan = (
            data_parallel(self.graph, self.mesh, batch_inputs=self.layout.batch, axis=data_axis) if strategy == "dp"
            else fsdp(self.graph, self.mesh, param_inputs=self.layout.trainable, axis=param_axis or data_axis,
                      batch_inputs=self.layout.batch, batch_axis=data_axis))
        self._auto = auto_mesh(self.mesh)
        self._params, self._fixed, self._batch = (
            tuple(NamedSharding(self._auto, self.plan.in_shardings[i]) for i in group)
            for group in (self.layout.trainable, self.layout.fixed, self.layout.batch))
        self._replicated = NamedSharding(self._auto, PartitionSpec())
        self._jitted: Any = None  # built by init(), which knows the optimizer state's structure
        self._compiled: Any = None

    # ------------------------------------------------------------------ state

    def init(self) -> TrainState:
        """A fresh state from the module's current parameters and buffers, put on the mesh."""
        tensors = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        with jax.enable_x64(True), jax.set_mesh(self._auto):
            params = tuple(self._on_device(tensors[n], s, i)
                           for i, (n, s) in enumerate(zip(self.layout.param_names, self._params)))
            fixed = tuple(self._on_device(tensors[n], s, i)
                          for i, (n, s) in enumerate(zip(self.layout.fixed_names, self._fixed)))
            opt_shardings = self._optimizer_shardings(params)
            opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
            if self._jitted is None:
                self._jitted = self._compile(opt_shardings)
        return TrainState(params, fixed, opt_state, 0, self.layout)

    @staticmethod
    def _on_device(tensor: torch.Tensor, sharding: NamedSharding, i: int) -> jax.Array:
        # a copy the state owns: its buffers are donated to each step, so they must not alias torch memory
        return jax.device_put(np.array(tensor_to_jax(tensor, i)), sharding)

    def _optimizer_shardings(self, params: tuple[jax.Array, ...]) -> Any:
        """Each optimizer-state leaf laid out like the parameter of its shape (Adam's moments), scalars
        (step counts) replicated. Both strategies choose a parameter's spec from its shape alone, so
        the shape names the layout."""
        by_shape = {p.shape: s for p, s in zip(params, self._params)}
        abstract = jax.eval_shape(self.optimizer.init, params)
        return jax.tree.map(lambda leaf: by_shape.get(leaf.shape, self._replicated), abstract)

    # ------------------------------------------------------------------ the step

    def _compile(self, opt_shardings: Any) -> Any:
        import optax  # the `sharding` extra: pip install 'reftrace[sharding]'
        run, layout = graph_function(self.graph), self.layout
        num_primals, num_outputs = self.graph.joint
        loss_dtype = self.graph.outputs[0].aval.dtype

        def step(params, fixed, opt_state, batch, key):
            primals: list[Any] = [None] * num_primals
            for group, values in ((layout.trainable, params), (layout.fixed, fixed), (layout.batch, batch)):
                for i, v in zip(group, values):
                    primals[i] = v
            if layout.key is not None:
                primals[layout.key] = key
            outs = run(*primals, jnp.ones((), loss_dtype))  # the loss's cotangent: d loss / d loss = 1
            grads = tuple(outs[num_outputs:])
            new_fixed = list(fixed)
            for out, pos in layout.fixed_updates:
                new_fixed[pos] = outs[out]
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), tuple(new_fixed), opt_state, outs[0]

        shardings = (self._params, self._fixed, opt_shardings)
        return jax.jit(step, in_shardings=(*shardings, self._batch, self._replicated),
                       out_shardings=(*shardings, self._replicated), donate_argnums=(0, 1, 2))

    def _arguments(self, state: TrainState, batch: Sequence[Any]) -> tuple[Any, ...]:
        if not isinstance(state, TrainState) or state.layout != self.layout:
            raise ArgumentError(f"the first argument is {type(state).__name__}; pass the TrainState this step's "
                                "init() (or a previous call) returned")
        if len(batch) != len(self.layout.batch):
            raise ArgumentError(f"the step takes {len(self.layout.batch)} batch tensor(s), as captured; got {len(batch)}")
        placed = []
        for k, (x, i, sharding) in enumerate(zip(batch, self.layout.batch, self._batch)):
            expected = self.graph.inputs[i].aval
            if not hasattr(x, "shape") or arg_aval(x) != expected:
                raise ArgumentError(f"batch argument {k}: expected {expected.str_short()}, got {describe(x)}; "
                                    "call train_step again for new shapes/dtypes")
            placed.append(jax.device_put(tensor_to_jax(x, k) if is_torch_tensor(x) else x, sharding))
        key = jax.device_put(np.array([self.seed, state.step], np.uint32), self._replicated)
        return state.params, state.fixed, state.opt_state, tuple(placed), key

    def __call__(self, state: TrainState, *batch: Any) -> tuple[TrainState, jax.Array]:
        """One step: the new state (the old one's buffers are donated: do not reuse it) and the loss."""
        with jax.enable_x64(True), jax.set_mesh(self._auto):
            arguments = self._arguments(state, batch)
            params, fixed, opt_state, loss = self._executable(arguments)(*arguments)
        return TrainState(params, fixed, opt_state, state.step + 1, self.layout), loss

    def compiled_text(self, state: TrainState, *batch: Any) -> str:
        """The partitioned HLO of the step (its collectives: all-reduce, all-gather, reduce-scatter)."""
        with jax.enable_x64(True), jax.set_mesh(self._auto):
            return self._executable(self._arguments(state, batch)).as_text()

    def _executable(self, arguments: tuple[Any, ...]) -> Any:
        """Compiled once: the batch is checked against the captured shapes, the state is the step's own."""
        if self._compiled is None:
            self._compiled = self._jitted.lower(*arguments).compile()
        return self._compiled


def _layout(forward: Graph) -> _Layout:
    """Sort the captured inputs into trainable parameters, fixed state, batch and random key."""
    in_names, out_names = forward.input_names, forward.output_names
    if len(out_names) - sum(map(names.is_update, out_names)) != 1 or forward.outputs[0].aval.ndim != 0 \
            or not is_float(forward.outputs[0].aval.dtype):
        raise ArgumentError(f"loss_fn must return one scalar floating tensor (the loss); the captured function "
                            f"returns {', '.join(o.aval.str_short() for o in forward.outputs)}")
    trainable = tuple(i for i, n in enumerate(in_names) if names.is_parameter(n) and is_float(forward.inputs[i].dtype))
    fixed = tuple(i for i, n in enumerate(in_names)
                  if names.is_buffer(n) or (names.is_parameter(n) and i not in trainable))
    batch = tuple(i for i, n in enumerate(in_names) if names.is_argument(n))
    key = in_names.index("rng_key") if "rng_key" in in_names else None
    updates = tuple((k, _fixed_position(in_names, fixed, n)) for k, n in enumerate(out_names) if names.is_update(n))
    return _Layout(trainable, fixed, batch, key, updates,
                   tuple(_module_name(in_names[i]) for i in trainable),
                   tuple(_module_name(in_names[i]) for i in fixed),
                   tuple(names.is_buffer(in_names[i]) for i in fixed))


def _fixed_position(in_names: Sequence[str], fixed: Sequence[int], update_name: str) -> int:
    """Where in the fixed state the input lives whose new value the output ``update_name`` is."""
    updated = [i for i, n in enumerate(in_names) if names.update(n) == update_name]
    if not updated or updated[0] not in fixed:
        raise ArgumentError(f"the module writes {update_name[len('update('):-1]} in place, and train_step updates "
                            "only buffers that way; make the parameter change part of the optimizer instead")
    return fixed.index(updated[0])


def train_step(module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], *example_batch: Any,
               optimizer: Any, mesh: Mesh | None = None, strategy: str = "dp",
               data_axis: str | Sequence[str] | None = None, param_axis: str | Sequence[str] | None = None,
               seed: int = 0) -> TrainStep:
    """Compile ``module``'s training step: ``loss_fn(module, *batch)`` returns the scalar loss.

    ``example_batch`` gives the batch tensors' shapes and dtypes (dimension 0 is the batch, split
    over ``data_axis``; default every mesh axis). ``optimizer`` is an optax GradientTransformation.
    ``strategy``: ``"dp"`` or ``"fsdp"`` (parameters split over ``param_axis``, default
    ``data_axis``). ``mesh=None`` runs on one device. Random ops (dropout) draw from the key
    ``(seed, step)``, the same on every mesh. Returns a ``TrainStep``: ``state = step.init()``,
    ``state, loss = step(state, *batch)``, ``state.copy_to(module)``.
    """
    if not isinstance(module, torch.nn.Module):
        raise ArgumentError(f"train_step trains an nn.Module; got {type(module).__name__}")
    return TrainStep(module, loss_fn, example_batch, optimizer, mesh, strategy, data_axis, param_axis, seed)
