"""``check``: run random programs through a target and judge it against reftrace's float64 reference.

One program is checked in stages, and the first discrepancy names the failure's kind:

1. ``crash``: compiling, calling or differentiating the target raises;
2. ``value``: an output is off (tolerance rule: ``reftrace.testing.tolerance``);
3. ``mutation``: an input the program writes to (or one it leaves alone) ends up other than eager leaves it;
4. ``grad``: a gradient of a param along a random cotangent is off, or missing;
5. ``recompile``: a second call with new values, then one with new shapes (every size doubled), raises
   or is off: no stale results;
6. ``second_order``: a Hessian-vector product through ``create_graph=True`` raises or is off.

``check`` draws programs with hypothesis (``programs()``), checks ``examples`` of them, then shrinks
one failure of each kind to the smallest program that still fails that way and writes a repro.
"""
from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
from hypothesis.database import ExampleDatabase, choices_to_bytes
from hypothesis.errors import UnsatisfiedAssumption

from reftrace.testing.cases import (NEW_SHAPE_SEED, SECOND_CALL_SEED, Case, Rejected, Run, call_and_differentiate,
                                    gradients, hessian_vector_products, make_case)
from reftrace.testing.program import INDEX, PARAM, Program
from reftrace.testing.reference import ReferenceGraphs
from reftrace.testing.repro import repro_script
from reftrace.testing.strategies import programs, random_program
from reftrace.testing.targets import Compile, Target, resolve
from reftrace.testing.tolerance import Discrepancy, compare

KINDS = ("crash", "value", "mutation", "grad", "recompile", "second_order")


class OracleFailure(AssertionError):
    """A discrepancy between the target and the reference; ``kind`` is one of ``KINDS``."""

    kind = ""

    def __init__(self, message: str, discrepancy: Discrepancy | None = None) -> None:
        super().__init__(f"{self.kind}: {message}")
        self.message = message
        self.discrepancy = discrepancy


class CrashFailure(OracleFailure):
    kind = "crash"


class ValueFailure(OracleFailure):
    kind = "value"


class MutationFailure(OracleFailure):
    kind = "mutation"


class GradFailure(OracleFailure):
    kind = "grad"


class RecompileFailure(OracleFailure):
    kind = "recompile"


class SecondOrderFailure(OracleFailure):
    kind = "second_order"


# ----------------------------------------------------------------------------- one program

def check_program(program: Program, target: str | Compile | Target, *, seed: int = 0,
                  second_order: bool | None = None, new_shapes: bool = True) -> list[str]:
    """Check one program; raise an ``OracleFailure`` subclass on a discrepancy.

    Returns notes for triage (e.g. eager float64 disagreeing with reftrace). When no valid inputs
    are found near ``seed`` (see ``reftrace.testing.cases``), calls ``hypothesis.reject()``, so
    inside ``@given`` the program is skipped. ``second_order=None`` asks for second order when
    the target claims double backward (``Target.double_backward``).
    """
    tgt = resolve(target)
    want_second = tgt.double_backward if second_order is None else second_order
    case, graphs = _valid_case(program, seed, want_second, new_shapes=False)
    if case is None:
        reject()
    notes = list(case.notes)
    try:
        compiled = tgt.compile(program.fn)
        run = call_and_differentiate(compiled, case.fresh_inputs(), program.params, case.cotangents)
    except Exception as err:
        raise CrashFailure(_exception("the target raised", err)) from err
    _compare(run, case, "", ValueFailure, MutationFailure, GradFailure)

    later = [("second call", seed + SECOND_CALL_SEED, False)]
    if new_shapes and program.has_new_shapes:
        later.append(("new shape", seed + NEW_SHAPE_SEED, True))
    for label, later_seed, new in later:
        later_case, _ = _valid_case(program, later_seed, False, new_shapes=new, graphs=None if new else graphs)
        if later_case is not None:
            _check_later_call(tgt, compiled, later_case, label)

    if want_second and case.ref.hvp is not None and case.eager.hvp is not None:
        _check_second_order(compiled, case)
    return notes


def _check_later_call(tgt: Target, compiled: Callable[..., Any], case: Case, label: str) -> None:
    """A later call must give what a fresh compile gives at the same inputs (else: ``recompile``);
    where both are off, the bug is in the values at those inputs, and is reported as that kind."""
    try:
        run = call_and_differentiate(compiled, case.fresh_inputs(), case.program.params, case.cotangents)
        stale_error = None
    except Exception as err:
        run, stale_error = None, err
    if run is not None:
        try:
            _compare(run, case, f"{label}: ", ValueFailure, MutationFailure, GradFailure)
            return
        except OracleFailure as failure:
            stale_message = failure.message
    try:
        fresh = call_and_differentiate(tgt.compile(case.program.fn), case.fresh_inputs(), case.program.params,
                                       case.cotangents)
    except Exception as err:
        if stale_error is not None:
            raise CrashFailure(_exception(f"at the {label}'s inputs, a fresh compile also raised", err)) from err
        raise RecompileFailure(_exception(f"the {label} is off ({stale_message}), and a fresh compile at its "
                                          "inputs raised", err)) from err
    _compare(fresh, case, f"at the {label}'s inputs (freshly compiled): ", ValueFailure, MutationFailure,
             GradFailure)
    if stale_error is not None:
        raise RecompileFailure(_exception(f"the {label} raised, while a fresh compile at its inputs works",
                                          stale_error)) from stale_error
    raise RecompileFailure(f"{stale_message}; a fresh compile at the same inputs is right")


def _valid_case(program: Program, seed: int, second_order: bool, *, new_shapes: bool,
                graphs: ReferenceGraphs | None = None, tries: int = 3) -> tuple[Case | None, ReferenceGraphs | None]:
    for k in range(tries):
        try:
            return make_case(program, seed + 1000 * k, new_shapes=new_shapes, second_order=second_order,
                             graphs=graphs)
        except Rejected:
            continue
    return None, graphs


def _compare(run: Run, case: Case, label: str, value_failure: type[OracleFailure],
             mutation_failure: type[OracleFailure], grad_failure: type[OracleFailure]) -> None:
    program, eager, ref = case.program, case.eager, case.ref
    if len(run.outputs) != len(eager.outputs):
        raise value_failure(f"{label}the target returns {len(run.outputs)} values, eager {len(eager.outputs)}")
    for k, (got, e, r) in enumerate(zip(run.outputs, eager.outputs, ref.outputs.values)):
        if not isinstance(got, torch.Tensor):
            raise value_failure(f"{label}output {k} is a {type(got).__name__}, eager's a tensor")
        if got.dtype != e.dtype or tuple(got.shape) != tuple(e.shape):
            raise value_failure(f"{label}output {k} is {_meta(got)}, eager's {_meta(e)}")
        _judge(value_failure, f"{label}output {k} ({_meta(e)})", compare(got, e, r, ref.outputs.scale))
    for i, x in enumerate(program.inputs):
        if x.kind in (PARAM, INDEX):
            continue
        expected = ref.mutations.get(i, case.inputs64[i])
        what = f"{label}input {x.name} after the call ({'written' if i in ref.mutations else 'not written'} by eager)"
        _judge(mutation_failure, what, compare(run.inputs[i], eager.inputs[i], expected, ref.outputs.scale))
    if ref.grads is None:
        return
    for k, (i, got, e, r) in enumerate(zip(program.params, run.grads or (), eager.grads or (), ref.grads.values)):
        _judge(grad_failure, f"{label}grad of {program.inputs[i].name}{' (None)' if got is None else ''}",
               compare(got, e, r, ref.grads.scale))


def _check_second_order(compiled: Callable[..., Any], case: Case) -> None:
    program = case.program
    try:
        inputs = case.fresh_inputs()
        params = [inputs[i] for i in program.params]
        outputs = compiled(*inputs)
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        grads = gradients(outputs, params, case.cotangents, create_graph=True)
        hvp = hessian_vector_products(grads, params, case.directions)
    except Exception as err:
        raise SecondOrderFailure(_exception("differentiating the target's gradients (create_graph=True) raised",
                                            err)) from err
    for i, got, e, r in zip(program.params, hvp, case.eager.hvp or (), case.ref.hvp.values):
        _judge(SecondOrderFailure, f"Hessian-vector product for {program.inputs[i].name}"
               f"{' (None)' if got is None else ''}", compare(got, e, r, case.ref.hvp.scale))


def _judge(failure: type[OracleFailure], what: str, d: Discrepancy) -> None:
    if not d.ok:
        raise failure(f"{what}: {d}", d)


def _meta(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _exception(what: str, err: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-8))
    return f"{what} {type(err).__name__}: {str(err).strip()[:2000]}\n{tb}"


# ----------------------------------------------------------------------------- many programs

@dataclass(frozen=True)
class Failure:
    """One kind of failure, shrunk: the smallest failing ``program``, its ``message`` and ``repro`` script."""

    kind: str
    program: Program
    message: str
    repro: str
    discrepancy: Discrepancy | None = None

    @property
    def num_ops(self) -> int:
        return self.program.num_ops

    def summary(self) -> str:
        d = self.discrepancy
        errors = f"max err {d.error:.1e} vs eager {d.eager_error:.1e}" if d is not None else \
            self.message.splitlines()[0][:90]
        return f"{self.kind:<12} {self.num_ops} ops  {errors}"


@dataclass
class Report:
    """What ``check`` found. ``examples_run`` counts the programs checked while searching (rejected
    ones and shrinking not included); ``failing`` how many of them failed, by kind."""

    target: str
    examples_run: int = 0
    rejected: int = 0
    failures: list[Failure] = field(default_factory=list)
    failing: dict[str, int] = field(default_factory=dict)
    notes: list[tuple[str, Program]] = field(default_factory=list)
    search_seconds: float = 0.0
    shrink_seconds: float = 0.0
    second_order: bool = True

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        per = self.search_seconds / max(1, self.examples_run)
        lines = [f"{self.target}: {self.examples_run} programs in {self.search_seconds:.1f} s "
                 f"({per * 1e3:.0f} ms each; {self.rejected} drawn inputs rejected), "
                 f"second order {'checked' if self.second_order else 'not checked'}"]
        counts = ", ".join(f"{k}: {n}" for k, n in self.failing.items())
        lines.append(f"failures: {len(self.failures)}" + (f"   (failing programs: {counts}; "
                                                             f"shrunk in {self.shrink_seconds:.1f} s)" if counts else ""))
        lines.extend("  " + f.summary() for f in self.failures)
        if self.notes:
            lines.append(f"notes for triage: {len(self.notes)} (Report.notes)")
        return "\n".join(lines)


@dataclass
class _Outcome:
    rejected: bool = False
    failure: OracleFailure | None = None
    notes: tuple[str, ...] = ()


class _Stop(Exception):
    """Raised inside the shrinking run for the kind being shrunk."""


class _Replay(ExampleDatabase):
    """A read-only database holding one choice sequence: hypothesis's reuse phase replays it, then
    its shrinker takes over. (The database is how hypothesis resumes from a known failure.) It
    sits in the secondary corpus: hypothesis takes a primary entry as already shrunk."""

    def __init__(self, choices: Sequence[int]) -> None:
        super().__init__()
        self.blob = choices_to_bytes(tuple(choices))

    def fetch(self, key: bytes) -> Iterable[bytes]:
        if key.endswith(b".secondary"):
            yield self.blob

    def save(self, key: bytes, value: bytes) -> None:
        pass

    def delete(self, key: bytes, value: bytes) -> None:
        pass


def check(target: str | Compile | Target, examples: int = 200, seed: int = 0, *, max_ops: int = 8,
          dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64), ops: Sequence[str] | None = None,
          second_order: bool | None = None, new_shapes: bool = True, shrink: bool = True,
          shrink_seconds: float = 120.0, progress: Callable[[str, int, int], None] | None = None) -> Report:
    """Check ``examples`` random programs against ``target``; shrink each kind of failure found.

    ``target``: a callable ``fn -> compiled fn`` (as ``torch.compile``), a ``module:function`` path, or
    one of ``"eager"``, ``"aot_eager"``, ``"inductor"``, ``"functorch"``, ``"reftrace"``,
    ``"reftrace-xla"``, ``"reftrace-ts"``. ``second_order=None``: check Hessian-vector products when the
    target claims double backward. ``shrink_seconds`` bounds the time spent shrinking each kind.
    ``progress(phase, done, total)`` is called after each program (phase ``"search"`` or ``"shrink"``).

    The search draws programs uniformly (``random_program``, seeded by ``seed``); each kind's smallest
    failure is then replayed to hypothesis, which shrinks it.
    """
    tgt = resolve(target)
    want_second = tgt.double_backward if second_order is None else second_order
    report = Report(tgt.name, second_order=want_second)
    options = dict(dtypes=dtypes, max_ops=max_ops, ops=ops)
    cache: dict[str, _Outcome] = {}
    deadline = [float("inf")]

    def outcome(program: Program) -> _Outcome | None:
        key = repr(program)
        if key not in cache:
            if time.monotonic() > deadline[0]:
                return None
            try:
                notes = check_program(program, tgt, seed=seed, second_order=want_second, new_shapes=new_shapes)
                cache[key] = _Outcome(notes=tuple(notes))
            except OracleFailure as failure:
                cache[key] = _Outcome(failure=failure)
            except UnsatisfiedAssumption:
                cache[key] = _Outcome(rejected=True)
        return cache[key]

    found: dict[str, tuple[Program, list[int]]] = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draws = 0
        while report.examples_run < examples and draws < 20 * examples + 100:
            program, choices = random_program(seed * 1_000_003 + draws, **options)
            draws += 1
            o = outcome(program)
            assert o is not None
            if o.rejected:
                report.rejected += 1
                continue
            report.examples_run += 1
            report.notes.extend((note, program) for note in o.notes)
            if o.failure is not None:
                kind = o.failure.kind
                report.failing[kind] = report.failing.get(kind, 0) + 1
                if kind not in found or _size(program) < _size(found[kind][0]):
                    found[kind] = (program, choices)
            if progress is not None:
                progress("search", report.examples_run, examples)
        report.search_seconds = time.perf_counter() - start
        for kind in KINDS:
            if kind not in found:
                continue
            smallest = found[kind][0]
            if shrink:
                smallest = _shrink(kind, *found[kind], outcome, options, shrink_seconds, deadline, progress)
            failure = cache[repr(smallest)].failure
            assert failure is not None
            report.failures.append(Failure(kind, smallest, failure.message,
                                           repro_script(smallest, tgt, kind, failure.message, seed),
                                           failure.discrepancy))
    # the kind most programs failed with first: it is the likeliest name of the bug
    report.failures.sort(key=lambda f: (-report.failing[f.kind], KINDS.index(f.kind)))
    report.shrink_seconds = time.perf_counter() - start - report.search_seconds
    return report


def _size(program: Program) -> tuple[int, int]:
    return program.num_ops, len(program.source)


def _shrink(kind: str, first: Program, choices: list[int], outcome: Callable[[Program], _Outcome | None],
            options: dict[str, Any], seconds: float, deadline: list[float],
            progress: Callable[[str, int, int], None] | None) -> Program:
    """Hand ``first`` (as its choice sequence) to hypothesis and let it shrink the ``kind`` failure."""
    smallest = [first]
    deadline[0] = time.monotonic() + seconds
    steps = [0]

    @settings(database=_Replay(choices), phases=[Phase.reuse, Phase.shrink], report_multiple_bugs=False,
              deadline=None, derandomize=False, print_blob=False, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))
    @given(programs(**options))
    def replay(program: Program) -> None:
        o = outcome(program)
        if o is None or o.rejected:
            return
        if o.failure is not None and o.failure.kind == kind:
            if _size(program) < _size(smallest[0]):
                smallest[0] = program
            steps[0] += 1
            if progress is not None:
                progress("shrink", smallest[0].num_ops, steps[0])
            raise _Stop(kind)

    try:
        replay()
    except _Stop:
        pass
    finally:
        deadline[0] = float("inf")
    return smallest[0]
