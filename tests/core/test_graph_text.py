"""Graphs as text: ``rt.parse(str(g)) == g`` (and printing is canonical), ``rt.save``/``rt.load`` for
every graph, in this process and a fresh one, and errors that name the line."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings

import reftrace as rt
import reftrace.numpy as rnp
from reftrace import lax
from reftrace.builder import Builder
from reftrace.graph import Aval, Graph, Literal, format_graph
from tests.properties.programs import programs

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _small_literals(g: Graph) -> bool:
    atoms = [a for e in g.eqns for a in e.inputs] + list(g.outputs)
    return all(not str(a).startswith("const:") for a in atoms if isinstance(a, Literal))


def check_round_trip(g: Graph) -> None:
    """parse gives back ``g`` from its listing (when it prints every value), the listing is canonical,
    and save/load gives back ``g`` whatever its literals."""
    if _small_literals(g):
        text = str(g)
        back = rt.parse(text)
        assert back == g and hash(back) == hash(g), f"{text}\n!=\n{back}"
        assert str(back) == text
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "g.graph")
        rt.save(g, path)
        assert rt.load(path) == g
        assert rt.load(str(path)) == g


def _joint_and_halves(g: Graph) -> list[Graph]:
    j = rt.vjp(g)
    p = rt.partition(j)
    return [g, j, p.forward, p.backward]


def _graph(fn, *avals: Aval) -> Graph:
    """``fn`` traced with ``reftrace.lax`` at these avals (any dtype, literals made by hand)."""
    b = Builder()
    xs = [lax.new_input(b, a) for a in avals]
    with lax.tracing(b):
        out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    return b.build([x.atom for x in xs], [lax.to_atom(o) for o in outs])


# ----------------------------------------------------------------------------- round trips

def test_listing_parses_back():
    g = rt.trace(lambda x, w: rnp.sum(rnp.tanh(x @ w)) * 2.0, np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    for h in _joint_and_halves(g):
        check_round_trip(h)
    j = rt.vjp(g)
    assert str(j).startswith("# joint: (2, 1)\n{ lambda a:f32[2,3] b:f32[3,4] c:f32[] .")
    assert rt.parse(str(j)).joint == (2, 1) and rt.parse(str(g)).joint is None
    assert rt.parse(format_graph(j, indent=6)) == j  # indentation is not significant


@given(programs(dtype=np.float64))
def test_random_programs_float64(program):
    for h in _joint_and_halves(program.graph):
        check_round_trip(h)


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(programs(dtype=np.float32))
def test_random_programs_float32(program):
    for h in _joint_and_halves(program.graph):
        check_round_trip(h)


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


COMPOSITES = {
    "gelu": (lambda x: rt.nn.gelu(x, "tanh"), [_r(2, 3)]),
    "softmax": (lambda x: rt.nn.softmax(x, 1), [_r(2, 3)]),
    "log_softmax": (lambda x: rt.nn.log_softmax(x, 0), [_r(2, 3)]),
    "layer_norm": (lambda x, w, b: rt.nn.layer_norm(x, w, b, normalized_ndim=1, eps=1e-5)[0], [_r(2, 3), _r(3), _r(3)]),
    "batch_norm_train": (lambda x, w, b, m, v: rt.nn.batch_norm_train(x, w, b, m, v, momentum=0.1, eps=1e-5)[0],
                         [_r(4, 3), _r(3), _r(3), _r(3), np.ones(3)]),
    "batch_norm_eval": (lambda x, m, v: rt.nn.batch_norm_eval(x, m, v, eps=1e-3), [_r(4, 3), _r(3), np.ones(3)]),
    "attention": (lambda q, k, v, m: rt.nn.dot_product_attention(q, k, v, m, causal=True, scale=0.3)[0],
                  [_r(1, 2, 3, 4), _r(1, 2, 3, 4), _r(1, 2, 3, 4), _r(1, 2, 3, 3)]),
    "attention_default_scale": (lambda q, k, v: rt.nn.dot_product_attention(q, k, v)[0],
                                [_r(1, 1, 2, 3), _r(1, 1, 2, 3), _r(1, 1, 2, 3)]),
    "linear": (rt.nn.linear, [_r(2, 3), _r(3, 4), _r(4)]),
    "embedding": (lambda w, i: rt.nn.embedding(w, i, 0, True), [_r(5, 3), np.array([0, 4, 2])]),
    "nll_loss": (lambda x, t, w: rt.nn.nll_loss(x, t, w, reduction="sum")[0], [_r(3, 4), np.array([1, 0, 3]), _r(4)]),
}


@pytest.mark.parametrize("name", COMPOSITES)
def test_composite_primitives(name):
    fn, args = COMPOSITES[name]
    g = rt.trace(fn, *args)
    assert any(e.primitive.name.startswith(name.split("_default")[0]) for e in g.eqns)
    for h in _joint_and_halves(g):
        check_round_trip(h)


def test_params_of_every_kind():
    """dtype params (also bf16), strings, None, floats (inf), bools, nested and negative tuples."""
    f32 = Aval((2, 3), np.float32)
    graphs = [
        _graph(lambda x: lax.convert_element_type(x, BF16), f32),
        _graph(lambda x: lax.argmax(x, 1, np.int32), f32),
        _graph(lambda x: lax.sort(x, 1, True, np.int64), f32),
        _graph(lambda: lax.iota(np.uint8, (4,), 0)),
        _graph(lambda x: lax.pad(x, 0.0, [(1, -1, 0), (0, 2, 1)]), f32),
        _graph(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())), np.float64), f32, Aval((3, 2), np.float32)),
        _graph(lambda x: rt.nn.gelu(x, "none"), f32),
        _graph(lambda x: rt.nn.layer_norm(x, normalized_ndim=1, eps=float("inf"))[0], f32),
        _graph(lambda x, w: lax.conv_general_dilated(x, w, (1,), [(1, 0)], (2,), (1,)),
               Aval((1, 2, 5), np.float32), Aval((3, 2, 2), np.float32)),
    ]
    for g in graphs:
        check_round_trip(g)
    assert "new_dtype=bf16" in str(graphs[0]) and "approximate='none'" in str(graphs[6])


def test_param_text_reads_what_the_printer_writes():
    """Values no primitive has today but a custom one may: strings with spaces, brackets and quotes,
    nested tuples of dtypes, infinities, complex numbers."""
    from reftrace.graph import Params, _format_param
    from reftrace.graph_text import _params
    params = Params({"s": "a b] [c", "t": "it's \"x\"", "u": (1, (2, -3), ()), "v": None, "w": -float("inf"),
                     "x": BF16, "y": (np.dtype(np.float32), np.dtype(np.int64)), "z": 1 - 2j, "f": 1.0, "i": 1})
    text = " ".join(f"{k}={_format_param(v)}" for k, v in params.items())
    back = _params(text, 1)
    assert back == params and " ".join(f"{k}={_format_param(v)}" for k, v in back.items()) == text
    assert [type(back[k]) for k in "fi"] == [float, int]


EDGE_LITERALS = [
    Literal.of(np.nan, np.float32), Literal.of(-np.nan, np.float32),
    Literal.of(np.array(0x7FC00001, np.uint32).view(np.float32)),         # a NaN payload
    Literal.of(np.array(0xFFF0000000000001, np.uint64).view(np.float64)),  # a signalling NaN
    Literal.of(np.inf, np.float64), Literal.of(-np.inf, np.float16), Literal.of(-0.0, np.float32),
    Literal.of([0.0, -0.0, np.inf, -np.nan], np.float64),
    Literal.of(0.1, np.float32), Literal.of(np.float32(1) + np.finfo(np.float32).eps),
    Literal.of(np.finfo(np.float64).max), Literal.of(np.finfo(np.float64).smallest_subnormal),
    Literal.of(np.finfo(np.float16).smallest_subnormal), Literal.of([65504.0, 1e-7], np.float16),
    Literal.of(True), Literal.of([True, False]), Literal.of(np.uint8(255)), Literal.of([0, 255], np.uint8),
    Literal.of(np.iinfo(np.int64).min), Literal.of(np.iinfo(np.int64).max), Literal.of(np.iinfo(np.uint64).max),
    Literal.of(np.iinfo(np.int8).min), Literal.of(-1, np.int32), Literal.of(40000, np.uint16),
    Literal.of(0.1, BF16), Literal.of([np.nan, -0.0, np.inf, 3.0e38], BF16), Literal.of(-np.nan, BF16),
    Literal.of([448.0, -np.nan], ml_dtypes.float8_e4m3fn), Literal.of([-8, 7], ml_dtypes.int4),
    Literal.of(1 + 2j, np.complex64), Literal.of([complex(-0.0, np.inf)], np.complex128),
    Literal.of(np.ones((2, 2), np.float32)), Literal.of(np.zeros((2, 0))), Literal.of(np.zeros((0, 3), np.int32)),
    Literal.of(np.arange(4, dtype=np.int16).reshape(1, 2, 2)),
]


@pytest.mark.parametrize("lit", EDGE_LITERALS, ids=str)
def test_literal_values_round_trip_bit_for_bit(lit):
    g = Graph((), (), (lit, lit))  # literal outputs: any dtype, no primitive rule in the way
    check_round_trip(g)
    assert rt.parse(str(g)).outputs[0].data == lit.data


def test_literal_operands_of_equations():
    g = _graph(lambda x: lax.mul(lax.add(x, Literal.of(-np.nan, BF16)), Literal.of([1.5, -0.0, 2.0], BF16)),
               Aval((3,), BF16))
    check_round_trip(g)
    assert str(g).splitlines()[1:3] == ["    b:bf16[3] = add a -nan:bf16", "    c:bf16[3] = mul b [1.5, -0.0, 2.0]:bf16[3]"]


def test_long_listings_reuse_names_such_as_in():
    g = rt.trace(lambda x: _chain(x, 300), np.ones(2, np.float32))
    assert "\n    in:f32[2] = sin im" in str(g)  # a variable named in
    check_round_trip(g)


def _chain(x, n):
    for _ in range(n):
        x = rnp.sin(x)
    return x


def test_hand_written_listings():
    """Any identifiers name variables (also nan and inf), spacing is free, values need not be canonical."""
    text = """
        {lambda x:f32[3]   inf:f32[] .
            nan:f32[3] = mul x inf
            y:f32[3] = add nan [1, 2, 3]:f32[3]
        in (y) }
    """
    g = rt.parse(text)
    assert g == rt.trace(lambda x, s: rnp.add(x * s, np.array([1, 2, 3], np.float32)),
                         np.ones(3, np.float32), np.float32(1))
    assert str(g).splitlines()[2] == "    d:f32[3] = add c [1.0, 2.0, 3.0]:f32[3]"


def test_names_header_lines():
    g = rt.trace(lambda x, y: rnp.cos(x) + y, np.ones(2), np.ones(2))
    text = '# input_names: ["fc.weight", "args[0]"]\n# output_names: ["out"]\n' + str(g)
    back = rt.parse(text)
    assert back == g
    if "input_names" in Graph.__dataclass_fields__:  # names are kept where the Graph has them
        assert back.input_names == ("fc.weight", "args[0]") and back.output_names == ("out",)
        assert str(back) == text
    with pytest.raises(rt.GraphError, match=r"line 1: 1 input_names for 2 inputs"):
        rt.parse('# input_names: ["x"]\n' + str(g))
    with pytest.raises(rt.GraphError, match=r"line 1: expected '# output_names: \[\"name\""):
        rt.parse("# output_names: [out]\n" + str(g))


# ----------------------------------------------------------------------------- torch modules, files

def _module_graph() -> Graph:
    """A module with a Linear, a BatchNorm and a constant (not a parameter or buffer): a large literal."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)
            self.scale = torch.linspace(0.5, 2.5, 5)

        def forward(self, x):
            return (torch.nn.functional.gelu(self.bn(self.fc(x))) * self.scale).sum()

    torch.manual_seed(0)
    return rt.trace(Net(), torch.randn(3, 6))


def test_torch_module_with_batch_norm_and_linear():
    g = _module_graph()
    assert {"linear", "batch_norm_train"} <= {e.primitive.name for e in g.eqns}
    assert not _small_literals(g)
    with pytest.raises(rt.GraphError, match=r"rt\.save\(graph, path\).*rt\.load\(path\)"):
        rt.parse(str(g))
    check_round_trip(g)
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    g = rt.trace(module, torch.randn(3, 6))
    check_round_trip(g)
    check_round_trip(rt.vjp(g, wrt=range(2), nondiff_outputs=range(1, len(g.outputs))))


def test_save_format(tmp_path):
    lit = Literal.of(np.arange(6, dtype=np.float32).astype(BF16).reshape(2, 3))
    g = _graph(lambda x: lax.add(lax.mul(x, lit), lit), Aval((2, 3), BF16))
    rt.save(g, tmp_path / "g.graph")
    text = (tmp_path / "g.graph").read_text()
    lines = text.splitlines()
    assert lines[0] == "# reftrace-graph: 1" and lines[1].startswith("# arrays: 1 sha256:")
    assert lines[3:5] == ["    b:bf16[2,3] = mul a const#0:bf16[2,3]", "    c:bf16[2,3] = add b const#0:bf16[2,3]"]
    with np.load(tmp_path / "g.graph.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["const0", "dtypes"] and list(npz["dtypes"]) == ["bfloat16"]
        assert npz["const0"].dtype == np.uint16 and npz["const0"].tobytes() == lit.data
    assert rt.load(tmp_path / "g.graph") == g
    small = rt.trace(lambda x: rnp.cos(x), np.ones(2))
    rt.save(small, tmp_path / "small.graph")
    assert (tmp_path / "small.graph").read_text() == "# reftrace-graph: 1\n" + str(small) + "\n"
    assert not (tmp_path / "small.graph.npz").exists()
    assert rt.parse((tmp_path / "small.graph").read_text()) == small
    (tmp_path / "bare.graph").write_text(str(small))  # a bare listing reads as version 1
    assert rt.load(tmp_path / "bare.graph") == small


CHILD = """
import sys, reftrace as rt
g = rt.load(sys.argv[1])
assert g == rt.load(sys.argv[1])
rt.save(g, sys.argv[2])
print(len(g.eqns))
"""


def test_save_load_in_a_fresh_process(tmp_path):
    graphs = {"module": _module_graph(), "joint": rt.vjp(rt.trace(lambda x: rnp.sum(rnp.tanh(x) * np.arange(8.0)), np.ones(8))),
              "bf16": Graph((), (), (Literal.of(np.linspace(-1, 1, 9).astype(BF16)), Literal.of(-np.nan, BF16)))}
    for name, graph in graphs.items():
        first, second = tmp_path / f"{name}.graph", tmp_path / f"{name}.again.graph"
        rt.save(graph, first)
        run = subprocess.run([sys.executable, "-c", CHILD, str(first), str(second)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == str(len(graph.eqns))
        assert rt.load(second) == graph
        assert second.read_text() == first.read_text()  # the format is deterministic


# ----------------------------------------------------------------------------- errors

G = "{ lambda a:f32[3] .\n    b:f32[3] = cos a\n  in (b) }"

BAD = [
    ("", r"expected a listing '\{ lambda \.\.\. \}', got no text"),
    ("{ lambda a:f32[3]\n  in (a) }", r"line 1: expected '\{ lambda <inputs> \.'"),
    ("{ lambda a:f33[3] .\n  in (a) }", r"line 1: unknown dtype 'f33'"),
    ("{ lambda a:f4[3] .\n  in (a) }", r"line 1: unknown dtype 'f4'"),
    ("{ lambda a:f32[3] a:f32[3] .\n  in (a) }", r"line 1: variable 'a' is defined twice"),
    (G.replace("cos", "cosine"), r"line 2: unknown primitive 'cosine'"),
    (G.replace("cos a", "cos z"), r"line 2: variable 'z' is used before it is defined"),
    (G.replace("b:f32[3] =", "b:f32[4] ="), r"line 2: cos gives f32\[3\], the listing declares f32\[4\]"),
    (G.replace("= cos a", "cos a"), r"line 2: expected an equation '<outputs> = <primitive> <operands>'"),
    (G.replace("cos a", "cos[axes=(0,] a"), r"line 2: unbalanced '\]'"),
    (G.replace("cos a", "cos[axes=(0,) a"), r"line 2: unclosed '\['"),
    (G.replace("cos a", "cos[axes] a"), r"line 2: expected a parameter 'name=value', got 'axes'"),
    (G.replace("cos a", "cos[x=__import__('os')] a"), r"line 2: cannot read the value of parameter 'x'"),
    (G.replace("cos a", "cos[x=os] a"), r"line 2: cannot read the value of parameter 'x': 'os'"),
    (G.replace("cos a", "cos[x=1] a"), r"line 2: cos rejects these operands/params"),
    (G.replace("cos a", "add a [1.0, 2.0]:f32[3]"), r"line 2: literal '\[1.0, 2.0\]' does not have the shape \[3\]"),
    (G.replace("cos a", "add a [1.0, 2.0, x]:f32[3]"), r"line 2: expected a value of dtype float32, got 'x'"),
    (G.replace("cos a", "add a [1.0, 2.0, 3.0 4.0]:f32[3]"), r"line 2: expected a value of dtype float32, got '3.0 4.0'"),
    (G.replace("cos a", "add a 1.5:i32"), r"line 2: expected a value of dtype int32, got '1.5'"),
    (G.replace("cos a", "add a 300:u8"), r"line 2: value 300 does not fit uint8"),
    (G.replace("cos a", "add a 1.0:f32[3"), r"line 2: unclosed '\['"),
    (G.replace("cos a", "add a const:f32[64,3]"),
     r"line 2: literal const:f32\[64,3\] was printed without its values .* rt\.save\(graph, path\) .* rt\.load\(path\)"),
    (G.replace("cos a", "add a const#0:f32[3]"), r"line 2: literal const#0:f32\[3\] refers to a side array file: .*rt\.load"),
    (G.replace("  in (b) }", ""), r"line 2: expected the last line 'in \(<outputs>\) \}'"),
    (G.replace("in (b) }", "in (b)"), r"line 3: expected 'in \(<outputs>\) \}'"),
    (G + "\n{ lambda .", r"line 4: expected nothing after the listing's closing '\}' \(line 3\)"),
    ("# joint: 1, 1\n" + G, r"line 1: expected '# joint: \(num_primals, num_outputs\)'"),
    ("# joint: (2, 1)\n" + G, r"line 1: joint \(2, 1\) does not fit 1 inputs and 1 outputs"),
    ("# jiont: (1, 1)\n" + G, r"line 1: expected a header line '# key: value' with key one of"),
    ("# joint: (1, 1)\n# joint: (1, 1)\n" + G, r"line 2: second '# joint:' line \(the first is line 1\)"),
    ("# reftrace-graph: 2\n" + G, r"line 1: format version 2 was written by a newer reftrace"),
    ("# reftrace-graph: 1\n# arrays: 1 sha256:00\n" + G, r"line 2: this listing's large literals live in a side array file"),
    (G.replace("\n  in", "\n# a comment\n  in"), r"line 3: expected an equation"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:40] for _, m in BAD])
def test_malformed_text_names_the_line(text, message):
    with pytest.raises(rt.GraphError, match=message):
        rt.parse(text)


def test_parse_takes_text_and_load_checks_the_side_file(tmp_path):
    with pytest.raises(rt.ArgumentError, match="rt.load"):
        rt.parse(tmp_path / "g.graph")
    g = _module_graph()
    path = tmp_path / "g.graph"
    rt.save(g, path)
    with pytest.raises(rt.GraphError, match="line 2: this listing's large literals"):
        rt.parse(path.read_text())
    other = tmp_path / "other.graph"
    rt.save(Graph((), (), (Literal.of(np.zeros(7)),)), other)
    (tmp_path / "other.graph.npz").replace(tmp_path / "g.graph.npz")
    with pytest.raises(rt.GraphError, match=r"g\.graph\.npz does not (hold|match)"):
        rt.load(path)
    (tmp_path / "g.graph.npz").unlink()
    with pytest.raises(rt.GraphError, match=r"g\.graph keeps 1 large literals in .*g\.graph\.npz, which does not exist"):
        rt.load(path)


def test_errors_are_reftrace_errors():
    for text, _ in BAD:
        with pytest.raises(rt.ReftraceError):
            rt.parse(text)
