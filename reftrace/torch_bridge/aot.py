"""``aot_function`` and ``aot_module``: functorch.compile's workflow on reftrace.

At the first call with a given signature the function is captured (forward graph),
differentiated by reftrace's ``vjp``, partitioned, emitted as FX and handed to the
compilers — forward and backward both, ahead of time. Guards: the cache key is the
argument structure, every tensor's shape/dtype/device/requires_grad, the values of
non-tensor arguments, whether grad mode is on, the autocast state and the default dtype;
anything new recompiles. A module's
plain attributes (numbers, strings, flags such as ``training``) are guarded too.

Inputs that share memory, one of them mutated in place, are captured as views of one
base tensor (``_AliasPlan``), so the mutation reaches every alias as in eager torch.

A function with random ops (dropout in training mode...) is captured with one more
input, a ``u32[2]`` key (``Captured.key_input``, the last input); every call feeds a
fresh one drawn from torch's default generator (``new_rng_key``), so
``torch.manual_seed`` makes runs reproducible and successive calls differ.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from reftrace.errors import ArgumentError, TracingError
from reftrace.primitives import is_inexact
from reftrace.transforms.simplify import eliminate_dead_code
from reftrace.torch_bridge.autocast import autocast_off, autocast_state
from reftrace.torch_bridge.autograd import Compiler, InferenceFunction, PartitionedFunction, new_rng_key
from reftrace.torch_bridge.compilers import as_partitioner, preferred_partition
from reftrace.torch_bridge.capture import capture_flat, refuse_trainable_constants
from reftrace.torch_bridge.output_layouts import Layout, with_eager_layouts
from reftrace.torch_bridge.output_views import OutputView, rebuild_outputs
from reftrace.torch_bridge.translate import ClosedOver
from reftrace.torch_bridge.module_writes import rebind
from reftrace.torch_bridge.modules import ModuleGuard, functional_module
from reftrace.torch_bridge.outputs import OutputSpec, flatten_outputs


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


# ----------------------------------------------------------------------------- aliased inputs

@dataclass(frozen=True)
class _AliasGroup:
    """Inputs whose memory overlaps: ``members`` (tensor positions), each a view
    ``(shape, stride, offset)`` of one base that spans ``span`` elements from storage offset ``start``."""

    members: tuple[int, ...]
    views: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]
    start: int
    span: int


@dataclass(frozen=True)
class _AliasPlan:
    """How a call whose inputs overlap is captured: each group's members become views of one base input.

    The graph's inputs are the tensors in no group (in order), then one base per group.
    Hashable: it is part of the cache key (same overlap, same graph).
    """

    groups: tuple[_AliasGroup, ...]

    def graph_inputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grouped = {i for g in self.groups for i in g.members}
        plain = [t for i, t in enumerate(tensors) if i not in grouped]
        return plain + [torch.as_strided(tensors[g.members[0]], (g.span,), (1,), g.start) for g in self.groups]

    def user_tensors(self, inputs: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
        """Inside the capture: the user's tensors again, the grouped ones as views of their bases."""
        grouped = {i for g in self.groups for i in g.members}
        plain = iter(inputs)
        tensors = [None if i in grouped else next(plain) for i in range(count)]
        bases = inputs[count - len(grouped):]
        for group, base in zip(self.groups, bases):
            for i, (shape, stride, offset) in zip(group.members, group.views):
                tensors[i] = torch.as_strided(base, shape, stride, offset)
        return tensors  # type: ignore[return-value]


def _alias_plan(tensors: Sequence[torch.Tensor], mutated: Sequence[int]) -> _AliasPlan | None:
    """The overlapping groups among ``tensors`` that hold a mutated one, or None when none does.

    Overlap is judged on storage byte ranges (a conservative test: interleaved views count as
    overlapping, and capturing them through a base is still exact).
    """
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.layout != torch.strided:
            continue
        start = t.storage_offset()
        end = start + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        size = t.element_size()
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append((start * size, end * size, i))
    if len(by_storage) == sum(1 for t in tensors if t.numel() and t.layout == torch.strided):
        return None  # every tensor has a storage of its own
    groups = []
    mutated_set = set(mutated)

    def close(members: list[int]) -> None:
        if len(members) > 1 and mutated_set.intersection(members):
            groups.append(_group(tensors, members))

    for ranges in by_storage.values():
        ranges.sort()
        members: list[int] = []
        end = 0
        for lo, hi, i in ranges:
            if members and lo < end:
                members.append(i)
                end = max(end, hi)
            else:
                close(members)
                members, end = [i], hi
        close(members)
    return _AliasPlan(tuple(groups)) if groups else None


def _group(tensors: Sequence[torch.Tensor], members: list[int]) -> _AliasGroup:
    members = sorted(members)
    ts = [tensors[i] for i in members]
    if len({t.dtype for t in ts}) > 1:
        raise ArgumentError(f"inputs {members} share memory with different dtypes "
                            f"({', '.join(str(t.dtype) for t in ts)}) and one is mutated in place; reftrace "
                            "cannot capture that: pass copies (.clone()) instead")
    if any(t.requires_grad for t in ts):
        raise ArgumentError(f"inputs {members} share memory, one is mutated in place, and some require grad; "
                            "reftrace does not capture that case: pass copies (.clone()) instead")
    start = min(t.storage_offset() for t in ts)
    end = max(t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) for t in ts)
    views = tuple((tuple(t.shape), tuple(t.stride()), t.storage_offset() - start) for t in ts)
    return _AliasGroup(tuple(members), views, start, end - start)


# ----------------------------------------------------------------------------- compiled signatures

RECAPTURE_WARNING = 8
"""Captures of one compiled function after which ``RecaptureWarning`` says what keeps changing."""


class RecaptureWarning(UserWarning):
    """A compiled function keeps being captured anew: something it is guarded on changes every call."""


class _Constant:
    """A tensor the graph holds as a constant (``ClosedOver``), and the module attribute holding it, if one
    does (``holder[key]``): the graph is stale once the tensor is written in place or the attribute is
    rebound to another tensor (``m.scale = torch.tensor(4.0)``), where eager would read the new value."""

    __slots__ = ("record", "holder", "key")

    def __init__(self, record: ClosedOver, holder: dict[str, Any] | None = None, key: str = "") -> None:
        self.record, self.holder, self.key = record, holder, key

    def changed(self) -> bool:
        return self.record.changed() or (self.holder is not None and self.holder.get(self.key) is not
                                         self.record.tensor())


class _Compiled:
    """One compiled signature: the graph functions plus how to rebuild the outputs."""

    def __init__(self, run: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]],
                 num_outputs: int, mutated_inputs: Sequence[int], out_spec: OutputSpec, key_input: int | None = None,
                 alias_plan: _AliasPlan | None = None, output_views: Sequence[OutputView] = (),
                 constants: Sequence[_Constant] = (), layouts: Sequence[Layout] = ()) -> None:
        self.run = run
        self.num_outputs = num_outputs  # the graph's outputs that are the function's (views excluded)
        self.mutated_inputs = tuple(mutated_inputs)  # graph input positions
        self.out_spec = out_spec
        self.key_input = key_input  # the graph's random key input (after the user's tensors), or None
        self.alias_plan = alias_plan  # how the user's tensors became the graph's inputs, or None (as they are)
        self.aliased: dict[_AliasPlan, _Compiled] = {}  # variants of this signature for overlapping inputs
        self.output_views = tuple(output_views)  # outputs rebuilt as views of graph inputs or of outputs
        self.constants = tuple(constants)  # tensors read from the enclosing scope, baked into the graph
        self.layouts = tuple(layouts)  # (computed output, eager's strides): outputs laid out as eager's


class AOTFunction:
    """The callable ``aot_function`` returns. ``.cache`` maps signatures to compiled graphs."""

    def __init__(self, fn: Callable[..., Any], fw_compiler: Compiler, bw_compiler: Compiler | None,
                 partition_fn: Any, decompositions: dict | None, inference_compiler: Compiler | None) -> None:
        for role, compiler in (("fw_compiler", fw_compiler), ("bw_compiler", bw_compiler),
                               ("inference_compiler", inference_compiler)):
            if not callable(compiler) and not (compiler is None and role != "fw_compiler"):
                raise ArgumentError(f"{role} must be a compiler, a callable (fx.GraphModule, example_inputs) -> "
                                    f"callable, got {compiler!r}; use reftrace.compile.nop to run graphs as they are")
        if not callable(fn):
            raise ArgumentError(f"aot_function expects a callable, got {type(fn).__name__}")
        self.fn = fn
        self.fw_compiler = fw_compiler
        self.bw_compiler = bw_compiler or fw_compiler
        self.inference_compiler = inference_compiler or fw_compiler
        self.partitioner = as_partitioner(preferred_partition(self.bw_compiler) if partition_fn is None
                                          else partition_fn)
        self.decompositions = decompositions
        # where a tensor the function reads as a constant is kept, as (attribute dict, name); aot_module's
        self.constant_holder: Callable[[torch.Tensor], tuple[dict[str, Any], str] | None] = lambda t: None
        self.cache: dict[Any, _Compiled] = {}
        self.captures = 0  # how many times a signature was captured (``_note_capture``)
        self._last_key: Any = None
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "aot_function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            # the common call, tensors only: its spec is known without walking the arguments, and
            # the count stands for it in the key (a spec hashes recursively)
            return self._call_leaves(list(args), _tensors_spec(len(args)), list(range(len(args))), len(args))
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        return self._call_leaves(leaves, spec, tensor_pos, spec)

    def call_module(self, state: Sequence[torch.Tensor], attributes: Any, args: Sequence[torch.Tensor]) -> Any:
        """``self(state, attributes, *args)`` where ``args`` are tensors (``aot_module``'s common call),
        without walking the arguments: the spec is known from the two counts."""
        n, m = len(state), len(args)
        return self._call_leaves([*state, attributes, *args], _module_call_spec(n, m),
                                 [*range(n), *range(n + 1, n + 1 + m)], ("module", n, m))

    def _call_leaves(self, leaves: list, spec: Any, tensor_pos: list[int], structure: Any) -> Any:
        """Run (compiling first if new) the signature of a call flattened to ``leaves``; ``structure``
        stands for ``spec`` in the cache key."""
        if torch._C._functorch.maybe_current_level() is not None:
            raise TracingError(
                f"{self.__name__} was called inside a torch.func transform (grad, vmap, jacrev, jvp, ...), which "
                "cannot see into a compiled function; compile the transformed function instead, "
                f"aot_function(torch.func.grad(f), ...), or call {self.__name__} outside the transform "
                "(torch.autograd.grad and torch.autograd.functional work on it)")
        tensors = [leaves[i] for i in tensor_pos]
        key = self._key(leaves, structure, tensor_pos)
        compiled = self.cache.get(key)
        if compiled is None or (compiled.constants and any(c.changed() for c in compiled.constants)):
            # new, or a tensor the graph holds as a constant was written since: eager reads its new values
            self._note_capture(key)
            with _gc_paused():
                compiled = self.cache[key] = self._compile(leaves, spec, tensor_pos, tensors, None)
        self._last_key = key
        if compiled.mutated_inputs:
            plan = _alias_plan(tensors, compiled.mutated_inputs)
            if plan is not None:
                variant = compiled.aliased.get(plan)
                if variant is None:
                    with _gc_paused():
                        variant = compiled.aliased[plan] = self._compile(leaves, spec, tensor_pos, tensors, plan)
                compiled, tensors = variant, plan.graph_inputs(tensors)
        return _run(compiled, tensors)

    def _note_capture(self, key: Any) -> None:
        """Count captures; at ``RECAPTURE_WARNING`` and every doubling, say what changed since the last call
        (a Python counter the forward bumps, ``self.steps += 1``, makes every call capture anew)."""
        self.captures += 1
        if self.captures < RECAPTURE_WARNING or self.captures & (self.captures - 1):
            return
        last = self._last_key
        changes = (["the tensors' shapes, dtypes or the argument structure"] if last is None or len(last) != len(key)
                   else [c for j, (new, old) in enumerate(zip(key, last)) if new != old for c in _changes(j, old, new)])
        warnings.warn(f"{self.__name__} was captured and compiled {self.captures} times; since the previous call, "
                      f"{'; '.join(changes[:6]) or 'a constant it reads was written in place'} changed. Every new "
                      "value of what a compiled function is guarded on (shapes, Python numbers it reads, module "
                      "attributes) captures it again: keep values that change every call in tensors (a buffer, "
                      "an argument)", RecaptureWarning, stacklevel=4)

    @staticmethod
    def _key(leaves: list, structure: Any, tensor_pos: list[int]) -> Any:
        # the default dtype decides what ``torch.zeros(3)`` or ``torch.tensor(0.1)`` inside makes
        parts: list[Any] = [structure, torch.is_grad_enabled(), autocast_state(), torch.get_default_dtype()]
        j = 0
        for i, x in enumerate(leaves):
            if j < len(tensor_pos) and tensor_pos[j] == i:
                parts.append((tuple(x.shape), x.dtype, x.device, x.requires_grad))
                j += 1
            else:
                parts.append(_guard_value(x, i))
        return tuple(parts)

    def _compile(self, leaves: list, spec: Any, tensor_pos: list[int], tensors: list[torch.Tensor],
                 plan: _AliasPlan | None) -> _Compiled:

        def fn_flat(ts: Sequence[torch.Tensor]) -> Any:
            if plan is not None:
                ts = plan.user_tensors(ts, len(tensor_pos))
            new_leaves = list(leaves)
            for i, t in zip(tensor_pos, ts):
                new_leaves[i] = t
            a, k = pytree.tree_unflatten(new_leaves, spec)
            return self.fn(*a, **k)

        inputs = tensors if plan is None else plan.graph_inputs(tensors)
        captured = capture_flat(fn_flat, inputs, decompositions=self.decompositions)
        if torch.is_grad_enabled():  # eager would give them gradients
            refuse_trainable_constants(
                captured.closed_over, "compiled, they would be constants and get no gradient, where eager gives "
                "them one. Compile the module itself with aot_module (its parameters become inputs; a tensor a "
                "module keeps in a plain attribute must be registered as an nn.Parameter), or pass the tensors "
                "as arguments")
        graph, views, links = captured.graph, captured.output_views, captured.autograd_links
        if views:  # outputs that are views of inputs or outputs are rebuilt from them, not computed
            dropped = {v.output for v in views}
            graph = eliminate_dead_code(graph.replace(
                outputs=tuple(o for k, o in enumerate(graph.outputs) if k not in dropped)))
            links = tuple(r for k, r in enumerate(links) if k not in dropped)
        examples = list(inputs)
        if captured.key_input is not None:
            examples.append(torch.zeros(2, dtype=torch.uint32))
        wrt = [i for i, t in enumerate(inputs) if t.requires_grad and is_inexact(graph.inputs[i].dtype)]
        if not graph.outputs:  # every output is a view of an input, and nothing is mutated
            run: Any = _no_outputs
        elif not (torch.is_grad_enabled() and wrt):
            run = InferenceFunction(graph, self.inference_compiler, examples)
        else:
            run = PartitionedFunction(graph, wrt, fw_compiler=self.fw_compiler, bw_compiler=self.bw_compiler,
                                      partitioner=self.partitioner, example_inputs=examples,
                                      mutated_inputs=captured.mutated_inputs, autograd_links=links,
                                      sparse_gradients=captured.sparse_gradients)
        rebuilt = {v.output for v in views}
        computed = [k for k in range(captured.num_outputs) if k not in rebuilt]
        layouts = [(j, strides) for j, k in enumerate(computed) if (strides := captured.output_strides[k]) is not None]
        return _Compiled(run, captured.num_outputs - len(views), captured.mutated_inputs, captured.out_spec,
                         captured.key_input, plan, views, self._constants(captured.closed_over), layouts)

    def _constants(self, closed_over: Sequence[ClosedOver]) -> list[_Constant]:
        constants = []
        for record in closed_over:
            tensor = record.tensor() if record.tensor is not None else None
            if tensor is not None:
                constants.append(_Constant(record, *(self.constant_holder(tensor) or (None, ""))))
        return constants


def _changes(j: int, old: Any, new: Any) -> list[str]:
    """What differs between part ``j`` of two cache keys (``_key``), in words."""
    if j < _KEY_CONTEXT:
        return [("the argument structure", "grad mode", "autocast", "the default dtype")[j]]
    if isinstance(new, tuple) and len(new) == 2 and isinstance(new[0], type):  # a guarded value: (type, value)
        new = new[1]
        old = old[1] if isinstance(old, tuple) and len(old) == 2 else old
        if hasattr(new, "changes_since"):  # a module's attributes, by name
            return new.changes_since(old)
    return [f"argument leaf {j - _KEY_CONTEXT}: {old!r} -> {new!r}"]


_KEY_CONTEXT = 4  # a cache key's leading parts (``_key``), before one per argument leaf


def _no_outputs(_tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return ()


@functools.lru_cache(maxsize=None)
def _tensors_spec(n: int) -> Any:
    """The pytree spec of ``(args, {})`` for ``n`` positional leaves: what flattening a call of
    ``n`` tensors gives."""
    return pytree.tree_flatten((tuple(range(n)), {}))[1]


@functools.lru_cache(maxsize=None)
def _module_call_spec(n: int, m: int) -> Any:
    """The pytree spec of ``((state, attributes, *args), {})`` for ``n`` state tensors, one attributes
    leaf and ``m`` tensor arguments: what flattening ``aot_module``'s call gives."""
    return pytree.tree_flatten(((tuple(range(n)), _LEAF, *range(m)), {}))[1]


_LEAF = object()  # a pytree leaf that stands for the attributes


def _run(compiled: _Compiled, tensors: list[torch.Tensor]) -> Any:
    """Run one compiled signature on the graph's input tensors; write mutations back; rebuild the outputs."""
    with autocast_off():  # the graph holds autocast's casts already
        if compiled.key_input is None:
            outs = compiled.run(tensors)
        else:  # a fresh key per call; the autograd Function keeps it for double backward
            outs = compiled.run([*tensors, new_rng_key(tensors[0].device if tensors else None)])
    n = compiled.num_outputs
    for i, new in zip(compiled.mutated_inputs, outs[n:]):
        target = tensors[i]
        # as eager: the input's new value carries its gradient history, except for a leaf that requires
        # grad (or a view of one), which eager could only have mutated under no_grad() (an optimizer step)
        base = target if target._base is None else target._base
        if new.requires_grad and torch.is_grad_enabled() and not (base.is_leaf and base.requires_grad):
            target.copy_(new)
        else:
            with torch.no_grad():
                target.copy_(new)
    outs = outs[:n]
    if compiled.layouts:
        outs = with_eager_layouts(outs, compiled.layouts)
    if not compiled.output_views:
        return compiled.out_spec.rebuild(outs)
    return compiled.out_spec.rebuild(rebuild_outputs(outs, compiled.output_views, tensors))


def _guard_value(x: Any, i: int) -> Any:
    """What a non-tensor argument is guarded on: its type and value (a slice by its bounds)."""
    if isinstance(x, slice):  # slices are unhashable before Python 3.12
        return (slice, _guard_value(x.start, i), _guard_value(x.stop, i), _guard_value(x.step, i))
    try:
        hash(x)
    except TypeError:
        raise ArgumentError(f"argument leaf {i} of type {type(x).__name__} is neither a tensor nor "
                            "a hashable constant; reftrace guards on non-tensor values") from None
    if type(x) not in _PLAIN_ARGUMENTS and not isinstance(x, tuple) and flatten_outputs(x)[0]:
        raise ArgumentError(f"argument leaf {i} is a {type(x).__name__} holding tensors; reftrace takes tensors "
                            "in tuples, lists, dicts and types registered with torch.utils._pytree, not inside "
                            "other objects (it would read them as constants). Pass the tensors themselves, or "
                            "register the type with torch.utils._pytree.register_pytree_node")
    return (type(x), x)


_PLAIN_ARGUMENTS = frozenset({bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
                              torch.memory_format, torch.layout, type(Ellipsis)})


def aot_function(fn: Callable[..., Any], fw_compiler: Compiler, bw_compiler: Compiler | None = None,
                 partition_fn: Any = None, decompositions: dict | None = None,
                 num_params_buffers: int = 0, keep_inference_input_mutations: bool = False,
                 inference_compiler: Compiler | None = None, *, dynamic: bool = False,
                 enable_log: bool = True) -> AOTFunction:
    """Capture ``fn``'s forward and backward ahead of time and hand them to the compilers.

    Same signature as ``functorch.compile.aot_function``. ``partition_fn`` may also be a
    reftrace policy ("default", "mincut", "fusion" or a callable ``policy(eqn) -> bool``); by
    default, ``default_partition``, except for a backward compiled by ``xla_compile``, which gets
    ``"fusion"`` (XLA fuses a recomputed elementwise chain into the backward's loops).
    ``num_params_buffers``, ``keep_inference_input_mutations``, ``dynamic`` and
    ``enable_log`` are accepted for compatibility; shapes are always static (guarded).
    """
    del num_params_buffers, keep_inference_input_mutations, enable_log
    if dynamic:
        raise ArgumentError("dynamic=True is not supported: reftrace specialises on shapes and "
                            "recompiles when they change")
    return AOTFunction(fn, fw_compiler, bw_compiler, partition_fn, decompositions, inference_compiler)


class AOTModule(torch.nn.Module):
    """The module ``aot_module`` returns; parameters and buffers stay the original module's.

    A deep copy (``copy.deepcopy``, ``torch.optim.swa_utils.AveragedModel``) compiles the copied module
    afresh with the same compilers: the compiled function traces its own module, so a copy that
    shared it would trace the original's code and attributes (the copy's BatchNorm set to
    ``momentum=None`` ran with the original's 0.1)."""

    def __init__(self, mod: torch.nn.Module, compiled: AOTFunction, guard: ModuleGuard,
                 recompile: Callable[[torch.nn.Module], "AOTModule"]) -> None:
        super().__init__()
        self.orig_module = mod
        self._compiled = compiled
        self._guard = guard
        self._recompile = recompile

    def __deepcopy__(self, memo: dict[int, Any]) -> "AOTModule":
        copied = _recompiled(self._recompile, copy.deepcopy(self.orig_module, memo), self.training)
        memo[id(self)] = copied
        return copied

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (``torch.save(compiled)``) as the module and how to compile it, as a deep copy is: the
        compiled function holds closures, and what it compiled is a cache."""
        return _recompiled, (self._recompile, self.orig_module, self.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state, attributes = self._guard.check()
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            out, rebound = self._compiled.call_module(state.tensors, attributes, args)
        else:
            out, rebound = self._compiled(state.tensors, attributes, *args, **kwargs)
        if rebound:
            rebind(self.orig_module, rebound)
        return out


def _recompiled(recompile: Callable[[torch.nn.Module], AOTModule], mod: torch.nn.Module, training: bool
                ) -> AOTModule:
    compiled = recompile(mod)
    compiled.training = training  # the wrapper's flag only: the module's submodules keep their own
    return compiled


def aot_module(mod: torch.nn.Module, fw_compiler: Compiler, bw_compiler: Compiler | None = None,
               partition_fn: Any = None, decompositions: dict | None = None,
               inference_compiler: Compiler | None = None, **kwargs: Any) -> AOTModule:
    """``aot_function`` for an ``nn.Module``: parameters and buffers become graph inputs.

    Tied weights are one input (their gradient is summed); buffer updates made in the
    forward (BatchNorm running statistics, in place or by reassigning the buffer) are written
    back after each call; every
    submodule's plain attributes (``training``, ``eps``, ...) are part of the guard.
    The module itself is never changed by compiling it.
    """
    if not isinstance(mod, torch.nn.Module):
        raise ArgumentError(f"aot_module expects an nn.Module, got {type(mod).__name__}; use aot_function "
                            "for functions")

    guard = ModuleGuard(mod)

    def functional(tensors: Sequence[torch.Tensor], attributes: Any, *args: Any, **kw: Any) -> Any:
        # ``attributes`` is only a guard: the module traces with its current attributes, and with the
        # state the guard just checked (``tensors`` are its tensors)
        del attributes
        rebound: dict[str, torch.Tensor] = {}  # buffers and attributes the forward rebinds
        out = functional_module(mod, guard.state, rebound)(tensors, *args, **kw)
        return out, rebound

    def constant_holder(tensor: torch.Tensor) -> tuple[dict[str, Any], str] | None:
        for m in mod.modules():
            for key, value in m.__dict__.items():
                if value is tensor:
                    return m.__dict__, key
        return None

    functional.__name__ = type(mod).__name__
    compiled = aot_function(functional, fw_compiler, bw_compiler, partition_fn, decompositions,
                            inference_compiler=inference_compiler, **kwargs)
    compiled.constant_holder = constant_holder
    recompile = functools.partial(aot_module, fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                                  partition_fn=partition_fn, decompositions=decompositions,
                                  inference_compiler=inference_compiler, **kwargs)
    return AOTModule(mod, compiled, guard, recompile)
