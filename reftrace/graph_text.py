"""Graphs as text: ``parse`` reads back the listing ``str(graph)`` prints; ``save``/``load`` keep any
graph (large literals included) in a text file plus a side ``.npz`` file.

Researchers share graphs as files and diff them, so the listing is the format: what a person reads
is what the machine reads. The format, its grammar and its stability promise are in
docs/graph_format.md; the printer is ``reftrace.graph.format_graph``.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
from typing import Any, Callable

import numpy as np

import reftrace.nn  # noqa: F401 - registers the composite primitives (layer_norm, ...) that listings name
from reftrace.errors import ArgumentError, GraphError, ReftraceError
from reftrace.graph import _DTYPE_SHORT, Aval, Eqn, Graph, Literal, Params, Var, expect_graph, format_graph
from reftrace.primitives import infer_avals, registry

__all__ = ["FORMAT_VERSION", "parse", "save", "load"]

FORMAT_VERSION = 1
"""The version ``save`` writes (``# reftrace-graph: 1``); ``load`` reads every version up to it."""

_HEADER_KEYS = ("reftrace-graph", "arrays", "joint", "input_names", "output_names")
_SHORT_DTYPES = {short: name for name, short in _DTYPE_SHORT.items()}

# what resolves ``const#k:aval`` operands: (k, aval, line number) -> Literal; None in ``parse``
Resolver = Callable[[int, Aval, int], Literal]


def parse(text: str) -> Graph:
    """The Graph that ``text`` lists: ``parse(str(g)) == g`` whenever ``g``'s literals print in full.

    A listing whose large literals print as ``const:f32[...]`` has lost their values; keep such
    graphs with ``save``/``load``. Malformed text raises ``GraphError`` naming the line.
    """
    if not isinstance(text, str):
        raise ArgumentError(f"parse expects the text of a listing (str), got {type(text).__name__}; "
                            "to read a file written by rt.save use rt.load(path)")
    header, body = _split(text)
    if "arrays" in header:
        raise GraphError(f"line {header['arrays'][0]}: this listing's large literals live in a side "
                         "array file: read it with rt.load(path)")
    return _build(header, body, resolve=None)


def save(graph: Graph, path: str | os.PathLike[str]) -> None:
    """Write ``graph`` to ``path`` (the listing, with a version line) and, if it has literals too
    large to print, their values to ``path + ".npz"``; ``load(path)`` gives back an equal graph."""
    expect_graph(graph, "save")
    path = os.fspath(path)
    constants: dict[Literal, int] = {}

    def literal(lit: Literal) -> str:
        text = str(lit)
        if not text.startswith("const:"):
            return text
        return f"const#{constants.setdefault(lit, len(constants))}:{lit.aval.str_short()}"

    listing = format_graph(graph, literal=literal)
    header = [f"# reftrace-graph: {FORMAT_VERSION}"]
    if constants:
        arrays = {f"const{k}": _storable(lit.value) for lit, k in constants.items()}
        arrays["dtypes"] = np.array([lit.dtype.name for lit in constants])
        with open(_arrays_path(path), "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        header.append(f"# arrays: {len(constants)} sha256:{_digest(lit.data for lit in constants)}")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(header + [listing]) + "\n")


def load(path: str | os.PathLike[str]) -> Graph:
    """The Graph ``save(graph, path)`` wrote (reading ``path + ".npz"`` when it has large literals)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    header, body = _split(text)
    resolve = _array_resolver(path, header["arrays"]) if "arrays" in header else None
    return _build(header, body, resolve)


# ----------------------------------------------------------------------------- lines

def _split(text: str) -> tuple[dict[str, tuple[int, str]], list[tuple[int, str]]]:
    """Header lines (``# key: value``) by key, and the numbered non-blank lines of the listing."""
    header: dict[str, tuple[int, str]] = {}
    body: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if body or not line.startswith("#"):
            body.append((n, line))
            continue
        m = re.fullmatch(r"#\s*([A-Za-z_][\w-]*)\s*:\s*(.*)", line)
        if not m or m[1] not in _HEADER_KEYS:
            raise GraphError(f"line {n}: expected a header line '# key: value' with key one of "
                             f"{', '.join(_HEADER_KEYS)}; got {_quote(line)}")
        if m[1] in header:
            raise GraphError(f"line {n}: second '# {m[1]}:' line (the first is line {header[m[1]][0]})")
        header[m[1]] = (n, m[2].strip())
    if "reftrace-graph" in header:
        n, value = header["reftrace-graph"]
        if not value.isdigit() or int(value) < 1:
            raise GraphError(f"line {n}: expected a format version number after '# reftrace-graph:', got {_quote(value)}")
        if int(value) > FORMAT_VERSION:
            raise GraphError(f"line {n}: format version {value} was written by a newer reftrace; this one "
                             f"reads versions up to {FORMAT_VERSION}")
    return header, body


def _build(header: dict[str, tuple[int, str]], body: list[tuple[int, str]], resolve: Resolver | None) -> Graph:
    """The Graph of a split listing: ``{ lambda <decls> .``, one line per equation, ``in (<atoms>) }``."""
    if not body:
        raise GraphError("expected a listing '{ lambda ... }', got no text")
    env: dict[str, Var] = {}
    n, first = body[0]
    m = re.fullmatch(r"\{\s*lambda\b(.*)\.", first)
    if not m:
        raise GraphError(f"line {n}: expected '{{ lambda <inputs> .', got {_quote(first)}")
    inputs = [_define(tok, env, n) for tok in _tokens(m[1], n)]
    eqns, end = [], None
    for n, line in body[1:]:
        if end is not None:
            raise GraphError(f"line {n}: expected nothing after the listing's closing '}}' (line {end[0]}), "
                             f"got {_quote(line)}")
        if line.startswith("in ") or line.startswith("in("):
            end = (n, line)
        else:
            eqns.append(_eqn(line, n, env, resolve))
    if end is None:
        raise GraphError(f"line {body[-1][0]}: expected the last line 'in (<outputs>) }}', got the end of the text")
    n, line = end
    m = re.fullmatch(r"in\s*\((.*)\)\s*\}", line)
    if not m:
        raise GraphError(f"line {n}: expected 'in (<outputs>) }}', got {_quote(line)}")
    outputs = [_operand(tok, env, n, resolve) for tok in _tokens(m[1], n)]
    joint = _joint(header, len(inputs), len(outputs))
    names = {key: _names(header, key, count) for key, count in
             (("input_names", len(inputs)), ("output_names", len(outputs))) if key in header}
    names = {key: value for key, value in names.items() if key in Graph.__dataclass_fields__}
    try:
        return Graph(tuple(inputs), tuple(eqns), tuple(outputs), joint, **names)
    except ReftraceError as err:
        raise GraphError(f"line {n}: {err}") from None


def _eqn(line: str, n: int, env: dict[str, Var], resolve: Resolver | None) -> Eqn:
    """``<decls> = <primitive>[<params>] <operands>``, checked against the primitive's shape rule."""
    tokens = _tokens(line, n)
    if "=" not in tokens:
        raise GraphError(f"line {n}: expected an equation '<outputs> = <primitive> <operands>' or "
                         f"'in (<outputs>) }}', got {_quote(line)}")
    eq = tokens.index("=")
    if eq + 1 == len(tokens):
        raise GraphError(f"line {n}: expected a primitive name after '=', got the end of the line")
    m = re.fullmatch(r"([A-Za-z_][\w.]*)(?:\[(.*)\])?", tokens[eq + 1], re.S)
    if not m:
        raise GraphError(f"line {n}: expected '<primitive>' or '<primitive>[<params>]', got {_quote(tokens[eq + 1])}")
    prim = registry.get(m[1])
    if prim is None:
        raise GraphError(f"line {n}: unknown primitive {m[1]!r}: not in reftrace.primitives.registry "
                         "(import the module that defines it first)")
    params = _params(m[2] or "", n)
    args = [_operand(tok, env, n, resolve) for tok in tokens[eq + 2:]]
    try:
        expected = infer_avals(prim, [a.aval for a in args], params)
    except Exception as err:  # noqa: BLE001 - any failure of a rule on hand-written text is the text's fault
        raise GraphError(f"line {n}: {prim.name} rejects these operands/params: {err}") from None
    declared = [_decl(tok, n) for tok in tokens[:eq]]
    if [aval for _, aval in declared] != list(expected):
        raise GraphError(f"line {n}: {prim.name} gives {' '.join(a.str_short() for a in expected) or 'no outputs'}, "
                         f"the listing declares {' '.join(a.str_short() for _, a in declared) or 'none'}")
    outs = [_define(tok, env, n) for tok in tokens[:eq]]
    return Eqn(prim, tuple(args), tuple(outs), params)


def _tokens(text: str, n: int) -> list[str]:
    """``text`` split at the spaces outside brackets and quotes (``[1.0, 2.0]:f32[2]`` is one token)."""
    tokens: list[str] = []
    opening = {")": "(", "]": "[", "}": "{"}
    open_brackets: list[str] = []
    start, quote, i = None, "", 0
    while i < len(text):
        c = text[i]
        if quote:  # inside a string param: only its closing quote matters
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            open_brackets.append(c)
        elif c in opening and (not open_brackets or open_brackets.pop() != opening[c]):
            raise GraphError(f"line {n}: unbalanced {c!r} in {_quote(text)}")
        if c.isspace() and not quote and not open_brackets:
            if start is not None:
                tokens.append(text[start:i])
                start = None
        elif start is None:
            start = i
        i += 1
    if quote or open_brackets:
        raise GraphError(f"line {n}: unclosed {quote or open_brackets[-1]!r} in {_quote(text)}")
    if start is not None:
        tokens.append(text[start:])
    return tokens


# ----------------------------------------------------------------------------- variables and avals

def _decl(token: str, n: int) -> tuple[str, Aval]:
    m = re.fullmatch(r"([A-Za-z_]\w*):(\w+)\[([\d,]*)\]", token)
    if not m:
        raise GraphError(f"line {n}: expected a variable declaration like 'a:f32[3,4]', got {_quote(token)}")
    return m[1], Aval(_shape(m[3]), _dtype(m[2], n))


def _define(token: str, env: dict[str, Var], n: int) -> Var:
    name, aval = _decl(token, n)
    if name in env:
        raise GraphError(f"line {n}: variable {name!r} is defined twice")
    var = env[name] = Var(len(env), aval)
    return var


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",")) if text else ()


@functools.lru_cache(maxsize=None)
def _dtype_or_none(name: str) -> np.dtype | None:
    full = _SHORT_DTYPES.get(name, name)
    try:
        dtype = np.dtype(full)
    except TypeError:
        try:
            import ml_dtypes  # bfloat16, float8_*, int4: numpy has none of them
        except ModuleNotFoundError:
            return None
        dtype = np.dtype(getattr(ml_dtypes, full)) if hasattr(ml_dtypes, full) else None
    # only names the printer writes: 'f4', 'd' or 'O' would parse in numpy but never print
    return dtype if dtype is not None and dtype.name == full and dtype.kind in "biufcV" else None


def _dtype(name: str, n: int) -> np.dtype:
    dtype = _dtype_or_none(name)
    if dtype is None:
        known = ", ".join(_SHORT_DTYPES)
        raise GraphError(f"line {n}: unknown dtype {name!r} (expected one of {known}, or a dtype name "
                         "such as float8_e4m3fn; bf16 and float8 need ml_dtypes installed)")
    return dtype


# ----------------------------------------------------------------------------- operands and literals

def _operand(token: str, env: dict[str, Var], n: int, resolve: Resolver | None) -> Var | Literal:
    if ":" not in token:
        if token not in env:
            raise GraphError(f"line {n}: variable {token!r} is used before it is defined")
        return env[token]
    text, _, aval_text = token.rpartition(":")
    m = re.fullmatch(r"(\w+)(?:\[([\d,]*)\])?", aval_text)
    if not m:
        raise GraphError(f"line {n}: expected a literal's type like 'f32' or 'f32[2]' after ':', got {_quote(token)}")
    aval = Aval(_shape(m[2] or ""), _dtype(m[1], n))
    if text == "const":
        raise GraphError(f"line {n}: literal {token} was printed without its values (more than 4 elements); "
                         "keep such graphs with rt.save(graph, path) and read them with rt.load(path)")
    ref = re.fullmatch(r"const#(\d+)", text)
    if ref:
        if resolve is None:
            raise GraphError(f"line {n}: literal {token} refers to a side array file: read the file with rt.load(path)")
        return resolve(int(ref[1]), aval, n)
    return _literal(text, aval, n)


def _literal(text: str, aval: Aval, n: int) -> Literal:
    """A literal from nested-list text (``[[1.0, nan], [-0.0, 2.5]]``) of ``aval``'s shape."""
    node, end = _nested(text, 0, n)
    if text[end:].strip():
        raise GraphError(f"line {n}: unexpected {_quote(text[end:])} after a literal's values")
    leaves: list[str] = []
    _flatten(node, aval.shape, leaves, text, n)
    data = b"".join(_scalar(leaf, aval.dtype, n).tobytes() for leaf in leaves)
    return Literal(data, aval)


def _nested(text: str, i: int, n: int) -> tuple[Any, int]:
    """One value or bracketed list of values starting at ``text[i]``: (leaf string or list, end)."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "[":
        items: list[Any] = []
        i += 1
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i < len(text) and text[i] == "]" and not items:
                return items, i + 1
            item, i = _nested(text, i, n)
            items.append(item)
            while i < len(text) and text[i].isspace():
                i += 1
            if i < len(text) and text[i] == ",":
                i += 1
            elif i < len(text) and text[i] == "]":
                return items, i + 1
            else:
                raise GraphError(f"line {n}: expected ',' or ']' in the literal {_quote(text)}")
    j = i
    while j < len(text) and text[j] not in ",]":
        j += 1
    leaf = text[i:j].strip()
    if not leaf:
        raise GraphError(f"line {n}: expected a value in the literal {_quote(text)}")
    return leaf, j


def _flatten(node: Any, shape: tuple[int, ...], out: list[str], text: str, n: int) -> None:
    if not shape:
        if isinstance(node, list):
            raise GraphError(f"line {n}: literal {_quote(text)} has more dimensions than its type says")
        out.append(node)
        return
    if not isinstance(node, list) or len(node) != shape[0]:
        raise GraphError(f"line {n}: literal {_quote(text)} does not have the shape {list(shape)} its type says")
    for item in node:
        _flatten(item, shape[1:], out, text, n)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?inf")


@functools.lru_cache(maxsize=None)
def _kind(dtype: np.dtype) -> type:
    """The Python type a dtype's values print as: bool, int, float or complex (ml_dtypes included)."""
    return type(np.zeros((), dtype).item())


def _scalar(leaf: str, dtype: np.dtype, n: int) -> np.ndarray:
    """One printed value (``1.5``, ``-nan``, ``nan(0x7fc00001)``, ``True``, ``(1+2j)``) as a 0-d array."""
    kind = _kind(dtype)
    try:
        if kind is bool and leaf in ("True", "False"):
            return np.array(leaf == "True")
        if kind is int and re.fullmatch(r"[-+]?\d+", leaf):
            return np.array(int(leaf), dtype)
        if kind is float:
            if leaf in ("nan", "-nan"):
                return np.array(np.nan if leaf == "nan" else -np.nan, dtype)
            bits = re.fullmatch(r"nan\(0x([0-9a-fA-F]+)\)", leaf)
            if bits and int(bits[1], 16) < 1 << (8 * dtype.itemsize):
                return np.array(int(bits[1], 16), f"u{dtype.itemsize}").view(dtype)
            if _FLOAT.fullmatch(leaf):
                return np.array(float(leaf), dtype)
        if kind is complex and re.fullmatch(r"[-+()\w.]+", leaf):
            return np.array(complex(leaf), dtype)
    except (OverflowError, ValueError) as err:
        raise GraphError(f"line {n}: value {leaf} does not fit {dtype.name}: {err}") from None
    raise GraphError(f"line {n}: expected a value of dtype {dtype.name}, got {_quote(leaf)}")


# ----------------------------------------------------------------------------- params

def _params(text: str, n: int) -> Params:
    """``k=v k2=v2``: Python literals (no code runs), dtype short names, nan/inf."""
    values: dict[str, Any] = {}
    for token in _tokens(text, n):
        key, eq, value = token.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise GraphError(f"line {n}: expected a parameter 'name=value', got {_quote(token)}")
        if key in values:
            raise GraphError(f"line {n}: parameter {key!r} given twice")
        try:
            node = ast.parse(value, mode="eval").body
        except SyntaxError:
            raise GraphError(f"line {n}: cannot read the value of parameter {key!r}: {_quote(value)}") from None
        values[key] = _param_value(node, key, value, n)
    return Params(values)


def _param_value(node: ast.AST, key: str, text: str, n: int) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_param_value(e, key, text, n) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _param_value(node.operand, key, text, n)
        if isinstance(v, (int, float, complex)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # complex: (1+2j)
        real, imag = _param_value(node.left, key, text, n), _param_value(node.right, key, text, n)
        if type(real) in (int, float) and type(imag) is complex and imag.real == 0:
            return real + imag if isinstance(node.op, ast.Add) else real - imag
    if isinstance(node, ast.Name):
        if node.id in ("nan", "inf"):
            return float(node.id)
        dtype = _dtype_or_none(node.id)
        if dtype is not None:
            return dtype
    raise GraphError(f"line {n}: cannot read the value of parameter {key!r}: {_quote(text)} (expected Python "
                     "literals: numbers, strings, True/False/None, tuples; nan/inf; dtype names like f32)")


# ----------------------------------------------------------------------------- header values

def _joint(header: dict[str, tuple[int, str]], num_inputs: int, num_outputs: int) -> tuple[int, int] | None:
    if "joint" not in header:
        return None
    n, text = header["joint"]
    m = re.fullmatch(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", text)
    if not m:
        raise GraphError(f"line {n}: expected '# joint: (num_primals, num_outputs)', got {_quote(text)}")
    joint = int(m[1]), int(m[2])
    if joint[0] > num_inputs or joint[1] > num_outputs:
        raise GraphError(f"line {n}: joint {joint} does not fit {num_inputs} inputs and {num_outputs} outputs")
    return joint


def _names(header: dict[str, tuple[int, str]], key: str, count: int) -> tuple[str, ...]:
    n, text = header[key]
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise GraphError(f"line {n}: expected '# {key}: [\"name\", ...]' (a JSON list of strings), got {_quote(text)}")
    if len(names) != count:
        raise GraphError(f"line {n}: {len(names)} {key} for {count} {key.split('_')[0]}s")
    return tuple(names)


# ----------------------------------------------------------------------------- the side array file

def _arrays_path(path: str) -> str:
    return path + ".npz"


def _storable(value: np.ndarray) -> np.ndarray:
    """npz holds numpy's own dtypes only: bfloat16/float8 values are kept as their bits (uint)."""
    return value if value.dtype.kind in "biufc" else value.view(f"u{value.dtype.itemsize}")


def _digest(chunks: Any) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _array_resolver(path: str, arrays_line: tuple[int, str]) -> Resolver:
    """Reads the side file named by convention, checks it against the ``# arrays:`` line, and
    resolves ``const#k:aval`` to its literal."""
    n, text = arrays_line
    m = re.fullmatch(r"(\d+)\s+sha256:([0-9a-f]{64})", text)
    if not m:
        raise GraphError(f"line {n}: expected '# arrays: <count> sha256:<hex digest>', got {_quote(text)}")
    count, digest = int(m[1]), m[2]
    side = _arrays_path(path)
    try:
        with np.load(side, allow_pickle=False) as npz:
            stored = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise GraphError(f"{path} keeps {count} large literals in {side}, which does not exist") from None
    except (OSError, ValueError) as err:
        raise GraphError(f"{side} is not a readable .npz file: {err}") from None
    arrays = [stored.get(f"const{k}") for k in range(count)]
    dtypes = stored.get("dtypes")
    if any(a is None for a in arrays) or dtypes is None or len(dtypes) != count:
        raise GraphError(f"{side} does not hold the {count} arrays (const0..const{count - 1}, dtypes) "
                         f"that line {n} of {path} announces")
    if _digest(np.ascontiguousarray(a).tobytes() for a in arrays) != digest:
        raise GraphError(f"{side} does not match {path} (sha256 differs from line {n}): "
                         "was one of the two files replaced?")

    def resolve(k: int, aval: Aval, line: int) -> Literal:
        if k >= count:
            raise GraphError(f"line {line}: const#{k} but the side file holds {count} arrays")
        arr = arrays[k]
        if str(dtypes[k]) != aval.dtype.name or arr.shape != aval.shape or arr.dtype.itemsize != aval.dtype.itemsize:
            raise GraphError(f"line {line}: const#{k} is {aval.str_short()} in the listing but "
                             f"{dtypes[k]}{list(arr.shape)} in {side}")
        return Literal(np.ascontiguousarray(arr).tobytes(), aval)
    return resolve


def _quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
