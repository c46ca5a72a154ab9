"""Sharded lowering, the sharding helpers, with_sharding and train_step.

The checks needing 8 devices run in one subprocess (``on_8_devices.py``: XLA's device count is
fixed when jax starts, and this process has one CPU device); the tests here assert on the facts
it reports. What one device can show runs in this process.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import reftrace as rt
import reftrace.numpy as rnp
from reftrace.sharding import data_parallel, fsdp

WORKER = pathlib.Path(__file__).with_name("on_8_devices.py")


@pytest.fixture(scope="module")
def report() -> dict:
    run = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 8 devices (4 x 2 mesh)

def test_runs_on_eight_devices(report):
    assert report["devices"] == 8


def test_sharded_transformer_joint_equals_one_device(report):
    t = report["transformer"]
    assert t["joint"] == [16, 1] and t["outputs"] == 16  # logits + 15 parameter gradients
    assert t["max_difference"] < 1e-4
    assert t["shardings_equal"]  # every output's .sharding == NamedSharding(mesh, the spec asked)
    assert t["specs"] == ["P('data', None, 'model')", "P(None, 'model')"]
    assert t["collectives"]["all-reduce"] > 0 and t["collectives"]["all-gather"] > 0


def test_data_parallel_plan_replicates_parameters_and_all_reduces_gradients(report):
    dp = report["mlp"]["dp"]
    assert dp["in_specs"] == ["P()"] * 6 + ["P('data',)", "P('data',)"]  # 6 parameters, x, ct(out)
    assert dp["out_specs"] == ["P('data',)"] + ["P()"] * 6 + ["P('data',)"]  # out, 6 grads, grad(x)
    assert dp["max_difference"] < 1e-5 and dp["shardings_equal"]
    assert dp["collectives"]["all-reduce"] > 0 and dp["collectives"]["all-gather"] == 0
    assert dp["grad_bytes_device0"] == dp["grad_bytes_total"]


def test_fsdp_plan_shards_parameters_gradients_and_gathers(report):
    f = report["mlp"]["fsdp"]
    # Linear(16, 64).weight is (64, 16): dim 0 split 8 ways; Linear(64, 16).weight is (16, 64): dim 1
    assert f["in_specs"][0] == "P(('data', 'model'),)" and f["in_specs"][2] == "P(None, ('data', 'model'))"
    assert f["out_specs"][1:7] == f["in_specs"][:6]  # gradients sharded like their parameters
    assert f["max_difference"] < 1e-5 and f["shardings_equal"]
    c = f["collectives"]
    assert c["all-gather"] > 0
    assert c["reduce-scatter"] > 0 or (c["all-reduce"] > 0 and c["dynamic-slice"] > 0)
    assert f["grad_bytes_device0"] * 8 == f["grad_bytes_total"]


def test_spec_mistakes_are_argument_errors_naming_the_input(report):
    e = report["errors"]
    assert all(kind == "ArgumentError" for kind, _ in e.values())
    assert e["rank"][1].startswith("input 0 ('0.weight', f32[64,16]): P(None, None, 'model') has 3 entries")
    assert e["divisibility"][1].startswith("input 7 ('ct(out)', f32[4,16]): dimension 0 of f32[4,16] has size 4")
    assert "names the axis 'rows'" in e["axis"][1] and "'data', 'model'" in e["axis"][1]
    assert e["count"][1].startswith("in_shardings has 7 entries for the graph's 8 inputs")
    assert "uses the mesh axis 'data' twice" in e["repeated"][1]
    assert "need mesh=" in e["no_mesh"][1]


def test_with_sharding_through_vjp_on_the_mesh(report):
    c = report["constraints"]
    assert c["constraints_in_joint"] == 2  # the value's and its cotangent's
    assert c["max_difference"] < 1e-5
    assert c["hlo_changed"]
    assert c["out_specs"] == ["P()", "P('data',)", "P()"]


def test_train_step_matches_eager_torch_on_every_mesh(report):
    t = report["training"]
    for name in ("single", "dp", "fsdp"):
        np.testing.assert_allclose(t[name]["losses"], t["eager"], rtol=1e-5)
        assert t[name]["weights_vs_eager"] < 1e-5  # copy_to wrote the trained weights into the module
    np.testing.assert_allclose(t["dp"]["losses"], t["single"]["losses"], rtol=1e-6)
    np.testing.assert_allclose(t["fsdp"]["losses"], t["single"]["losses"], rtol=1e-6)


def test_train_step_collectives_and_parameter_bytes(report):
    t = report["training"]
    assert t["dp"]["collectives"]["all-reduce"] > 0
    assert t["fsdp"]["collectives"]["all-gather"] > 0
    assert t["single"]["param_bytes_per_device"] == [t["single"]["param_bytes_total"]]
    assert t["dp"]["param_bytes_per_device"] == [t["dp"]["param_bytes_total"]] and t["dp"]["devices"] == 8
    total, (each,) = t["fsdp"]["param_bytes_total"], t["fsdp"]["param_bytes_per_device"]
    assert each * 8 == total  # every parameter of this model divides 8 ways


# ----------------------------------------------------------------------------- one device, in process

def _f(x, w):
    return rnp.sum(rt.with_sharding(rnp.tanh(x @ w), P("data", None)))


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
W = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)


def test_with_sharding_is_a_primitive_with_its_spec():
    g = rt.trace(_f, X, W)
    (eqn,) = [e for e in g.eqns if e.primitive.name == "sharding_constraint"]
    assert eqn.params["spec"] == ("data", None)
    assert "sharding_constraint[spec=('data', None)]" in str(g)
    assert rt.parse(str(g)) == g


def test_with_sharding_is_the_identity_without_a_mesh():
    want = np.sum(np.tanh(X @ W))
    joint = rt.vjp(rt.trace(_f, X, W))
    for backend in ("jax", "torch"):
        out, gx, gw = rt.lower(joint, backend)(X, W, np.float32(1))
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(gx), (1 - np.tanh(X @ W) ** 2) @ W.T, rtol=1e-5)
    np.testing.assert_array_equal(rt.with_sharding(X, P("data")), X)  # outside a trace: eagerly, unchanged


def test_with_sharding_carries_over_to_cotangent_and_tangent():
    g = rt.trace(lambda x: rt.with_sharding(x * x, P(None, "model")), X)
    for transformed in (rt.vjp(g), rt.jvp(g)):
        specs = [e.params["spec"] for e in transformed.eqns if e.primitive.name == "sharding_constraint"]
        assert specs == [(None, "model")] * 2


def test_with_sharding_rejects_bad_specs():
    with pytest.raises(rt.ShapeError, match="3 entries for the rank-2 value"):
        rt.trace(lambda x: rt.with_sharding(x, P("a", "b", "c")), X)
    with pytest.raises(rt.ArgumentError, match="each entry is None, a mesh axis name, or a tuple"):
        rt.trace(lambda x: rt.with_sharding(x, (3,)), X)
    with pytest.raises(rt.ArgumentError, match="pass a jax.sharding.PartitionSpec"):
        rt.trace(lambda x: rt.with_sharding(x, "data"), X)


def test_one_device_mesh_lowering_and_compiled_text():
    mesh = jax.make_mesh((1,), ("data",))
    g = rt.trace(_f, X, W)
    exe = rt.lower(g, "jax", mesh=mesh, in_shardings=[P("data"), None], out_shardings=[None])
    (out,) = exe(torch.from_numpy(X), W)
    np.testing.assert_allclose(np.asarray(out), np.sum(np.tanh(X @ W)), rtol=1e-6)
    assert out.sharding.spec == P() and out.sharding.mesh == mesh
    assert "HloModule" in exe.compiled_text(X, W)
    with pytest.raises(rt.ArgumentError, match=r"argument 1 of the sharded JAX-lowered graph: expected f32\[3,2\]"):
        exe(X, X)


def test_sharding_options_are_jax_only():
    g = rt.trace(_f, X, W)
    with pytest.raises(rt.ArgumentError, match="options of the 'jax' backend"):
        rt.lower(g, "torch", mesh=jax.make_mesh((1,), ("data",)))


def test_plans_read_graph_names_and_refuse_unnamed_guesses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    joint = rt.vjp(rt.trace(model, torch.randn(2, 4)))
    mesh = jax.make_mesh((1,), ("data",))
    plan = data_parallel(joint, mesh)
    names = dict(zip(joint.input_names, plan.in_shardings))
    assert names["args[0]"] == P("data") and names["0.weight"] == P() and names["ct(out)"] == P("data")
    outs = dict(zip(joint.output_names, plan.out_shardings))
    assert outs["update(1.running_mean)"] == P() and outs["grad(0.weight)"] == P()
    f = fsdp(joint, mesh)
    assert dict(zip(joint.input_names, f.in_shardings))["buffer(1.running_mean)"] == P()
    unnamed = rt.vjp(rt.trace(_f, X, W))
    with pytest.raises(rt.ArgumentError, match="pass batch_inputs= as input indices"):
        data_parallel(unnamed, mesh)
    assert data_parallel(unnamed, mesh, batch_inputs=[0]).out_shardings == (P(), P("data"), P())
    with pytest.raises(rt.ArgumentError, match="axis 'model' is not an axis of the mesh"):
        fsdp(joint, mesh, axis="model")
