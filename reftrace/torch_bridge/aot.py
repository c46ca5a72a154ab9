"""``aot_function`` and ``aot_module``: functorch.compile's workflow on reftrace.

At the first call with a given signature the function is captured (forward graph),
differentiated by reftrace's ``vjp``, partitioned, emitted as FX and handed to the
compilers — forward and backward both, ahead of time. Guards: the cache key is the
argument structure, every tensor's shape/dtype/device/requires_grad, the values of
non-tensor arguments and whether grad mode is on; anything new recompiles.

A function with random ops (dropout in training mode...) is captured with one more
input, a ``u32[2]`` key (``Captured.key_input``, the last input); every call feeds a
fresh one drawn from torch's default generator (``new_rng_key``), so
``torch.manual_seed`` makes runs reproducible and successive calls differ.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from reftrace.errors import ArgumentError, TracingError
from reftrace.primitives import is_float
from reftrace.torch_bridge.autograd import Compiler, InferenceFunction, PartitionedFunction, new_rng_key
from reftrace.torch_bridge.compilers import as_partitioner, default_partition


@contextlib.contextmanager
def _gc_paused() -> Any:
    """Compilation allocates many small immutable objects and no cycles worth collecting;
    a full collection of a process holding torch and transformers costs more than the work."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Compiled:
    """One compiled signature: the graph functions plus how to rebuild the outputs."""

    def __init__(self, run: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]],
                 num_outputs: int, mutated_inputs: Sequence[int], out_spec: Any, key_input: int | None = None
                 ) -> None:
        self.run = run
        self.num_outputs = num_outputs
        self.mutated_inputs = tuple(mutated_inputs)
        self.out_spec = out_spec
        self.key_input = key_input  # the graph's random key input (after the user's tensors), or None


class AOTFunction:
    """The callable ``aot_function`` returns. ``.cache`` maps signatures to compiled graphs."""

    def __init__(self, fn: Callable[..., Any], fw_compiler: Compiler, bw_compiler: Compiler | None,
                 partition_fn: Any, decompositions: dict | None, inference_compiler: Compiler | None) -> None:
        self.fn = fn
        self.fw_compiler = fw_compiler
        self.bw_compiler = bw_compiler or fw_compiler
        self.inference_compiler = inference_compiler or fw_compiler
        self.partitioner = as_partitioner(partition_fn)
        self.decompositions = decompositions
        self.cache: dict[Any, _Compiled] = {}
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "aot_function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        tensors = [leaves[i] for i in tensor_pos]
        key = self._key(leaves, spec, tensor_pos)
        compiled = self.cache.get(key)
        if compiled is None:
            with _gc_paused():
                compiled = self.cache[key] = self._compile(leaves, spec, tensor_pos, tensors)
        if compiled.key_input is None:
            outs = compiled.run(tensors)
        else:  # a fresh key per call; the autograd Function keeps it for double backward
            outs = compiled.run([*tensors, new_rng_key(tensors[0].device if tensors else None)])
        if compiled.mutated_inputs:
            with torch.no_grad():
                for i, new in zip(compiled.mutated_inputs, outs[compiled.num_outputs:]):
                    tensors[i].copy_(new)
        return pytree.tree_unflatten(list(outs[:compiled.num_outputs]), compiled.out_spec)

    @staticmethod
    def _key(leaves: list, spec: Any, tensor_pos: list[int]) -> Any:
        parts: list[Any] = [spec, torch.is_grad_enabled()]
        j = 0
        for i, x in enumerate(leaves):
            if j < len(tensor_pos) and tensor_pos[j] == i:
                parts.append((tuple(x.shape), x.dtype, x.device, x.requires_grad))
                j += 1
            else:
                parts.append(_guard_value(x, i))
        return tuple(parts)

    def _compile(self, leaves: list, spec: Any, tensor_pos: list[int], tensors: list[torch.Tensor]) -> _Compiled:
        from reftrace.torch_bridge.capture import capture_flat
        out_spec_box: list[Any] = []

        def fn_flat(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            new_leaves = list(leaves)
            for i, t in zip(tensor_pos, ts):
                new_leaves[i] = t
            a, k = pytree.tree_unflatten(new_leaves, spec)
            out_leaves, out_spec = pytree.tree_flatten(self.fn(*a, **k))
            for o in out_leaves:
                if not isinstance(o, torch.Tensor):
                    raise TracingError(f"{self.__name__} returned a {type(o).__name__}; compiled functions "
                                       "must return tensors (in tuples/lists/dicts)")
            out_spec_box[:] = [out_spec]
            return out_leaves

        captured = capture_flat(fn_flat, tensors, decompositions=self.decompositions)
        graph = captured.graph
        n_out = captured.num_outputs
        examples = list(tensors)
        if captured.key_input is not None:
            examples.append(torch.zeros(2, dtype=torch.uint32))
        wrt = [i for i, t in enumerate(tensors) if t.requires_grad and is_float(graph.inputs[i].dtype)]
        if not (torch.is_grad_enabled() and wrt):
            run = InferenceFunction(graph, self.inference_compiler, examples)
        else:
            nondiff = [i for i, v in enumerate(graph.outputs) if i >= n_out or not is_float(v.dtype)]
            run = PartitionedFunction(graph, wrt, nondiff, fw_compiler=self.fw_compiler,
                                      bw_compiler=self.bw_compiler, partitioner=self.partitioner,
                                      example_inputs=examples, mutated_inputs=captured.mutated_inputs)
        return _Compiled(run, n_out, captured.mutated_inputs, out_spec_box[0], captured.key_input)


def _guard_value(x: Any, i: int) -> Any:
    """What a non-tensor argument is guarded on: its type and value (a slice by its bounds)."""
    if isinstance(x, slice):  # slices are unhashable before Python 3.12
        return (slice, _guard_value(x.start, i), _guard_value(x.stop, i), _guard_value(x.step, i))
    try:
        hash(x)
    except TypeError:
        raise ArgumentError(f"argument leaf {i} of type {type(x).__name__} is neither a tensor nor "
                            "a hashable constant; reftrace guards on non-tensor values") from None
    return (type(x), x)


def aot_function(fn: Callable[..., Any], fw_compiler: Compiler, bw_compiler: Compiler | None = None,
                 partition_fn: Any = default_partition, decompositions: dict | None = None,
                 num_params_buffers: int = 0, keep_inference_input_mutations: bool = False,
                 inference_compiler: Compiler | None = None, *, dynamic: bool = False,
                 enable_log: bool = True) -> AOTFunction:
    """Capture ``fn``'s forward and backward ahead of time and hand them to the compilers.

    Same signature as ``functorch.compile.aot_function``. ``partition_fn`` may also be a
    reftrace policy ("default", "mincut" or a callable ``policy(eqn) -> bool``).
    ``num_params_buffers``, ``keep_inference_input_mutations``, ``dynamic`` and
    ``enable_log`` are accepted for compatibility; shapes are always static (guarded).
    """
    del num_params_buffers, keep_inference_input_mutations, enable_log
    if dynamic:
        raise ArgumentError("dynamic=True is not supported: reftrace specialises on shapes and "
                            "recompiles when they change")
    return AOTFunction(fn, fw_compiler, bw_compiler, partition_fn, decompositions, inference_compiler)


class AOTModule(torch.nn.Module):
    """The module ``aot_module`` returns; parameters and buffers stay the original module's."""

    def __init__(self, mod: torch.nn.Module, compiled: AOTFunction) -> None:
        super().__init__()
        self.orig_module = mod
        self._compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from reftrace.torch_bridge.modules import module_state
        state = module_state(self.orig_module)
        modes = tuple(m.training for m in self.orig_module.modules())
        return self._compiled(state.tensors, modes, *args, **kwargs)


def aot_module(mod: torch.nn.Module, fw_compiler: Compiler, bw_compiler: Compiler | None = None,
               partition_fn: Any = default_partition, decompositions: dict | None = None,
               inference_compiler: Compiler | None = None, **kwargs: Any) -> AOTModule:
    """``aot_function`` for an ``nn.Module``: parameters and buffers become graph inputs.

    Tied weights are one input (their gradient is summed); buffer updates made in the
    forward (BatchNorm running statistics) are written back after each call; the
    module's ``training`` flag is part of the guard.
    """
    from reftrace.torch_bridge.modules import module_state

    def functional(tensors: Sequence[torch.Tensor], modes: tuple[bool, ...], *args: Any, **kw: Any) -> Any:
        # ``modes`` (every submodule's training flag) is only a guard: the module traces in its current mode.
        del modes
        state = module_state(mod)
        return torch.func.functional_call(mod, dict(zip(state.names, tensors)), args, kw)

    functional.__name__ = type(mod).__name__
    compiled = aot_function(functional, fw_compiler, bw_compiler, partition_fn, decompositions,
                            inference_compiler=inference_compiler, **kwargs)
    return AOTModule(mod, compiled)
