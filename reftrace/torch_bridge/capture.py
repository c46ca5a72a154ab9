"""Capturing torch functions and ``nn.Module``s as reftrace Graphs.

torch's own machinery runs the function, as ``make_fx`` would: FakeTensors (no real
compute; a branch on a tensor value raises instead of being silently specialised),
``FunctionalTensorMode`` (AOTAutograd's functionalization) to remove mutations and
views, and ``core_aten_decompositions()`` (plus the caller's ``decompositions``, which
win) to lower composite ops. Where make_fx would record each remaining ATen op as an FX
node, reftrace's mode in that slot translates it through the ATen table
(``reftrace.torch_bridge.aten``) on the spot: one pass, no intermediate graph.

Mutated inputs (``x.add_(1)``, BatchNorm running statistics) become trailing
outputs: graph outputs are ``(*fn outputs, *new values of mutated inputs)``.

Random ops (dropout, bernoulli, rand...) draw from an explicit ``u32[2]`` key: a
function that uses any gets one extra graph input, the key, always the last one
(``Captured.key_input``); see ``reftrace.torch_bridge.aten.random``.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import disable_autocast_cache
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode, autograd_would_have_decomposed

from reftrace import lax, names
from reftrace.errors import (ArgumentError, DataDependentControlFlowError, ReftraceError, TracingError,
                             UnsupportedOperatorError)
from reftrace.graph import Graph
from reftrace.torch_bridge.aten.random import key_stream
from reftrace.torch_bridge.autograd_hooks import autograd_hooks_refused
from reftrace.torch_bridge.autograd_links import autograd_links
from reftrace.torch_bridge.decompositions import decomposition_table
from reftrace.torch_bridge.escapes import EscapeWatch
from reftrace.torch_bridge.output_layouts import dense_strides
from reftrace.torch_bridge.output_views import OutputView, find_output_views
from reftrace.torch_bridge.modules import ModuleState, functional_module, module_state
from reftrace.torch_bridge.outputs import OutputSpec, flatten_outputs
from reftrace.torch_bridge.static_rewrites import StaticShapeRewrites
from reftrace.torch_bridge.trace_settings import compiling_flag, fake_tensor_logs_silenced, mkldnn_disabled
from reftrace.torch_bridge.translate import (ClosedOver, Translator, functional_variant, op_display_name,
                                             unsupported_operator)
from reftrace.torch_bridge.sparse_gradients import SparseGradient
from reftrace.torch_bridge.user_frames import innermost_user_frame, location_from_traceback, torch_module_frame

__all__ = ["Captured", "capture", "capture_flat", "capture_tree"]


@dataclass(frozen=True, eq=False)
class Captured:
    """A captured function: its Graph plus what callers need to map values in and out.

    - ``graph``: inputs are the flat tensors (for a module: its state first, see
      ``reftrace.torch_bridge.modules``); outputs are ``(*fn outputs, *mutations)``.
    - ``num_outputs``: how many leading graph outputs are the function's (flat) outputs.
    - ``mutated_inputs``: for each trailing output, the graph input index it is the new value of.
    - ``out_spec``: how the function's return value is rebuilt from its output tensors
      (``unflatten_outputs``; see ``reftrace.torch_bridge.outputs``).
    - ``in_spec`` / ``static_args`` / ``arg_slots``: pytree spec of the user's arguments, its leaves
      with ``None`` where a tensor goes, and the tensor leaves' positions (for ``flatten_args``);
      ``None`` / ``()`` / ``()`` from ``capture_flat``.
    - ``num_state``: leading inputs that are module parameters and buffers (0 for functions).
    - ``state``: the module's ModuleState, or ``None``.
    - ``key_input``: index of the ``u32[2]`` key input random ops draw from (the last input), or
      ``None`` when the function draws no random numbers. Callers feed a fresh key per call
      (``reftrace.torch_bridge.autograd.new_rng_key``) to get fresh random numbers.
    - ``closed_over``: the real tensors the function read from its enclosing scope, baked into
      the graph as constants (``capture`` refuses those that require grad).
    - ``output_views``: the outputs that are views of inputs (``x.t()``, ``x[0]``, ``x``) or of other
      outputs (``y.view(-1)`` next to ``y``) in eager, with how to rebuild each from its base
      (``reftrace.torch_bridge.output_views``); the graph computes them too, as values.
    - ``autograd_links``: for each graph output, the inputs eager's autograd graph links it to
      (``reftrace.torch_bridge.autograd_links``): also those an in-place overwrite cut off its value.
    - ``output_strides``: for each of the function's outputs, eager's strides where they are dense
      (``reftrace.torch_bridge.output_layouts``), else None.
    - ``sparse_gradients``: the embedding tables (inputs) eager gives a sparse gradient
      (``reftrace.torch_bridge.sparse_gradients``).
    """

    graph: Graph
    num_outputs: int
    mutated_inputs: tuple[int, ...]
    out_spec: OutputSpec
    in_spec: pytree.TreeSpec | None = None
    static_args: tuple[Any, ...] = ()
    arg_slots: tuple[int, ...] = ()
    num_state: int = 0
    state: ModuleState | None = None
    key_input: int | None = None
    closed_over: tuple[ClosedOver, ...] = ()
    output_views: tuple[OutputView, ...] = ()
    autograd_links: tuple[frozenset[int], ...] = ()
    output_strides: tuple[tuple[int, ...] | None, ...] = ()
    sparse_gradients: tuple[SparseGradient, ...] = ()

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """The function's return value, rebuilt around the graph's leading ``num_outputs`` values."""
        return self.out_spec.rebuild(flat[:self.num_outputs])

    def flatten_args(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The user tensors of a call with the captured structure (state inputs not included)."""
        if self.in_spec is None:
            raise ArgumentError("flatten_args needs a capture made by capture_tree")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ArgumentError(f"arguments have structure {spec}, but the graph was captured for {self.in_spec}; "
                                "capture again")
        tensors = []
        for i, (leaf, static) in enumerate(zip(leaves, self.static_args)):
            if i in self.arg_slots:
                if not isinstance(leaf, torch.Tensor):
                    raise ArgumentError(f"argument leaf {i} was a tensor when captured, got {type(leaf).__name__}")
                tensors.append(leaf)
            elif isinstance(leaf, torch.Tensor) or leaf != static:
                raise ArgumentError(f"static argument leaf {i} changed from {static!r} to {leaf!r}; capture again")
        return tensors


# ----------------------------------------------------------------------------- tracing

_DATA_DEPENDENT_HINT = ("Its value is unknown while tracing (tensors are fake), so reftrace will not specialise on "
                        "it; use torch.where / masking instead of Python control flow on tensor values")


_DETACH_OPS = (torch.ops.aten.detach.default, torch.ops.aten.detach_.default)
_METADATA_OPS = (torch.ops.aten.size.default, torch.ops.aten.stride.default, torch.ops.aten.storage_offset.default)


class _TraceState:
    """What the two modes share: the translator, and what the op being dispatched was called under."""

    def __init__(self, table: Mapping[Any, Callable[..., Any]], devices: set[torch.device]) -> None:
        self.translator = Translator()
        self.table = table
        self.devices = devices  # where the inputs live: the only devices a captured value may be on
        self.custom_functions: set[type] = set()  # custom autograd.Functions met (warned about once each)
        self.location: str | None = None  # the user's line behind the op being dispatched
        self.stops = False  # made under no_grad() or by detach(): gradients stop where the value leaves
        self.straight = False  # the ``copy`` that writes an in-place op's result under no_grad()
        # storage of a ``.detach()`` / ``.data`` alias -> the tensor requiring grad it aliases
        self.detached_from: dict[StorageWeakRef, torch.Tensor] = {}
        # id of a detach's output no op has read yet -> (that output, the detached tensor): among them the
        # copies autograd keeps of the outputs an op saves for its backward (``_unpacked_output``)
        self.unread_detaches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.caller_grad = torch.is_grad_enabled()  # the caller's grad mode (the trace itself runs with grad on)
        self.leaf_inputs: set[int] = set()  # ids of the traced inputs that stand for leaves requiring grad
        self.escapes = EscapeWatch()  # the stand-ins the function sees, refused if kept after the capture

    @contextlib.contextmanager
    def flag(self, name: str) -> Any:
        previous = getattr(self, name)
        setattr(self, name, True)
        try:
            yield
        finally:
            setattr(self, name, previous)


class _UserFrames(TorchDispatchMode):
    """Notes the user's line behind every ATen op, and stops data-dependent values at their source.

    It sits above functionalization, so it sees ops as the user called them and the
    ops made beneath it (decompositions included) inherit the user's line. Ops run
    under ``torch.no_grad()`` and ``detach`` are flagged ``stops``: reftrace's own VJP
    must not differentiate through what torch autograd would not.
    """

    def __init__(self, state: _TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._linalg_check_errors.default:
            return None  # raises on values (a singular matrix); a capture cannot: results are inf/NaN instead
        state = self.state
        state.location = innermost_user_frame()
        stop = func in _DETACH_OPS
        if stop:
            unpacked = _unpacked_output(state, args[0])
            if unpacked is not None:
                args, stop = (unpacked, *args[1:]), False
        elif state.unread_detaches:
            _note_reads(state, args)
        if not stop and not torch.is_grad_enabled():
            function = _autograd_function_running()
            stop = function is None
            if function is not None and function not in state.custom_functions and func.namespace != "reftrace":
                # (reftrace's own ops, ``reftrace::*``, come wrapped in one too: their composites have rules)
                state.custom_functions.add(function)
                warnings.warn(f"{function.__qualname__} is a custom torch.autograd.Function (at "
                              f"{innermost_user_frame()}): reftrace differentiates its forward with its own "
                              "rules, so its custom backward is not used. If the backward is not the "
                              "forward's true derivative (a straight-through estimator, gradient clipping), "
                              "gradients will differ from eager; torch.compile(backend='reftrace') runs such "
                              "Functions eagerly", CustomBackwardIgnoredWarning, stacklevel=2)
        owner = None if stop else _detached_owner(state, func, args)
        if state.leaf_inputs and state.caller_grad and not stop and owner is None:
            _refuse_write_into_leaf(state, func, args)
        try:
            if stop and func not in _DETACH_OPS and _writes_float_tensor(func, args):
                out = _mutate_straight_through(state, func, args, kwargs or {})
            elif owner is not None:  # a write through ``.data`` / ``.detach()``: autograd does not see it either
                out = _mutate_straight_through(state, func, args, kwargs or {}, owner)
            elif stop:  # ops made for this one carry the flag; the translator stops gradients where they leave
                with state.flag("stops"):
                    out = func(*args, **(kwargs or {}))
            else:
                out = func(*args, **(kwargs or {}))
        except (ReftraceError, DataDependentControlFlowError):
            raise
        except Exception as err:
            if _is_missing_fake_impl(err):
                raise unsupported_operator(func, innermost_user_frame()) from None
            if type(err) in (RuntimeError, ValueError, IndexError, TypeError) and not _is_functionalization_error(err):
                # the user's code is wrong for these shapes/dtypes (eager torch raises the same): say where
                raise TracingError(f"{op_display_name(func)} failed at {innermost_user_frame()}: {err}") from None
            raise
        if func in _DETACH_OPS and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            state.detached_from[StorageWeakRef(out.untyped_storage())] = args[0]
        if stop and func in _DETACH_OPS:
            state.unread_detaches[id(out)] = (out, args[0])
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(out, (torch.SymInt, torch.SymFloat,
                                                                                     torch.SymBool)):
            raise DataDependentControlFlowError(
                f"data-dependent control flow: a tensor value was read as a Python number (.item(), .tolist(), "
                f"bool(), if/while on a tensor) (at {innermost_user_frame()}{torch_module_frame()}). "
                f"{_DATA_DEPENDENT_HINT}.")
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if isinstance(t, FunctionalTensor):
                state.escapes.note(t, state.location)
            if t.device not in state.devices and t.device.type != "meta" and not (t.device.type == "cpu"
                                                                                  and t.ndim == 0):
                raise UnsupportedOperatorError(
                    f"{op_display_name(func)} makes a tensor on {t.device}, but the function's inputs are on "
                    f"{' and '.join(sorted(map(str, state.devices)))} (at {innermost_user_frame()}); graph values "
                    "carry no device, so reftrace cannot honour a device change inside a compiled function. "
                    "Move the tensors before calling it")
            if not all(isinstance(d, int) for d in t.shape):
                raise DataDependentControlFlowError(
                    f"data-dependent control flow: the output shape of {op_display_name(func)} depends on tensor "
                    f"values (at {innermost_user_frame()}). reftrace captures static shapes; use masking with "
                    "torch.where instead of nonzero / masked_select / boolean indexing.")
        return out


class _Translating(TorchDispatchMode):
    """Between functionalization and fake tensors (make_fx's proxy slot): translates each functional ATen op.

    It applies the decomposition table (and CompositeImplicitAutograd decompositions)
    as make_fx does, lets FakeTensorMode compute the op's output metadata, and hands
    the op to the Translator, which emits the reftrace equations right away: no
    intermediate FX graph is built.
    """

    def __init__(self, state: _TraceState) -> None:
        super().__init__()
        self.state = state
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.tracer = _NoTensorTracker()
        self.enter_stack: list[Any] = []

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True

    def __enter__(self) -> "_Translating":
        self.enter_stack.append(torch.utils._python_dispatch._unset_infra_mode(self._mode_key))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        previous = self.enter_stack.pop()
        if previous is not None:
            torch.utils._python_dispatch._push_mode(previous)

    def __sym_dispatch__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        # arithmetic on a data-dependent size (after nonzero): evaluated, not recorded; _UserFrames
        # refuses the op that made the size
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        state = self.state
        decomposition = state.table.get(func)
        if decomposition is not None:
            with self:
                out = decomposition(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func not in _METADATA_OPS and autograd_would_have_decomposed(func, pytree.tree_leaves((args, kwargs))):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is torch.ops.aten.is_nonzero.default:  # as make_fx: reads the value (data-dependent)
            with self:
                torch._check(args[0].numel() == 1,
                             lambda: "Boolean value of Tensor with more than one value is ambiguous")
                return (args[0] != 0).item()
        if func is torch.ops.aten.lift_fresh.default:  # the copy keeps a later in-place op off the constant
            func = torch.ops.aten.lift_fresh_copy.default
        out = _batch_norm_outputs(*args, **kwargs) if func is _BATCH_NORM else None
        if out is None:
            out = func(*args, **kwargs)
        state.translator.call(func, args, kwargs, out, location=state.location, stops=state.stops,
                              straight=state.straight)
        return out


_BATCH_NORM = torch.ops.aten._native_batch_norm_legit_functional.default


def _batch_norm_outputs(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: bool,
                        momentum: float, eps: float) -> tuple[torch.Tensor, ...] | None:
    """Fake outputs of BatchNorm's functional op (the one that returns new running statistics),
    made directly from its simple metadata rule.

    The translator only needs the outputs' metadata, and torch's fake kernel for this op runs
    the whole Python decomposition on fake tensors for every new shape: about a fifth of
    resnet18's capture. ``out`` is laid out like a dense input; the saved mean and rstd are ``(C,)`` in
    the input's dtype (``(0,)`` outside training); the new running statistics are like the old.
    ``tests/torch_bridge/test_capture.py`` checks this against the fake kernel. Returns None
    (use the kernel) for inputs this rule does not cover.
    """
    if not (isinstance(x, FakeTensor) and isinstance(running_mean, FakeTensor)
            and isinstance(running_var, FakeTensor) and x.ndim >= 2):
        return None
    if x.is_contiguous():
        out_stride = x.stride()
    elif x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out_stride = x.stride()
    else:
        return None

    def fake(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        with no_dispatch():  # a plain meta tensor, beneath the fake mode this runs inside
            meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        return FakeTensor(x.fake_mode, meta, x.device)

    n = x.shape[1] if training else 0
    return (fake(x.shape, out_stride, x.dtype), fake((n,), (1,), x.dtype), fake((n,), (1,), x.dtype),
            fake(running_mean.shape, running_mean.stride(), running_mean.dtype),
            fake(running_var.shape, running_var.stride(), running_var.dtype))


class _NoTensorTracker:
    """FunctionalTensorMode asks the proxy-slot mode's tracer for FX nodes to annotate view replays with."""

    class _Map:
        def __getitem__(self, t: torch.Tensor) -> Any:
            return _NO_NODE

    tensor_tracker = _Map()


class _NoNode:
    class proxy:  # noqa: N801 - mirrors make_fx's tracker entries: ``entry.proxy.node``
        node = None


_NO_NODE = _NoNode()


def _writes_float_tensor(func: Any, args: Any) -> bool:
    return (functional_variant(func) is not None and bool(args) and isinstance(args[0], torch.Tensor)
            and args[0].is_floating_point())


def _refuse_write_into_leaf(state: _TraceState, func: Any, args: Any) -> None:
    """Eager refuses an in-place op, under grad mode, on a leaf that requires grad or a view of one."""
    if _writes_float_tensor(func, args) and (id(args[0]) in state.leaf_inputs
                                             or id(args[0]._base) in state.leaf_inputs):
        raise TracingError(f"{op_display_name(func)} at {innermost_user_frame()} writes in place into a tensor "
                           "that requires grad and has no history (a leaf: an argument, a parameter), or a view "
                           "of one, with grad mode on; eager torch refuses it too (\"a leaf Variable that "
                           "requires grad is being used in an in-place operation\"). Write under "
                           "torch.no_grad(), through .data, or into a copy")


def _detached_owner(state: _TraceState, func: Any, args: Any) -> torch.Tensor | None:
    """For an in-place op writing into a ``.detach()`` / ``.data`` alias of a tensor that requires grad
    (``self.weight.data.mul_(0.5)``), with grad mode on: that tensor; else None."""
    if not state.detached_from or not _writes_float_tensor(func, args) or args[0].requires_grad:
        return None
    return state.detached_from.get(StorageWeakRef(args[0].untyped_storage()))


def _unpacked_output(state: _TraceState, detached: Any) -> torch.Tensor | None:
    """The op output autograd is unpacking, where this ``detach`` is that unpacking in a backward that
    records (``torch.autograd.grad(..., create_graph=True)`` inside the function), else None.

    An op that saves its own output for the backward (``exp``, ``tanh``, ``sigmoid``, softmax) keeps a
    detached copy of it, and unpacks it with a second ``detach``: both reach the dispatch as the ``detach``
    a user writes. In eager the unpacked tensor carries the output's history, so a gradient of the
    gradient flows through it; read as a ``detach`` it stopped (a PINN's loss on ``du/dx`` trained
    ``tanh`` layers with the wrong gradient). Such a copy is a detach output nothing read in the forward;
    one the user made and then used is not taken for it.
    """
    if not isinstance(detached, torch.Tensor) or not state.unread_detaches:
        return None
    if torch._C._current_graph_task_id() == -1 or not torch.is_grad_enabled():
        return None
    saved = state.unread_detaches.get(id(detached))
    return None if saved is None else saved[1]


def _note_reads(state: _TraceState, args: Any) -> None:
    """Forget the unread detach outputs an op reads: a tensor the user detached and then used."""
    for a in args:
        if isinstance(a, (list, tuple)):
            for b in a:
                state.unread_detaches.pop(id(b), None)
        else:
            state.unread_detaches.pop(id(a), None)


def _mutate_straight_through(state: _TraceState, func: Any, args: Any, kwargs: Any,
                             target: torch.Tensor | None = None) -> Any:
    """An in-place op torch autograd does not record (under ``no_grad()``, or into a ``.detach()`` /
    ``.data`` alias of ``target``): the tensor takes the new value, its gradient passes unchanged.

    The tensor keeps its history and the gradient reaching it flows to its old value as if the
    op were the identity (torch's ``cosine_similarity`` clamps norms this way; a module that
    clips ``self.weight.data`` in its forward still trains ``weight``). The new value is computed
    with gradients stopped, then a ``copy`` flagged ``straight`` joins it to the old value.
    """
    target = args[0] if target is None else target
    while target._base is not None:  # writing through a view writes its base: pass the base straight through
        target = target._base
    before = torch.ops.aten.clone.default(target)
    with state.flag("stops"):
        out = func(*args, **kwargs)
    with state.flag("straight"):
        torch.ops.aten.copy_.default(before, target)
    torch.ops.aten.copy_.default(target, before)
    return out


class CustomBackwardIgnoredWarning(UserWarning):
    """A captured custom ``torch.autograd.Function`` whose backward reftrace does not use."""


def _autograd_function_running() -> type | None:
    """The custom ``torch.autograd.Function`` whose forward is running (autograd runs it with grad off), or None.

    reftrace differentiates that forward itself (the custom backward cannot be honoured),
    so its ops must not be mistaken for a ``no_grad()`` region.
    """
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount:
            ctx = frame.f_locals.get(code.co_varnames[0])
            if isinstance(ctx, torch.autograd.function.FunctionCtx):
                return getattr(ctx, "_forward_cls", type(ctx))
        frame = frame.f_back
    return None


def _is_functionalization_error(err: Exception) -> bool:
    return "mutating a non-functional tensor with a functional tensor" in str(err)


def _is_missing_fake_impl(err: Exception) -> bool:
    from torch._subclasses.fake_tensor import UnsupportedOperatorException
    return isinstance(err, UnsupportedOperatorException) or (
        isinstance(err, RuntimeError) and ("no fake impl" in str(err) or "meta kernel" in str(err).lower()))


def _data_dependent_errors() -> tuple[type[BaseException], ...]:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    return (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)


class _Functionalized(NamedTuple):
    """What running the function functionalized gives (``_run_functionalized``)."""

    results: list[torch.Tensor]  # the (fake) ``[*outputs, *new values of mutated inputs]``
    out_spec: OutputSpec  # rebuilds the function's return value from its output tensors
    mutated: tuple[int, ...]  # the mutated inputs' indices
    views: tuple[OutputView, ...]  # the outputs that are views of inputs
    links: tuple[frozenset[int], ...]  # the inputs eager's autograd links each result to
    strides: tuple[tuple[int, ...] | None, ...]  # the outputs' eager strides, where dense


def _run_functionalized(fn: Callable[[list[torch.Tensor]], Any], fakes: Sequence[torch.Tensor],
                        state: _TraceState) -> _Functionalized:
    """Runs ``fn`` functionalized, on fake tensors."""
    with FunctionalTensorMode():
        inputs = [FunctionalTensor.to_functional(t) for t in fakes]
        state.leaf_inputs = {id(w) for w, t in zip(inputs, fakes) if t.requires_grad and t.is_leaf}
        with _UserFrames(state), StaticShapeRewrites(), autograd_hooks_refused():
            out = fn(list(inputs))
        state.location = None
        leaves, spec = flatten_outputs(out)
        for t in inputs:
            torch._sync(t)
        mutated = tuple(i for i, t in enumerate(inputs) if torch._functionalize_has_data_mutation(t.elem))
        for i, t in enumerate(inputs):
            # an ``out=`` tensor resized by the op keeps its old shape on the wrapper, not on its value
            shape = tuple(_unwrap(t).shape) if i in mutated else tuple(t.shape)
            if shape != tuple(fakes[i].shape) or tuple(t.shape) != tuple(fakes[i].shape):
                raise TracingError(f"input {i} had its shape changed in place ({tuple(fakes[i].shape)} -> "
                                   f"{shape if shape != tuple(fakes[i].shape) else tuple(t.shape)}); reftrace "
                                   "captures value mutations only")
        views = find_output_views(leaves, inputs)
        links = autograd_links([*leaves, *(inputs[i] for i in mutated)], inputs)
        strides = tuple(dense_strides(t) for t in leaves)  # a FunctionalTensor has eager's strides
        results = [_unwrap(t) for t in leaves] + [_unwrap(inputs[i]) for i in mutated]
    return _Functionalized(results, spec, mutated, views, links, strides)


def _unwrap(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, FunctionalTensor):
        torch._sync(t)
        return torch._from_functional_tensor(t.elem)
    return t


def _trace(fn: Callable[[list[torch.Tensor]], Any], tensors: Sequence[torch.Tensor],
           table: Mapping[Any, Callable[..., Any]]) -> Captured:
    """``fn`` run on fake tensors, functionalized, with every ATen op translated as it is dispatched
    (``capture_flat``'s work)."""
    devices = {t.device for t in tensors} or {torch.device("cpu")}
    state = _TraceState(table, devices)
    translator = state.translator
    fake_mode = FakeTensorMode(allow_fallback_kernels=True, allow_non_fake_inputs=True, shape_env=ShapeEnv(),
                               static_shapes=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_tensor_logs_silenced())
        stack.enter_context(lax.tracing(translator.builder))
        keys = stack.enter_context(key_stream(translator.builder))
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
        for fake in fakes:
            translator.input(fake)
        stack.enter_context(enable_python_dispatcher())  # native_batch_norm -> its correctly-schema'd variants
        stack.enter_context(mkldnn_disabled())  # LSTM decomposes to portable ops, not mkldnn's kernel
        stack.enter_context(torch.enable_grad())  # the differentiable (decomposable) paths, no fused fast paths
        stack.enter_context(compiling_flag())
        stack.enter_context(disable_autocast_cache())
        stack.enter_context(fake_mode)
        stack.enter_context(_Translating(state))
        try:
            run = _run_functionalized(fn, fakes, state)
        except ReftraceError as err:
            raise err.with_traceback(None) from None
        except _data_dependent_errors() as err:
            where = location_from_traceback(err.__traceback__)
            func = getattr(err, "func", None)  # fake tensors' own refusals name the op
            if func is None:
                what, hint = "a branch or size depends on a tensor value", _DATA_DEPENDENT_HINT
            else:
                what = f"{op_display_name(func)} computes a shape or a returned value from tensor values"
                hint = ("reftrace captures static shapes: run it outside the compiled function, or pass a "
                        f"decomposition with static shapes (decompositions={{torch.ops.{func}: ...}})")
            raise DataDependentControlFlowError(
                f"data-dependent control flow: {what}{f' (at {where})' if where else ''}. {hint}.") from None
        except RuntimeError as err:
            if not _is_functionalization_error(err):
                raise
            where = location_from_traceback(err.__traceback__)
            raise TracingError(
                f"an in-place operation writes into a tensor computed only from constants the function reads from "
                f"its enclosing scope{f' (at {where})' if where else ''}; torch's functionalization cannot "
                "capture that: pass those tensors as arguments (or register them as module buffers)") from None
    try:
        graph = translator.finish(run.results, keys.key)
    except ReftraceError as err:
        raise err.with_traceback(None) from None
    state.detached_from.clear()  # the capture's own references to the stand-ins
    state.unread_detaches.clear()
    state.escapes.check()
    key_input = len(tensors) if len(graph.inputs) > len(tensors) else None  # the key follows the tensors
    return Captured(graph=graph, num_outputs=run.out_spec.num_tensors, mutated_inputs=run.mutated,
                    out_spec=run.out_spec, key_input=key_input, closed_over=tuple(translator.closed_over),
                    output_views=run.views, autograd_links=run.links, output_strides=run.strides,
                    sparse_gradients=translator.sparse_gradients)


def _check_tensors(tensors: Sequence[Any], what: str) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{what} {i} is a {type(t).__name__}; capture takes torch tensors")
        if t.is_quantized or t.is_sparse or t.layout != torch.strided or t.dtype == torch.complex32:
            raise ArgumentError(f"{what} {i} ({t.dtype}, {t.layout}) is not supported; reftrace captures dense "
                                "bool, integer, floating and complex64/complex128 tensors")
        out.append(t)
    return out


def capture_flat(fn: Callable[[list[torch.Tensor]], Any], example_tensors: Sequence[torch.Tensor], *,
                 decompositions: Mapping[Any, Callable[..., Any]] | None = None) -> Captured:
    """Capture ``fn(list_of_tensors) -> tensors`` at the shapes/dtypes of ``example_tensors``.

    ``fn`` may return one tensor or a (nested) tuple/list/dict of tensors; the graph's
    inputs are ``example_tensors`` in order, then the ``u32[2]`` random key if ``fn`` draws
    random numbers (``key_input``). No real computation runs.
    """
    if not callable(fn):
        raise ArgumentError(f"capture_flat expects a callable, got {type(fn).__name__}")
    tensors = _check_tensors(list(example_tensors), "example tensor")
    return _trace(fn, tensors, decomposition_table(decompositions))


_STATIC_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def capture_tree(fn_or_module: Callable[..., Any], *args: Any,
                 decompositions: Mapping[Any, Callable[..., Any]] | None = None,
                 kwargs: Mapping[str, Any] | None = None) -> Captured:
    """Capture a function or ``nn.Module`` called as ``fn(*args, **kwargs)``; arguments may be pytrees
    of tensors.

    Tensor leaves of ``args`` and ``kwargs`` become graph inputs, in that order; ``None``, numbers, strings, dtypes
    and devices are static (baked into the graph). For a module, its parameters and
    buffers are the leading inputs (``reftrace.torch_bridge.modules``), and train()/
    eval() mode is the module's current one.
    """
    if not callable(fn_or_module):
        raise ArgumentError(f"capture expects a function or nn.Module, got {type(fn_or_module).__name__}")
    leaves, in_spec = pytree.tree_flatten((args, dict(kwargs or {})))
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, (torch.Tensor,) + _STATIC_LEAVES):
            raise ArgumentError(f"argument leaf {i} is a {type(leaf).__name__}; pass torch tensors (or static "
                                "Python numbers/None) to capture")
    tensor_slots = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    static = tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
    user_tensors = _check_tensors([leaves[i] for i in tensor_slots], "tensor argument")

    if isinstance(fn_or_module, torch.nn.Module):
        state = module_state(fn_or_module)
        call = functional_module(fn_or_module, state)
    else:
        state, call = None, None
    num_state = len(state) if state is not None else 0

    def flat_fn(flat: list[torch.Tensor]) -> Any:
        rebuilt = list(static)
        for slot, t in zip(tensor_slots, flat[num_state:]):
            rebuilt[slot] = t
        call_args, call_kwargs = pytree.tree_unflatten(rebuilt, in_spec)
        if call is not None:
            return call(flat[:num_state], *call_args, **call_kwargs)
        return fn_or_module(*call_args, **call_kwargs)

    example = list(state.tensors if state is not None else ()) + user_tensors
    captured = capture_flat(flat_fn, example, decompositions=decompositions)
    arg_names = [_argument_name(path) for path, leaf in pytree.tree_flatten_with_path((args, dict(kwargs or {})))[0]
                 if isinstance(leaf, torch.Tensor)]
    graph = _named(captured, state, arg_names)
    return Captured(graph=graph, num_outputs=captured.num_outputs,
                    mutated_inputs=captured.mutated_inputs, out_spec=captured.out_spec, in_spec=in_spec,
                    static_args=static,
                    arg_slots=tensor_slots, num_state=num_state, state=state,
                    key_input=captured.key_input, closed_over=captured.closed_over,
                    output_views=captured.output_views, autograd_links=captured.autograd_links,
                    output_strides=captured.output_strides, sparse_gradients=captured.sparse_gradients)


LARGE_CONSTANT_BYTES = 1024
"""Closed-over constants larger than this are reported (``LargeConstantWarning``)."""


class LargeConstantWarning(UserWarning):
    """The traced function read a large tensor from its enclosing scope; the graph holds a copy."""


def refuse_trainable_constants(closed_over: Sequence[ClosedOver], consequence: str) -> None:
    """A graph value must not silently lose gradients: a closed-over tensor that requires grad (a
    parameter reached through a closure) would be baked in as a constant and get no gradient.
    ``consequence``: what that means for the caller, and what to do instead."""
    trainable = [c for c in closed_over if c.requires_grad]
    if trainable:
        listed = "; ".join(c.describe() for c in trainable[:4]) + (" ..." if len(trainable) > 4 else "")
        raise TracingError(f"the function reads {len(trainable)} tensor(s) that require grad from its enclosing "
                           f"scope ({listed}); {consequence} (or read them under .detach() / torch.no_grad() to "
                           "use them as constants on purpose)")


def _check_closed_over(closed_over: Sequence[ClosedOver]) -> None:
    """No trainable constants (``refuse_trainable_constants``); large constants are copied into the
    graph: say so."""
    refuse_trainable_constants(
        closed_over, "rt.trace would bake them into the graph as constants, and vjp would give them no gradient. "
        "Trace the module itself so its parameters become named inputs (rt.trace(model, ids, use_cache=False) "
        "rather than rt.trace(lambda ids: model(ids).logits, ids); keyword arguments go to the module), or pass "
        "the tensors as arguments")
    large = [c for c in closed_over if c.nbytes > LARGE_CONSTANT_BYTES]
    if large:
        listed = "; ".join(c.describe() for c in large[:4]) + (" ..." if len(large) > 4 else "")
        warnings.warn(f"the graph holds {len(large)} constant(s) over {LARGE_CONSTANT_BYTES} bytes read from the "
                      f"function's enclosing scope ({listed}); pass them as arguments to make them inputs",
                      LargeConstantWarning, stacklevel=4)


def _argument_name(path: tuple[Any, ...]) -> str:
    """``args[0]``, ``args[1][0]``, ``kwargs['mask']`` for a tensor leaf of ``(args, kwargs)``."""
    return ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])


def _named(captured: Captured, state: ModuleState | None, arg_names: Sequence[str]) -> Graph:
    """The captured graph with the names of ``reftrace.names``: parameters, ``buffer(...)``s,
    arguments and the random key in; outputs and ``update(...)``s of mutated inputs out."""
    in_names = [name if is_param else names.buffer(name)
                for name, is_param in zip(state.names, state.is_param)] if state is not None else []
    in_names += arg_names
    if captured.key_input is not None:
        in_names.append("rng_key")
    n = captured.num_outputs
    out_names = ["out"] if n == 1 else [f"out[{i}]" for i in range(n)]
    out_names += [names.update(in_names[i]) for i in captured.mutated_inputs]
    return captured.graph.named(in_names, out_names)


def capture(fn_or_module: Callable[..., Any], *args: Any,
            decompositions: Mapping[Any, Callable[..., Any]] | None = None, **kwargs: Any) -> Graph:
    """The Graph of ``fn_or_module(*args, **kwargs)`` (what ``rt.trace`` returns for torch inputs).

    ``decompositions=`` is capture's own option; every other keyword argument goes to the
    function (``rt.trace(gpt2, ids, use_cache=False)``): tensors become inputs, other values
    are static. Inputs: module parameters, then buffers (see ``modules``), then the tensor
    leaves of ``args`` and of ``kwargs``, then, if the function draws random numbers (dropout in training mode...), a
    ``u32[2]`` key. Outputs: the output tensors (flattened), then new values of mutated inputs.
    Use ``capture_tree`` for the full ``Captured`` record.
    """
    captured = capture_tree(fn_or_module, *args, decompositions=decompositions, kwargs=kwargs)
    _check_closed_over(captured.closed_over)
    if captured.out_spec.bare_static is not None:
        raise TracingError(f"the function returns {captured.out_spec.bare_static} among its outputs, which is not "
                           "a tensor; a Graph's outputs are tensors. Return only tensors (None is allowed), or use "
                           "reftrace.compile.aot_function, which hands static values back as they were")
    return captured.graph

