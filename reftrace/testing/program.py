"""``Program``: a small straight-line torch program as a value.

A program is data (inputs, op lines, outputs) that renders as plain Python source. Everything
that runs it — ``program.fn``, the float64 reference, the repro scripts — executes that one
source text, so what a failure report prints is exactly what ran.

Shapes come in two worlds: ``Input.shape`` (the shapes a program is drawn at) and
``Input.new_shape`` (every size variable doubled), which the oracle uses for its "new shape"
call. ``new_shape`` is ``None`` for every input when some op of the program is only valid at
the drawn shapes (a hard-coded size that stops dividing, say).
"""
from __future__ import annotations

import functools
import linecache
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# kinds of inputs: a trainable tensor (requires grad, never mutated), a data tensor (no grad; the
# program may write to it in place), a positive data tensor (BatchNorm's running_var), and an
# int64 index tensor with values in [0, high)
PARAM, DATA, POSITIVE, INDEX = "param", "data", "positive", "index"

_DTYPE_NAMES = {torch.float32: "torch.float32", torch.float64: "torch.float64", torch.int64: "torch.int64"}


@dataclass(frozen=True)
class Input:
    """One argument of the program; see the module docstring for ``new_shape``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = PARAM
    scale: float = 1.0           # float values are offset + scale * N(0, 1)
    high: int = 0                # INDEX: values in [0, high)
    new_shape: tuple[int, ...] | None = None
    new_high: int = 0
    offset: float = 0.0

    @property
    def requires_grad(self) -> bool:
        return self.kind == PARAM


@dataclass(frozen=True)
class Op:
    """One line ``target = expr``.

    ``kind`` is the vocabulary entry that drew it (for reports); ``guard``, if set, is an expression
    whose value's entries must stay away from zero for the line to be smooth at the inputs (see
    ``reftrace.testing.guards``); it is not part of the program's source.
    """

    target: str
    expr: str
    kind: str
    guard: str | None = None


@dataclass(frozen=True)
class Program:
    """A straight-line torch program: ``inputs``, ``ops`` (in order), ``outputs`` (names)."""

    inputs: tuple[Input, ...]
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]

    # ------------------------------------------------------------------ reading it

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def params(self) -> tuple[int, ...]:
        """Indices of the inputs that require grad."""
        return tuple(i for i, x in enumerate(self.inputs) if x.requires_grad)

    @property
    def has_new_shapes(self) -> bool:
        return all(x.new_shape is not None for x in self.inputs)

    @property
    def source(self) -> str:
        """The program as a Python function ``program(...)`` (torch and ``F`` in scope)."""
        return self.render()

    def render(self, *, name: str = "program", promote: bool = False) -> str:
        """The source; ``promote=True`` renders every dtype cast as float64 (the reference's program)."""
        args = ", ".join(x.name for x in self.inputs)
        lines = [f"def {name}({args}):"]
        for op in self.ops:
            lines.append(f"    {op.target} = {_promoted(op.expr) if promote else op.expr}")
        outs = ", ".join(self.outputs)
        lines.append(f"    return {outs}{',' if len(self.outputs) == 1 else ''}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        sig = ", ".join(f"{x.name}: {_describe(x)}" for x in self.inputs)
        return f"Program({self.num_ops} ops; {sig})\n{self.source}"

    # ------------------------------------------------------------------ running it

    @functools.cached_property
    def fn(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The program as a Python function (returns a tuple of tensors)."""
        return _compile_function(self.render(), "program")

    @functools.cached_property
    def reference_fn(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        """``fn`` with casts promoted to float64: run on float64 inputs, it computes in float64 throughout."""
        return _compile_function(self.render(promote=True), "program")

    def inputs_source(self, seed: int, *, new_shapes: bool = False, dtype: torch.dtype | None = None) -> str:
        """Python lines that make the inputs (``torch`` in scope); ``make_inputs`` runs exactly these."""
        lines = [f"g = torch.Generator().manual_seed({seed})"]
        for x in self.inputs:
            shape = x.new_shape if new_shapes else x.shape
            if shape is None:
                raise ValueError("this program has no new shapes (see Program.has_new_shapes)")
            dt = _DTYPE_NAMES[dtype if dtype is not None and x.dtype.is_floating_point else x.dtype]
            size = f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"
            if x.kind == INDEX:
                high = x.new_high if new_shapes else x.high
                lines.append(f"{x.name} = torch.randint(0, {high}, {size}, generator=g)")
                continue
            draw = f"torch.randn({size}, generator=g, dtype=torch.float64)"
            if x.kind == POSITIVE:
                value = f"({draw}.abs() + 0.5)"
            else:
                value = f"{draw} * {x.scale:g}" if x.scale != 1 else draw
                value += f" + {x.offset:g}" if x.offset else ""
            grad = ".requires_grad_()" if x.requires_grad else ""
            lines.append(f"{x.name} = ({value}).to({dt}){grad}")
        return "\n".join(lines) + "\n"

    def make_inputs(self, seed: int = 0, *, new_shapes: bool = False,
                    dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Fresh input tensors for ``seed`` (params require grad). ``dtype`` overrides the float dtype
        (float64 for the reference); the values are the same float64 draws, rounded."""
        namespace: dict[str, Any] = {"torch": torch}
        exec(_compile_code(self.inputs_source(seed, new_shapes=new_shapes, dtype=dtype), "<inputs>"), namespace)
        return [namespace[x.name] for x in self.inputs]

    def run_lines(self, args: Sequence[torch.Tensor], on_line: Callable[[Op, dict[str, Any]], None],
                  *, promote: bool = False) -> tuple[torch.Tensor, ...]:
        """Run the program one line at a time, calling ``on_line(op, env)`` after each line."""
        env: dict[str, Any] = {"torch": torch, "F": torch.nn.functional}
        env.update((x.name, a) for x, a in zip(self.inputs, args))
        exprs = tuple(_promoted(o.expr) if promote else o.expr for o in self.ops)
        for op, code in zip(self.ops, _line_codes(tuple(o.target for o in self.ops), exprs)):
            exec(code, env)
            on_line(op, env)
        return tuple(env[name] for name in self.outputs)


def _describe(x: Input) -> str:
    dt = str(x.dtype).replace("torch.", "")
    extra = f", high={x.high}" if x.kind == INDEX else (f", scale={x.scale:g}" if x.scale != 1 else "")
    extra += f", offset={x.offset:g}" if x.offset else ""
    return f"{dt}{list(x.shape)} {x.kind}{extra}"


_counter = iter(range(1 << 62))


def _compile_code(source: str, what: str) -> Any:
    """Compile ``source`` under a unique file name registered with linecache, so tracebacks show it."""
    filename = f"<reftrace.testing {what} {next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    return compile(source, filename, "exec")


def _compile_function(source: str, name: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {"torch": torch, "F": torch.nn.functional}
    exec(_compile_code(source, name), namespace)
    return namespace[name]


def _promoted(expr: str) -> str:
    """The only dtypes a program's lines name are cast targets; the reference casts to float64 instead."""
    return expr.replace("torch.float32", "torch.float64")


@functools.lru_cache(maxsize=4096)
def _line_codes(targets: tuple[str, ...], exprs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(compile(f"{t} = {e}", "<program line>", "exec") for t, e in zip(targets, exprs))
