"""The IR: immutability, structural equality and hashing, printing, typecheck, errors."""
import dataclasses

import numpy as np
import pytest

import reftrace as rt
import reftrace.numpy as rnp
from reftrace import lax
from reftrace.graph import Aval, Eqn, Graph, Literal, Params, Var
from reftrace.primitives import cos_p, registry


def f32(*shape):
    return np.ones(shape, np.float32)


def test_prints_like_a_jaxpr():
    g = rt.trace(lambda x: rnp.cos(rnp.cos(x)), f32(3))
    assert str(g) == ("{ lambda a:f32[3] .\n"
                      "    b:f32[3] = cos a\n"
                      "    c:f32[3] = cos b\n"
                      "  in (c) }")


def test_params_and_literals_print():
    g = rt.trace(lambda x: rnp.sum(x * 2.0, axis=0), f32(2, 3))
    text = str(g)
    assert "mul a 2.0:f32" in text
    assert "reduce_sum[axes=(0,)]" in text


def test_two_traces_are_equal_and_hash_equal():
    fn = lambda x, y: rnp.tanh(x @ y) + 1.0  # noqa: E731
    g1 = rt.trace(fn, f32(2, 3), f32(3, 4))
    g2 = rt.trace(fn, f32(2, 3), f32(3, 4))
    assert g1 == g2 and hash(g1) == hash(g2)
    assert len({g1, g2}) == 1


@pytest.mark.parametrize("other", [
    lambda: rt.trace(lambda x, y: rnp.tanh(x @ y) + 2.0, f32(2, 3), f32(3, 4)),   # different literal
    lambda: rt.trace(lambda x, y: rnp.sin(x @ y) + 1.0, f32(2, 3), f32(3, 4)),    # different op
    lambda: rt.trace(lambda x, y: rnp.tanh(x @ y) + 1.0, f32(2, 3), f32(3, 5)),   # different shape
    lambda: rt.trace(lambda x, y: rnp.tanh(x @ y) + 1.0, np.ones((2, 3)), np.ones((3, 4))),  # dtype
])
def test_different_functions_shapes_dtypes_differ(other):
    g = rt.trace(lambda x, y: rnp.tanh(x @ y) + 1.0, f32(2, 3), f32(3, 4))
    assert g != other()


def test_values_are_frozen():
    g = rt.trace(lambda x: rnp.exp(x), f32(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.eqns = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.eqns[0].inputs = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.inputs[0].aval = Aval((3,), np.float32)
    with pytest.raises(AttributeError):
        g.eqns[0].params.x = 1
    assert isinstance(g.eqns, tuple) and isinstance(g.inputs, tuple) and isinstance(g.outputs, tuple)


def test_params_are_hashable_and_lists_freeze():
    p = Params({"axes": [1, 0], "dtype": np.float32})
    assert p["axes"] == (1, 0) and p["dtype"] == np.dtype(np.float32)
    assert hash(p) == hash(Params({"dtype": np.dtype("float32"), "axes": (1, 0)}))
    with pytest.raises(TypeError):
        Params({"bad": {1: 2}})


def test_canonical_numbering_makes_builders_irrelevant():
    a = Var(1000, Aval((3,), np.float32))
    b = Var(5, Aval((3,), np.float32))
    g1 = Graph((a,), (Eqn(cos_p, (a,), (b,), Params()),), (b,))
    c = Var(77, Aval((3,), np.float32))
    d = Var(78, Aval((3,), np.float32))
    g2 = Graph((c,), (Eqn(cos_p, (c,), (d,), Params()),), (d,))
    assert g1 == g2
    assert [v.id for v in g1.inputs] == [0] and g1.eqns[0].outputs[0].id == 1


def test_malformed_graphs_raise_graph_error():
    a = Var(1, Aval((3,), np.float32))
    b = Var(2, Aval((3,), np.float32))
    with pytest.raises(rt.GraphError, match="used before"):
        Graph((a,), (Eqn(cos_p, (b,), (a,), Params()),), (a,))
    with pytest.raises(rt.GraphError, match="defined twice"):
        Graph((a,), (Eqn(cos_p, (a,), (a,), Params()),), (a,))


def test_typecheck_catches_wrong_declared_avals():
    a = Var(1, Aval((3,), np.float32))
    b = Var(2, Aval((4,), np.float32))
    g = Graph((a,), (Eqn(cos_p, (a,), (b,), Params()),), (b,))
    with pytest.raises(rt.ShapeError, match="cos"):
        rt.typecheck(g)


def test_typecheck_holds_on_traces():
    def fn(x, y):
        z = rnp.concatenate([x, y], axis=0)
        return rnp.max(z, axis=1, keepdims=True) * rnp.mean(z), z[::2, 1:].T
    rt.typecheck(rt.trace(fn, f32(2, 3), f32(4, 3)))


def test_literals_hash_by_value_and_dtype():
    assert Literal.of(1.0, np.float32) == Literal.of(1.0, np.float32)
    assert Literal.of(1.0, np.float32) != Literal.of(1.0, np.float64)
    assert Literal.of(np.nan, np.float32) == Literal.of(np.nan, np.float32)
    big = Literal.of(np.int64(2**62 + 1))
    assert big.item() == 2**62 + 1


def test_every_primitive_has_a_shape_rule():
    from reftrace.primitives import shape_rules
    assert set(registry.values()) <= set(shape_rules)


def test_shape_errors_name_the_problem():
    with pytest.raises(rt.ShapeError, match="could not be broadcast"):
        rt.trace(lambda x, y: x + y, f32(2, 3), f32(4))
    with pytest.raises(rt.ShapeError, match="dot_general"):
        rt.trace(lambda x, y: lax.dot_general(x, y, (((1,), (0,)), ((), ()))), f32(2, 3), f32(4, 2))
    with pytest.raises(rt.ShapeError, match="reshape"):
        rt.trace(lambda x: x.reshape(5), f32(2, 3))


def test_data_dependent_python_control_flow_is_reported():
    def fn(x):
        if rnp.sum(x) > 0:
            return x
        return -x
    with pytest.raises(rt.DataDependentControlFlowError, match="data-dependent"):
        rt.trace(fn, f32(3))


def test_lower_checks_arguments():
    run = rt.lower(rt.trace(lambda x, y: x * y, f32(2), f32(2)))
    with pytest.raises(rt.ArgumentError, match="takes 2 arguments"):
        run(f32(2))
    with pytest.raises(rt.ArgumentError, match="argument 1"):
        run(f32(2), f32(3))
    with pytest.raises(rt.ArgumentError, match="argument 0"):
        run(np.ones(2), f32(2))
    with pytest.raises(rt.ArgumentError, match="backend"):
        rt.lower(rt.trace(lambda x: x, f32(1)), backend="tpu")


def test_error_hierarchy_roots_at_reftrace_error():
    for cls in (rt.GraphError, rt.ShapeError, rt.TracingError, rt.DataDependentControlFlowError,
                rt.UnsupportedOperatorError, rt.ArgumentError, rt.PartitionError):
        assert issubclass(cls, rt.ReftraceError)


def test_core_does_not_import_torch_or_jax():
    import subprocess
    import sys
    code = ("import sys, numpy as np, reftrace as rt, reftrace.numpy as rnp, reftrace.transforms.trace;"
            "rt.trace(lambda x: rnp.sin(x), np.ones(2));"
            "import reftrace.graph, reftrace.primitives, reftrace.lax, reftrace.interpreter;"
            "bad = [m for m in ('torch', 'jax') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_reftrace_check_typechecks_what_a_transform_returns(monkeypatch):
    from reftrace.primitives import checked
    g = rt.trace(lambda x: rnp.cos(x), np.ones(3, np.float32))
    assert checked(g, "test") is g  # a well-typed graph passes through unchanged
    eqn = g.eqns[0]
    wrong = Var(eqn.outputs[0].id, Aval((4,), np.dtype(np.float32)))
    ill = Graph(g.inputs, (Eqn(eqn.primitive, eqn.inputs, (wrong,), eqn.params),), (wrong,))
    monkeypatch.setenv("REFTRACE_CHECK", "1")
    with pytest.raises(rt.GraphError, match="test produced an ill-typed graph"):
        checked(ill, "test")
    monkeypatch.setenv("REFTRACE_CHECK", "0")
    assert checked(ill, "test") is ill


def test_core_never_imports_the_outer_layers():
    """The arrows run one way: only the facades (``reftrace/__init__.py``, ``compile.py``) reach
    ``backends/`` and ``torch_bridge/`` from the core (``reftrace/*.py``, ``reftrace/transforms/``)."""
    import ast
    import pathlib
    root = pathlib.Path(rt.__file__).parent
    core = [p for p in root.glob("*.py") if p.name not in ("__init__.py", "compile.py", "__main__.py")]
    core += list((root / "transforms").glob("*.py"))
    offenders = []
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("reftrace.backends", "reftrace.torch_bridge", "torch", "jax"))]
    assert offenders == []


def test_eager_evaluation_without_an_evaluator_says_so():
    previous = lax.set_eager_evaluator(None)
    try:
        with pytest.raises(rt.TracingError, match="no eager evaluator"):
            rnp.cos(np.ones(2))
    finally:
        lax.set_eager_evaluator(previous)
    np.testing.assert_allclose(rnp.cos(np.ones(2)), np.cos(np.ones(2)))


def test_import_graph_has_no_cycles():
    """No two modules import each other, not even lazily inside a function (the package facade
    ``reftrace/__init__.py``, which every submodule import runs first, is left out)."""
    import ast
    import pathlib

    import networkx as nx
    root = pathlib.Path(rt.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        name = ".".join(("reftrace",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        names[name] = path
    edges = []
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges += [(name, t) for t in targets if t in names and t not in (name, "reftrace")]
    assert list(nx.simple_cycles(nx.DiGraph(edges))) == []
