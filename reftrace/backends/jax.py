"""The JAX backend: the whole graph runs as one ``jax.jit`` computation (one XLA program).

64-bit fidelity: each call runs inside ``jax.enable_x64(True)``, a thread-local
context, so float64/int64 stay 64-bit without flipping the user's global JAX config.
"""
from __future__ import annotations

import functools
import os
import sys
import weakref
from typing import Any, Sequence

import jax
import numpy as np

from reftrace.backends import jax_nn  # noqa: F401 - its rows complete jax_rules
from reftrace.backends.jax_graph import graph_function
from reftrace.backends.signature import check_args, is_torch_tensor
from reftrace.errors import ArgumentError
from reftrace.graph import Aval, Eqn, Graph, Params, Var
from reftrace.primitives import Primitive, infer_avals


XLA_OPTIONS = {"xla_allow_excess_precision": False}
"""Every float16/bfloat16 result rounded to its dtype, as the graph's avals say and torch computes it: by
default XLA may keep an intermediate in float32 inside a fusion (``(x + 0.9).cumprod(0)`` over 600
bfloat16 values gave 0.41 where torch gives 1.0). float32 and float64 computations do not change."""


def tensor_to_jax(tensor: Any, index: int, host_numpy: bool = False) -> Any:
    """A torch tensor as a JAX (or numpy) array with the same dtype and bits (bfloat16, bool, 64-bit).

    DLPack shares the memory when JAX has the tensor's device, else a CPU tensor goes through
    numpy; a tensor that requires grad is detached first (JAX computes no torch gradients).
    With ``host_numpy`` (the caller checked ``numpy_runs_on_cpu()``), a plain CPU tensor comes back
    as a numpy view of its memory: a jitted function takes it without a copy, in a quarter of
    DLPack's time. Call inside ``jax.enable_x64(True)`` so 64-bit dtypes stay 64-bit.
    """
    origin = getattr(tensor, "_reftrace_jax_origin", None)
    if origin is not None and origin[1] == tensor._version:  # made by array_to_tensor, unchanged since
        return origin[0]
    if host_numpy and _numpy_viewable(tensor):
        return tensor.detach().numpy()
    tensor = tensor.detach().resolve_conj().resolve_neg()
    try:
        return jax.dlpack.from_dlpack(tensor)
    except Exception as exc:  # noqa: BLE001 - JAX has no such device, or DLPack refuses the layout
        if tensor.device.type != "cpu":
            raise ArgumentError(f"argument {index} of the JAX-lowered graph is a torch tensor on {tensor.device}, "
                                f"which JAX cannot read here ({type(exc).__name__}: {exc}); pass tensor.cpu()"
                                ) from None
    import torch
    from reftrace.backends.torch_dtypes import numpy_dtype
    if tensor.dtype == torch.bfloat16:  # numpy has no native bfloat16: move the bits, as ml_dtypes' bfloat16
        return tensor.contiguous().view(torch.int16).numpy().view(numpy_dtype(tensor.dtype))
    return tensor.numpy()


def _numpy_viewable(tensor: Any) -> bool:
    """A CPU tensor whose memory numpy can view as it is (``.numpy()`` refuses the rest)."""
    import torch
    return (tensor.device.type == "cpu" and tensor.layout == torch.strided and tensor.dtype != torch.bfloat16
            and not tensor.is_conj() and not tensor.is_neg())


def numpy_runs_on_cpu() -> bool:
    """Whether a numpy argument of a jitted function lands on the CPU (JAX's default device), where it
    may stand in for a CPU tensor's JAX array; with a GPU default, it would move the computation."""
    return jax.default_backend() == "cpu" and jax.config.jax_default_device is None


try:  # jaxlib's own DLPack export: a quarter of ``torch.from_dlpack(array)``'s time (no protocol walk)
    from jax._src.lib import _jax as _jaxlib
    _export_dlpack = _jaxlib.buffer_to_dlpack_managed_tensor
except (ImportError, AttributeError):  # pragma: no cover - another jaxlib: the public protocol
    _export_dlpack = None


def _shared_tensor(array: Any, on_cpu: bool) -> Any:
    """A torch tensor sharing ``array``'s memory through DLPack (raises where DLPack refuses)."""
    import torch
    if on_cpu and _export_dlpack is not None:
        try:
            return torch._C._from_dlpack(_export_dlpack(array, stream=None))
        except Exception:  # noqa: BLE001 - the public protocol decides (and names what it refuses)
            pass
    return torch.from_dlpack(array)


def array_to_tensor(array: Any, on_cpu: bool = False) -> Any:
    """A JAX array as a torch tensor: DLPack shares the memory (bool arrays, which DLPack refuses,
    are copied). The tensor remembers its array, so ``tensor_to_jax`` hands the same array back
    while the tensor is unchanged (a forward's saved values reach the backward without a second
    DLPack import). ``on_cpu``: the caller knows the array is on the CPU (no stream to hand over),
    so the capsule is made directly."""
    import torch
    try:
        tensor = _shared_tensor(array, on_cpu)
    except Exception:  # noqa: BLE001 - e.g. bool arrays; copy instead
        return torch.from_numpy(np.array(array))
    if not tensor.is_inference():  # made under inference_mode: no version counter to tell a change by
        tensor._reftrace_jax_origin = (array, tensor._version)
    return tensor


def _unexpanded(tensor: Any) -> Any:
    """``tensor`` without its expanded dimensions (stride 0, size above 1) where it has some, each
    kept at size 1: the cotangent of ``y.sum()`` is one number expanded to ``y``'s shape, which
    ``.contiguous()`` would write out in full for the computation to read back; other tensors are
    returned as they are (contiguous: DLPack takes no other layout on every device)."""
    if tensor.is_contiguous():
        return tensor
    strides = tensor.stride()
    if 0 in strides:
        index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(strides, tensor.shape))
        tensor = tensor[index]
    return tensor.contiguous()


class _Transferred:
    """A torch tensor's JAX view, kept while the tensor is unchanged: the same object (weakly held), the
    same memory and the same version counter (every in-place op bumps it). Parameters cross once,
    not on every step."""

    __slots__ = ("tensor", "data_ptr", "version", "array")

    def __init__(self, tensor: Any, array: Any) -> None:
        self.tensor = weakref.ref(tensor)
        self.data_ptr, self.version, self.array = tensor.data_ptr(), tensor._version, array

    def holds(self, tensor: Any) -> bool:
        return (self.tensor() is tensor and self.version == tensor._version
                and self.data_ptr == tensor.data_ptr())


def _shares_memory(array: Any, tensor: Any) -> bool:
    """Whether ``array`` reads ``tensor``'s memory, so that it sees every in-place update."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0] == tensor.data_ptr()
    try:
        return array.unsafe_buffer_pointer() == tensor.data_ptr()
    except Exception:  # noqa: BLE001 - an array with no single buffer (sharded, deleted): not shared
        return False


_malloc_warmed = False


def warm_up_malloc() -> None:
    """Put glibc's malloc in the mode it reaches after freeing a large block, once per process.

    XLA on the CPU allocates each output anew on every call (for a training step: activations and
    gradients, several MiB). glibc maps a block above its mmap threshold (128 KiB at start) fresh from
    the OS and returns heap memory above its trim threshold; both thresholds rise only when a mapped
    block is freed. Until a program frees a big enough one, each call page-faults its outputs in again
    (about 2,500 faults, 3 ms of a 13 ms MLP training step on the 2-core machine). Allocating and
    freeing one 32 MiB block raises the thresholds to glibc's dynamic maximum (32 MiB mapped, 64 MiB
    kept), by glibc's own rule, as any program that frees a large tensor does; no setting is
    changed. Another allocator (jemalloc, tcmalloc) just allocates and frees a block.
    ``REFTRACE_MALLOC_WARM_UP=0`` leaves malloc alone.
    """
    global _malloc_warmed
    if _malloc_warmed:
        return
    _malloc_warmed = True
    if os.environ.get("REFTRACE_MALLOC_WARM_UP", "1") == "0" or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        malloc, free = libc.malloc, libc.free
    except (OSError, AttributeError):  # pragma: no cover - no C library symbols to call
        return
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    block = malloc((32 << 20) - (64 << 10))  # under glibc's 32 MiB cap on the dynamic threshold
    if block:
        free(block)


class JaxExecutable:
    """``graph`` compiled by XLA; call with numpy/JAX arrays or torch tensors, get a tuple of JAX arrays."""

    def __init__(self, graph: Graph) -> None:
        if jax.default_backend() == "cpu":
            warm_up_malloc()
        self.graph = graph
        self._jitted = jax.jit(graph_function(graph), compiler_options=XLA_OPTIONS)
        self._jitted_broadcasting: Any = None  # made by the first call with an expanded tensor
        self._transferred: list[_Transferred | None] = [None] * len(graph.inputs)
        self._torch_avals: list[tuple[tuple[int, ...], Any]] | None = None  # made by the first call_tensors

    def _to_jax(self, tensor: Any, i: int, host_numpy: bool = False) -> Any:
        cached = self._transferred[i]
        if cached is not None and cached.holds(tensor):
            return cached.array
        # only parameters (leaves that require grad) are kept: holding a step's activations until the
        # next call would keep their memory alive (the array shares it). And only an array that reads
        # the tensor's own memory: an update through ``.data`` (an EMA, weight clipping) changes the
        # memory without bumping the version counter, which a copy (DLPack copies a tensor whose
        # memory XLA cannot alias, such as one at an unaligned offset into a flat buffer) would miss
        keep = tensor.requires_grad and tensor.is_leaf
        array = tensor_to_jax(tensor, i, host_numpy and not keep)
        self._transferred[i] = _Transferred(tensor, array) if keep and _shares_memory(array, tensor) else None
        return array

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        args = check_args(self.graph, args, "JAX-lowered graph", kwargs)
        with jax.enable_x64(True):
            args = [self._to_jax(a, i) if is_torch_tensor(a) else a for i, a in enumerate(args)]
            return self._run(args)

    def call_tensors(self, tensors: Sequence[Any], host_numpy: bool, on_cpu: bool) -> list[Any]:
        """``self(*tensors)`` for the torch bridge, as torch tensors (``array_to_tensor``), whose guards
        already matched every shape and dtype: an exact comparison with the inputs' torch avals stands
        in for ``check_args`` (which still answers a mismatch, with its message), and CPU tensors go in
        as numpy views. ``host_numpy``: ``numpy_runs_on_cpu()``; ``on_cpu``: the outputs are on the CPU."""
        expected = self._torch_avals
        if expected is None:
            from reftrace.backends.torch_dtypes import torch_dtype
            expected = self._torch_avals = [(v.aval.shape, torch_dtype(v.aval.dtype)) for v in self.graph.inputs]
        with jax.enable_x64(True):  # also while crossing DLPack: keeps 64-bit dtypes
            if len(tensors) != len(expected) or not all(
                    is_torch_tensor(t) and t.dtype == d and t.shape == s for t, (s, d) in zip(tensors, expected)):
                results = self(*tensors)
            else:
                compact = [_unexpanded(t) for t in tensors]
                args = [self._to_jax(t, i, host_numpy) for i, t in enumerate(compact)]
                if all(c is t for c, t in zip(compact, tensors)):
                    results = self._run(args)
                else:
                    results = self._run_broadcasting(args)
            return [array_to_tensor(r, on_cpu) for r in results]

    def _run_broadcasting(self, args: list[Any]) -> tuple[Any, ...]:
        """``_run`` where some arguments come without their expanded dimensions (``_unexpanded``): one
        jitted function broadcasts each to its input's shape, which XLA fuses into its readers, and
        retraces per pattern of shapes as ``jax.jit`` does."""
        if self._jitted_broadcasting is None:
            run = graph_function(self.graph)
            shapes = [v.aval.shape for v in self.graph.inputs]

            def broadcasting(*arrays: Any) -> tuple[Any, ...]:
                import jax.numpy as jnp
                return run(*(a if a.shape == s else jnp.broadcast_to(a, s) for a, s in zip(arrays, shapes)))
            self._jitted_broadcasting = jax.jit(broadcasting, compiler_options=XLA_OPTIONS)
        return tuple(jax.block_until_ready(self._jitted_broadcasting(*args)))

    def _run(self, args: list[Any]) -> tuple[Any, ...]:
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
