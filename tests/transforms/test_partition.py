"""partition: forward + backward compose to the joint; policies save what they promise;
min cut finds the true byte optimum (checked against brute force)."""
import itertools
import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reftrace as rt
import reftrace.numpy as rnp
from reftrace import lax
from reftrace import primitives as P
from reftrace.builder import Builder
from reftrace.composite import decomposition_of, is_composite
from reftrace.graph import Aval, Graph, Var
from reftrace.interpreter import eval_graph
from reftrace.lax import new_input, tracing
from reftrace.transforms.partition import JointAnalysis, Partition, min_cut_saved
from reftrace.transforms.policies import (MinCut, default_ban, dots_saveable, save_all, save_all_but_copies,
                                          save_anything_except_these, save_nothing, save_only_these)


def f64(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- a numpy interpreter
# Composition is checked for *exact* equality, so graphs run on one deterministic evaluator.

def _dot_general(x, y, *, dimension_numbers, preferred_element_type):
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(string.ascii_letters)
    xs = [next(letters) for _ in range(x.ndim)]
    ys = [next(letters) for _ in range(y.ndim)]
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        ys[b] = xs[a]
    out = [xs[i] for i in lb] + [xs[i] for i in range(x.ndim) if i not in lc and i not in lb]
    out += [ys[i] for i in range(y.ndim) if i not in rc and i not in rb]
    r = np.einsum(f"{''.join(xs)},{''.join(ys)}->{''.join(out)}", x, y)
    return r.astype(preferred_element_type or x.dtype)


def _broadcast_in_dim(x, *, shape, broadcast_dimensions):
    expanded = [1] * len(shape)
    for d, od in zip(np.shape(x), broadcast_dimensions):
        expanded[od] = d
    return np.broadcast_to(np.reshape(x, expanded), shape)


def _random(key, *, shape, dtype, distribution):
    rng = np.random.default_rng([int(k) for k in key])
    draw = rng.random(shape) if distribution == "uniform" else rng.standard_normal(shape)
    return draw.astype(dtype)


NUMPY_RULES = {
    P.cos_p: np.cos, P.sin_p: np.sin, P.tanh_p: np.tanh, P.exp_p: np.exp, P.log_p: np.log, P.sqrt_p: np.sqrt,
    P.neg_p: np.negative, P.integer_pow_p: lambda x, *, y: x ** y,
    P.logistic_p: lambda x: 1 / (1 + np.exp(-x)),
    P.add_p: np.add, P.sub_p: np.subtract, P.mul_p: np.multiply, P.div_p: np.divide,
    P.max_p: np.maximum, P.min_p: np.minimum, P.gt_p: np.greater, P.lt_p: np.less, P.ge_p: np.greater_equal,
    P.le_p: np.less_equal, P.eq_p: np.equal, P.ne_p: np.not_equal,
    P.select_p: np.where,
    P.convert_element_type_p: lambda x, *, new_dtype: np.asarray(x).astype(new_dtype),
    P.broadcast_in_dim_p: _broadcast_in_dim,
    P.reshape_p: lambda x, *, new_sizes: np.reshape(x, new_sizes),
    P.transpose_p: lambda x, *, permutation: np.transpose(x, permutation),
    P.reduce_sum_p: lambda x, *, axes: np.sum(x, axis=axes, dtype=x.dtype),
    P.reduce_max_p: lambda x, *, axes: np.max(x, axis=axes),
    P.dot_general_p: _dot_general,
    P.random_p: _random,
    P.rsqrt_p: lambda x: 1 / np.sqrt(x), P.stop_gradient_p: lambda x: x,
}


def run(graph, *args):
    def apply(eqn, values):
        if is_composite(eqn.primitive):  # through its decomposition
            return tuple(run(decomposition_of(eqn), *values))
        with np.errstate(all="ignore"):
            return (np.asarray(NUMPY_RULES[eqn.primitive](*values, **dict(eqn.params))),)
    return [np.asarray(v) for v in eval_graph(graph, list(args), apply)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)  # NaNs compare equal here


def compose(part, joint, args):
    num_primals, num_outs = joint.joint
    fw = run(part.forward, *args[:num_primals])
    outs, saved = fw[:num_outs], fw[num_outs:]
    assert len(saved) == len(part.saved)
    grads = run(part.backward, *saved, *args[num_primals:])
    return outs + grads


def joint_args(joint, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
            else np.zeros(v.shape, v.dtype) for v in joint.inputs]


def check_partition(joint, policy, args=None):
    """Partition, then check every contract that holds for any policy; return the partition."""
    part = rt.partition(joint, policy)
    assert isinstance(part, Partition)
    forward, backward = part
    num_primals, num_outs = joint.joint
    rt.typecheck(forward)
    rt.typecheck(backward)
    assert forward.joint is None and backward.joint is None
    assert forward.in_avals == joint.in_avals[:num_primals]
    assert forward.out_avals[:num_outs] == joint.out_avals[:num_outs]
    assert backward.in_avals[len(part.saved):] == joint.in_avals[num_primals:]
    assert backward.out_avals == joint.out_avals[num_outs:]
    assert tuple(v.aval for v in part.saved) == backward.in_avals[:len(part.saved)]
    assert part.saved_bytes == sum(v.nbytes for v in part.saved)
    assert all(isinstance(v, Var) for v in part.saved)
    assert not any(e.primitive is P.random_p for e in backward.eqns), "random draws are never recomputed"
    args = joint_args(joint) if args is None else args
    assert_same(compose(part, joint, args), run(joint, *args))
    assert rt.partition(joint, policy) == part, "partition is deterministic"
    assert_recomputes_just_in_time(part)
    return part


def assert_recomputes_just_in_time(part):
    """Each backward equation that does not read the cotangents (a recomputation) runs just before
    its first reader: everything between the two also feeds that reader."""
    backward = part.backward
    cotangents = set(backward.inputs[len(part.saved):])
    reads_cotangents = set()
    producer = {}
    for k, e in enumerate(backward.eqns):
        if any(isinstance(a, Var) and (a in cotangents or producer.get(a) in reads_cotangents) for a in e.inputs):
            reads_cotangents.add(k)
        producer.update((v, k) for v in e.outputs)

    def feeds(k):
        seen, stack = set(), [k]
        while stack:
            for a in backward.eqns[stack.pop()].inputs:
                if isinstance(a, Var) and producer.get(a) is not None and producer[a] not in seen:
                    seen.add(producer[a])
                    stack.append(producer[a])
        return seen

    for k, e in enumerate(backward.eqns):
        if k in reads_cotangents:
            continue
        readers = [j for j, r in enumerate(backward.eqns) if any(a in e.outputs for a in r.inputs)]
        if readers:
            assert all(i in feeds(readers[0]) for i in range(k, readers[0])), \
                f"recomputed {e} runs before it is needed"


def saved_kinds(part):
    """For each saved value: ('input', i) for a primal, or the name of the primitive producing it."""
    producers = {v: e for e in part.forward.eqns for v in e.outputs}
    out = []
    for v in part.saved:
        out.append(("input", part.forward.inputs.index(v)) if v in part.forward.inputs
                   else producers[v].primitive.name)
    return out


# ----------------------------------------------------------------------------- hand-written joints
# Joint-shaped graphs written by hand (before and independently of rt.vjp).

def hand_joint(fn, *args, num_primals, num_outs):
    return rt.trace(fn, *args).replace(joint=(num_primals, num_outs))


def cos_cos_joint(x, ct):
    y1 = rnp.cos(x)
    return rnp.cos(y1), ct * -rnp.sin(y1) * -rnp.sin(x)


def test_hand_written_cos_cos():
    j = hand_joint(cos_cos_joint, f64(3), f64(3), num_primals=1, num_outs=1)
    default = check_partition(j, "default")
    assert saved_kinds(default) == ["neg", "neg"]          # -sin(cos x), -sin(x)
    mincut = check_partition(j, "mincut")
    assert saved_kinds(mincut) == [("input", 0)] and mincut.saved_bytes == 24


def test_hand_written_outputs_that_depend_on_cotangents_are_rejected():
    j = hand_joint(lambda x, ct: (x * ct, x), f64(3), f64(3), num_primals=1, num_outs=1)
    with pytest.raises(rt.PartitionError, match="cotangent"):
        rt.partition(j)


def test_hand_written_gradient_independent_of_cotangent_and_literal_gradient():
    j = hand_joint(lambda x, ct: (rnp.sin(x), rnp.cos(x), np.zeros(3)), f64(3), f64(3),
                   num_primals=1, num_outs=1)
    for policy in ("default", "mincut", save_nothing):
        check_partition(j, policy)


def test_unused_cotangents_and_primals_stay_in_the_signatures():
    j = hand_joint(lambda x, y, ct1, ct2: (rnp.sin(x), x * 2.0, ct1 * rnp.cos(x)), f64(3), f64(2), f64(3), f64(3),
                   num_primals=2, num_outs=2)
    part = check_partition(j, "mincut")
    assert part.forward.in_avals == j.in_avals[:2]
    assert part.backward.in_avals[-2:] == j.in_avals[2:]


# ----------------------------------------------------------------------------- known optima, through vjp

def test_cos_cos_of_a_sum_saves_exactly_one_tensor():
    x = np.ones(3, np.float32)
    j = rt.vjp(rt.trace(lambda a, b, c, d: rnp.cos(rnp.cos(a + b + c + d)), x, x, x, x))
    mincut = check_partition(j, "mincut")
    assert len(mincut.saved) == 1 and mincut.saved_bytes == 12
    assert saved_kinds(mincut) == ["add"]                 # a+b+c+d, not the four inputs
    assert check_partition(j, "default").saved_bytes > 12


def test_cos_cos_saves_the_input_as_in_the_design_example():
    g = rt.trace(lambda x: rnp.cos(rnp.cos(x)), np.ones(3, np.float32))
    p = rt.partition(rt.vjp(g), policy="mincut")
    assert p.saved_bytes == 12 and len(p.saved) == 1
    assert p.saved[0] is p.forward.outputs[-1] and p.saved[0] == p.forward.inputs[0]
    assert [e.primitive.name for e in p.forward.eqns] == ["cos", "cos"]


@pytest.mark.parametrize("length", [2, 5, 12])
def test_long_elementwise_chain_saves_only_its_input(length):
    def fn(x):
        for i in range(length):
            x = rnp.sin(x) if i % 2 else rnp.tanh(x) * 1.5
        return x
    j = rt.vjp(rt.trace(fn, f64(4)))
    mincut = check_partition(j, "mincut")
    assert saved_kinds(mincut) == [("input", 0)]
    assert check_partition(j, "default").saved_bytes >= length * 32


def test_chain_with_a_dot_in_the_middle_saves_inputs_and_the_dot():
    fn = lambda x, w: rnp.sum(rnp.cos(rnp.cos(x) @ w))  # noqa: E731
    j = rt.vjp(rt.trace(fn, f64(4, 5), f64(5, 6)))
    mincut = check_partition(j, "mincut")
    assert sorted(map(str, saved_kinds(mincut))) == sorted(map(str, [("input", 0), ("input", 1), "dot_general"]))
    default = check_partition(j, "default")
    assert mincut.saved_bytes < default.saved_bytes


def test_small_reduction_is_saved_not_recomputed_unless_the_ban_is_lifted():
    fn = lambda x: rnp.sum(rnp.cos(rnp.sum(x * x, axis=1)))  # noqa: E731  reduction 8x smaller
    j = rt.vjp(rt.trace(fn, f64(8, 8)))
    mincut = check_partition(j, "mincut")
    assert sorted(map(str, saved_kinds(mincut))) == sorted(map(str, [("input", 0), "reduce_sum"]))
    assert mincut.saved_bytes == 8 * 8 * 8 + 8 * 8
    free = check_partition(j, MinCut(banned=lambda eqn: False))
    assert saved_kinds(free) == [("input", 0)]


def test_a_dot_only_the_backward_needs_is_computed_there_once():
    # cos(x) @ w is not a forward output: with the dot banned it may still run in the backward only.
    def joint_fn(x, w, ct):
        h = rnp.cos(x) @ w
        return rnp.sum(x), ct * rnp.tanh(h)
    j = hand_joint(joint_fn, f64(6, 2), f64(2, 6), f64(6, 6), num_primals=2, num_outs=1)
    part = check_partition(j, "mincut")
    assert saved_kinds(part) == [("input", 0), ("input", 1)]
    assert [e.primitive for e in part.backward.eqns].count(P.dot_general_p) == 1
    assert P.dot_general_p not in [e.primitive for e in part.forward.eqns]


def test_an_output_can_be_saved():
    j = rt.vjp(rt.trace(lambda x: rnp.exp(x), f64(5)))
    default = check_partition(j, "default")
    assert default.saved == (default.forward.outputs[0],)  # exp(x) is both the output and saved
    mincut = check_partition(j, "mincut")
    assert saved_kinds(mincut) == [("input", 0)]         # equal bytes: a primal input wins the tie


def test_mincut_saves_an_output_rather_than_recompute_it_when_the_bytes_tie():
    """``relu(x @ w) @ v``: the backward needs the relu's output (``v``'s gradient, relu's own) and
    nothing else of the forward; saving the matmul's output instead, the same size, would have the
    backward run the relu again. Among byte-minimal cuts with as many values, fewer recomputed wins."""
    def fn(x, w, v):
        return rnp.sum(rt.nn.relu(x @ w) @ v)
    j = rt.vjp(rt.trace(fn, f64(4, 3), f64(3, 5, seed=1), f64(5, 2, seed=2)))
    for policy in ("mincut", "fusion"):
        part = check_partition(j, policy)
        assert "relu" in saved_kinds(part), (policy, saved_kinds(part))
        assert "relu" not in [e.primitive.name for e in part.backward.eqns]


def test_fusion_policy_recomputes_core_chains_and_saves_composites():
    """``"fusion"``: a chain of elementwise primitives is recomputed in the backward (one loop for a
    fusing compiler, where the default saves every link's derivative); a composite (``gelu``,
    ``layer_norm``) is saved, never run again; gradients are the joint's."""
    def chain(x):
        for _ in range(4):
            x = rnp.cos(x)
        return rnp.sum(x)
    j = rt.vjp(rt.trace(chain, f64(6)))
    assert len(check_partition(j, "default").saved) == 4
    fused = check_partition(j, "fusion")
    assert saved_kinds(fused) == [("input", 0)]

    def block(x, w):
        h = rt.nn.gelu(x @ w, approximate="tanh")
        y, _, _ = rt.nn.layer_norm(h, normalized_ndim=1, eps=1e-5)
        return rnp.sum(y * y)
    j = rt.vjp(rt.trace(block, f64(4, 3), f64(3, 6, seed=1)))
    part = check_partition(j, "fusion")  # its gradients are the joint's
    recomputed = {e.primitive.name for e in part.backward.eqns} & {"gelu", "layer_norm"}
    assert not recomputed and "gelu" in saved_kinds(part)
    assert check_partition(j, "mincut").saved_bytes <= part.saved_bytes


def test_random_draws_are_saved_never_recomputed_whatever_the_policy():
    def fn(x, key):
        mask = lax.convert_element_type(lax.bind(P.random_p, key, shape=(6,), dtype=np.dtype(np.float64),
                                                 distribution="uniform") > 0.5, np.float64)
        return rnp.sum(rnp.sin(x * mask))
    j = rt.vjp(rt.trace(fn, f64(6), np.array([1, 2], np.uint32)))
    policies = ("default", "mincut", save_nothing, save_only_these("sin"), MinCut(banned=lambda e: False),
                lambda eqn: eqn.primitive is not P.random_p)
    for policy in policies:
        part = check_partition(j, policy)  # checks that the backward has no random equation
        assert [e.primitive for e in part.forward.eqns].count(P.random_p) == 1
    kinds = saved_kinds(check_partition(j, save_nothing))
    assert "random" in kinds and all(k == "random" or k[0] == "input" for k in kinds)


def test_partitioning_thousands_of_equations_is_fast():
    import time

    def fn(x, *ws):
        for w in ws:
            x = x + rnp.tanh(x @ w) * rnp.cos(x) / (1.0 + rnp.exp(-x))
        return rnp.sum(x * x)
    ws = [f64(8, 8, seed=i) for i in range(100)]
    j = rt.vjp(rt.trace(fn, f64(4, 8), *ws))
    assert len(j.eqns) >= 1500
    start = time.perf_counter()
    part = rt.partition(j, "mincut")
    assert time.perf_counter() - start < 2.0, "min-cut partition should be near-linear"
    assert part.saved_bytes <= rt.partition(j, "default").saved_bytes


# ----------------------------------------------------------------------------- callable policies

def test_the_default_policy_saves_everything_but_copies():
    """"default" is save_all except for copies (a transpose, reshape, broadcast), which the backward
    redoes from their operands: a weight's transpose is not saved as a second copy of the weight."""
    j = rt.vjp(rt.trace(lambda x, w: rnp.tanh(rnp.tanh(x @ w.T)).sum(), f64(3, 4), f64(2, 4)))
    default, everything = rt.partition(j, "default"), rt.partition(j, save_all)
    assert default == rt.partition(j, save_all_but_copies)
    assert default.saved_activation_bytes < everything.saved_activation_bytes
    assert not any(e.primitive.name == "transpose" for e in j.eqns
                   if any(o in set(default.saved) for o in e.outputs))


def test_save_nothing_saves_only_primals():
    j = rt.vjp(rt.trace(lambda x, w: rnp.tanh(rnp.tanh(x @ w)).sum(), f64(3, 4), f64(4, 2)))
    part = check_partition(j, save_nothing)
    assert all(kind[0] == "input" for kind in saved_kinds(part))


def test_dots_saveable_saves_dots_and_primals_only():
    j = rt.vjp(rt.trace(lambda x, w, v: rnp.sum(rnp.tanh(rnp.tanh(x @ w) @ v)), f64(3, 4), f64(4, 5), f64(5, 2)))
    part = check_partition(j, dots_saveable)
    kinds = saved_kinds(part)
    assert "dot_general" in kinds
    assert all(k == "dot_general" or k[0] == "input" for k in kinds)
    assert save_only_these("dot_general", "conv_general_dilated")(j.eqns[0]) == dots_saveable(j.eqns[0])


def test_save_anything_except_these_recomputes_only_those():
    j = rt.vjp(rt.trace(lambda x: rnp.sum(rnp.tanh(rnp.sin(x))), f64(4)))
    part = check_partition(j, save_anything_except_these([P.sin_p]))
    assert "sin" not in saved_kinds(part)


def test_a_user_written_policy():
    def save_big(eqn):  # save values of 8 or more elements, recompute small ones
        return eqn.outputs[0].size >= 8
    j = rt.vjp(rt.trace(lambda x, y: rnp.sum(rnp.tanh(x) * rnp.sum(rnp.sin(y))), f64(8), f64(2)))
    part = check_partition(j, save_big)
    for v, kind in zip(part.saved, saved_kinds(part)):
        assert kind[0] == "input" or v.size >= 8


def test_policies_are_checked():
    j = rt.vjp(rt.trace(lambda x: rnp.sin(x), f64(2)))
    with pytest.raises(rt.PartitionError, match="unknown partition policy"):
        rt.partition(j, "fastest")
    with pytest.raises(rt.PartitionError, match="policy"):
        rt.partition(j, 3)
    with pytest.raises(rt.PartitionError, match="joint graph"):
        rt.partition(rt.trace(lambda x: rnp.sin(x), f64(2)))
    with pytest.raises(rt.ReftraceError):
        rt.partition("not a graph")
    with pytest.raises(rt.PartitionError):
        save_only_these(42)


# ----------------------------------------------------------------------------- values, through JAX

def test_forward_then_backward_give_jax_grad_values():
    import jax
    import jax.numpy as jnp

    def fn(x, w):
        return rnp.sum(rnp.tanh(rnp.cos(x) @ w) ** 2)

    def ref(x, w):
        return jnp.sum(jnp.tanh(jnp.cos(x) @ w) ** 2)

    x, w = f64(3, 4), f64(4, 5, seed=2)
    j = rt.vjp(rt.trace(fn, x, w))
    for policy in ("default", "mincut"):
        fw, bw = p = rt.partition(j, policy)
        out, *saved = rt.lower(fw, "jax")(x, w)
        gx, gw = rt.lower(bw, "jax")(*saved, np.array(1.0))
        with jax.enable_x64(True):
            rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
            np.testing.assert_allclose(out, ref(x, w), rtol=1e-12)
        np.testing.assert_allclose(gx, rx, rtol=1e-10)
        np.testing.assert_allclose(gw, rw, rtol=1e-10)
        assert len(saved) == len(p.saved)


# ----------------------------------------------------------------------------- purity

def test_partition_never_changes_its_input():
    j = rt.vjp(rt.trace(lambda x: rnp.cos(rnp.cos(x)) + rnp.cos(x), f64(3)))
    before = (j.inputs, j.eqns, j.outputs, j.joint, hash(j))
    twin = Graph(j.inputs, j.eqns, j.outputs, j.joint)
    for policy in ("default", "mincut", save_nothing):
        rt.partition(j, policy)
    assert (j.inputs, j.eqns, j.outputs, j.joint, hash(j)) == before and j == twin


def test_partition_value_is_a_pair_and_immutable():
    import copy
    import pickle
    p = rt.partition(rt.vjp(rt.trace(lambda x: rnp.sin(x), f64(2))), "mincut")
    fw, bw = p
    assert (fw, bw) == tuple(p) and p.forward is fw and p.backward is bw
    with pytest.raises(AttributeError):
        p.forward = bw
    assert p._replace(forward=fw).saved == p.saved
    assert "saved=1 values" in repr(p)
    for q in (copy.copy(p), pickle.loads(pickle.dumps(p))):
        assert q == p and q.saved == p.saved and q.num_saved == 1


# ----------------------------------------------------------------------------- brute force optimum

def brute_force_optimum(joint, banned=default_ban):
    """(bytes, non-primal count, primal count + forward values recomputed) of the best valid saved set,
    by enumeration."""
    a = JointAnalysis(rt.simplify(joint))
    relevant = sorted(a.ancestors(a.boundary), key=lambda v: v.id)
    assert len(relevant) <= 14, "too big to enumerate"
    forced = {v for v in relevant if a.must_save(v)
              or (v in a.forward_needed and banned(a.producer[v]))}
    best = None
    for r in range(len(relevant) + 1):
        for subset in itertools.combinations(relevant, r):
            chosen = set(subset)
            ok: dict[Var, bool] = {}
            for v in relevant:  # topological order
                if v in chosen:
                    ok[v] = True
                elif v in forced:
                    ok[v] = False
                else:  # what the backward runs to recompute v (a smaller form, where there is one)
                    ok[v] = all(ok[a.values[u]] for u in a.recompute_operands(a.eqn_of[v.id]))
            if all(ok[b] for b in a.boundary):
                key = cut_key(a, chosen)
                best = key if best is None or key < best else best
    return best


def _recomputed(a, saved):
    """The values the backward computes from ``saved``: walking back from the boundary until a saved one."""
    seen, stack = set(), [b for b in a.boundary if b not in saved]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        stack.extend(u for u in map(a.values.__getitem__, a.recompute_operands(a.eqn_of[v.id])) if u not in saved)
    return seen


def cut_key(a, chosen):
    """A saved set's (bytes, non-primal count, primal count + forward values the backward recomputes)."""
    primal = sum(1 for v in chosen if v in a.primal_set)
    recomputed = sum(1 for v in _recomputed(a, chosen) if v in a.forward_needed)
    return (sum(v.nbytes for v in chosen), len(chosen) - primal, primal + recomputed)


def partition_key(part):
    """A partition's (bytes, non-primal count) saved."""
    primal = sum(1 for v in part.saved if v in part.forward.inputs)
    return (part.saved_bytes, len(part.saved) - primal)


OPS = ["cos", "sin", "tanh", "neg", "exp_tanh", "add", "mul", "sub", "max", "matmul", "sum_keep", "scale",
       "transpose", "sum_small", "batch_norm"]


@st.composite
def programs(draw):
    num_inputs = draw(st.integers(1, 3))
    ops = draw(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 99), st.integers(0, 99)),
                        min_size=1, max_size=7))
    extra_output = draw(st.booleans())
    return num_inputs, ops, extra_output


def batch_norm_with_updates(x, y):
    """A train-mode batch norm of ``x`` with running statistics made from ``y``: (output, new running
    mean, new running variance); a program returns the last two, as a module's buffer updates."""
    stats = rnp.sum(y, axis=0)
    out, _, _, mean, var = rt.nn.batch_norm_train(x, None, None, stats, stats * stats, momentum=0.1, eps=1e-5)
    return out, mean, var


def build(program):
    num_inputs, ops, extra_output = program

    def fn(*xs):
        pool, updates = list(xs), []
        for name, i, k in ops:
            x, y = pool[i % len(pool)], pool[k % len(pool)]
            if name == "batch_norm":
                out, *stats = batch_norm_with_updates(x, y)
                pool.append(out)
                updates += stats
                continue
            pool.append({
                "cos": lambda: rnp.cos(x), "sin": lambda: rnp.sin(x), "tanh": lambda: rnp.tanh(x),
                "neg": lambda: -x, "exp_tanh": lambda: rnp.exp(rnp.tanh(x)), "add": lambda: x + y,
                "mul": lambda: x * y, "sub": lambda: x - y, "max": lambda: rnp.maximum(x, y),
                "matmul": lambda: x @ y, "sum_keep": lambda: x + rnp.sum(x, axis=0, keepdims=True),
                "scale": lambda: x * 0.5, "transpose": lambda: x.T,
                "sum_small": lambda: rnp.sum(x, axis=(0, 1)) * y,
            }[name]())
        return (pool[-1], pool[len(pool) // 2], *updates) if extra_output or updates else pool[-1]

    shapes = [(2, 2)] * num_inputs
    return rt.trace(fn, *[f64(*s, seed=i) for i, s in enumerate(shapes)])


@given(programs())
def test_random_programs_compose_and_mincut_is_optimal(program):
    j = rt.vjp(build(program))
    default = check_partition(j, "default")
    mincut = check_partition(j, "mincut")
    nothing = check_partition(j, save_nothing)
    check_partition(j, dots_saveable)
    assert mincut.saved_bytes <= default.saved_bytes
    assert mincut.saved_bytes <= nothing.saved_bytes or any(default_ban(e) for e in j.eqns)
    a = JointAnalysis(rt.simplify(j))
    if len(a.ancestors(a.boundary)) <= 12:
        best = brute_force_optimum(j)
        assert cut_key(a, min_cut_saved(a)) == best
        assert partition_key(mincut) == best[:2]
        free = check_partition(j, MinCut(banned=lambda e: False))
        best_free = brute_force_optimum(j, banned=lambda e: False)
        assert cut_key(a, min_cut_saved(a, banned=lambda e: False)) == best_free
        assert partition_key(free) == best_free[:2]
        assert free.saved_bytes <= nothing.saved_bytes


@given(programs())
def test_second_order_joints_partition_too(program):
    g = build(program)
    j = rt.vjp(g)
    jj = rt.vjp(j.replace(joint=None))
    for policy in ("default", "mincut"):
        check_partition(jj, policy)


# ----------------------------------------------------------------------------- exact integers beyond int32

def test_huge_tensors_use_exact_arithmetic():
    """Saved bytes far beyond 2**31 gcd-units: phase one runs on exact integers and stays optimal."""
    builder = Builder()
    x = new_input(builder, Aval((400_000_003,), np.float64))
    y = new_input(builder, Aval((400_000_001,), np.float64))
    with tracing(builder):
        out = rnp.sum(rnp.cos(rnp.cos(x))) + rnp.sum(rnp.sin(rnp.tanh(y)) * rnp.sin(y))
    g = builder.build([x.atom, y.atom], [out.atom])
    j = rt.vjp(g)
    a = JointAnalysis(rt.simplify(j))
    assert sum(v.nbytes for v in a.boundary) > 2**31 * 8
    part = rt.partition(j, "mincut")
    rt.typecheck(part.forward)
    rt.typecheck(part.backward)
    assert saved_kinds(part) == [("input", 0), ("input", 1)]
    assert cut_key(a, min_cut_saved(a)) == brute_force_optimum(j)
    assert min_cut_saved(a) == set(a.primals)


def _attention_joint():
    """A joint where attention's output is read by the forward and its log-sum-exp only by the backward."""
    x, w = f64(2, 2, 5, 4), f64(4, 4, seed=1)

    def fn(x, w):
        q = lax.dot_general(x, w, (((3,), (0,)), ((), ())))
        out, _ = rt.nn.dot_product_attention(q, x, x)
        return lax.mul(out, out)
    return rt.vjp(rt.trace(fn, x, w)), [x, w, f64(2, 2, 5, 4, seed=2)]


def _check_partition_runs_like_the_joint(joint, part, args):
    want = [np.asarray(v) for v in rt.lower(joint, "jax")(*args)]
    n_primals, n_outs = joint.joint
    fwd = [np.asarray(v) for v in rt.lower(part.forward, "jax")(*args[:n_primals])]
    grads = [np.asarray(v) for v in rt.lower(part.backward, "jax")(*fwd[n_outs:], *args[n_primals:])]
    for got, expected in zip(fwd[:n_outs] + grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_a_recomputed_equation_with_a_saved_output_reads_the_saved_one():
    """Saving one output of a multi-output equation and recomputing it for another: the backward
    takes the saved value as an input and gives the recomputed copy a fresh name."""
    from reftrace.transforms.partition import split
    from reftrace.transforms.simplify import simplify
    joint, args = _attention_joint()
    analysis = JointAnalysis(simplify(joint))
    attention = next(e for e in analysis.graph.eqns if e.primitive.name == "attention")
    saved = set(analysis.primals) | {attention.outputs[0], attention.inputs[0]}  # out and q, not lse
    part = split(analysis, saved)
    assert "attention" in {e.primitive.name for e in part.backward.eqns}
    _check_partition_runs_like_the_joint(joint, part, args)


def test_mincut_keeps_every_output_of_a_banned_equation_the_forward_runs():
    """Attention is banned from recomputation: its log-sum-exp is saved, not made by a second attention."""
    joint, args = _attention_joint()
    part = rt.partition(joint, "mincut")
    assert "attention" not in {e.primitive.name for e in part.backward.eqns}
    _check_partition_runs_like_the_joint(joint, part, args)
