"""The oracle: programs are valid values, correct targets pass, each seeded compiler bug is caught
with its kind and shrunk to at most 4 ops, repros reproduce, and the command line works."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

from reftrace.__main__ import main
from reftrace.testing import (KINDS, CrashFailure, GradFailure, Program, ValueFailure, check, check_program,
                              programs)
from reftrace.testing.guards import gap, near
from reftrace.testing.tolerance import MULTIPLE, compare, error
from tests.testing.seeded_bugs import EXPECTED_KIND, SEEDED

ROOT = Path(__file__).resolve().parents[2]


@settings(max_examples=40)
@given(programs())
def test_a_program_is_its_source(program: Program):
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(program.source, namespace)
    inputs = program.make_inputs(3)
    again = program.make_inputs(3)
    assert all(torch.equal(a, b) and a.requires_grad == b.requires_grad for a, b in zip(inputs, again))
    with torch.no_grad():
        by_source = namespace["program"](*[t.detach().clone() for t in inputs])
        by_fn = program.fn(*[t.detach().clone() for t in again])
    assert program.num_ops == len(program.ops) == program.source.count("\n") - 2
    for a, b in zip(by_source, by_fn):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    if program.has_new_shapes:          # the new shapes are valid for every line
        with torch.no_grad():
            bigger = program.fn(*program.make_inputs(3, new_shapes=True))
        assert [b.dim() for b in bigger] == [a.dim() for a in by_fn]


def test_reference_programs_compute_in_float64():
    from reftrace.testing.program import Input, Op
    program = Program((Input("x0", (3,), torch.float32),), (Op("v1", "x0.to(torch.float32) * 3", "cast"),), ("v1",))
    assert "torch.float64" in program.render(promote=True) and "torch.float64" not in program.source
    (out,) = program.reference_fn(*program.make_inputs(0, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_tolerance_rule():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    eager = ref.float() + torch.tensor([1e-7, 0.0])
    assert error(None, ref) == 2.0                                   # a missing grad counts as zeros
    assert error(torch.zeros(3), ref) == float("inf")                 # a wrong shape never passes
    assert error(torch.tensor([float("nan"), 2.0]), ref) == float("inf")
    d = compare(ref.float() + 0.5, eager, ref, scale=2.0)
    assert not d.ok and d.error == pytest.approx(0.5)
    assert compare(eager * (1 + 1e-7), eager, ref, scale=2.0).ok
    assert d.allowed == pytest.approx(MULTIPLE * d.eager_error + 2e-5 * 2.0)


def test_guards_measure_distance_to_kinks():
    x = torch.tensor([[3.0, 1.0, 2.9], [0.0, 5.0, -1.0]], dtype=torch.float64)
    assert float(gap(x, [1]).min()) == pytest.approx(0.1)
    assert float(gap(x, None).min()) == pytest.approx(1.0)    # 5 - 3 at the top, 0 - (-1) at the bottom
    assert float(near(x, 0.0).abs().min()) == 0.0


@pytest.mark.parametrize("target", ["eager", "reftrace"])
def test_correct_targets_report_nothing(target):
    report = check(target, examples=300 if target == "eager" else 60, seed=1)
    assert report.ok, str(report) + "\n" + "\n".join(f.message for f in report.failures)
    assert report.examples_run == (300 if target == "eager" else 60)


@pytest.mark.parametrize("bug", sorted(SEEDED))
def test_seeded_bugs_are_caught_with_their_kind_and_shrunk(bug):
    report = check(SEEDED[bug], examples=300, seed=1, shrink_seconds=60)
    assert not report.ok, f"{bug} not caught"
    first = report.failures[0]
    assert first.kind == EXPECTED_KIND[bug], str(report)
    assert first.num_ops <= 4, first.program.source
    compile(first.repro, "repro", "exec")


def test_a_crashing_target_is_a_crash_failure_not_a_crash_of_check():
    def broken(fn):
        def run(*args):
            raise RuntimeError("backend exploded")
        return run
    report = check(broken, examples=20, seed=0)
    assert [f.kind for f in report.failures] == ["crash"]
    assert "backend exploded" in report.failures[0].message and report.failures[0].num_ops == 1


def test_check_program_raises_the_kind():
    from tests.testing.seeded_bugs import wrong_grad, wrong_value
    from reftrace.testing.program import Input, Op
    tanh = Program((Input("x0", (3, 2), torch.float64),), (Op("v1", "torch.tanh(x0)", "tanh"),), ("v1",))
    sigmoid = Program((Input("x0", (3, 2), torch.float64),), (Op("v1", "torch.sigmoid(x0)", "sigmoid"),), ("v1",))
    check_program(tanh, "eager")
    with pytest.raises(GradFailure):
        check_program(tanh, wrong_grad)
    with pytest.raises(ValueFailure):
        check_program(sigmoid, wrong_value)
    with pytest.raises(CrashFailure, match="ZeroDivisionError"):
        check_program(tanh, lambda fn: lambda *a: 1 / 0)


def test_the_repro_script_shows_the_discrepancy(tmp_path):
    report = check("tests.testing.seeded_bugs:wrong_grad", examples=60, seed=1)
    (failure,) = report.failures
    script = tmp_path / "repro.py"
    script.write_text(failure.repro)
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1 and "AssertionError" in run.stderr and "grads[0]" in run.stdout, run.stderr
    # the same script with eager as the target passes
    fixed = failure.repro.replace("compiled = wrong_grad(program)", "compiled = program")
    script.write_text(fixed)
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr


def test_command_line(tmp_path, capsys):
    assert main(["check", "--target", "eager", "--examples", "10"]) == 0
    assert "eager: 10 programs" in capsys.readouterr().out
    out = tmp_path / "repros"
    assert main(["check", "--target", "tests.testing.seeded_bugs:lost_mutation", "--examples", "120", "--seed", "1",
                 "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "mutation" in printed and [p.name for p in out.iterdir()] == ["mutation-0001.py"]


def test_every_kind_has_a_failure_class():
    from reftrace.testing import oracle as check_module
    kinds = {cls.kind for cls in vars(check_module).values()
             if isinstance(cls, type) and issubclass(cls, check_module.OracleFailure) and cls.kind}
    assert kinds == set(KINDS)
