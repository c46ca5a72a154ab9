"""torch's OpInfo database through reftrace: every differentiable operator variant, eager against compiled.

    python -m reftrace.tools.opinfo [--ops a,b] [--backend nop|xla|nop,xla] [--out docs/coverage.md]
                                    [--limit-samples N] [--time-limit SECONDS] [--save x.json] [--include y.json]

For each OpInfo entry with ``supports_autograd`` (variants such as ``max.reduction_with_dim``
are separate entries) and each of its sample inputs (float64 where the op supports it,
else float32), the op (through its OpInfo ``gradcheck_wrapper``, as torch's gradient tests
call it) runs eagerly and through ``reftrace.compile.aot_function`` with the chosen compiler. The compiled run must give the same values and the same gradients
(``torch.autograd.grad`` of the outputs against one random cotangent per output) as eager,
or raise a ``ReftraceError`` that says what is unsupported. Anything else is a defect:

- ``wrong value`` / ``wrong grad``: a result differs beyond tolerance (the worst defect);
- ``crash``: an exception that is not a ReftraceError, or a ReftraceError that reports an
  internal inconsistency (a ShapeError/GraphError from a rule, "reftrace bug");
- ``timeout``: the op ran past ``--time-limit`` (counted with the crashes).

Samples whose eager run fails, and samples without a differentiable output, are skipped.
Random ops (two eager runs with different seeds differ) are checked for output shapes and
dtypes and for a backward that runs; their values cannot be compared with eager's.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import signal
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree

from reftrace.errors import GraphError, ReftraceError, ShapeError
from reftrace.tools.opinfo_results import (CRASH, EAGER_GRAD_WRONG, PASS, RANDOM, SEVERITY, SKIP_DTYPE, SKIP_EAGER,
                                           SKIP_NO_GRAD, SKIPS, STATUSES, TIMEOUT, UNSUPPORTED, WRONG_GRAD,
                                           WRONG_VALUE, OpResult, SampleResult, Sweep, load_sweep, save_sweep,
                                           short, summary_counts, write_report)

__all__ = ["OpResult", "SampleResult", "Sweep", "check_op", "check_sample", "differentiable_ops", "find_ops",
           "load_sweep", "main", "on_grid", "run_sweep", "save_sweep", "variant_name", "write_report", "STATUSES"]

# base tolerances (torch.testing.assert_close's defaults); OpInfo's own overrides loosen them per op
_BASE_TOLERANCE = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5),
                   torch.complex128: (1e-7, 1e-7), torch.complex64: (1.3e-6, 1e-5)}
#: the dtypes a sweep tries, in order of preference, for each kind of run
DTYPE_KINDS = {"real": (torch.float64, torch.float32), "complex": (torch.complex128, torch.complex64)}


# ----------------------------------------------------------------------------- the database

def variant_name(op: Any) -> str:
    """``max.reduction_with_dim`` for a variant, ``add`` otherwise."""
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def differentiable_ops() -> list[Any]:
    """Every OpInfo entry of torch's ``op_db`` with ``supports_autograd`` (variants included)."""
    from torch.testing._internal.common_methods_invocations import op_db
    return [op for op in op_db if op.supports_autograd]


def find_ops(names: Iterable[str] | None = None) -> list[Any]:
    """The differentiable ops named (a base name selects all its variants); all of them for ``None``."""
    ops = differentiable_ops()
    if names is None:
        return ops
    wanted = [n.strip() for n in names if n.strip()]
    chosen = [op for op in ops if variant_name(op) in wanted or op.name in wanted]
    known = {variant_name(op) for op in ops} | {op.name for op in ops}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown or non-differentiable OpInfo names: {', '.join(missing)}")
    return chosen


def _dtype_for(op: Any, kind: str = "real") -> torch.dtype | None:
    """The dtype of ``op``'s samples for a ``kind`` of run: float64/float32 for ``"real"``; for
    ``"complex"``, complex128/complex64 where the op supports complex gradients on the CPU."""
    supported = op.supported_backward_dtypes("cpu") if kind == "complex" else op.supported_dtypes("cpu")
    for dtype in DTYPE_KINDS[kind]:
        if dtype in supported:
            return dtype
    return None


def has_complex_variant(op: Any) -> bool:
    return _dtype_for(op, "complex") is not None


def _tolerance(op: Any, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol): the base for ``dtype`` loosened by any of the op's OpInfo toleranceOverrides."""
    rtol, atol = _BASE_TOLERANCE[dtype]
    for info in getattr(op, "decorators", ()):
        device = getattr(info, "device_type", None)
        if device not in (None, "cpu"):
            continue
        for deco in getattr(info, "decorators", ()):
            overrides = getattr(deco, "d", None)
            if isinstance(overrides, dict) and dtype in overrides:
                tol = overrides[dtype]
                atol, rtol = max(atol, tol.atol), max(rtol, tol.rtol)
    return rtol, atol


# ----------------------------------------------------------------------------- compilers

def _compiler(backend: str) -> Callable[..., Any]:
    from reftrace.compile import nop, xla_compile
    try:
        return {"nop": nop, "xla": xla_compile}[backend]
    except KeyError:
        raise SystemExit(f"unknown backend {backend!r}; choose nop or xla") from None


# ----------------------------------------------------------------------------- one sample

class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` on the way swallows it."""


def _fresh(tree: Any) -> Any:
    """Independent leaf copies of every tensor in ``tree`` (a tensor passed twice stays shared)."""
    memo: dict[int, torch.Tensor] = {}

    def copy(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in memo:
            memo[id(x)] = x.detach().clone().requires_grad_(x.requires_grad)
        return memo[id(x)]
    return pytree.tree_map(copy, tree)


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _diff_inputs(tree: Any) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in _tensor_leaves(tree):
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _run(op: Any, sample: Any, call_args: Any, fn: Callable[..., Any] | None = None) -> Any:
    inp, args, kwargs = call_args
    out = (fn or _as_function(op))(inp, args, kwargs)
    return sample.output_process_fn_grad(out)


def _as_function(op: Any) -> Callable[..., Any]:
    """The op through its OpInfo ``gradcheck_wrapper``, as torch's own gradient tests call it: ops on
    symmetric or triangular matrices see such matrices (their gradients elsewhere are conventions)."""
    def call(inp: Any, args: Any, kwargs: Any) -> Any:
        return op.gradcheck_wrapper(op.op, inp, *args, **kwargs)
    call.__name__ = variant_name(op).replace(".", "_")
    return call


def _same_values(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(
                    torch.nan_to_num(x.detach()) if x.is_floating_point() else x.detach(),
                    torch.nan_to_num(y.detach()) if y.is_floating_point() else y.detach()):
                return False
        elif x != y:
            return False
    return True


def _is_random(op: Any, sample: Any) -> bool:
    """Two eager runs under different seeds disagree (dropout, rrelu, bernoulli...)."""
    with torch.no_grad():
        torch.manual_seed(1234)
        first = _run(op, sample, _fresh((sample.input, sample.args, sample.kwargs)))
        torch.manual_seed(4321)
        second = _run(op, sample, _fresh((sample.input, sample.args, sample.kwargs)))
    return not _same_values(first, second)


def _draws_random(compiled: Any) -> bool:
    """The captured graph takes a random key: its numbers come from reftrace's RNG, not torch's stream
    (OpInfo seeds some random ops, such as dropout in attention, so eager alone looks deterministic)."""
    return any(getattr(entry, "key_input", None) is not None for entry in getattr(compiled, "cache", {}).values())


def _compare(what: str, expected: Any, actual: Any, rtol: float, atol: float, values: bool = True) -> str | None:
    """None if ``actual`` matches ``expected``; else a one-line reason."""
    if isinstance(expected, torch.Tensor) != isinstance(actual, torch.Tensor):
        return f"{what}: expected {type(expected).__name__}, got {type(actual).__name__}"
    if not isinstance(expected, torch.Tensor):
        return None if expected == actual or not values else f"{what}: expected {expected!r}, got {actual!r}"
    if expected.shape != actual.shape:
        return f"{what}: shape {tuple(actual.shape)} != eager {tuple(expected.shape)}"
    if expected.dtype != actual.dtype:
        return f"{what}: dtype {actual.dtype} != eager {expected.dtype}"
    if not values:
        return None
    try:
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=atol, equal_nan=True,
                                   check_device=False, check_stride=False, check_layout=False)
    except AssertionError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:4] if line.strip())
        return f"{what}: {detail}"
    return None


def _grads(outs: Sequence[torch.Tensor | None], cts: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
           ) -> list[torch.Tensor]:
    """d(sum ct*out)/d inputs; outputs that do not require grad contribute nothing; zeros for unused inputs."""
    pairs = [(o, c) for o, c in zip(outs, cts) if o is not None and o.requires_grad]
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), [c for _, c in pairs], allow_unused=True)
    else:
        grads = (None,) * len(inputs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def check_sample(op: Any, sample: Any, compiler: Callable[..., Any], dtype: torch.dtype,
                 tolerance: tuple[float, float] | None = None, seed: int = 0) -> SampleResult:
    """One sample of ``op`` eagerly and through ``aot_function(fn, compiler)``: values, then gradients."""
    from reftrace.compile import aot_function
    rtol, atol = tolerance or _BASE_TOLERANCE[dtype]
    try:
        eager_args = _fresh((sample.input, sample.args, sample.kwargs))
        eager_out = _run(op, sample, eager_args)
        random = _is_random(op, sample)
    except _Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - the op itself cannot run this sample
        return SampleResult(SKIP_EAGER, short(f"{type(err).__name__}: {err}"))
    eager_leaves = pytree.tree_leaves(eager_out)
    diff_positions = [i for i, o in enumerate(eager_leaves)
                      if isinstance(o, torch.Tensor) and o.requires_grad and (o.is_floating_point() or o.is_complex())]
    eager_inputs = _diff_inputs(eager_args)

    compiled_args = _fresh((sample.input, sample.args, sample.kwargs))
    try:
        compiled = aot_function(_as_function(op), compiler)
        out = _run(op, sample, compiled_args, compiled)
    except _Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - classified below
        return _classify(err)
    random = random or _draws_random(compiled)
    leaves = pytree.tree_leaves(out)
    if len(leaves) != len(eager_leaves):
        return SampleResult(WRONG_VALUE, f"{len(leaves)} outputs, eager has {len(eager_leaves)}")
    for i, (e, a) in enumerate(zip(eager_leaves, leaves)):
        problem = _compare(f"output {i}", e, a, rtol, atol, values=not random)
        if problem:
            return SampleResult(WRONG_VALUE, short(problem))
    if not diff_positions or not eager_inputs:
        return SampleResult(SKIP_NO_GRAD)

    gen = torch.Generator().manual_seed(seed)
    cts = [torch.randn(eager_leaves[i].shape, generator=gen, dtype=eager_leaves[i].dtype) for i in diff_positions]
    try:
        expected = _grads([eager_leaves[i] for i in diff_positions], cts, eager_inputs)
    except _Timeout:
        raise
    except Exception as err:  # noqa: BLE001 - eager backward fails: nothing to compare with
        return SampleResult(SKIP_EAGER, short(f"eager backward: {type(err).__name__}: {err}"))
    try:
        actual = _grads([leaves[i] for i in diff_positions], cts, _diff_inputs(compiled_args))
    except _Timeout:
        raise
    except Exception as err:  # noqa: BLE001
        return _classify(err, "backward: ")
    for i, (e, a) in enumerate(zip(expected, actual)):
        g_rtol, g_atol = rtol, atol
        if isinstance(e, torch.Tensor) and e.dtype in _BASE_TOLERANCE and e.dtype != dtype and e.numel():
            # a gradient in a lower precision than the sample's (cov's float32 aweights beside a complex128
            # input) sums terms of the sample's size that cancel: its own dtype's tolerance, normwise
            own_rtol, own_atol = _BASE_TOLERANCE[e.dtype]
            g_rtol, g_atol = max(rtol, own_rtol), max(atol, own_atol, own_rtol * e.abs().max().item())
        problem = _compare(f"grad {i}", e, a, g_rtol, g_atol, values=not random)
        if problem:
            if dtype in (torch.float64, torch.complex128) and _eager_grad_is_wrong(op, sample, diff_positions, cts, expected, actual):
                return SampleResult(EAGER_GRAD_WRONG, short(
                    f"torch's eager gradient fails a central-difference check that reftrace's passes ({problem})"))
            return SampleResult(WRONG_GRAD, short(problem))
    return SampleResult(RANDOM if random else PASS)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re(sum(conj(a) * b))`` in double precision: the real inner product under which torch's complex
    gradients are adjoints (for real tensors, ``sum(a * b)``)."""
    if a.is_complex() or b.is_complex():
        return torch.real(torch.sum(torch.conj(a.to(torch.complex128)) * b.to(torch.complex128)))
    return torch.sum(a.double() * b.double())


def _eager_grad_is_wrong(op: Any, sample: Any, diff_positions: Sequence[int], cts: Sequence[torch.Tensor],
                         expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> bool:
    """The arbiter when gradients disagree (float64): central differences of eager's forward.

    True only if reftrace's gradient matches the directional derivative in every one of three
    random directions and eager's misses at least one (torch has such bugs, e.g. as_strided_scatter).
    """
    gen = torch.Generator().manual_seed(12345)
    eps = 1e-6
    eager_missed = False
    for _ in range(3):
        args = _fresh((sample.input, sample.args, sample.kwargs))
        inputs = _diff_inputs(args)
        directions = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs]

        def objective(sign: float) -> torch.Tensor:
            moved = {id(x): x.detach() + sign * eps * u for x, u in zip(inputs, directions)}
            tree = pytree.tree_map(lambda t: moved.get(id(t), t) if isinstance(t, torch.Tensor) else t, args)
            with torch.no_grad():
                leaves = pytree.tree_leaves(_run(op, sample, tree))
            return sum(_inner(c, leaves[i]) for i, c in zip(diff_positions, cts))

        numeric = float((objective(1.0) - objective(-1.0)) / (2 * eps))
        along = [float(sum(_inner(g, u) for g, u in zip(grads, directions))) for grads in (actual, expected)]
        scale = float(sum((g.double().abs() * u.abs()).sum() for g, u in zip(actual, directions))) + abs(numeric)
        tolerance = 1e-5 * scale + 1e-8
        if not abs(along[0] - numeric) <= tolerance:
            return False
        eager_missed |= not abs(along[1] - numeric) <= tolerance
    return eager_missed


_ADVICE = (". Pass a decomposition", ". Its value is unknown", ". reftrace captures static shapes")


def _essential(message: str) -> str:
    """An error message without the caller's location and the how-to-fix advice (the report says what)."""
    message = re.sub(r" \((called from|at) [^)]*\)", "", message)
    cut = min((message.find(a) for a in _ADVICE if a in message), default=-1)
    return message[:cut] if cut > 0 else message


def _classify(err: BaseException, prefix: str = "") -> SampleResult:
    text = short(f"{prefix}{type(err).__name__}: {_essential(str(err))}")
    if isinstance(err, ReftraceError) and not isinstance(err, (ShapeError, GraphError)) \
            and "reftrace bug" not in str(err):
        return SampleResult(UNSUPPORTED, text)
    return SampleResult(CRASH, text)


# ----------------------------------------------------------------------------- one op

@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``_Timeout`` after ``seconds`` (SIGALRM; main thread on POSIX only, else no limit)."""
    usable = seconds and hasattr(signal, "SIGALRM")
    if usable:
        try:
            previous = signal.signal(signal.SIGALRM, _raise_timeout)
        except ValueError:  # not the main thread
            usable = False
    if not usable:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _Timeout()


def on_grid(sample: Any) -> Any:
    """``sample`` with every floating tensor rounded to a multiple of 1/2: repeated values and values on
    kinks and bounds (0, +-1, +-3, x == min...), which random samples almost never hit."""
    def snap(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.round(t * 2).div_(2).requires_grad_(t.requires_grad)
        return t
    return sample.transform(snap)


def check_op(op: Any, backend: str = "nop", limit_samples: int | None = None,
             time_limit: float | None = 120.0, ties: bool = False, kind: str = "real") -> OpResult:
    """Every sample of ``op`` (at most ``limit_samples``) on ``backend``; the op gets its worst sample's status.
    ``ties``: the samples ``on_grid`` instead (subgradients at ties and boundaries must be eager's too).
    ``kind``: ``"real"`` (float64, else float32 samples) or ``"complex"`` (complex128, else complex64)."""
    name = variant_name(op)
    dtype = _dtype_for(op, kind)
    if dtype is None:
        wanted = "/".join(str(d).replace("torch.", "") for d in DTYPE_KINDS[kind])
        return OpResult(name, backend, SKIP_DTYPE, f"no {wanted} support on CPU")
    compiler = _compiler(backend)
    tolerance = _tolerance(op, dtype)
    start = time.perf_counter()
    results: list[SampleResult] = []
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _time_limit(time_limit):
                torch.manual_seed(0)
                samples = op.sample_inputs("cpu", dtype, requires_grad=True)
                for k, sample in enumerate(itertools.islice(samples, limit_samples)):
                    sample = on_grid(sample) if ties else sample
                    results.append(check_sample(op, sample, compiler, dtype, tolerance, seed=k))
                    if SEVERITY[results[-1].status] >= SEVERITY[WRONG_GRAD]:
                        break  # a wrong result is reported as soon as it is found
        except _Timeout:
            if any(r.status not in SKIPS for r in results):  # many samples: report the ones checked
                note = f"time limit {time_limit:g} s reached after {len(results)} samples"
            else:
                results.append(SampleResult(TIMEOUT, f"still running after {time_limit:g} s "
                                                     f"({len(results)} samples done)"))
        except Exception as err:  # noqa: BLE001 - making the sample inputs failed
            results.append(SampleResult(SKIP_EAGER, short(f"sample inputs: {type(err).__name__}: {err}")))
    seconds = time.perf_counter() - start
    checked = [r for r in results if r.status not in SKIPS]
    pool = checked or results or [SampleResult(SKIP_EAGER, "no sample inputs")]
    worst = max(pool, key=lambda r: SEVERITY[r.status])
    message = "; ".join(m for m in (worst.message, note) if m)
    return OpResult(name, backend, worst.status, message, str(dtype).replace("torch.", ""), len(checked), seconds)


def run_sweep(ops: Sequence[Any], backend: str = "nop", limit_samples: int | None = None,
              time_limit: float | None = 120.0, progress: bool = True,
              kinds: Sequence[str] = ("real",)) -> list[OpResult]:
    """Each op once per kind of dtype: every op for ``"real"``, the ops with complex gradients for ``"complex"``."""
    jobs = [(op, kind) for kind in kinds for op in ops if kind == "real" or has_complex_variant(op)]
    results = []
    for i, (op, kind) in enumerate(jobs):
        result = check_op(op, backend, limit_samples, time_limit, kind=kind)
        results.append(result)
        if progress:
            print(f"[{i + 1}/{len(jobs)}] {backend} {result.name} ({result.dtype or kind}): {result.status} "
                  f"({result.seconds:.1f} s)"
                  f"{' - ' + result.message if result.message and result.status != PASS else ''}",
                  file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reftrace.tools.opinfo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", help="comma-separated OpInfo names (a base name selects its variants)")
    parser.add_argument("--backend", default="nop",
                        help="nop, xla, both as nop,xla, or none (only write --out from --include files)")
    parser.add_argument("--out", default=None, help="write the markdown report here (e.g. docs/coverage.md)")
    parser.add_argument("--limit-samples", type=int, default=None, help="check at most N samples per op")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per op before it times out")
    parser.add_argument("--dtypes", default="real,complex",
                        help="real (float64/float32 samples), complex (complex128/complex64 samples of the ops "
                             "with complex gradients), or both as real,complex (the default)")
    parser.add_argument("--save", default=None, help="also save the results as JSON (one backend)")
    parser.add_argument("--include", action="append", default=[],
                        help="add a saved sweep (another backend's, --save) to the report")
    ns = parser.parse_args(argv)
    ops = find_ops(ns.ops.split(",") if ns.ops else None) if ns.backend != "none" else []
    backends = [b.strip() for b in ns.backend.split(",") if b.strip() and b.strip() != "none"]
    given = list(sys.argv[1:] if argv is None else argv)
    shown = [a for i, a in enumerate(given)  # the run's own options, not where its files went
             if a not in ("--save", "--include", "--out") and (i == 0 or given[i - 1] not in ("--save", "--include",
                                                                                             "--out"))]
    command = ("python -m reftrace.tools.opinfo " + " ".join(shown)).strip()
    kinds = [k.strip() for k in ns.dtypes.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in DTYPE_KINDS]
    if unknown:
        raise SystemExit(f"unknown --dtypes {unknown}; use real, complex or real,complex")
    sweeps = [Sweep(b, run_sweep(ops, b, ns.limit_samples, ns.time_limit, kinds=kinds), command, ns.limit_samples,
                    ns.time_limit) for b in backends]
    for sweep in sweeps:
        counts = summary_counts(sweep.results)
        print(f"{sweep.backend}: " + ", ".join(f"{k}: {v}" for k, v in counts.items() if v), flush=True)
    if ns.save:
        if len(sweeps) != 1:
            raise SystemExit("--save takes the results of one backend")
        save_sweep(sweeps[0], ns.save)
    if ns.out:
        everything = sweeps + [load_sweep(p) for p in ns.include]
        if not everything:
            raise SystemExit("nothing to report: run a backend or --include a saved sweep")
        write_report(everything, ns.out)
    bad = any(r.status in (WRONG_VALUE, WRONG_GRAD) for s in sweeps for r in s.results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
