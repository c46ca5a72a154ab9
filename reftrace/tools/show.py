"""``python -m reftrace show FILE.py:NAME --input 1x3x64x64 [--joint] [--partition mincut]``: a model's
graphs, with names, equation counts per primitive and, for a partition, the saved bytes split into
activations, parameters and other inputs.

``NAME`` in ``FILE.py`` is an ``nn.Module``, a function returning one (``examples/models.py``), or a
plain function of tensors. ``--input`` gives one tensor argument as ``SHAPE[:DTYPE]`` (repeat it for
several); integer inputs are drawn in [0, 8). ``--kwarg key=value`` passes a static keyword argument
(a Python literal). The graph is traced with ``rt.trace``; ``--joint`` shows ``rt.vjp`` of it;
``--partition POLICY`` shows both halves of ``rt.partition(rt.vjp(graph), policy=POLICY)``.
"""
from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from reftrace import names
from reftrace.errors import ArgumentError
from reftrace.graph import Graph


def add_show_command(commands: Any) -> None:
    p = commands.add_parser("show", help="print a model's graph, joint graph or partition, with statistics",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="FILE.py:NAME (a module, a function returning one, or a function of tensors)")
    p.add_argument("--input", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="one tensor argument, e.g. 1x3x64x64 or 4x128:int64 (repeat for more)")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="a static keyword argument, e.g. use_cache=False")
    p.add_argument("--joint", action="store_true", help="show the joint (vjp) graph")
    p.add_argument("--partition", metavar="POLICY", help="show the forward and backward of this policy "
                                                          "(default, mincut, save_all, save_nothing, dots_saveable)")
    p.add_argument("--eval", action="store_true", help="put the module in eval mode first")
    p.add_argument("--no-listing", action="store_true", help="statistics only")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import reftrace as rt
    target = load_target(args.target)
    if isinstance(target, torch.nn.Module) and args.eval:
        target.eval()
    inputs = [example_tensor(spec) for spec in args.input]
    kwargs = dict(parse_kwarg(k) for k in args.kwarg)
    graph = rt.trace(target, *inputs, **kwargs)
    shown: list[tuple[str, Graph]] = [("graph", graph)]
    if args.joint or args.partition:
        joint = rt.vjp(graph)
        if args.joint:
            shown.append(("joint", joint))
    partition = rt.partition(joint, policy=args.partition) if args.partition else None
    if partition is not None:
        shown += [("forward", partition.forward), ("backward", partition.backward)]
    for title, g in shown:
        print(f"== {title}: {len(g.inputs)} inputs, {len(g.eqns)} equations, {len(g.outputs)} outputs")
        if not args.no_listing:
            print(g)
        print(equation_counts(g))
        print()
    if partition is not None:
        print(saved_report(partition))
    return 0


def load_target(spec: str) -> Any:
    """``FILE.py:NAME``: the object, called first when it is a function of no arguments (a factory)."""
    import inspect
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ArgumentError(f"show: target {spec!r} is not FILE.py:NAME")
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"show: no file {file}")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules.setdefault(file.stem, module)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        found = [n for n in vars(module) if not n.startswith("_")]
        raise ArgumentError(f"show: {file} has no {name!r}; it defines {', '.join(found)}")
    obj = getattr(module, name)
    if inspect.isfunction(obj) and not inspect.signature(obj).parameters:
        obj = obj()
    return obj


def example_tensor(spec: str) -> Any:
    """``1x3x64x64`` (float32) or ``4x128:int64``: a random tensor of that shape and dtype."""
    import torch
    shape_text, _, dtype_name = spec.partition(":")
    try:
        shape = [int(d) for d in shape_text.split("x")] if shape_text else []
    except ValueError:
        raise ArgumentError(f"show: --input {spec!r}: the shape must be like 1x3x64x64") from None
    dtype = getattr(torch, dtype_name or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise ArgumentError(f"show: --input {spec!r}: {dtype_name!r} is not a torch dtype (float32, int64, ...)")
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 8, shape, dtype=dtype)


def parse_kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ArgumentError(f"show: --kwarg {text!r} is not KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string


def equation_counts(graph: Graph) -> str:
    """Equations per primitive, most frequent first, as one table."""
    counts = collections.Counter(e.primitive.name for e in graph.eqns)
    width = max((len(n) for n in counts), default=0)
    return "\n".join(f"  {name:<{width}}  {count:>5}" for name, count in counts.most_common())


def _is_parameter(name: str) -> bool:
    return not (names.is_buffer(name) or name.startswith(("args", "kwargs")) or name == "rng_key")


def saved_report(partition: Any) -> str:
    """Saved values and bytes: activations (computed by the forward), parameters, other inputs."""
    forward = partition.forward
    input_names = names.or_default(forward.input_names, len(forward.inputs), "args")
    name_of = dict(zip(forward.inputs, input_names))
    parameters = [v for v in partition.saved if v in name_of and _is_parameter(name_of[v])]
    other_inputs = [v for v in partition.saved if v in name_of and not _is_parameter(name_of[v])]
    activations = [v for v in partition.saved if v not in name_of]
    rows = [("activations", activations), ("parameters", parameters), ("other inputs (arguments, buffers)", other_inputs)]
    lines = [f"saved for the backward: {len(partition.saved)} values, {_mib(partition.saved_bytes)}"]
    lines += [f"  {title:<36} {len(values):>5} values  {_mib(sum(v.nbytes for v in values))}" for title, values in rows]
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"
