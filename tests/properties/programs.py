"""A hypothesis strategy for random reftrace programs, shared by the property tests.

    from tests.properties.programs import programs

    @given(programs(dtype=np.float64))
    def test_something(program):
        graph, args = program          # a Graph and numpy arguments for it
        ...

A program is a DAG of primitives over 1-3 floating inputs: smooth and non-smooth
elementwise math (with numpy broadcasting between operands), reductions,
cumulative ops, dot_general with random dimension numbers, shape ops
(transpose, reshape, broadcast, strided/reversed slicing, pad with negative and
interior padding, concatenate, rev), select, gather/scatter-add with constant
indices, argmax-driven gathers (integer values inside the graph), and
stop_gradient. Its outputs (1-2) are drawn from its values, so an output may be
an input or the same value twice.

Values are kept in safe domains (``log(1 + x*x)``, ``pow(1.5 + tanh x, y)``, ...)
and argument values come from a seeded numpy generator (uniform in [-1.5, 1.5]),
so the functions are differentiable at the arguments with probability 1 and
central finite differences are meaningful in float64.

``programs(..., ops=SMOOTH_OPS)`` restricts the op catalog (names in ``ALL_OPS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from hypothesis import strategies as st

from reftrace import lax
from reftrace import numpy as rnp
from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.graph import Graph
from reftrace.lax import TracedArray, new_input, tracing


@dataclass(frozen=True)
class Program:
    """A random program: ``graph``, numpy ``args`` for it, and ``text``, its readable source."""

    graph: Graph
    args: tuple[np.ndarray, ...]
    text: str

    def __iter__(self) -> Iterator[Any]:
        """``graph, args = program``."""
        return iter((self.graph, self.args))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self.args)
        return f"Program(args=({shapes}))\n{self.text}\n{self.graph}"


Draw = Callable[[st.SearchStrategy], Any]


class _Ctx:
    """Drawing state: the values built so far and the program text."""

    def __init__(self, draw: Draw, dtype: np.dtype) -> None:
        self.draw = draw
        self.dtype = dtype
        self.values: list[TracedArray] = []
        self.names: list[str] = []
        self.lines: list[str] = []
        self.rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))

    def pick(self, prefer_recent: bool = True) -> int:
        n = len(self.values)
        if prefer_recent and n > 2 and self.draw(st.booleans()):
            return self.draw(st.integers(n - 2, n - 1))
        return self.draw(st.integers(0, n - 1))

    def add(self, value: TracedArray, text: str) -> None:
        name = f"v{len(self.values)}"
        self.values.append(value)
        self.names.append(name)
        self.lines.append(f"{name} = {text}    # {value.aval.str_short()}")

    def partner(self, i: int) -> int:
        """Another value numpy-broadcastable with value ``i`` (``i`` itself if none)."""
        shape = self.values[i].shape
        ok = [j for j, v in enumerate(self.values) if _broadcastable(shape, v.shape)]
        return self.draw(st.sampled_from(ok))


def _broadcastable(a: Sequence[int], b: Sequence[int]) -> bool:
    try:
        np.broadcast_shapes(tuple(a), tuple(b))
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the op catalog

def _unary(text: str, fn: Callable[[TracedArray], TracedArray]):
    def op(c: _Ctx) -> None:
        i = c.pick()
        c.add(fn(c.values[i]), text.format(x=c.names[i]))
    return op


def _binary(text: str, fn: Callable[[TracedArray, TracedArray], TracedArray]):
    def op(c: _Ctx) -> None:
        i = c.pick()
        j = c.partner(i)
        if c.draw(st.booleans()):
            i, j = j, i
        c.add(fn(c.values[i], c.values[j]), text.format(x=c.names[i], y=c.names[j]))
    return op


def _axes_of(c: _Ctx, ndim: int, min_size: int = 0) -> tuple[int, ...]:
    if ndim == 0:
        return ()
    return tuple(sorted(c.draw(st.sets(st.integers(0, ndim - 1), min_size=min_size, max_size=ndim))))


def _reduction(name: str, fn: Callable[..., TracedArray]):
    def op(c: _Ctx) -> None:
        i = c.pick()
        x = c.values[i]
        axes = _axes_of(c, x.ndim)
        keep = c.draw(st.booleans())
        c.add(fn(x, axis=axes, keepdims=keep), f"{name}({c.names[i]}, axis={axes}, keepdims={keep})")
    return op


def _cumulative(name: str, prim: P.Primitive):
    def op(c: _Ctx) -> None:
        i = c.pick()
        x = c.values[i]
        if x.ndim == 0:
            x = lax.reshape(x, (1,))
        axis = c.draw(st.integers(0, x.ndim - 1))
        reverse = c.draw(st.booleans())
        c.add(lax.bind(prim, x, axis=axis, reverse=reverse),
              f"{name}({c.names[i]}, axis={axis}, reverse={reverse})")
    return op


def _op_transpose(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    perm = tuple(c.draw(st.permutations(range(x.ndim))))
    c.add(lax.transpose(x, perm), f"transpose({c.names[i]}, {perm})")


def _op_reshape(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    n = x.size
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    shape = c.draw(st.sampled_from([(n,), (1, n)] + [(d, n // d) for d in divisors]
                                   + [(d, 1, n // d) for d in divisors[:2]]))
    c.add(lax.reshape(x, shape), f"reshape({c.names[i]}, {shape})")


def _op_broadcast(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    if x.ndim >= 4:
        return _op_sum_all(c)
    lead = c.draw(st.sampled_from([(), (2,)]))
    shape = lead + tuple(c.draw(st.sampled_from([d, 2, 3])) if d == 1 else d for d in x.shape)
    c.add(rnp.broadcast_to(x, shape), f"broadcast_to({c.names[i]}, {shape})")


def _op_sum_all(c: _Ctx) -> None:
    i = c.pick()
    c.add(rnp.sum(c.values[i]), f"sum({c.names[i]})")


def _op_getitem(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    key = []
    for d in x.shape:
        step = c.draw(st.sampled_from([1, 1, 2, -1, -2]))
        start = c.draw(st.integers(0, max(0, d - 1)))
        key.append(slice(start, None, step) if step > 0 else slice(d - 1 - start, None, step))
    c.add(x[tuple(key)], f"{c.names[i]}[{tuple(key)}]")


def _op_pad(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    config = []
    for d in x.shape:
        interior = c.draw(st.integers(0, 2))
        full = d + max(0, d - 1) * interior
        lo = c.draw(st.integers(-1, 2))
        hi = c.draw(st.integers(-1, 2))
        if full + lo + hi < 1:
            lo, hi = max(lo, 0), max(hi, 0)
        config.append((lo, hi, interior))
    scalars = [k for k, v in enumerate(c.values) if v.ndim == 0]
    if scalars and c.draw(st.booleans()):
        k = c.draw(st.sampled_from(scalars))
        value, text = c.values[k], c.names[k]
    else:
        value, text = 0.5, "0.5"
    c.add(lax.pad(x, value, tuple(config)), f"pad({c.names[i]}, {text}, {tuple(config)})")


def _op_concatenate(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    if x.ndim == 0:
        x = lax.reshape(x, (1,))
    axis = c.draw(st.integers(0, x.ndim - 1))
    same = [j for j, v in enumerate(c.values)
            if v.ndim == x.ndim and all(a == b for k, (a, b) in enumerate(zip(v.shape, x.shape)) if k != axis)]
    j = c.draw(st.sampled_from(same)) if same else i
    y = c.values[j] if same else x
    c.add(lax.concatenate([x, y], axis), f"concatenate([{c.names[i]}, {c.names[j]}], {axis})")


def _op_rev(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    dims = _axes_of(c, x.ndim, min_size=1)
    c.add(lax.rev(x, dims), f"rev({c.names[i]}, {dims})")


def _op_dot(c: _Ctx) -> None:
    """dot_general with random contracting and batch dimensions among matching sizes."""
    i = c.pick()
    j = c.draw(st.integers(0, len(c.values) - 1))
    x, y = c.values[i], c.values[j]
    pairs = [(a, b) for a in range(x.ndim) for b in range(y.ndim) if x.shape[a] == y.shape[b]]
    if not pairs:
        c.add(lax.mul(x, rnp.sum(y)), f"{c.names[i]} * sum({c.names[j]})")
        return
    chosen = c.draw(st.lists(st.sampled_from(pairs), min_size=1, max_size=2,
                             unique_by=(lambda p: p[0], lambda p: p[1])))
    n_batch = c.draw(st.integers(0, len(chosen) - 1))
    batch, contract = chosen[:n_batch], chosen[n_batch:]
    dn = ((tuple(a for a, _ in contract), tuple(b for _, b in contract)),
          (tuple(a for a, _ in batch), tuple(b for _, b in batch)))
    if x.size * y.size // max(1, int(np.prod([x.shape[a] for a, _ in chosen]))) > 512:
        c.add(lax.mul(x, rnp.sum(y)), f"{c.names[i]} * sum({c.names[j]})")  # keep sizes small
        return
    c.add(lax.dot_general(x, y, dn), f"dot_general({c.names[i]}, {c.names[j]}, {dn})")


def _op_matmul(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    ok = [j for j, v in enumerate(c.values) if x.ndim >= 1 and v.ndim >= 1
          and x.shape[-1] == (v.shape[-2] if v.ndim >= 2 else v.shape[0])
          and _broadcastable(x.shape[:-2], v.shape[:-2])]
    if not ok:
        return _op_dot(c)
    j = c.draw(st.sampled_from(ok))
    c.add(rnp.matmul(x, c.values[j]), f"{c.names[i]} @ {c.names[j]}")


def _op_select(c: _Ctx) -> None:
    i = c.pick()
    j = c.partner(i)
    k = c.partner(i)
    x, y, z = c.values[i], c.values[j], c.values[k]
    if not _broadcastable(np.broadcast_shapes(x.shape, y.shape), z.shape):
        k, z = i, x
    c.add(rnp.where(rnp.greater(x, 0.1), y, z),
          f"where({c.names[i]} > 0.1, {c.names[j]}, {c.names[k]})")


def _random_indices(c: _Ctx, shape: Sequence[int], bound: int) -> np.ndarray:
    return c.rng.integers(0, bound, size=tuple(shape)).astype(np.int64)


def _op_gather(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    if x.ndim == 0:
        x = lax.reshape(x, (1,))
    axis = c.draw(st.integers(0, x.ndim - 1))
    shape = tuple(c.draw(st.integers(1, 3)) if d == axis else c.draw(st.integers(1, x.shape[d]))
                  for d in range(x.ndim))
    idx = _random_indices(c, shape, x.shape[axis])
    c.add(lax.gather(x, idx, axis), f"gather({c.names[i]}, {idx.tolist()}, axis={axis})")


def _op_scatter_add(c: _Ctx) -> None:
    i = c.pick()
    x = c.values[i]
    if x.ndim == 0:
        x = lax.reshape(x, (1,))
    axis = c.draw(st.integers(0, x.ndim - 1))
    same = [j for j, v in enumerate(c.values) if v.shape == x.shape]
    j = c.draw(st.sampled_from(same)) if same else i
    updates = lax.sin(c.values[j] if same else x)
    idx = _random_indices(c, x.shape, x.shape[axis])  # duplicates allowed: they add
    c.add(lax.scatter_add(x, idx, updates, axis),
          f"scatter_add({c.names[i]}, {idx.tolist()}, sin({c.names[j]}), axis={axis})")


def _op_argmax_gather(c: _Ctx) -> None:
    """An integer value inside the graph: x gathered at argmax of y (take_along_axis)."""
    i = c.pick()
    x = c.values[i]
    if x.ndim == 0:
        return _op_sum_all(c)
    axis = c.draw(st.integers(0, x.ndim - 1))
    same = [j for j, v in enumerate(c.values) if v.shape == x.shape]
    j = c.draw(st.sampled_from(same))
    where = lax.argmax(c.values[j], axis)
    idx = lax.reshape(where, tuple(1 if d == axis else n for d, n in enumerate(x.shape)))
    c.add(lax.gather(x, idx, axis), f"take_along_axis({c.names[i]}, argmax({c.names[j]}, {axis}), {axis})")


def _op_stop_gradient(c: _Ctx) -> None:
    i = c.pick()
    c.add(lax.mul(lax.stop_gradient(c.values[i]), c.values[i]), f"stop_gradient({c.names[i]}) * {c.names[i]}")


def _half_tanh(x: TracedArray) -> TracedArray:
    return lax.mul(lax.tanh(x), lax.full((), 0.5, x.dtype))


def _one_plus_square(x: TracedArray) -> TracedArray:
    return rnp.add(1.0, rnp.multiply(x, x))


SMOOTH_UNARY: dict[str, Callable[[_Ctx], None]] = {
    "sin": _unary("sin({x})", lax.sin),
    "cos": _unary("cos({x})", lax.cos),
    "tanh": _unary("tanh({x})", lax.tanh),
    "logistic": _unary("logistic({x})", lax.logistic),
    "atan": _unary("atan({x})", lax.atan),
    "asinh": _unary("asinh({x})", lax.asinh),
    "erf": _unary("erf({x})", lax.erf),
    "erfc": _unary("erfc({x})", lax.erfc),
    "sinh": _unary("sinh({x})", lax.sinh),
    "exp": _unary("exp(tanh({x}))", lambda x: lax.exp(lax.tanh(x))),
    "expm1": _unary("expm1(tanh({x}))", lambda x: lax.expm1(lax.tanh(x))),
    "cosh": _unary("cosh(tanh({x}))", lambda x: lax.cosh(lax.tanh(x))),
    "log": _unary("log(1 + {x}**2)", lambda x: lax.log(_one_plus_square(x))),
    "log1p": _unary("log1p({x}**2)", lambda x: lax.log1p(lax.mul(x, x))),
    "sqrt": _unary("sqrt(1 + {x}**2)", lambda x: lax.sqrt(_one_plus_square(x))),
    "rsqrt": _unary("rsqrt(1 + {x}**2)", lambda x: lax.rsqrt(_one_plus_square(x))),
    "cbrt": _unary("cbrt(2 + tanh({x}))", lambda x: lax.cbrt(rnp.add(2.0, lax.tanh(x)))),
    "acosh": _unary("acosh(1.5 + {x}**2)", lambda x: lax.acosh(rnp.add(1.5, lax.mul(x, x)))),
    "asin": _unary("asin(tanh({x})/2)", lambda x: lax.asin(_half_tanh(x))),
    "acos": _unary("acos(tanh({x})/2)", lambda x: lax.acos(_half_tanh(x))),
    "atanh": _unary("atanh(tanh({x})/2)", lambda x: lax.atanh(_half_tanh(x))),
    "tan": _unary("tan(tanh({x})/2)", lambda x: lax.tan(_half_tanh(x))),
    "erf_inv": _unary("erf_inv(tanh({x})/2)", lambda x: lax.erf_inv(_half_tanh(x))),
    "lgamma": _unary("lgamma(1 + {x}**2)", lambda x: lax.lgamma(_one_plus_square(x))),
    "digamma": _unary("digamma(1 + {x}**2)", lambda x: lax.digamma(_one_plus_square(x))),
    "square": _unary("{x}**2", lambda x: lax.integer_pow(x, 2)),
    "cube": _unary("{x}**3", lambda x: lax.integer_pow(x, 3)),
    "inverse_square": _unary("(2 + sin({x}))**-2", lambda x: lax.integer_pow(rnp.add(2.0, lax.sin(x)), -2)),
    "neg": _unary("-{x}", lax.neg),
}
SMOOTH_BINARY: dict[str, Callable[[_Ctx], None]] = {
    "add": _binary("{x} + {y}", rnp.add),
    "sub": _binary("{x} - {y}", rnp.subtract),
    "mul": _binary("{x} * {y}", rnp.multiply),
    "div": _binary("{x} / (2 + sin({y}))", lambda x, y: rnp.divide(x, rnp.add(2.0, lax.sin(y)))),
    "pow": _binary("(1.5 + tanh({x})) ** tanh({y})",
                   lambda x, y: rnp.power(rnp.add(1.5, lax.tanh(x)), lax.tanh(y))),
    "atan2": _binary("atan2({x}, 2 + cos({y}))", lambda x, y: rnp.arctan2(x, rnp.add(2.0, lax.cos(y)))),
}
STRUCTURAL: dict[str, Callable[[_Ctx], None]] = {
    "sum": _reduction("sum", rnp.sum),
    "mean": _reduction("mean", rnp.mean),
    "prod": _reduction("prod", rnp.prod),
    "cumsum": _cumulative("cumsum", P.cumsum_p),
    "cumprod": _cumulative("cumprod", P.cumprod_p),
    "transpose": _op_transpose,
    "reshape": _op_reshape,
    "broadcast": _op_broadcast,
    "getitem": _op_getitem,
    "pad": _op_pad,
    "concatenate": _op_concatenate,
    "rev": _op_rev,
    "dot_general": _op_dot,
    "matmul": _op_matmul,
    "gather": _op_gather,
    "scatter_add": _op_scatter_add,
}
NONSMOOTH: dict[str, Callable[[_Ctx], None]] = {
    "max": _binary("maximum({x}, {y})", rnp.maximum),
    "min": _binary("minimum({x}, {y})", rnp.minimum),
    "abs": _unary("abs({x})", rnp.abs),
    "reduce_max": _reduction("max", rnp.max),
    "reduce_min": _reduction("min", rnp.min),
    "cummax": _cumulative("cummax", P.cummax_p),
    "cummin": _cumulative("cummin", P.cummin_p),
    "select": _op_select,
    "argmax_gather": _op_argmax_gather,
    "stop_gradient": _op_stop_gradient,
}

_GROUPS = (tuple(SMOOTH_UNARY), tuple(SMOOTH_BINARY), tuple(STRUCTURAL), tuple(STRUCTURAL), tuple(NONSMOOTH))
_CATALOG = {**SMOOTH_UNARY, **SMOOTH_BINARY, **STRUCTURAL, **NONSMOOTH}
ALL_OPS: tuple[str, ...] = tuple(_CATALOG)
SMOOTH_OPS: tuple[str, ...] = tuple(SMOOTH_UNARY) + tuple(SMOOTH_BINARY) + tuple(STRUCTURAL)


def _shapes(draw: Draw, n: int) -> list[tuple[int, ...]]:
    """Input shapes aligned on one 'universe' shape, so numpy broadcasting between them works."""
    universe = tuple(draw(st.lists(st.integers(1, 4), min_size=3, max_size=3)))
    shapes = []
    for _ in range(n):
        rank = draw(st.integers(0, 3))
        shapes.append(tuple(d if draw(st.integers(0, 3)) else 1 for d in universe[3 - rank:]))
    return shapes


@st.composite
def _program(draw: Draw, dtype: np.dtype, ops: tuple[str, ...], max_inputs: int, max_steps: int,
             max_outputs: int) -> Program:
    ctx = _Ctx(draw, dtype)
    n_inputs = draw(st.integers(1, max_inputs))
    builder = Builder()
    args = []
    for shape in _shapes(draw, n_inputs):
        args.append(ctx.rng.uniform(-1.5, 1.5, size=shape).astype(dtype))
    inputs = [new_input(builder, lax.aval_of(a)) for a in args]
    for k, x in enumerate(inputs):
        ctx.values.append(x)
        ctx.names.append(f"v{k}")
    ctx.lines.append(f"def program({', '.join(ctx.names)}):")
    groups = [[op for op in group if op in ops] for group in _GROUPS]
    groups = [g for g in groups if g]
    with tracing(builder):
        for _ in range(draw(st.integers(1, max_steps))):
            group = draw(st.sampled_from(groups))  # pick a kind first so 30 unary ops don't crowd out the rest
            _CATALOG[draw(st.sampled_from(group))](ctx)
        # the last value is an output; others may be any value (an input, or the same one again)
        count = draw(st.integers(1, max_outputs))
        picks = [len(ctx.values) - 1] + [draw(st.integers(0, len(ctx.values) - 1)) for _ in range(count - 1)]
    ctx.lines.append(f"    return ({', '.join(ctx.names[p] for p in picks)},)")
    text = "\n".join([ctx.lines[0]] + ["    " + line for line in ctx.lines[1:-1]] + [ctx.lines[-1]])
    graph = builder.build([x.atom for x in inputs], [ctx.values[p].atom for p in picks])
    return Program(graph, tuple(args), text)


def programs(dtype: Any = np.float64, *, ops: Sequence[str] = ALL_OPS, max_inputs: int = 3,
             max_steps: int = 6, max_outputs: int = 2) -> st.SearchStrategy[Program]:
    """Random programs over floating inputs of ``dtype``; see the module docstring.

    ``ops``: names from ``ALL_OPS`` (``SMOOTH_OPS`` leaves out max/min/abs/select and friends).
    """
    unknown = set(ops) - set(_CATALOG)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {ALL_OPS}")
    return _program(np.dtype(dtype), tuple(ops), max_inputs, max_steps, max_outputs)

