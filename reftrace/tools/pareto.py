"""``python -m reftrace pareto FILE.py:NAME [--input SHAPE] [--points N] [--out FILE.svg]``: the
activation-bytes / recompute-FLOPs Pareto frontier of a model's training step, printed and plotted.

The model is traced as by ``show`` (``FILE.py:NAME`` is a module, a factory returning one, or a
function of tensors); without ``--input``, the inputs a factory's docstring names
(``examples/models.py``: "``--input 1x3x64x64``"). Each frontier point is ``rt.optimal`` at some
budget; the table marks where ``default``, ``mincut`` and ``dots_saveable`` land.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from reftrace.errors import ArgumentError
from reftrace.tools.show import example_tensor, load_target, parse_kwarg


def add_pareto_command(commands: Any) -> None:
    p = commands.add_parser("pareto", help="print and plot a model's memory / recomputation Pareto frontier",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="FILE.py:NAME (a module, a function returning one, or a function of tensors)")
    p.add_argument("--input", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="one tensor argument, e.g. 1x3x64x64 (repeat for more; default: from the docstring)")
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE", help="a static keyword argument")
    p.add_argument("--points", type=int, default=12, help="budgets to solve for (0: the whole frontier)")
    p.add_argument("--out", metavar="FILE", help="the plot (.svg, .png, .pdf); default pareto_NAME.svg")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import reftrace as rt
    from reftrace import plot
    from reftrace.transforms.policies import dots_saveable

    target = load_target(args.target)
    specs, kwargs = args.input, args.kwarg
    if not specs:
        specs, kwargs = documented_arguments(args.target)
        if not specs:
            raise ArgumentError(f"pareto: give the model's inputs with --input SHAPE (its docstring names none)")
    torch.manual_seed(0)
    graph = rt.trace(target, *[example_tensor(s) for s in specs], **dict(parse_kwarg(k) for k in kwargs))
    joint = rt.vjp(graph)
    name = args.target.rpartition(":")[2]
    out = Path(args.out or f"pareto_{name}.svg")
    frontier = plot.pareto(joint, out, points=args.points or None,
                           title=f"{name} ({' '.join(specs)}): activation memory vs recomputation")
    print(f"{name}, inputs {' '.join(specs)}: joint graph of {len(joint.eqns)} equations")
    print(f"{'point':<16} {'activations (MiB)':>18} {'recompute (MFLOP)':>18} {'peak (MiB)':>11}")
    rows = [(f"optimal #{i + 1}", p) for i, p in enumerate(frontier)]
    rows += [(label, rt.partition(joint, policy)) for label, policy in
             (("default", "default"), ("mincut", "mincut"), ("dots_saveable", dots_saveable))]
    for label, part in rows:
        c = rt.cost(part)
        print(f"{label:<16} {c.activation_bytes / 2**20:>18.3f} {c.recompute_flops / 1e6:>18.3f} "
              f"{c.peak_bytes / 2**20:>11.2f}")
    print(f"plot: {out}")
    return 0


def documented_arguments(spec: str) -> tuple[list[str], list[str]]:
    """The ``--input`` and ``--kwarg`` values the target's docstring gives (``examples/models.py``)."""
    path, _, name = spec.rpartition(":")
    module = sys.modules.get(Path(path).stem)  # loaded by load_target
    doc = getattr(getattr(module, name, None), "__doc__", None) or ""
    return re.findall(r"--input\s+([\w:]+)", doc), re.findall(r"--kwarg\s+([\w=.]+)", doc)
