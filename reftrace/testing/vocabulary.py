"""The op vocabulary of random programs: each entry draws one line onto a ``Draft``.

An entry picks operands among the values drawn so far (most recent first), writes the line's
source and, for a line with a kink, a guard (``reftrace.testing.guards``). Domains are kept by
construction: ``log``/``sqrt``/``rsqrt``/``reciprocal``/``pow`` and divisors apply to
``x * x + 0.5``, never to a value that can reach zero or go negative. Lines that need a
weight, a bias, a running statistic or an index make it a new input, shaped from the operand
in both shape worlds. An entry that finds no suitable operand draws nothing.
"""
from __future__ import annotations

from typing import Callable

import torch

from reftrace.testing.program import INDEX, POSITIVE
from reftrace.testing.draft import Draft, Value

Entry = Callable[[Draft], bool]


def _unary(template: str, guard: str | None = None) -> Entry:
    def entry(d: Draft) -> bool:
        x = d.pick()
        if x is None:
            return False
        return d.emit(template.format(x=x.name), guard=guard.format(x=x.name) if guard else None)
    return entry


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    for x, y in zip(reversed(a), reversed(b)):
        if x != y and 1 not in (x, y):
            return False
    return True


def _binary(template: str, guard: str | None = None) -> Entry:
    def entry(d: Draft) -> bool:
        x = d.pick()
        if x is None:
            return False
        # half the time insist on another shape: broadcasting is where gradients go wrong
        other_shape = d.boolean()
        y = d.pick(lambda v: _broadcastable(v.shape, x.shape) and (not other_shape or v.shape != x.shape)) or x
        if d.boolean():
            x, y = y, x
        fields = {"x": x.name, "y": y.name}
        return d.emit(template.format(**fields), guard=guard.format(**fields) if guard else None)
    return entry


def _dims(d: Draft, x: Value) -> list[int]:
    """One or several distinct dims of ``x`` (possibly negative)."""
    count = d.integer(1, max(1, x.ndim))
    dims = d.permutation(x.ndim)[:count]
    return [dim - x.ndim if d.boolean() else dim for dim in dims]


def _reduction(method: str, *, guard: bool = False, extra: str = "") -> Entry:
    """``x.method(dims, keepdim=...)`` over one or several dims, or over everything."""
    def entry(d: Draft) -> bool:
        x = d.pick()
        if x is None:
            return False
        if x.ndim == 0 or d.integer(0, 5) == 0:
            if method == "logsumexp":
                return False
            dims = None
            text = f"{x.name}.{method}({extra.lstrip(', ')})"
        else:
            dims = _dims(d, x)
            keep = ", keepdim=True" if d.boolean() else ""
            text = f"{x.name}.{method}(({', '.join(map(str, dims))},){extra}{keep})"
        return d.emit(text, guard=f"G.gap({x.name}, {dims})" if guard else None)
    return entry


def _max_dim(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    axis = d.axis(x)
    return d.emit(f"{x.name}.max(dim={axis}).values", guard=f"G.gap({x.name}, [{axis}])")


def _softmax(fn: str) -> Entry:
    def entry(d: Draft) -> bool:
        x = d.pick(lambda v: v.ndim >= 1)
        if x is None:
            return False
        return d.emit(f"torch.{fn}({x.name}, dim={d.axis(x)})")
    return entry


def _where(d: Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    y = d.pick(lambda v: _broadcastable(v.shape, x.shape))
    compare = d.sample([">", "<", ">=", "<="])
    if d.boolean():
        other = d.pick(lambda v: _broadcastable(v.shape, x.shape))
        return d.emit(f"torch.where({x.name} {compare} {y.name}, {x.name}, {other.name})",
                      guard=f"G.near({x.name} - {y.name}, 0.0)")
    return d.emit(f"{x.name}.masked_fill({x.name} {compare} {y.name}, 0.25)",
                  guard=f"G.near({x.name} - {y.name}, 0.0)")


def _transpose(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 2)
    if x is None:
        return False
    return d.emit(f"{x.name}.transpose({d.axis(x)}, {d.axis(x)})")


def _permute(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 2)
    if x is None:
        return False
    perm = d.permutation(x.ndim)
    return d.emit(f"{x.name}.permute({', '.join(map(str, perm))})")


def _reshape(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    form = d.integer(0, 3)
    if form == 0 and x.ndim >= 2:
        start = d.integer(0, x.ndim - 2)
        return d.emit(f"{x.name}.flatten({start}, {start + 1})")
    if form == 1:
        return d.emit(f"{x.name}.reshape(-1)")
    if form == 2 and x.ndim >= 2:
        return d.emit(f"{x.name}.reshape({x.name}.shape[0], -1)")
    splits = [dim for dim in range(x.ndim) if x.shape[dim] % 2 == 0]
    if not splits:
        return False
    dim = d.sample(splits)
    return d.emit(f"{x.name}.unflatten({dim}, (-1, 2))")


def _expand(d: Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    y = d.pick(lambda v: v.ndim >= x.ndim and _broadcastable(x.shape, v.shape)
               and all(a in (1, b) for a, b in zip(reversed(x.shape), reversed(v.shape))))
    if y is None or y.shape == x.shape:
        return False
    return d.emit(f"{x.name}.expand_as({y.name})")


_SLICES = ("1:", ":-1", "::2", "1::2", ":1", "1:3")


def _slice(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1 and max(v.shape) >= 2)
    if x is None:
        return False
    dim = d.sample([i for i in range(x.ndim) if x.shape[i] >= 2])
    piece = d.sample(_SLICES)
    prefix = "..., " if dim == x.ndim - 1 and dim > 0 and d.boolean() else ":, " * dim
    return d.emit(f"{x.name}[{prefix}{piece}]")


def _select(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    dim = d.integer(0, x.ndim - 1)
    index = d.integer(-1, x.shape[dim] - 1)
    return d.emit(f"{x.name}[{':, ' * dim}{index}]")


def _unsqueeze(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim <= 3)
    if x is None:
        return False
    return d.emit(f"{x.name}.unsqueeze({d.integer(-x.ndim - 1, x.ndim)})")


def _squeeze(d: Draft) -> bool:
    x = d.pick(lambda v: 1 in v.shape)
    if x is None:
        return False
    return d.emit(f"{x.name}.squeeze({d.axis(x, lambda dim: x.shape[dim] == 1)})")


def _join(fn: str) -> Entry:
    def entry(d: Draft) -> bool:
        x = d.pick(lambda v: v.ndim >= 1 or fn == "stack")
        if x is None:
            return False
        if fn == "cat":
            axis = int(d.axis(x))
            y = d.pick(lambda v: v.ndim == x.ndim and all(a == b for i, (a, b) in enumerate(zip(v.shape, x.shape))
                                                           if i != axis % x.ndim))
            return d.emit(f"torch.cat([{x.name}, {y.name}], dim={axis})")
        y = d.pick(lambda v: v.shape == x.shape)
        return d.emit(f"torch.stack([{x.name}, {y.name}], dim={d.integer(-x.ndim - 1, x.ndim)})")
    return entry


def _weight(d: Draft, x: Value, shape_from_x: Callable[[tuple[int, ...]], tuple[int, ...]], prefix: str = "w"):
    new = d.new_shape_of(x)
    return d.new_input(prefix, shape_from_x(x.shape), shape_from_x(new) if new is not None else None)


def _matmul(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    n = d.size()
    if d.boolean():   # against an existing value when one fits
        y = d.pick(lambda v: v.ndim >= 2 and v.shape[-2] == x.shape[-1])
        if y is not None:
            return d.emit(f"{x.name} @ {y.name}")
    w = _weight(d, x, lambda s: (s[-1], n))
    return d.emit(f"{x.name} @ {w.name}", inputs=[w])


def _bmm(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim == 3)
    if x is None:
        return False
    n = d.size()
    w = _weight(d, x, lambda s: (s[0], s[2], n))
    return d.emit(f"torch.bmm({x.name}, {w.name})", inputs=[w])


def _linear(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    n = d.size()
    w = _weight(d, x, lambda s: (n, s[-1]))
    if d.boolean():
        b = _weight(d, x, lambda s: (n,), "b")
        return d.emit(f"F.linear({x.name}, {w.name}, {b.name})", inputs=[w, b])
    return d.emit(f"F.linear({x.name}, {w.name})", inputs=[w])


def _layer_norm(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim >= 1)
    if x is None:
        return False
    k = d.integer(1, min(2, x.ndim))
    w = _weight(d, x, lambda s: s[-k:])
    b = _weight(d, x, lambda s: s[-k:], "b")
    return d.emit(f"F.layer_norm({x.name}, {x.name}.shape[-{k}:], {w.name}, {b.name})",
                  inputs=[w, b])


def _batch_norm(d: Draft) -> bool:
    x = d.pick(lambda v: 2 <= v.ndim <= 4 and _per_channel(v.shape) >= 2)
    if x is None:
        return False
    w = _weight(d, x, lambda s: (s[1],))
    b = _weight(d, x, lambda s: (s[1],), "b")
    new = d.new_shape_of(x)
    mean = d.new_input("running_mean", (x.shape[1],), (new[1],) if new else None, kind="data")
    var = d.new_input("running_var", (x.shape[1],), (new[1],) if new else None, kind=POSITIVE)
    return d.emit(f"F.batch_norm({x.name}, {mean.name}, {var.name}, {w.name}, {b.name}, training=True, "
                  "momentum=0.1)", inputs=[w, b, mean, var], extra_outputs=[mean.name, var.name])


def _per_channel(shape: tuple[int, ...]) -> int:
    n = shape[0]
    for s in shape[2:]:
        n *= s
    return n


def _conv2d(d: Draft) -> bool:
    x = d.pick(lambda v: v.ndim == 4 and min(v.shape[2:]) >= 2)
    if x is None:
        return False
    k = d.integer(1, 3)
    padding = d.integer(0, 1)
    stride = d.integer(1, 2)
    out = d.size()
    w = _weight(d, x, lambda s: (out, s[1], k, k))
    inputs = [w]
    bias = "None"
    if d.boolean():
        b = _weight(d, x, lambda s: (out,), "b")
        inputs.append(b)
        bias = b.name
    return d.emit(f"F.conv2d({x.name}, {w.name}, {bias}, stride={stride}, padding={padding})",
                  inputs=inputs)


def _indexing(gather: bool) -> Entry:
    """``torch.gather`` (an index shaped like the operand but along ``dim``), or ``index_select`` and
    ``x[index]`` (a 1-D index); the index is an int64 input within the dim's size in both worlds."""
    def entry(d: Draft) -> bool:
        x = d.pick(lambda v: v.ndim >= 1)
        if x is None:
            return False
        dim = d.integer(0, x.ndim - 1)
        length = d.integer(1, 4)
        new = d.new_shape_of(x)
        if gather:
            shape = tuple(length if i == dim else s for i, s in enumerate(x.shape))
            new_shape = tuple(length if i == dim else s for i, s in enumerate(new)) if new else None
        else:
            shape, new_shape = (length,), (length,) if new else None
        index = d.new_input("index", shape, new_shape, kind=INDEX, high=x.shape[dim],
                            new_high=new[dim] if new else 0)
        if gather:
            return d.emit(f"torch.gather({x.name}, {dim}, {index.name})", inputs=[index])
        if dim == 0 and d.boolean():
            return d.emit(f"{x.name}[{index.name}]", inputs=[index])
        return d.emit(f"{x.name}.index_select({dim}, {index.name})", inputs=[index])
    return entry


def _cast(d: Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    target = "torch.float64" if x.meta.dtype == torch.float32 else "torch.float32"
    return d.emit(f"{x.name}.to({target})")


def _inplace(on_input: bool) -> Entry:
    """``a.op_(b)``: on an intermediate, or on a data input (an input mutation the caller must see)."""
    def entry(d: Draft) -> bool:
        if on_input:
            x = d.pick(lambda v: v.input_kind in ("data",))
        else:
            x = d.pick(lambda v: v.input_kind is None)
        if x is None:
            return False
        method = d.sample(["mul_", "add_", "sub_", "tanh_", "clamp_"])
        if method == "tanh_":
            return d.emit(f"{x.name}.tanh_()")
        if method == "clamp_":
            return d.emit(f"{x.name}.clamp_(-1.0, 1.0)", guard=f"G.near({x.name}, -1.0, 1.0)")
        y = d.pick(lambda v: _broadcastable(v.shape, x.shape) and len(v.shape) <= x.ndim
                   and all(a in (1, b) for a, b in zip(reversed(v.shape), reversed(x.shape))))
        if y is None:
            return False
        return d.emit(f"{x.name}.{method}({y.name})")
    return entry


def _inplace_view_of_input(d: Draft) -> bool:
    """Write through a slice of a data input: the input changes in part."""
    x = d.pick(lambda v: v.input_kind == "data" and v.ndim >= 1 and v.shape[0] >= 2)
    if x is None:
        return False
    y = d.pick(lambda v: v.input_kind is None and _broadcastable(v.shape, (1,) + x.shape[1:])
               and len(v.shape) <= x.ndim
               and all(a in (1, b) for a, b in zip(reversed(v.shape), reversed((1,) + x.shape[1:]))))
    if y is None:
        return False
    return d.emit(f"{x.name}[:1].add_({y.name})")


VOCABULARY: dict[str, Entry] = {
    # elementwise, smooth
    "tanh": _unary("torch.tanh({x})"),
    "add": _binary("{x} + {y}"),
    "mul": _binary("{x} * {y}"),
    "sub": _binary("{x} - {y}"),
    "div": _binary("{x} / ({y} * {y} + 0.5)"),
    "exp": _unary("torch.exp({x})"),
    "log": _unary("torch.log({x} * {x} + 0.5)"),
    "sigmoid": _unary("torch.sigmoid({x})"),
    "gelu": _unary("F.gelu({x})"),
    "gelu_tanh": _unary("F.gelu({x}, approximate='tanh')"),
    "silu": _unary("F.silu({x})"),
    "softplus": _unary("F.softplus({x})"),
    "logsigmoid": _unary("F.logsigmoid({x})"),
    "sin": _unary("torch.sin({x})"),
    "cos": _unary("torch.cos({x})"),
    "erf": _unary("torch.erf({x})"),
    "atan": _unary("torch.atan({x})"),
    "sqrt": _unary("torch.sqrt({x} * {x} + 0.5)"),
    "rsqrt": _unary("torch.rsqrt({x} * {x} + 0.5)"),
    "reciprocal": _unary("torch.reciprocal({x} * {x} + 0.5)"),
    "pow": _unary("({x} * {x} + 0.5) ** 1.5"),
    "cube": _unary("{x} ** 3"),
    "neg": _unary("-{x}"),
    "scale": _unary("{x} * 2.5 + 1.0"),
    # elementwise with kinks (guarded)
    "relu": _unary("torch.relu({x})", "G.near({x}, 0.0)"),
    "leaky_relu": _unary("F.leaky_relu({x}, 0.1)", "G.near({x}, 0.0)"),
    "elu": _unary("F.elu({x})", "G.near({x}, 0.0)"),
    "abs": _unary("torch.abs({x})", "G.near({x}, 0.0)"),
    "hardtanh": _unary("F.hardtanh({x})", "G.near({x}, -1.0, 1.0)"),
    "clamp": _unary("torch.clamp({x}, -0.5, 2.0)", "G.near({x}, -0.5, 2.0)"),
    "maximum": _binary("torch.maximum({x}, {y})", "G.near({x} - {y}, 0.0)"),
    "minimum": _binary("torch.minimum({x}, {y})", "G.near({x} - {y}, 0.0)"),
    "where": _where,
    # reductions
    "sum": _reduction("sum"),
    "mean": _reduction("mean"),
    "amax": _reduction("amax", guard=True),
    "amin": _reduction("amin", guard=True),
    "max.dim": _max_dim,
    "logsumexp": _reduction("logsumexp"),
    "var": _reduction("var", extra=", correction=0"),
    "std": _reduction("std"),
    "cumsum": _softmax("cumsum"),
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    # views and data movement
    "transpose": _transpose,
    "permute": _permute,
    "reshape": _reshape,
    "expand": _expand,
    "slice": _slice,
    "select": _select,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "cat": _join("cat"),
    "stack": _join("stack"),
    "gather": _indexing(gather=True),
    "index": _indexing(gather=False),
    "cast": _cast,
    # contractions and modules (their weights and buffers become inputs)
    "matmul": _matmul,
    "bmm": _bmm,
    "Linear": _linear,
    "layer_norm": _layer_norm,
    "BatchNorm": _batch_norm,
    "Conv2d": _conv2d,
    # in place
    "inplace": _inplace(on_input=False),
    "inplace_input": _inplace(on_input=True),
    "inplace_input_view": _inplace_view_of_input,
}

# drawn twice as often: the ops whose kernels overflow or cancel when written naively, and the
# broadcasting binary ops, whose gradients must reduce over the broadcast dims
WEIGHTS: dict[str, int] = {name: 2 for name in (
    "add", "mul", "sub", "exp", "softplus", "logsigmoid", "logsumexp", "var", "std", "softmax", "log_softmax",
    "layer_norm", "BatchNorm")}
