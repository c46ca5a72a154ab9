"""The JAX backend on a device mesh: one jitted SPMD program that XLA's partitioner (GSPMD) splits.

``rt.lower(graph, "jax", mesh=mesh, in_shardings=[...], out_shardings=[...])`` gives each input and
output a ``PartitionSpec`` (``None``: replicated). The graph runs as in ``reftrace.backends.jax``
(``graph_function``), inside ``jax.jit(in_shardings=..., out_shardings=...)``; GSPMD propagates the
layouts through the program and inserts the collectives (all-reduce, all-gather, reduce-scatter).

The mesh's axes are used as ``Auto`` axes while tracing (GSPMD chooses every intermediate layout,
as ``jax.jit`` did before sharding-in-types): a graph is a lax program with no sharding types, and
an ``Explicit`` mesh (``jax.make_mesh``'s default) would make jax ask for the output sharding of
every matmul whose contracted dimension is split. Outputs come back labelled with the caller's mesh
(relabelling is free: the same buffers on the same devices).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from reftrace.backends.jax import XLA_OPTIONS, graph_function, tensor_to_jax
from reftrace.backends.signature import check_args, is_torch_tensor
from reftrace.errors import ArgumentError
from reftrace.graph import Graph
from reftrace.sharding import (Spec, as_spec, check_spec, describe_value, format_spec, mesh_axes,
                               sharding_constraint_p)


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (the partitioner picks intermediate layouts)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


class ShardedJaxExecutable:
    """``graph`` compiled once as an SPMD program over ``mesh``; call with numpy/JAX arrays or torch
    tensors, get a tuple of ``jax.Array``s laid out as ``out_shardings`` asked."""

    def __init__(self, graph: Graph, mesh: Mesh, in_specs: tuple[Spec, ...],
                 out_specs: tuple[Spec, ...] | None) -> None:
        self.graph, self.mesh = graph, mesh
        self._mesh = auto_mesh(mesh)
        self.in_shardings = tuple(NamedSharding(mesh, PartitionSpec(*s)) for s in in_specs)
        self.out_shardings = (None if out_specs is None else
                              tuple(NamedSharding(mesh, PartitionSpec(*s)) for s in out_specs))
        self._in = tuple(NamedSharding(self._mesh, PartitionSpec(*s)) for s in in_specs)
        out = None if out_specs is None else tuple(NamedSharding(self._mesh, PartitionSpec(*s)) for s in out_specs)
        self._jitted = jax.jit(graph_function(graph), in_shardings=self._in, compiler_options=XLA_OPTIONS,
                               **({} if out is None else {"out_shardings": out}))
        self._compiled: Any = None  # the arguments' avals are the graph's: one XLA executable serves every call

    def _placed(self, args: Sequence[Any]) -> list[jax.Array]:
        """The arguments checked against the graph and put on the mesh (a no-op for arrays already there)."""
        args = check_args(self.graph, args, "sharded JAX-lowered graph")
        args = [tensor_to_jax(a, i) if is_torch_tensor(a) else a for i, a in enumerate(args)]
        return [jax.device_put(a, s) for a, s in zip(args, self._in)]

    def _executable(self, placed: Sequence[jax.Array]) -> Any:
        if self._compiled is None:
            self._compiled = self._jitted.lower(*placed).compile()
        return self._compiled

    def __call__(self, *args: Any) -> tuple[jax.Array, ...]:
        with jax.enable_x64(True), jax.set_mesh(self._mesh):
            placed = self._placed(args)
            outs = self._executable(placed)(*placed)
            if self.out_shardings is not None:  # the caller's mesh (maybe Explicit): same buffers, relabelled
                outs = [jax.device_put(o, s) for o, s in zip(outs, self.out_shardings)]
            return tuple(jax.block_until_ready(outs))

    def compiled_text(self, *args: Any) -> str:
        """The partitioned, optimized HLO XLA runs for these arguments: the collectives GSPMD
        inserted (``all-reduce``, ``all-gather``, ``reduce-scatter``...) are in it."""
        with jax.enable_x64(True), jax.set_mesh(self._mesh):
            return self._executable(self._placed(args)).as_text()

    def __repr__(self) -> str:
        return f"<ShardedJaxExecutable on {dict(self.mesh.shape)} {self.graph!r}>"


def lower_sharded(graph: Graph, mesh: Any, in_shardings: Sequence[Any] | None,
                  out_shardings: Sequence[Any] | None) -> ShardedJaxExecutable:
    """Check the mesh and one spec per input (default: all replicated) and per output (default: the
    partitioner's choice) against the graph, naming the first bad one, then compile."""
    if not isinstance(mesh, Mesh):
        raise ArgumentError(f"in_shardings/out_shardings need mesh=, a jax.sharding.Mesh; got "
                            f"{type(mesh).__name__} (build one with jax.make_mesh((4, 2), ('data', 'model')))")
    in_specs = _specs(graph, mesh, "input", in_shardings)
    out_specs = None if out_shardings is None else _specs(graph, mesh, "output", out_shardings)
    _check_constraints(graph, mesh)
    return _compiled(graph, mesh, in_specs, out_specs)


@functools.lru_cache(maxsize=64)
def _compiled(graph: Graph, mesh: Mesh, in_specs: tuple[Spec, ...],
              out_specs: tuple[Spec, ...] | None) -> ShardedJaxExecutable:
    return ShardedJaxExecutable(graph, mesh, in_specs, out_specs)


def _specs(graph: Graph, mesh: Mesh, kind: str, given: Sequence[Any] | None) -> tuple[Spec, ...]:
    values, option = (graph.inputs, "in_shardings") if kind == "input" else (graph.outputs, "out_shardings")
    if given is None:
        return ((),) * len(values)
    if isinstance(given, (PartitionSpec, str)) or not isinstance(given, Sequence):
        raise ArgumentError(f"{option} must be a sequence with one PartitionSpec (or None) per {kind}; "
                            f"got {given!r}")
    if len(given) != len(values):
        raise ArgumentError(f"{option} has {len(given)} entries for the graph's {len(values)} {kind}s; "
                            f"give one PartitionSpec (or None = replicated) per {kind}")
    axes = mesh_axes(mesh)
    specs = []
    for i, (v, s) in enumerate(zip(values, given)):
        where = describe_value(graph, kind, i)
        if isinstance(s, NamedSharding):
            raise ArgumentError(f"{where}: pass its PartitionSpec ({format_spec(as_spec(s.spec))}); the mesh comes "
                                "from mesh=")
        spec = as_spec(s, f"the spec of {where}")
        check_spec(v.aval, spec, axes, where)
        specs.append(spec)
    return tuple(specs)


def _check_constraints(graph: Graph, mesh: Mesh) -> None:
    """Every ``with_sharding`` in the graph names axes of this mesh (XLA would fail far from the cause)."""
    axes = mesh_axes(mesh)
    for k, eqn in enumerate(graph.eqns):
        if eqn.primitive is sharding_constraint_p:
            check_spec(eqn.inputs[0].aval, eqn.params["spec"], axes,
                       f"equation {k} (with_sharding of {eqn.inputs[0].aval.str_short()})")
