"""``Draft``: a program being drawn, line by line, on meta tensors in both shape worlds.

Every line is run on meta tensors (shapes, dtypes, autograd metadata, no data) before it is
kept, at the drawn shapes and at the "new" shapes (every size doubled); a line that fails at the
drawn shapes is dropped, and a line valid only there turns the program's new-shape call off.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from hypothesis import strategies as st

from reftrace.testing.program import INDEX, PARAM, Input, Op, Program

_ENV = {"torch": torch, "F": torch.nn.functional}


@dataclass
class Value:
    """A float value of the program being drawn, as meta tensors in both shape worlds."""

    name: str
    meta: torch.Tensor
    new_meta: torch.Tensor | None
    input_kind: str | None = None     # the Input kind when the value is an input

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta.shape)

    @property
    def ndim(self) -> int:
        return self.meta.dim()


class Choices:
    """Where a draft's choices come from: every choice is one integer in a closed range.

    ``Choices.hypothesis(draw)`` draws them with ``st.integers`` (``@given``, shrinking);
    ``Choices.uniform(rng)`` draws them uniformly and records them: the recorded list is exactly
    the choice sequence hypothesis would replay to rebuild the same program, which is how
    ``check`` hands a failure found by its fast uniform search to hypothesis's shrinker.
    """

    def __init__(self, integer: Callable[[int, int], int], rng: random.Random | None = None) -> None:
        self.integer = integer
        self.rng = rng
        self.recorded: list[int] = []

    def repeat(self, lo: int, hi: int) -> Iterator[int]:
        """``lo`` to ``hi`` iterations, each after the first ``lo`` behind a 0/1 "one more" choice.

        That is how hypothesis draws a list, and why it shrinks well: deleting one iteration's
        choices, its "one more" flag included, leaves a valid shorter sequence. Drawn uniformly,
        the count is uniform in ``[lo, hi]`` and the flags are recorded as they would be drawn.
        """
        target = self.rng.randint(lo, hi) if self.rng is not None else None
        n = 0
        while n < hi:
            if n >= lo:
                if target is None:
                    more = self.integer(0, 1)
                else:
                    more = int(n < target)
                    self.recorded.append(more)
                if not more:
                    return
            yield n
            n += 1

    @classmethod
    def hypothesis(cls, draw: Callable[[st.SearchStrategy], Any]) -> "Choices":
        return cls(lambda lo, hi: draw(st.integers(lo, hi)))

    @classmethod
    def uniform(cls, rng: random.Random) -> "Choices":
        choices = cls(lambda lo, hi: 0, rng)

        def integer(lo: int, hi: int) -> int:
            value = rng.randint(lo, hi)
            choices.recorded.append(value)
            return value
        choices.integer = integer
        return choices


class Draft:
    """A program being drawn: values so far, inputs, lines, and the meta environments."""

    def __init__(self, choices: Choices) -> None:
        self.choices = choices
        self.dtype = torch.float32
        self.sizes: list[int] = []
        self.values: list[Value] = []
        self.inputs: list[Input] = []
        self.ops: list[Op] = []
        self.extra_outputs: list[str] = []
        self.env: dict[str, Any] = dict(_ENV)
        self.new_env: dict[str, Any] | None = dict(_ENV)
        self._names = 0
        self.used: set[str] = set()        # values some line has taken as an operand
        self.entry = ""                   # the vocabulary entry drawing now: each line's ``Op.kind``

    # ------------------------------------------------------------------ drawing helpers

    def integer(self, lo: int, hi: int) -> int:
        return self.choices.integer(lo, hi)

    def boolean(self) -> bool:
        return bool(self.integer(0, 1))

    def sample(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def permutation(self, n: int) -> list[int]:
        """A permutation of ``range(n)``, shrinking toward the identity."""
        rest, out = list(range(n)), []
        while rest:
            out.append(rest.pop(self.integer(0, len(rest) - 1)))
        return out

    def fresh(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def pick(self, ok: Callable[[Value], bool] = lambda v: True, *, inputs: bool = True) -> Value | None:
        """A value satisfying ``ok``; what shrinking tends to is the most recent one."""
        candidates = [v for v in reversed(self.values) if ok(v) and (inputs or v.input_kind is None)]
        if not candidates:
            return None
        # half the time the most recent value: programs become chains, not piles of dead lines
        chosen = candidates[0 if self.boolean() else self.integer(0, len(candidates) - 1)]
        self.used.add(chosen.name)
        return chosen

    def axis(self, v: Value, ok: Callable[[int], bool] = lambda d: True) -> str | None:
        """One dim of ``v`` as source text, drawn as a negative index half the time."""
        dims = [d for d in range(v.ndim) if ok(d)]
        if not dims:
            return None
        d = self.sample(dims)
        return str(d - v.ndim if self.boolean() else d)

    def size(self) -> int:
        return self.sample(self.sizes)

    def new_input(self, prefix: str, shape: Sequence[int], new_shape: Sequence[int] | None, kind: str = PARAM,
                  scale: float = 1.0, high: int = 0, new_high: int = 0, offset: float = 0.0) -> Input:
        """An input for a module-like line (a weight, a buffer, an index); added when the line is kept."""
        dtype = torch.int64 if kind == INDEX else self.dtype
        return Input(self.fresh(prefix), tuple(shape), dtype, kind, scale, high,
                     tuple(new_shape) if new_shape is not None else None, new_high, offset)

    def new_shape_of(self, v: Value) -> tuple[int, ...] | None:
        return tuple(v.new_meta.shape) if v.new_meta is not None else None

    # ------------------------------------------------------------------ adding

    def add_input(self, x: Input) -> Value:
        self.inputs.append(x)
        value = Value(x.name, _meta(x.shape, x), _meta(x.new_shape, x) if x.new_shape is not None else None,
                      x.kind)
        self.env[x.name] = value.meta
        if self.new_env is not None:
            if value.new_meta is None:
                self.new_env = None
            else:
                self.new_env[x.name] = value.new_meta
        if x.kind != INDEX:
            self.values.append(value)
        return value

    def emit(self, expr: str, *, guard: str | None = None, inputs: Iterable[Input] = (),
             extra_outputs: Sequence[str] = ()) -> bool:
        """Keep the line ``v = expr`` if it runs on meta tensors; ``False`` (and nothing added) if not."""
        inputs = list(inputs)
        target = self.fresh("v")
        env = dict(self.env)
        env.update((x.name, _meta(x.shape, x)) for x in inputs)
        try:
            exec(f"{target} = {expr}", env)
        except Exception:
            return False
        result = env[target]
        if not isinstance(result, torch.Tensor) or not result.dtype.is_floating_point:
            return False
        for x in inputs:
            self.add_input(x)
        self.env[target] = result
        new_result = None
        if self.new_env is not None and all(x.new_shape is not None for x in inputs):
            new_env = dict(self.new_env)
            new_env.update((x.name, _meta(x.new_shape, x)) for x in inputs)
            try:
                exec(f"{target} = {expr}", new_env)
                new_result = new_env[target]
                self.new_env[target] = new_result
            except Exception:
                self.new_env = None
        else:
            self.new_env = None
        # in-place lines return their operand: later lines see the same tensor under both names
        self.values.append(Value(target, result, new_result))
        self.ops.append(Op(target, expr, self.entry, guard))
        self.extra_outputs.extend(extra_outputs)
        return True

    def program(self, outputs: Sequence[str]) -> Program:
        inputs = self.inputs
        if self.new_env is None:
            inputs = [dataclasses.replace(x, new_shape=None, new_high=0) for x in inputs]
        outs = list(dict.fromkeys([*outputs, *self.extra_outputs]))
        return Program(tuple(inputs), tuple(self.ops), tuple(outs))


def _meta(shape: Sequence[int], x: Input) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=x.dtype, device="meta")
    return t.requires_grad_() if x.requires_grad else t
