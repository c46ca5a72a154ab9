"""``python -m reftrace check``: the oracle from the command line (progress bar, table, repro files)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_check_command(commands: Any) -> None:
    from reftrace.testing.targets import NAMED
    p = commands.add_parser("check", help="check a compiler against reftrace on random torch programs",
                            description="Check a compiler against reftrace's float64 reference on random torch "
                                        "programs; shrink each kind of failure and write a repro script. "
                                        "Exit status 1 when anything fails.")
    p.add_argument("--target", default="inductor",
                   help=f"one of {', '.join(NAMED)}, or module:function (a callable fn -> compiled fn)")
    p.add_argument("--examples", type=int, default=200, help="programs to check (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for the shrunk repro scripts")
    p.add_argument("--max-ops", type=int, default=8, help="largest program drawn (default 8 ops)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), action="append", help="float dtype(s) (default both)")
    p.add_argument("--second-order", choices=["auto", "yes", "no"], default="auto",
                   help="check Hessian-vector products (auto: when the target claims double backward)")
    p.add_argument("--no-shrink", action="store_true", help="report the first failing program of each kind")
    p.add_argument("--shrink-seconds", type=float, default=120.0, help="time limit for shrinking each kind")
    p.set_defaults(run=run_check)


class ProgressBar:
    """``500 programs  [#####.....]  50%  3.1 programs/s`` on one line of ``stream``."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 40) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.start = time.perf_counter()
        self.interactive = stream.isatty()
        self._last = -1
        self._smallest = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "shrink":
            if self.interactive or done != self._smallest:
                line = f"shrinking: {total} failing candidates, smallest {done} ops"
                self.stream.write(f"\r{line.ljust(70)}" if self.interactive else line + "\n")
                self.stream.flush()
            self._smallest = done
            return
        percent = 100 * done // max(1, self.total)
        if not self.interactive and percent // 10 == self._last // 10 and done != self.total:
            return      # in a log, one line per 10%
        self._last = percent
        filled = self.width * done // max(1, self.total)
        rate = done / max(1e-9, time.perf_counter() - self.start)
        line = (f"{self.total} programs  [{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%  "
                f"{rate:.1f} programs/s")
        self.stream.write(("\r" if self.interactive else "") + line + ("" if self.interactive else "\n"))
        self.stream.flush()


def run_check(args: argparse.Namespace) -> int:
    from reftrace.testing.oracle import check

    second = {"auto": None, "yes": True, "no": False}[args.second_order]
    dtypes = tuple(_DTYPES[d] for d in args.dtype) if args.dtype else (torch.float32, torch.float64)
    bar = ProgressBar(args.examples)
    report = check(args.target, examples=args.examples, seed=args.seed, max_ops=args.max_ops, dtypes=dtypes,
                   second_order=second, shrink=not args.no_shrink, shrink_seconds=args.shrink_seconds,
                   progress=bar)
    sys.stderr.write("\n")
    paths = {}
    if args.out is not None and report.failures:
        args.out.mkdir(parents=True, exist_ok=True)
        for k, failure in enumerate(report.failures, 1):
            path = args.out / f"{failure.kind.replace('_', '-')}-{k:04d}.py"
            path.write_text(failure.repro)
            paths[failure.kind] = path
    print(report)
    for failure in report.failures:
        where = f"   repro: {paths[failure.kind]}" if failure.kind in paths else ""
        if where:
            print(f"  {failure.kind:<12}{where}")
    for note, program in report.notes[:10]:
        print(f"note: {note}\n{program.source}")
    return 1 if report.failures else 0
