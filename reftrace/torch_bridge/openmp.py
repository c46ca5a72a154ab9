"""Opt-in: keep torch's idle OpenMP workers off the cores XLA computes on (``xla_compile`` on the CPU).

After each parallel torch op, GNU OpenMP (libgomp, which torch's Linux wheels ship) lets its idle
workers spin for 300,000 iterations — milliseconds — before they sleep, unless the environment said
otherwise when torch started (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT``). A process that
alternates torch ops with XLA computations on the same cores (``compiled(x).sum()`` between the
forward and the backward computation, ``optimizer.step()`` before the next forward) hands XLA's
threads a core a spinning worker already holds. On the 2-core machine, the MLP of
``benchmarks/step.py`` with Adam took 15.8–16.1 ms a step through ``xla_compile`` with the spins and
13.5–13.6 ms without, and the hand-written JAX step in the same process 10.0 against 7.7 ms.

The environment variable is the clean remedy but must be set before ``import torch``.
``throttle_openmp_spinning()`` has the same effect at any time: libgomp spins only 100 iterations
while it manages more OpenMP threads than there are CPUs (its manual, under ``GOMP_SPINCOUNT``), and a
daemon thread that runs one parallel torch op, then waits, idle, for the life of the process, makes
it manage that many. It is process-wide and one-way, and it costs eager torch what a passive wait
policy costs: on the same machine an eager resnet18 step went from 43–51 ms to 57–58 ms and the
conv net's from 9 to 11 ms (each op wakes sleeping workers). So it is for processes whose heavy work
runs in XLA; reftrace never calls it on its own.
"""
from __future__ import annotations

import os
import sys
import threading

import torch

_holder: threading.Thread | None = None


def throttle_openmp_spinning() -> bool:
    """Make torch's OpenMP workers sleep after about 100 spins instead of 300,000, for the rest of the
    process (see the module docstring for the trade-off). Returns whether the throttle is on: it is not
    where the environment chose a wait policy (``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT``), where torch runs
    one thread, or where torch's OpenMP is not libgomp (other runtimes spin differently)."""
    global _holder
    if _holder is not None:
        return True
    if not _applies():
        return False
    started = threading.Event()

    def hold_a_team() -> None:
        torch.ones(1 << 20).sum()  # 32 grains of torch's parallel reductions: a parallel region, a team
        started.set()
        threading.Event().wait()

    _holder = threading.Thread(target=hold_a_team, name="reftrace-openmp-team", daemon=True)
    _holder.start()
    started.wait()
    return True


def _applies() -> bool:
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    if torch.get_num_threads() < 2 or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:  # pragma: no cover - no procfs
        return False
