"""The sharding checks that need 8 devices, run by ``test_sharding.py`` in one subprocess.

XLA fixes its device count when jax starts, and the pytest process has started it with one CPU
device; this script sets ``--xla_force_host_platform_device_count=8`` before importing jax, runs
every check, and prints one JSON object of measured facts (values, shardings, collectives, bytes)
as its last line, for the tests to assert on.
"""
from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("REFTRACE_CHECK", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import reftrace as rt  # noqa: E402
import reftrace.jax as rj  # noqa: E402
import reftrace.numpy as rnp  # noqa: E402
from reftrace.sharding import data_parallel, fsdp  # noqa: E402

MESH = jax.make_mesh((4, 2), ("data", "model"))
# dynamic-slice: the CPU compiler writes a reduce-scatter as an all-reduce and each device's slice of it
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "dynamic-slice")


def max_difference(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
               for g, w in zip(got, want))


def collectives(hlo: str) -> dict[str, int]:
    return {c: hlo.count(f" {c}(") + hlo.count(f" {c}-start(") for c in COLLECTIVES}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
                               torch.nn.LayerNorm(16))


class TinyTransformer(torch.nn.Module):
    """Embedding, one encoder layer (attention, MLP, LayerNorms) and a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.block = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def transformer_joint() -> dict:
    """A torch-captured transformer's joint graph, lowered with hand-written specs on the 4x2 mesh."""
    torch.manual_seed(0)
    model = TinyTransformer()
    ids = torch.randint(0, 64, (8, 16))
    joint = rt.vjp(rt.trace(model, ids))
    n_in, n_out = joint.joint
    params = [p.detach() for p in model.parameters()]

    def param_spec(aval):  # matrices split along their last dimension over "model", vectors replicated
        return P(*(None,) * (aval.ndim - 1), "model") if aval.ndim == 2 else None
    in_specs = [param_spec(v.aval) for v in joint.inputs[:len(params)]] + [P("data"), P("data")]
    out_specs = [P("data", None, "model")] + in_specs[:len(params)]
    args = params + [ids, torch.randn(8, 16, 64)]
    want = rt.lower(joint)(*args)
    exe = rt.lower(joint, "jax", mesh=MESH, in_shardings=in_specs, out_shardings=out_specs)
    got = exe(*args)
    asked = [NamedSharding(MESH, s if s is not None else P()) for s in out_specs]
    return {
        "inputs": len(joint.inputs), "outputs": len(joint.outputs), "joint": [n_in, n_out],
        "max_difference": max_difference(got, want),
        "shardings_equal": all(o.sharding == s for o, s in zip(got, asked)),
        "specs": [str(o.sharding.spec) for o in got[:2]],
        "collectives": collectives(exe.compiled_text(*args)),
    }


def mlp_plans() -> dict:
    """data_parallel and fsdp plans of a torch MLP's joint graph: values, collectives, bytes per device."""
    model = mlp()
    x = torch.randn(8, 16)
    joint = rt.vjp(rt.trace(model, x))
    args = [p.detach() for p in model.parameters()] + [x, torch.randn(8, 16)]
    want = rt.lower(joint)(*args)
    n_params = len(list(model.parameters()))
    result = {}
    for name, plan in (("dp", data_parallel(joint, MESH, axis="data")),
                       ("fsdp", fsdp(joint, MESH, axis=("data", "model")))):
        exe = rt.lower(joint, "jax", mesh=MESH, **plan._asdict())
        got = exe(*args)
        grads = got[-1 - n_params:-1]  # sharded like their parameters; the last output is grad(args[0])
        total = sum(g.nbytes for g in grads)
        device0 = sum(s.data.nbytes for g in grads for s in g.addressable_shards if s.device == jax.devices()[0])
        result[name] = {
            "max_difference": max_difference(got, want),
            "in_specs": [str(s) for s in plan.in_shardings], "out_specs": [str(s) for s in plan.out_shardings],
            "shardings_equal": all(o.sharding.spec == s for o, s in zip(got, plan.out_shardings)),
            "collectives": collectives(exe.compiled_text(*args)),
            "grad_bytes_total": total, "grad_bytes_device0": device0,
        }
    return result


def spec_errors() -> dict:
    """What rt.lower says about specs that cannot work: the error type and message, per mistake."""
    model = mlp()
    joint = rt.vjp(rt.trace(model, torch.randn(8, 16)))
    n = len(joint.inputs)
    mistakes = {
        "rank": [P(None, None, "model")] + [None] * (n - 1),
        "divisibility": [None] * (n - 3) + [P("data"), P("data"), P(("data", "model"), None)],
        "axis": [P("rows")] + [None] * (n - 1),
        "count": [None] * (n - 1),
        "repeated": [P("data", "data")] + [None] * (n - 1),
    }
    found = {}
    for name, specs in mistakes.items():
        if name == "divisibility":  # a batch of 4 rows cannot split 8 ways
            joint = rt.vjp(rt.trace(model, torch.randn(4, 16)))
        try:
            rt.lower(joint, "jax", mesh=MESH, in_shardings=specs)
            found[name] = None
        except rt.ReftraceError as err:
            found[name] = [type(err).__name__, str(err)]
    try:
        rt.lower(joint, "jax", in_shardings=[None] * n)
    except rt.ReftraceError as err:
        found["no_mesh"] = [type(err).__name__, str(err)]
    return found


def constraints() -> dict:
    """rt.with_sharding in a reftrace.numpy function, through vjp, lowered on the mesh."""
    def f(x, w):
        h = rt.with_sharding(rnp.tanh(x @ w), P("data", "model"))
        return rnp.sum(h * h)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    joint = rt.vjp(rt.trace(f, x, w))
    args = (x, w, np.float32(1.0))
    want = rt.lower(joint)(*args)
    specs = dict(in_shardings=[P("data"), None, None], out_shardings=[None, P("data"), None])
    exe = rt.lower(joint, "jax", mesh=MESH, **specs)
    got = exe(*args)
    unconstrained = rt.lower(rt.vjp(rt.trace(lambda x, w: rnp.sum(rnp.tanh(x @ w) ** 2), x, w)), "jax", mesh=MESH,
                             **specs)
    return {
        "constraints_in_joint": sum(e.primitive.name == "sharding_constraint" for e in joint.eqns),
        "max_difference": max_difference(got, want),
        "hlo_changed": exe.compiled_text(*args) != unconstrained.compiled_text(*args),
        "out_specs": [str(o.sharding.spec) for o in got],
    }


def training() -> dict:
    """train_step on one device, dp and fsdp: losses, parameters copied back, collectives, bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 8))
    batches = [(torch.randn(8, 16), torch.randint(0, 8, (8,))) for _ in range(3)]

    def loss_fn(m, x, y):
        return torch.nn.functional.cross_entropy(m(x), y)

    eager = _copy(model)  # torch's own loop with the same SGD: the reference
    opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    eager_losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(eager, x, y)
        loss.backward()
        opt.step()
        eager_losses.append(float(loss))

    result = {"eager": eager_losses}
    for name, mesh, strategy in (("single", None, "dp"), ("dp", MESH, "dp"), ("fsdp", MESH, "fsdp")):
        trained = _copy(model)
        step = rj.train_step(trained, loss_fn, *batches[0], optimizer=optax.sgd(0.1), mesh=mesh, strategy=strategy)
        state = step.init()
        losses = []
        for x, y in batches:
            state, loss = step(state, x, y)
            losses.append(float(loss))
        per_device = state.param_bytes_per_device()
        state.copy_to(trained)
        result[name] = {
            "losses": losses,
            "param_bytes_total": sum(p.nbytes for p in state.params),
            "param_bytes_per_device": sorted(set(per_device.values())),
            "devices": len(per_device),
            "param_specs": [str(p.sharding.spec) for p in state.params],
            "collectives": collectives(step.compiled_text(state, *batches[0])),
            "weights_vs_eager": max(float((a - b).abs().max()) for a, b in
                                    zip(trained.state_dict().values(), eager.state_dict().values())),
        }
    return result


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(model)


if __name__ == "__main__":
    checks = {"transformer": transformer_joint, "mlp": mlp_plans, "errors": spec_errors,
              "constraints": constraints, "training": training}
    only = sys.argv[1:] or list(checks)
    report = {"devices": jax.device_count()}
    report.update({name: checks[name]() for name in only})
    print(json.dumps(report))
