"""Sharding: where a graph's values live on a device mesh, said as values XLA's SPMD partitioner reads.

reftrace does not partition anything itself: it annotates, and GSPMD (``jax.sharding``) splits the
program and inserts the collectives. Three pieces live here, all in the core (no jax import; a mesh
is a ``jax.sharding.Mesh`` read by duck typing: ``mesh.shape`` maps axis names to sizes):

- the **spec** of one value: a tuple with one entry per leading dimension, each ``None``
  (replicated), a mesh axis name, or a tuple of names (that dimension split over several axes) —
  a ``jax.sharding.PartitionSpec`` as a hashable graph parameter (``as_spec``, ``check_spec``);
- ``with_sharding(value, spec)``: the ``sharding_constraint`` primitive, an identity on values that
  asks the partitioner to lay ``value`` out as ``spec`` (``jax.lax.with_sharding_constraint``);
  its cotangent and tangent carry the same constraint;
- ``data_parallel`` and ``fsdp``: one spec per input and per output of a (joint) graph, read from
  the graph's names (``reftrace.names``), for ``rt.lower(graph, "jax", mesh=..., **plan._asdict())``.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from reftrace import lax, names
from reftrace.errors import ArgumentError, ShapeError
from reftrace.graph import Aval, Graph, expect_graph
from reftrace.primitives import Primitive, is_float, registry, shape_rules
from reftrace.transforms.jvp_rules import jvp_rules
from reftrace.transforms.vjp_rules import vjp_rules

__all__ = ["Spec", "ShardingPlan", "as_spec", "check_spec", "format_spec", "mesh_axes", "with_sharding",
           "sharding_constraint_p", "data_parallel", "fsdp", "fsdp_spec", "describe_value"]

Entry = str | tuple[str, ...] | None
Spec = tuple[Entry, ...]
"""One entry per leading dimension (trailing dimensions are replicated), as in ``PartitionSpec``."""


# ----------------------------------------------------------------------------- specs

def as_spec(spec: Any, what: str = "spec") -> Spec:
    """``spec`` (a ``PartitionSpec``, a tuple/list of entries, or ``None`` = replicated) as a ``Spec``."""
    if spec is None:
        return ()
    if isinstance(spec, str) or not isinstance(spec, Iterable):
        raise ArgumentError(f"{what} is {spec!r}; pass a jax.sharding.PartitionSpec (or a tuple of mesh axis "
                            "names / None per dimension), or None for a replicated value")
    return tuple(_entry(e, what) for e in spec)


def _entry(entry: Any, what: str) -> Entry:
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)) and entry and all(isinstance(n, str) for n in entry):
        return entry[0] if len(entry) == 1 else tuple(entry)
    raise ArgumentError(f"{what} has the entry {entry!r}; each entry is None, a mesh axis name, or a tuple "
                        "of axis names")


def _axis_names(entry: Entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else entry


def format_spec(spec: Spec) -> str:
    """``P('data', None)``, as jax prints a PartitionSpec."""
    return f"P({', '.join(repr(e) for e in spec)})"


def mesh_axes(mesh: Any) -> dict[str, int]:
    """A mesh's axis sizes by name (``jax.sharding.Mesh.shape``)."""
    shape = getattr(mesh, "shape", None)
    if not isinstance(shape, Mapping):
        raise ArgumentError(f"mesh is {type(mesh).__name__}; pass a jax.sharding.Mesh "
                            "(jax.make_mesh((4, 2), ('data', 'model')))")
    return dict(shape)


def check_spec(aval: Aval, spec: Spec, axes: Mapping[str, int], where: str) -> None:
    """Raise ArgumentError (starting with ``where``) unless ``spec`` can lay ``aval`` out on a mesh
    with these axis sizes: at most one entry per dimension, known axes used once, and every sharded
    dimension divisible by the product of its axes' sizes (``jax.jit`` refuses uneven shards)."""
    if len(spec) > aval.ndim:
        raise ArgumentError(f"{where}: {format_spec(spec)} has {len(spec)} entries for the rank-{aval.ndim} value "
                            f"{aval.str_short()}; give at most one entry per dimension")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        for name in _axis_names(entry):
            if name not in axes:
                raise ArgumentError(f"{where}: {format_spec(spec)} names the axis {name!r}, which the mesh does "
                                    f"not have (its axes: {', '.join(map(repr, axes))})")
            if name in used:
                raise ArgumentError(f"{where}: {format_spec(spec)} uses the mesh axis {name!r} twice; a mesh "
                                    "axis splits at most one dimension")
            used.append(name)
        size = math.prod(axes[n] for n in _axis_names(entry))
        if aval.shape[dim] % size:
            raise ArgumentError(f"{where}: dimension {dim} of {aval.str_short()} has size {aval.shape[dim]}, which "
                                f"the {size} shards of {entry!r} do not divide; shard another dimension, pad this "
                                "one, or replicate it (None)")


# ----------------------------------------------------------------------------- the constraint primitive

def _constraint_shape_rule(x: Aval, *, spec: Spec) -> Aval:
    if len(spec) > x.ndim:
        raise ShapeError(f"sharding_constraint: {format_spec(spec)} has {len(spec)} entries for the rank-{x.ndim} "
                         f"value {x.str_short()}")
    return x


sharding_constraint_p = Primitive("sharding_constraint")
registry[sharding_constraint_p.name] = sharding_constraint_p
shape_rules[sharding_constraint_p] = _constraint_shape_rule


def with_sharding(value: Any, spec: Any) -> Any:
    """``value`` unchanged, asking XLA to lay it out as ``spec`` (``jax.lax.with_sharding_constraint``).

    Use inside a traced function. It takes effect where the graph is lowered with a mesh
    (``rt.lower(g, "jax", mesh=...)``); elsewhere (plain ``rt.lower``, the torch backend) it is the
    identity. Its gradient carries the same constraint.
    """
    return lax.bind(sharding_constraint_p, value, spec=as_spec(spec, "with_sharding's spec"))


def _constraint_vjp(cts, primals, outs, *, spec):
    """A value's cotangent has its shape, so it is laid out the same way."""
    return (lax.bind(sharding_constraint_p, cts[0], spec=spec),)


def _constraint_jvp(tangents, primals, outs, *, spec):
    return (lax.bind(sharding_constraint_p, tangents[0], spec=spec),)


vjp_rules[sharding_constraint_p] = _constraint_vjp
jvp_rules[sharding_constraint_p] = _constraint_jvp


# ----------------------------------------------------------------------------- plans for whole graphs

class ShardingPlan(NamedTuple):
    """One ``PartitionSpec`` per graph input and per output: ``rt.lower(g, "jax", mesh=mesh, **plan._asdict())``."""

    in_shardings: tuple[Any, ...]
    out_shardings: tuple[Any, ...]


def data_parallel(graph: Graph, mesh: Any, batch_inputs: Sequence[int | str] | None = None,
                  axis: str | Sequence[str] | None = None) -> ShardingPlan:
    """Data parallelism: the batch inputs split along dimension 0 over ``axis`` (default: every mesh
    axis), everything else replicated. GSPMD then all-reduces the parameter gradients.

    ``batch_inputs`` are input indices or names (default: the user's tensors of a traced module or
    function, ``args[...]``/``kwargs[...]``). Outputs and cotangents follow the ``_Roles`` rule.
    """
    expect_graph(graph, "data_parallel")
    roles = _Roles.of(graph)
    axes, entry = _axis_entry(mesh, axis)
    batch = _select(graph, roles, batch_inputs, names.is_argument, "batch_inputs")
    specs: list[Spec] = [(entry,) if i in batch else () for i in range(roles.num_primals)]
    return _plan(graph, roles, specs, _batch_size(graph, batch), entry, axes)


def fsdp(graph: Graph, mesh: Any, param_inputs: Sequence[int | str] | None = None,
         axis: str | Sequence[str] | None = None, batch_inputs: Sequence[int | str] | None = None,
         batch_axis: str | Sequence[str] | None = None) -> ShardingPlan:
    """Fully sharded data parallelism (ZeRO-3): each parameter split over ``axis`` along its largest
    dimension the axis size divides (replicated when none does), the batch split along dimension 0
    over ``batch_axis`` (default: ``axis``); gradients are sharded like their parameters. GSPMD
    all-gathers each parameter where it is used and reduce-scatters its gradient.

    ``param_inputs`` default: the parameters of a traced module (inputs that are neither
    ``buffer(...)``s nor arguments nor the random key). ``axis`` default: every mesh axis.
    """
    expect_graph(graph, "fsdp")
    roles = _Roles.of(graph)
    axes, entry = _axis_entry(mesh, axis)
    _, batch_entry = _axis_entry(mesh, axis if batch_axis is None else batch_axis)
    params = _select(graph, roles, param_inputs, names.is_parameter, "param_inputs")
    batch = _select(graph, roles, batch_inputs, names.is_argument, "batch_inputs")
    shards = math.prod(axes[n] for n in _axis_names(entry))
    specs: list[Spec] = []
    for i, v in enumerate(graph.inputs[:roles.num_primals]):
        if i in params and i in batch:
            raise ArgumentError(f"fsdp: {describe_value(graph, 'input', i)} is both a parameter and a batch input")
        specs.append(fsdp_spec(v.aval, entry, shards) if i in params else (batch_entry,) if i in batch else ())
    return _plan(graph, roles, specs, _batch_size(graph, batch), batch_entry, axes)


def fsdp_spec(aval: Aval, entry: Entry, shards: int) -> Spec:
    """The spec FSDP gives a parameter: ``entry`` on its largest dimension that ``shards`` divides."""
    dims = sorted(range(aval.ndim), key=lambda d: -aval.shape[d])
    for d in dims:
        if aval.shape[d] % shards == 0:
            return (None,) * d + (entry,)
    return ()


class _Roles(NamedTuple):
    """What each input and output of a graph is: for a joint graph (``rt.vjp``) the cotangent inputs
    are tied to the forward outputs they belong to and the gradient outputs to their primal inputs,
    so both take the spec of their partner."""

    num_primals: int
    cotangent_of: tuple[int, ...]  # per cotangent input: the forward output it belongs to
    num_forward_outputs: int
    gradient_of: tuple[int, ...]  # per gradient output: its primal input

    @staticmethod
    def of(graph: Graph) -> "_Roles":
        if graph.joint is None:
            return _Roles(len(graph.inputs), (), len(graph.outputs), ())
        n_in, n_out = graph.joint
        cts, grads = graph.inputs[n_in:], graph.outputs[n_out:]
        if graph.input_names is not None and graph.output_names is not None:
            out_names, in_names = graph.output_names[:n_out], graph.input_names[:n_in]
            cotangent_of = tuple(_partner(out_names, n, "ct") for n in graph.input_names[n_in:])
            gradient_of = tuple(_partner(in_names, n, "grad") for n in graph.output_names[n_out:])
        else:  # vjp's defaults for a graph without names: every output has a cotangent, every float input a gradient
            cotangent_of = tuple(range(len(cts))) if len(cts) == n_out else None
            floats = tuple(i for i in range(n_in) if is_float(graph.inputs[i].dtype))
            gradient_of = floats if len(floats) == len(grads) else None
            if cotangent_of is None or gradient_of is None:
                raise ArgumentError("this joint graph has no names and was not made with vjp's defaults, so which "
                                    "gradient belongs to which input is unknown; give the graph names "
                                    "(graph.named(...)) before rt.vjp")
        return _Roles(n_in, cotangent_of, n_out, gradient_of)


def _partner(candidates: Sequence[str], name: str, mark: str) -> int:
    inner = name[len(mark) + 1:-1] if name.startswith(f"{mark}(") and name.endswith(")") else None
    if inner not in candidates:
        raise ArgumentError(f"the joint graph's value {name!r} is not {mark}(<name>) of one of its "
                            f"{'outputs' if mark == 'ct' else 'inputs'}; plan shardings on the graph rt.vjp returned")
    return candidates.index(inner)


def _plan(graph: Graph, roles: _Roles, primal_specs: list[Spec], batch_size: int | None, batch_entry: Entry,
          axes: Mapping[str, int]) -> ShardingPlan:
    """Complete the primal inputs' specs: forward outputs are split like the batch when their
    dimension 0 is the batch size (an ``update(...)`` output like the input it updates; the rest
    replicated), cotangents like their outputs, gradients like their inputs."""
    in_names = graph.input_names or ()
    forward: list[Spec] = []
    for k, out in enumerate(graph.outputs[:roles.num_forward_outputs]):
        name = graph.output_names[k] if graph.output_names is not None else ""
        updated = [i for i, n in enumerate(in_names[:roles.num_primals]) if names.is_update(name)
                   and names.update(n) == name]
        if updated:
            forward.append(primal_specs[updated[0]])
        elif batch_size is not None and out.aval.ndim > 0 and out.aval.shape[0] == batch_size:
            forward.append((batch_entry,))
        else:
            forward.append(())
    in_specs = primal_specs + [forward[k] for k in roles.cotangent_of]
    out_specs = forward + [primal_specs[i] for i in roles.gradient_of]
    for kind, values, specs in (("input", graph.inputs, in_specs), ("output", graph.outputs, out_specs)):
        for i, (v, spec) in enumerate(zip(values, specs)):
            check_spec(v.aval, spec, axes, describe_value(graph, kind, i))
    return ShardingPlan(tuple(map(_partition_spec, in_specs)), tuple(map(_partition_spec, out_specs)))


def _partition_spec(spec: Spec) -> Any:
    """A ``jax.sharding.PartitionSpec``: a mesh exists, so jax is loaded; the core never imports it."""
    return sys.modules["jax.sharding"].PartitionSpec(*spec)


def _axis_entry(mesh: Any, axis: str | Sequence[str] | None) -> tuple[dict[str, int], Entry]:
    axes = mesh_axes(mesh)
    entry = _entry(tuple(axes) if axis is None else axis, "axis")
    for name in _axis_names(entry):
        if name not in axes:
            raise ArgumentError(f"axis {name!r} is not an axis of the mesh (its axes: {', '.join(map(repr, axes))})")
    return axes, entry


def _select(graph: Graph, roles: _Roles, chosen: Sequence[int | str] | None, default: Any, what: str) -> set[int]:
    """Primal input indices from indices or names; ``None``: those whose name ``default`` accepts."""
    primal_names = (graph.input_names or ())[:roles.num_primals]
    if chosen is None:
        if graph.input_names is None:
            raise ArgumentError(f"this graph has no input names, so {what} cannot be guessed; pass {what}= "
                                "as input indices")
        return {i for i, n in enumerate(primal_names) if default(n)}
    if isinstance(chosen, (str, int)):
        chosen = [chosen]
    picked = set()
    for c in chosen:
        if isinstance(c, str):
            if c not in primal_names:
                raise ArgumentError(f"{what}: the graph has no input named {c!r}")
            picked.add(primal_names.index(c))
        elif isinstance(c, int) and 0 <= c < roles.num_primals:
            picked.add(c)
        else:
            raise ArgumentError(f"{what}: {c!r} is not the index (0..{roles.num_primals - 1}) or name of an input "
                                "(of the primal inputs, for a joint graph)")
    return picked


def _batch_size(graph: Graph, batch: set[int]) -> int | None:
    sizes = {graph.inputs[i].aval.shape[0] if graph.inputs[i].aval.ndim else None for i in sorted(batch)}
    if None in sizes or len(sizes) > 1:
        listed = ", ".join(describe_value(graph, "input", i) for i in sorted(batch))
        raise ArgumentError(f"the batch inputs ({listed}) must all have the same leading (batch) dimension")
    return sizes.pop() if sizes else None


def describe_value(graph: Graph, kind: str, i: int) -> str:
    """``input 3 ('fc1.weight', f32[512,2048])``: how errors name an input or output of ``graph``."""
    values, value_names = ((graph.inputs, graph.input_names) if kind == "input"
                           else (graph.outputs, graph.output_names))
    name = f"{value_names[i]!r}, " if value_names is not None else ""
    return f"{kind} {i} ({name}{values[i].aval.str_short()})"
