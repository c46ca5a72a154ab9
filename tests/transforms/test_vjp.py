"""vjp: per-primitive gradients against JAX and finite differences, HVPs, the joint convention.

Every gradient reftrace computes comes from its own rules (reftrace.transforms.vjp_rules);
the references are jax.vjp of the same graph lowered to JAX (JAX's own rules), functions
written directly in JAX, and central finite differences in float64.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reftrace as rt
from reftrace import lax
from reftrace import numpy as rnp
from reftrace import primitives as P
from reftrace.backends.jax import graph_function
from reftrace.errors import ArgumentError, UnsupportedOperatorError
from reftrace.graph import Graph
from reftrace.primitives import typecheck
from reftrace.primitives import is_float
from reftrace.transforms import vjp_rules as rules_module
from reftrace.transforms.vjp import differentiable_inputs, vjp

RNG_SEED = 0


# ----------------------------------------------------------------------------- checking helpers
# (also used by tests/properties/test_vjp_properties.py)

def random_cotangents(graph: Graph, rng: np.random.Generator, skip: Sequence[int] = ()) -> list[np.ndarray]:
    """One cotangent per output not in ``skip``: normal noise for floats, zeros for ints/bools."""
    cts = []
    for j, out in enumerate(graph.outputs):
        if j in skip:
            continue
        if is_float(out.dtype):
            cts.append(rng.standard_normal(out.shape).astype(out.dtype))
        else:
            cts.append(np.zeros(out.shape, out.dtype))
    return cts


def run_joint(graph: Graph, args: Sequence[Any], cts: Sequence[Any], **vjp_kwargs: Any
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Build the joint with reftrace's rules, typecheck it, run it on JAX: (outs, grads)."""
    joint = vjp(graph, **vjp_kwargs)
    typecheck(joint)
    assert joint.joint == (len(graph.inputs), len(graph.outputs))
    results = [np.asarray(r) for r in rt.lower(joint, "jax")(*args, *cts)]
    return results[:len(graph.outputs)], results[len(graph.outputs):]


def _with(args: Sequence[Any], positions: Sequence[int], values: Sequence[Any]) -> list[Any]:
    full = list(args)
    for i, v in zip(positions, values):
        full[i] = v
    return full


def jax_reference(graph: Graph, args: Sequence[Any], cts: Sequence[Any], diff: Sequence[int]
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """JAX's own VJP of the graph lowered to JAX, in one jit: (outs, grads).

    Only float outputs take part (JAX gives integer outputs float0 cotangents).
    """
    f = graph_function(graph)
    float_outs = [j for j, o in enumerate(graph.outputs) if is_float(o.dtype)]

    def outs_and_grads(args, float_cts):
        def restricted(*diff_args):
            outs = f(*_with(args, diff, diff_args))
            return tuple(outs[j] for j in float_outs)
        outs, pullback = jax.vjp(restricted, *[args[i] for i in diff])
        return outs, pullback(tuple(float_cts))

    with jax.enable_x64(True):
        outs, grads = jax.jit(outs_and_grads)(list(args), [cts[j] for j in float_outs])
    full_outs = [None] * len(graph.outputs)
    for j, o in zip(float_outs, outs):
        full_outs[j] = np.asarray(o)
    return full_outs, [np.asarray(g) for g in grads]


class _Forward:
    """The forward outputs, read off the (already compiled) joint with zero cotangents."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.joint = rt.lower(vjp(graph), "jax")
        self.zero_cts = [np.zeros(o.shape, o.dtype) for o in graph.outputs]

    def __call__(self, *args: Any) -> list[np.ndarray]:
        results = self.joint(*args, *self.zero_cts)
        return [np.asarray(r) for r in results[:len(self.graph.outputs)]]


def finite_difference_check(graph: Graph, args: Sequence[np.ndarray], cts: Sequence[np.ndarray],
                            diff: Sequence[int], grads: Sequence[np.ndarray], rng: np.random.Generator,
                            labels: Sequence[str] | None = None, directions: int = 2, eps: float = 1e-6) -> None:
    """Central differences of <ct, f(x + t v)> along random v match <grads, v> (float64).

    With ``labels`` (one per input), inputs sharing a label are perturbed together and
    separately from the others, so a failure names the culprit.
    """
    forward = _Forward(graph)
    float_outs = [j for j, o in enumerate(graph.outputs) if is_float(o.dtype)]
    grad_of = dict(zip(diff, grads))

    def phi(point: Sequence[np.ndarray]) -> float:
        outs = forward(*point)
        return float(sum(np.sum(outs[j].astype(np.float64) * cts[j]) for j in float_outs))

    at_args = forward(*args)
    scale = 1.0 + sum(float(np.sum(np.abs(at_args[j].astype(np.float64) * cts[j]))) for j in float_outs)
    labels = list(labels) if labels is not None else ["inputs"] * len(args)
    for label in dict.fromkeys(labels[i] for i in diff):
        group = [i for i in diff if labels[i] == label]
        for _ in range(directions):
            vs = [rng.standard_normal(np.shape(args[i])) for i in group]
            plus = _with(args, group, [np.asarray(args[i] + eps * v) for i, v in zip(group, vs)])
            minus = _with(args, group, [np.asarray(args[i] - eps * v) for i, v in zip(group, vs)])
            numeric = (phi(plus) - phi(minus)) / (2 * eps)
            analytic = float(sum(np.sum(grad_of[i] * v) for i, v in zip(group, vs)))
            assert abs(numeric - analytic) <= 1e-6 * scale + 1e-5 * abs(analytic), \
                f"{label}: finite differences {numeric} != {analytic}"


def check_gradients(graph: Graph, args: Sequence[Any], *, finite_differences: bool = True,
                    rtol: float = 1e-9, atol: float = 1e-9, seed: int = RNG_SEED,
                    labels: Sequence[str] | None = None) -> list[np.ndarray]:
    """reftrace's gradients equal JAX's (and finite differences); its outs equal JAX's forward.

    ``labels`` (one per input) name the inputs in failure messages.
    """
    rng = np.random.default_rng(seed)
    args = [np.asarray(a) for a in args]
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(args))]
    cts = random_cotangents(graph, rng)
    outs, grads = run_joint(graph, args, cts)
    diff = differentiable_inputs(graph)
    want_outs, want_grads = jax_reference(graph, args, cts, diff)
    for j, (got, want) in enumerate(zip(outs, want_outs)):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13, err_msg=f"output {j}")
    assert len(grads) == len(diff)
    for i, g in zip(diff, grads):
        assert g.shape == args[i].shape and g.dtype == args[i].dtype, labels[i]
    for i, got, want in zip(diff, grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"gradient of {labels[i]}")
    if finite_differences and diff:
        finite_difference_check(graph, args, cts, diff, grads, rng, labels)
    return grads


Case = tuple[str, Callable[..., Any], Sequence[np.ndarray]]


def check_cases(cases: Sequence[Case], **kwargs: Any) -> None:
    """Check several small functions as one graph (one XLA compile instead of many).

    Each case is (label, fn, args); the graph's inputs are all cases' args in order and its
    outputs all their outputs, so the cases stay independent and failures name their label.
    """
    flat_args = [np.asarray(a) for _, _, args in cases for a in args]
    labels = [label for label, _, args in cases for _ in args]

    def combined(*flat):
        outs, k = [], 0
        for _, fn, args in cases:
            result = fn(*flat[k:k + len(args)])
            outs.extend(result if isinstance(result, (tuple, list)) else [result])
            k += len(args)
        return tuple(outs)

    check_gradients(rt.trace(combined, *flat_args), flat_args, labels=labels, **kwargs)


def hvp_check(graph: Graph, args: Sequence[np.ndarray], seed: int = RNG_SEED, rtol: float = 1e-8,
              atol: float = 1e-9) -> None:
    """vjp(vjp(g)) gives Hessian-vector products equal to JAX's forward-over-reverse."""
    rng = np.random.default_rng(seed)
    diff = differentiable_inputs(graph)
    cts = random_cotangents(graph, rng)
    vs = [rng.standard_normal(np.shape(args[i])) for i in diff]
    joint = vjp(graph)
    n_out = len(graph.outputs)
    # second joint: differentiate the gradients only (no cotangents for the forward outputs)
    second = vjp(joint, wrt=diff, nondiff_outputs=tuple(range(n_out)))
    typecheck(second)
    res = rt.lower(second, "jax")(*args, *cts, *vs)
    ours = [np.asarray(r) for r in res[len(joint.outputs):]]

    f = graph_function(graph)
    float_outs = [j for j, o in enumerate(graph.outputs) if is_float(o.dtype)]

    def scalar(*diff_args):
        outs = f(*_with(args, diff, diff_args))
        return sum(jnp.sum(outs[j] * cts[j]) for j in float_outs)

    def hessian_vector_product(primal, tangent):
        return jax.jvp(jax.grad(scalar, argnums=tuple(range(len(diff)))), primal, tangent)[1]

    with jax.enable_x64(True):
        tangent = jax.jit(hessian_vector_product)([args[i] for i in diff], vs)
    for got, want in zip(ours, tangent):
        np.testing.assert_allclose(got, np.asarray(want), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- per-primitive cases

def _r(*shape: int, low: float = -1.5, high: float = 1.5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed + 7 * len(shape) + sum(shape)).uniform(low, high, shape)


def _sign_mixed(*shape: int, low: float, high: float, seed: int = 1) -> np.ndarray:
    """Values with |x| in [low, high] and random signs: away from a kink at 0."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


UNARY_DOMAINS: dict[str, np.ndarray] = {
    "exp": _r(3, 4), "log": _r(3, 4, low=0.2, high=3), "log1p": _r(3, 4, low=-0.5, high=2),
    "expm1": _r(3, 4), "tanh": _r(3, 4), "logistic": _r(3, 4), "sin": _r(3, 4), "cos": _r(3, 4),
    "tan": _r(3, 4, low=-1, high=1), "asin": _r(3, 4, low=-0.9, high=0.9), "acos": _r(3, 4, low=-0.9, high=0.9),
    "atan": _r(3, 4), "sinh": _r(3, 4), "cosh": _r(3, 4), "asinh": _r(3, 4), "acosh": _r(3, 4, low=1.2, high=3),
    "atanh": _r(3, 4, low=-0.9, high=0.9), "sqrt": _r(3, 4, low=0.1, high=3), "rsqrt": _r(3, 4, low=0.1, high=3),
    "cbrt": _sign_mixed(3, 4, low=0.2, high=2), "erf": _r(3, 4), "erfc": _r(3, 4),
    "erf_inv": _r(3, 4, low=-0.9, high=0.9),
    "lgamma": np.array([0.3, 1.0, 2.5, 7.0, -0.5, -1.7, -2.2, 15.0]),
    "digamma": np.array([0.3, 1.0, 2.5, 7.0, -0.5, -1.7, -2.2, 15.0, 0.499, 0.501, 40.0]),
    "floor": _r(3, 4), "ceil": _r(3, 4), "round": _r(3, 4), "sign": _sign_mixed(3, 4, low=0.1, high=1),
    "neg": _r(3, 4), "abs": _sign_mixed(3, 4, low=0.1, high=2),
}


def test_every_primitive_has_a_rule():
    assert rules_module.missing_rules() == []
    assert set(UNARY_DOMAINS) >= {p.name for p in P.UNARY_PRIMITIVES if p not in (P.not_p, P.is_finite_p)}


def _unary_case(name: str) -> Case:
    prim = P.registry[name]
    return name, lambda a: lax.bind(prim, a), [UNARY_DOMAINS[name]]


def test_unary():
    """Every elementwise unary primitive (each one an independent input/output of one graph)."""
    check_cases([_unary_case(name) for name in sorted(UNARY_DOMAINS)], rtol=1e-8)


def test_unary_rank0():
    g = rt.trace(lambda a: lax.mul(lax.sin(a), lax.exp(a)), np.float64(0.7))
    check_gradients(g, [np.float64(0.7)])


def test_integer_pow():
    x = _sign_mixed(3, 4, low=0.3, high=1.5)
    check_cases([(f"x**{y}", lambda a, y=y: lax.integer_pow(a, y), [x]) for y in (-3, -2, -1, 0, 1, 2, 3, 5)])


BINARY_DOMAINS: dict[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]] = {
    "add": (_r, _r), "sub": (_r, _r), "mul": (_r, _r),
    "div": (_r, lambda *s: _sign_mixed(*s, low=0.5, high=2, seed=3)),
    "rem": (lambda *s: _r(*s, low=-4, high=4), lambda *s: _sign_mixed(*s, low=0.7, high=1.3, seed=3)),
    "pow": (lambda *s: _r(*s, low=0.2, high=2), lambda *s: _r(*s, seed=5)),
    "atan2": (_r, lambda *s: _r(*s, seed=4)),
    "max": (_r, lambda *s: _r(*s, seed=2)), "min": (_r, lambda *s: _r(*s, seed=2)),
}


@pytest.mark.parametrize("name", sorted(BINARY_DOMAINS))
def test_binary(name):
    """Equal shapes, and rank-0 operands broadcast on either side (their cotangents are summed)."""
    prim = P.registry[name]
    make_x, make_y = BINARY_DOMAINS[name]
    cases = []
    for label, (xs, ys) in {"same": ((3, 4), (3, 4)), "lhs_rank0": ((), (3, 4)), "rhs_rank0": ((3, 4), ()),
                            "both_rank0": ((), ())}.items():
        cases.append((f"{name} {label}", lambda a, b: lax.bind(prim, a, b), [make_x(*xs), make_y(*ys)]))
    check_cases(cases)


def test_binary_literal_operand():
    """A Literal operand gets no cotangent and no work is emitted for it."""
    x = _r(3)
    g = rt.trace(lambda a: lax.mul(a, 3.0), x)
    joint = vjp(g)
    assert [e.primitive.name for e in joint.eqns] == ["mul", "mul"]
    check_gradients(g, [x])


def test_select_and_relu():
    x, y = _r(3, 4), _r(3, 4, seed=9)
    g = rt.trace(lambda a, b: rnp.where(a > b, a * b, rnp.sin(b)), x, y)
    check_gradients(g, [x, y])
    relu = rt.trace(lambda a: rnp.maximum(a, 0.0), x)
    check_gradients(relu, [x])
    # rank-0 branches: their cotangents are summed back
    g0 = rt.trace(lambda p, a, b: lax.select(lax.gt(p, 0.0), a, b), x, np.float64(2.0), np.float64(-1.0))
    grads = check_gradients(g0, [x, np.float64(2.0), np.float64(-1.0)])
    assert grads[1].shape == () and grads[2].shape == ()


def test_convert_element_type():
    x = _r(3, 4)
    g = rt.trace(lambda a: lax.convert_element_type(lax.mul(lax.convert_element_type(a, np.float32), 2.0),
                                                    np.float64), x)
    rng = np.random.default_rng(0)
    ct = rng.standard_normal((3, 4))
    _, (grad,) = run_joint(g, [x], [ct])
    np.testing.assert_allclose(grad, 2 * ct.astype(np.float32).astype(np.float64), rtol=1e-6)
    to_int = rt.trace(lambda a: lax.convert_element_type(lax.convert_element_type(a, np.int32), np.float64), x)
    _, (grad,) = run_joint(to_int, [x], [ct])
    np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_stop_gradient_and_piecewise_constant():
    x = _r(3, 4)
    g = rt.trace(lambda a: lax.mul(lax.stop_gradient(a), lax.sin(a)), x)
    ct = np.ones((3, 4))
    _, (grad,) = run_joint(g, [x], [ct])
    np.testing.assert_allclose(grad, x * np.cos(x), rtol=1e-12)
    check_gradients(g, [x], finite_differences=False)


@pytest.mark.parametrize("op", ["sum", "max", "min", "prod"])
def test_reductions(op):
    x = _r(2, 3, 4)
    fn = {"sum": lax.reduce_sum, "max": lax.reduce_max, "min": lax.reduce_min, "prod": lax.reduce_prod}[op]
    check_cases([(f"{op} over {axes}", lambda a, axes=axes: fn(a, axes), [x])
                 for axes in [(0,), (1,), (0, 1), (1, 2), (0, 2), (0, 1, 2)]])


def test_reduce_prod_with_zeros():
    x = np.array([[1.5, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    g = rt.trace(lambda a: lax.reduce_prod(a, (1,)), x)
    grads = check_gradients(g, [x], finite_differences=False)
    _, (grad,) = run_joint(g, [x], [np.ones(3)])
    np.testing.assert_array_equal(grad[0], [0.0, -3.0, 0.0, 0.0])   # one zero: only it gets a slope
    np.testing.assert_array_equal(grad[1], [0.0, 0.0, 0.0, 0.0])    # two zeros: all slopes vanish
    assert grads[0].shape == x.shape


def test_reduce_max_ties_split_equally():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    g = rt.trace(lambda a: lax.reduce_max(a, (1,)), x)
    _, (grad,) = run_joint(g, [x], [np.array([1.0, 3.0])])
    np.testing.assert_allclose(grad, [[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]])
    check_gradients(g, [x], finite_differences=False)  # JAX splits ties the same way


def test_elementwise_max_tie_and_abs_at_zero():
    x = np.array([1.0, 2.0, 0.0])
    y = np.array([1.0, 1.0, 0.5])
    g = rt.trace(lambda a, b: (rnp.maximum(a, b), rnp.abs(a)), x, y)
    _, (gx, gy) = run_joint(g, [x, y], [np.ones(3), np.ones(3)])
    np.testing.assert_allclose(gx, [0.5 + 1.0, 1.0 + 1.0, 0.0 + 0.0])  # abs'(0) = 0 (torch); JAX says 1
    np.testing.assert_allclose(gy, [0.5, 0.0, 1.0])


def test_sqrt_at_zero_is_inf_and_pow_at_zero():
    g = rt.trace(lambda a: lax.sqrt(a), np.zeros(2))
    _, (grad,) = run_joint(g, [np.zeros(2)], [np.ones(2)])
    assert np.all(np.isposinf(grad))
    x, y = np.array([0.0, 0.0, 0.0, 2.0]), np.array([0.0, 1.0, 2.0, 0.0])
    p = rt.trace(lambda a, b: lax.pow(a, b), x, y)
    _, (gx, gy) = run_joint(p, [x, y], [np.ones(4)])
    np.testing.assert_array_equal(gx, [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(gy, [0.0, 0.0, 0.0, np.log(2.0)])
    # JAX agrees except d/dx at x == y == 0 with a float exponent, where it gives nan (0 * inf)
    check_gradients(rt.trace(lambda a, b: lax.pow(a, b), x[1:], y[1:]), [x[1:], y[1:]], finite_differences=False)


@pytest.mark.parametrize("name", ["cumsum", "cumprod", "cummax", "cummin"])
def test_cumulative(name):
    x = _r(4, 5)
    prim = P.registry[name]
    check_cases([(f"{name} axis={axis} reverse={reverse}",
                  lambda a, axis=axis, reverse=reverse: lax.bind(prim, a, axis=axis, reverse=reverse), [x])
                 for axis in (0, 1) for reverse in (False, True)])


@pytest.mark.parametrize("reverse", [False, True])
def test_cumprod_with_zeros(reverse):
    x = np.array([[2.0, 0.0, 3.0, 0.5, 0.0, 1.5], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    g = rt.trace(lambda a: lax.bind(P.cumprod_p, a, axis=1, reverse=reverse), x)
    grads = check_gradients(g, [x], finite_differences=False)
    # against the definition: d/dx_k sum_i ct_i prod_{j<=i} x_j, by brute force
    ct = random_cotangents(g, np.random.default_rng(RNG_SEED))[0]
    expected = np.zeros_like(x)
    for r in range(2):
        row = x[r, ::-1] if reverse else x[r]
        c = ct[r, ::-1] if reverse else ct[r]
        for k in range(6):
            expected_k = sum(c[i] * np.prod([row[j] for j in range(i + 1) if j != k]) for i in range(k, 6))
            expected[r, (5 - k) if reverse else k] = expected_k
    np.testing.assert_allclose(grads[0], expected, rtol=1e-12)


def test_cummax_ties_split_equally():
    x = np.array([1.0, 3.0, 2.0, 3.0, 0.0])
    g = rt.trace(lambda a: lax.bind(P.cummax_p, a, axis=0, reverse=False), x)
    _, (grad,) = run_joint(g, [x], [np.ones(5)])
    # out = [1, 3, 3, 3, 3]: position 3 ties with position 1 for outputs 3 and 4
    np.testing.assert_allclose(grad, [1.0, 1 + 1 + 0.5 + 0.5, 0.0, 1.0, 0.0])


def test_shape_ops():
    x = _r(2, 3, 4)
    cases = {
        "broadcast size-1 and new dims": lambda a: lax.broadcast_in_dim(lax.reshape(a, (2, 1, 3, 4)),
                                                                         (5, 2, 6, 3, 4), (1, 2, 3, 4)),
        "broadcast a middle dim": lambda a: lax.broadcast_in_dim(a, (2, 3, 7, 4), (0, 1, 3)),
        "reshape": lambda a: lax.reshape(a, (4, 6)),
        "transpose": lambda a: lax.transpose(a, (2, 0, 1)),
        "strided slice": lambda a: lax.slice(a, (0, 1, 0), (2, 3, 4), (1, 1, 3)),
        "strided slice 2": lambda a: lax.slice(a, (1, 0, 1), (2, 3, 4), (2, 2, 2)),
        "zero-size slice": lambda a: lax.slice(a, (0, 0, 1), (2, 3, 1)),
        "rev": lambda a: lax.rev(a, (0, 2)),
        "concatenate": lambda a: lax.concatenate([a, lax.sin(a), lax.slice(a, (0, 0, 0), (2, 3, 1))], 2),
        "negative-step getitem": lambda a: a[::-1, 1:, ::2],
    }
    check_cases([(label, fn, [x]) for label, fn in cases.items()])


def test_pad():
    """lo/hi (negative ones crop) and interior padding; the padding value gets a gradient too."""
    x, v = _r(4, 3), np.float64(0.25)
    configs = [((1, 2, 0), (0, 0, 0)), ((-1, 2, 1), (2, -2, 2)), ((0, -3, 0), (1, 1, 3)), ((-2, -1, 2), (0, 0, 1))]
    check_cases([(f"pad {c}", lambda a, b, c=c: lax.mul(lax.pad(a, b, c), 1.5), [x, v]) for c in configs])


@pytest.mark.parametrize("dn,shapes", [
    ((((1,), (0,)), ((), ())), ((3, 4), (4, 5))),                            # matmul
    ((((0,), (1,)), ((), ())), ((4, 3), (5, 4))),                            # transposed operands
    ((((2,), (1,)), ((0,), (0,))), ((2, 3, 4), (2, 4, 5))),                  # batched matmul
    ((((0, 2), (2, 0)), ((1,), (1,))), ((3, 2, 4), (4, 2, 3))),              # batch not leading, 2 contractions
    ((((), ()), ((), ())), ((3,), (2, 2))),                                   # outer product
    ((((0,), (0,)), ((), ())), ((3,), (3,))),                                 # inner product
    ((((1,), (2,)), ((2, 0), (0, 1))), ((2, 5, 3), (3, 2, 5))),              # batch dims permuted
])
def test_dot_general(dn, shapes):
    x, y = _r(*shapes[0]), _r(*shapes[1], seed=3)
    g = rt.trace(lambda a, b: lax.dot_general(a, b, dn), x, y)
    check_gradients(g, [x, y])


def test_dot_general_preferred_element_type():
    x, y = _r(3, 4).astype(np.float32), _r(4, 2).astype(np.float32)
    g = rt.trace(lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=np.float64),
                 x, y)
    ct = np.random.default_rng(0).standard_normal((3, 2))
    _, (gx, gy) = run_joint(g, [x, y], [ct])
    assert gx.dtype == np.float32 and gy.dtype == np.float32
    ct32 = ct.astype(np.float32)
    np.testing.assert_allclose(gx, ct32 @ y.T, rtol=1e-5)
    np.testing.assert_allclose(gy, x.T @ ct32, rtol=1e-5)


CONV_CASES = [
    # lhs shape, rhs shape, strides, padding, lhs_dilation, rhs_dilation, dimension numbers, fgc, bgc
    ((2, 3, 9), (4, 3, 3), (2,), ((-1, 2),), (1,), (1,), None, 1, 1),                     # negative padding
    ((2, 3, 10), (4, 3, 3), (3,), ((2, 0),), (2,), (2,), None, 1, 1),                     # both dilations
    ((1, 2, 7, 6), (3, 2, 3, 2), (2, 1), ((1, 1), (0, 2)), (1, 1), (1, 2), None, 1, 1),
    ((2, 4, 7, 5), (6, 2, 2, 3), (1, 2), ((0, 1), (1, 0)), (1, 2), (2, 1), None, 2, 1),    # feature groups
    ((2, 6, 8), (6, 1, 3), (2,), ((1, 1),), (1,), (1,), None, 6, 1),                      # depthwise
    ((6, 2, 7, 5), (6, 2, 2, 2), (2, 1), ((1, 0), (0, 1)), (1, 1), (1, 2), None, 1, 3),    # batch groups
    ((2, 7, 6, 3), (3, 2, 3, 4), (1, 2), ((1, 0), (2, 1)), (1, 1), (1, 1),                # NHWC, HWIO
     ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)), 1, 1),
    ((5, 2, 2, 8), (2, 4, 3, 6), (2, 1), ((0, 0), (1, 1)), (2, 1), (1, 1),                # odd layouts + groups
     ((2, 3, 0, 1), (3, 1, 0, 2), (1, 3, 2, 0)), 2, 1),
]


def _conv_fn(strides, padding, lhs_dil, rhs_dil, dn, fgc, bgc):
    def fn(a, b):
        return lax.conv_general_dilated(a, b, strides, padding, lhs_dil, rhs_dil, dn, fgc, bgc)
    return fn


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv_general_dilated(case):
    lhs_shape, rhs_shape, *params = case
    x, w = _r(*lhs_shape), _r(*rhs_shape, seed=11)
    g = rt.trace(_conv_fn(*params), x, w)
    check_gradients(g, [x, w], rtol=1e-8)


def test_conv_against_jax_written_directly():
    """Not only JAX's VJP of our lowering: a conv written in JAX, differentiated by jax.grad."""
    x, w = _r(2, 4, 9, 6), _r(6, 2, 3, 2, seed=5)
    params = dict(window_strides=(2, 1), padding=((1, 0), (0, 2)), lhs_dilation=(1, 2), rhs_dilation=(2, 1),
                  feature_group_count=2)
    g = rt.trace(lambda a, b: lax.reduce_sum(lax.integer_pow(lax.conv_general_dilated(a, b, **params), 2),
                                             (0, 1, 2, 3)), x, w)
    _, (gx, gw) = run_joint(g, [x, w], [np.float64(1.0)])

    def loss(a, b):
        return jnp.sum(jax.lax.conv_general_dilated(a, b, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                    precision=jax.lax.Precision.HIGHEST, **params) ** 2)
    with jax.enable_x64(True):
        jx, jw = jax.grad(loss, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, jx, rtol=1e-9)
    np.testing.assert_allclose(gw, jw, rtol=1e-9)


def test_gather_scatter():
    x, u = _r(3, 4), _r(3, 2, seed=4)
    idx = np.array([[0, 3], [1, 1], [2, 0]])
    check_gradients(rt.trace(lambda a: lax.gather(a, idx, 1), x), [x])
    check_gradients(rt.trace(lambda a, b: lax.scatter_add(a, idx, b, 1), x, u), [x, u])   # duplicates add
    unique = np.array([[0, 3], [1, 2], [2, 0]])
    g = rt.trace(lambda a, b: lax.mul(lax.scatter(a, unique, b, 1), lax.sin(a)), x, u)
    check_gradients(g, [x, u])
    rows = rt.trace(lambda a: rnp.take(a, np.array([2, 0, 2]), axis=0), x)
    check_gradients(rows, [x])


def test_sort_sends_cotangents_back_through_the_permutation():
    x = _r(3, 5)
    for axis, descending in [(1, False), (0, True)]:
        g = rt.trace(lambda a: lax.mul(lax.sort(a, axis, descending)[0], lax.sin(a)), x)
        check_gradients(g, [x])
    ties = np.array([[1.0, 3.0, 1.0, 2.0, 3.0]])  # tied values keep their own cotangents (a permutation)
    g = rt.trace(lambda a: lax.sort(a, 1)[0], ties)
    ct = np.arange(5.0)[None]
    _, (grad,) = run_joint(g, [ties], [ct])
    np.testing.assert_array_equal(grad, [[0.0, 3.0, 1.0, 2.0, 4.0]])


# ----------------------------------------------------------------------------- linear algebra
# References: torch.autograd (whose conventions for symmetric inputs the rules follow) and central
# differences of functions that symmetrize their input, so every direction is a valid one.

def _symmetric(a):
    return lax.add(a, lax.transpose(a, tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2)))


def check_against_torch(fn, torch_fn, args, seed: int = RNG_SEED, rtol: float = 1e-8,
                        finite_differences: bool = True) -> None:
    """reftrace's gradients of ``fn`` (run on JAX) equal torch.autograd's of ``torch_fn``, and finite differences."""
    import torch
    args = [np.asarray(a) for a in args]
    graph = rt.trace(fn, *args)
    rng = np.random.default_rng(seed)
    cts = random_cotangents(graph, rng)
    outs, grads = run_joint(graph, args, cts)
    targs = [torch.from_numpy(a).requires_grad_() for a in args]
    touts = torch_fn(*targs)
    touts = touts if isinstance(touts, tuple) else (touts,)
    for got, want in zip(outs, touts):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-10)
    pairs = [(o, torch.from_numpy(c)) for o, c in zip(touts, cts) if o.dtype.is_floating_point]
    want = torch.autograd.grad([o for o, _ in pairs], targs, [c for _, c in pairs])
    for got, w in zip(grads, want):
        np.testing.assert_allclose(got, w.numpy(), rtol=rtol, atol=1e-9)
    if finite_differences:
        finite_difference_check(graph, args, cts, differentiable_inputs(graph), grads, rng)


def _spd(seed, *shape):
    a = _r(*shape, seed=seed)
    return a @ np.swapaxes(a, -1, -2) / shape[-1] + np.eye(shape[-1])


def test_cholesky_and_triangular_solve():
    import torch
    s, b = _spd(1, 2, 4, 4), _r(2, 4, 3, seed=2)
    check_against_torch(lambda a: lax.cholesky(_symmetric(a)), lambda a: torch.linalg.cholesky(a + a.mT), [s])
    lower = np.tril(_r(2, 4, 4, seed=3)) + 3 * np.eye(4)
    for left, lower_, transpose, unit in [(True, True, False, False), (False, False, True, True),
                                          (True, False, True, False), (False, True, False, True)]:
        a = lower if lower_ else np.swapaxes(lower, -1, -2)
        rhs = b if left else np.swapaxes(b, -1, -2)

        def fn(a, b, left=left, lower_=lower_, transpose=transpose, unit=unit):
            return lax.triangular_solve(a, b, left_side=left, lower=lower_, transpose_a=transpose,
                                        unit_diagonal=unit)

        def tfn(a, b, left=left, lower_=lower_, transpose=transpose, unit=unit):
            m = a.mT if transpose else a
            return torch.linalg.solve_triangular(m, b, upper=lower_ == transpose, left=left, unitriangular=unit)
        check_against_torch(fn, tfn, [a, rhs])


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 5), (5, 3)])
def test_lu(shape):
    import torch

    def tlu(a):
        packed, pivots = torch.linalg.lu_factor(a)
        return packed, (pivots - 1).to(torch.int32), torch.argmax(torch.lu_unpack(packed, pivots)[0], -2).int()
    check_against_torch(lax.lu, tlu, [_r(*shape, seed=4)])


@pytest.mark.parametrize("shape", [(2, 5, 3), (4, 4), (3, 5)])
def test_qr_and_svd(shape):
    import torch
    a = _r(*shape, seed=5)
    check_against_torch(lambda a: lax.qr(a), lambda a: tuple(torch.linalg.qr(a)), [a])
    # singular vectors are defined up to sign: differentiate a sign-invariant function of them
    check_against_torch(lambda a: (lambda u, s, vh: (lax.mul(u, u), s, lax.mul(vh, vh)))(*lax.svd(a)),
                        lambda a: (lambda u, s, vh: (u * u, s, vh * vh))(*torch.linalg.svd(a, full_matrices=False)),
                        [a])


def test_eigh_with_torchs_convention():
    import torch
    a = _r(2, 4, 4, seed=6)
    check_against_torch(lambda a: (lambda w, v: (w, lax.mul(v, v)))(*lax.eigh(_symmetric(a))),
                        lambda a: (lambda w, v: (w, v * v))(*torch.linalg.eigh(a + a.mT)), [a])


def test_pinv_is_differentiable_at_rank_deficient_matrices():
    import torch
    a = _r(5, 2, seed=7) @ _r(2, 4, seed=8)  # rank 2: differentiating an SVD would divide by zero
    tol = np.array(1e-10)
    # (no finite differences: a generic perturbation raises the rank, where pinv jumps)
    check_against_torch(lambda a: lax.pinv(a, np.array(0.0), tol), lambda a: torch.linalg.pinv(a, rtol=1e-10), [a],
                        finite_differences=False)
    full_rank = _r(5, 4, seed=9)
    check_against_torch(lambda a: lax.pinv(a, np.array(0.0), tol), lambda a: torch.linalg.pinv(a, rtol=1e-10),
                        [full_rank])


def test_integer_values_inside_the_graph():
    x = _r(3, 4)
    g = rt.trace(lambda a: rnp.take(rnp.sin(a), rnp.argmax(a, axis=1), axis=1) * rnp.sum(a > 0), x)
    check_gradients(g, [x])


def test_numpy_front_end_program():
    x, w, b = _r(5, 3), _r(3, 4, seed=2), _r(4, seed=3)

    def mlp(x, w, b):
        h = rnp.tanh(x @ w + b)
        return rnp.mean(h ** 2), h

    check_gradients(rt.trace(mlp, x, w, b), [x, w, b])


# ----------------------------------------------------------------------------- HVPs (vjp of vjp)

@pytest.mark.parametrize("fn,shapes", [
    (lambda a, b: rnp.sum(rnp.tanh(a @ b) ** 2), ((3, 4), (4, 2))),
    (lambda a: rnp.sum(rnp.exp(rnp.sin(a)) * a ** 3), ((5,),)),
    (lambda a: rnp.prod(a, axis=0), ((3, 2),)),
    (lambda a, b: rnp.sum(rnp.power(rnp.abs(a) + 0.5, b)), ((3,), (3,))),
    (lambda a: rnp.max(a * a, axis=1), ((2, 4),)),
    (lambda a: lax.digamma(lax.add(lax.mul(a, a), 0.5)), ((4,),)),
    (lambda a: lax.lgamma(lax.add(lax.mul(a, a), 0.5)), ((4,),)),
    (lambda a: lax.bind(P.cumprod_p, a, axis=0, reverse=True), ((5,),)),
    (lambda a, b: lax.conv_general_dilated(lax.sin(a), b, (2,), ((1, 0),), (1,), (2,)), ((2, 2, 7), (3, 2, 2))),
    (lambda a: lax.atan2(lax.sin(a), lax.add(lax.cos(a), 2.0)), ((4,),)),
])
def test_hvp_matches_jax(fn, shapes):
    args = [_r(*s, seed=k) for k, s in enumerate(shapes)]
    hvp_check(rt.trace(fn, *args), args)


def test_hvp_of_digamma_against_polygamma():
    x = np.array([0.3, 1.7, 4.0, -0.6, 12.0])
    g = rt.trace(lambda a: lax.digamma(a), x)
    second = vjp(vjp(g), wrt=(0,), nondiff_outputs=(0,))
    res = rt.lower(second, "jax")(x, np.ones(5), np.ones(5))
    from scipy.special import polygamma
    np.testing.assert_allclose(np.asarray(res[1]), polygamma(1, x), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(res[2]), polygamma(2, x), rtol=1e-9)


def test_third_order():
    x = np.array([0.3, -0.8])
    g = rt.trace(lambda a: rnp.sin(a), x)
    j3 = vjp(vjp(vjp(g), wrt=(0,), nondiff_outputs=(0,)), wrt=(0,), nondiff_outputs=(0, 1))
    typecheck(j3)
    res = rt.lower(j3, "jax")(x, np.ones(2), np.ones(2), np.ones(2))
    np.testing.assert_allclose(np.asarray(res[-1]), -np.cos(x), rtol=1e-12)


# ----------------------------------------------------------------------------- the joint convention

def test_joint_layout_and_printing():
    g = rt.trace(lambda x: rnp.cos(rnp.cos(x)), np.ones(3, np.float32))
    j = vjp(g)
    assert j.joint == (1, 1)
    assert [v.aval for v in j.inputs] == [g.inputs[0].aval, g.outputs[0].aval]
    assert str(j) == """\
# joint: (1, 1)
{ lambda a:f32[3] b:f32[3] .
    c:f32[3] = cos a
    d:f32[3] = cos c
    e:f32[3] = sin c
    f:f32[3] = neg e
    g:f32[3] = mul b f
    h:f32[3] = sin a
    i:f32[3] = neg h
    j:f32[3] = mul g i
  in (d j) }"""


def test_wrt_selects_inputs():
    x, y, z = _r(3), _r(3, seed=2), _r(3, seed=3)
    g = rt.trace(lambda a, b, c: a * b * c, x, y, z)
    ct = np.ones(3)
    j = vjp(g, wrt=[2, 0])
    assert len(j.outputs) == 1 + 2
    _, (gx, gz) = run_joint(g, [x, y, z], [ct], wrt=[2, 0])
    np.testing.assert_allclose(gx, y * z)
    np.testing.assert_allclose(gz, x * y)
    # forward: t = a*b, o = t*c; backward: ct_t = ct*c, ct_c = ct*t, ct_a = ct_t*b; nothing for b
    assert sum(e.primitive is P.mul_p for e in j.eqns) == 2 + 3


def test_wrt_errors():
    x = _r(3)
    g = rt.trace(lambda a, n: a * n, x, np.arange(3))
    with pytest.raises(ArgumentError, match="input 1 is i64"):
        vjp(g, wrt=[1])
    with pytest.raises(ArgumentError, match="not an input index"):
        vjp(g, wrt=[2])
    with pytest.raises(ArgumentError, match="not an output index"):
        vjp(g, nondiff_outputs=[1])
    with pytest.raises(ArgumentError):
        vjp(lambda a: a)  # type: ignore[arg-type]


def test_integer_inputs_and_outputs():
    """Int inputs get no gradient; an int output takes a cotangent (of its aval) that is ignored."""
    x, n = _r(3), np.arange(3)
    g = rt.trace(lambda a, k: (a * k, k * 2, rnp.argmax(a)), x, n)
    j = vjp(g)
    assert [v.aval.str_short() for v in j.inputs] == ["f64[3]", "i64[3]", "f64[3]", "i64[3]", "i64[]"]
    assert len(j.outputs) == 3 + 1
    _, (gx,) = run_joint(g, [x, n], [np.ones(3), np.full(3, 7), np.int64(5)])
    np.testing.assert_allclose(gx, n.astype(np.float64))


def test_nondiff_outputs_get_no_cotangent():
    x = _r(3)
    g = rt.trace(lambda a: (rnp.sin(a), rnp.cos(a), a * 2), x)
    j = vjp(g, nondiff_outputs=(1,))
    assert len(j.inputs) == 1 + 2
    _, (gx,) = run_joint(g, [x], [np.ones(3), np.full(3, 10.0)], nondiff_outputs=(1,))
    np.testing.assert_allclose(gx, np.cos(x) + 20.0)


def test_outputs_that_are_inputs_literals_and_duplicates():
    x, y, unused = _r(3), _r(3, seed=2), _r(2, seed=3)
    s = None

    def fn(a, b, c):
        nonlocal s
        s = rnp.sin(a)
        return a, s, s, np.float64(2.0), b

    g = rt.trace(fn, x, y, unused)
    assert g.outputs[0] == g.inputs[0] and g.outputs[1] == g.outputs[2]
    cts = [np.full(3, 1.0), np.full(3, 2.0), np.full(3, 3.0), np.float64(4.0), np.full(3, 5.0)]
    outs, (gx, gy, gu) = run_joint(g, [x, y, unused], cts)
    np.testing.assert_allclose(gx, 1.0 + (2.0 + 3.0) * np.cos(x))
    np.testing.assert_allclose(gy, np.full(3, 5.0))
    np.testing.assert_array_equal(gu, np.zeros(2))
    check_gradients(g, [x, y, unused])


def test_identity_gradient_is_the_cotangent():
    g = rt.trace(lambda a: a, _r(3))
    j = vjp(g)
    assert j.eqns == () and j.outputs == (j.inputs[0], j.inputs[1])


def test_constant_function_gets_zero_gradients():
    g = rt.trace(lambda a: rnp.ones((3,)), _r(2))
    j = vjp(g)
    typecheck(j)
    _, (grad,) = run_joint(g, [_r(2)], [np.ones(3)])
    np.testing.assert_array_equal(grad, np.zeros(2))


def test_no_work_for_symbolic_zeros():
    """Backward equations only appear for cotangents that can be nonzero."""
    x = _r(3)
    g = rt.trace(lambda a, b: (rnp.sin(a), rnp.exp(b)), x, x)
    j = vjp(g, wrt=[0])
    names = [e.primitive.name for e in j.eqns]
    assert names == ["sin", "exp", "cos", "mul"]


def test_vjp_is_pure_and_deterministic():
    x = _r(3, 4)
    fn = lambda a: rnp.sum(rnp.tanh(a) @ rnp.transpose(a), axis=0)  # noqa: E731
    g = rt.trace(fn, x)
    before = (g.inputs, g.eqns, g.outputs, g.joint, hash(g))
    j1, j2 = vjp(g), vjp(rt.trace(fn, x))
    assert (g.inputs, g.eqns, g.outputs, g.joint, hash(g)) == before
    assert j1 == j2 and hash(j1) == hash(j2)
    assert vjp(j1) == vjp(j2)


def test_rt_vjp_is_this_vjp():
    assert rt.vjp is vjp


def test_missing_rule_names_the_primitive(monkeypatch):
    monkeypatch.delitem(rules_module.vjp_rules, P.erf_p)
    g = rt.trace(lambda a: lax.erf(a), _r(3))
    with pytest.raises(UnsupportedOperatorError, match="erf has no VJP rule"):
        vjp(g)
