"""reftrace as a correctness oracle: random torch programs, ``check``, shrinking, repro scripts.

    from reftrace.testing import check
    report = check("inductor", examples=500)
    print(report)                       # a summary table
    for failure in report.failures:     # one per kind, shrunk
        print(failure.repro)            # a standalone script

See ``docs/oracle.md``.
"""
from reftrace.testing.oracle import (KINDS, CrashFailure, Failure, GradFailure, MutationFailure, OracleFailure,
                                    RecompileFailure, Report, SecondOrderFailure, ValueFailure, check, check_program)
from reftrace.testing.program import Input, Op, Program
from reftrace.testing.strategies import programs
from reftrace.testing.targets import NAMED as TARGETS
from reftrace.testing.targets import Target
from reftrace.testing.vocabulary import VOCABULARY

__all__ = ["check", "check_program", "Report", "Failure", "KINDS", "OracleFailure", "CrashFailure", "ValueFailure",
           "MutationFailure", "GradFailure", "RecompileFailure", "SecondOrderFailure", "Program", "Input", "Op",
           "programs", "VOCABULARY", "Target", "TARGETS"]
