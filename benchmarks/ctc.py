"""CTC loss training steps: time to the first step (capture and compile) and per step, against eager.

    .venv/bin/python benchmarks/ctc.py [--lengths 20,100,200,400] [--steps 5]

One step is ``F.ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths,
zero_infinity=True).backward()`` on ``(T, 8, 32)`` float32 logits, targets of about ``T / 4`` labels,
for ``nop`` and ``xla_compile``; per-step times are the best of ``--steps``. The loss and the gradient
are compared with eager's.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from reftrace.compile import aot_function, nop, xla_compile


def best_ms(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def measure(length: int, compiler, steps: int) -> str:
    torch.manual_seed(0)
    n, classes, width = 8, 32, max(length // 4, 1)
    x = torch.randn(length, n, classes)
    targets = torch.randint(1, classes, (n, width))
    il, tl = torch.full((n,), length), torch.randint(width // 2, width + 1, (n,))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.ctc_loss(x.log_softmax(-1), targets, il, tl, zero_infinity=True)

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = loss(xe)
    want.backward()
    compiled = aot_function(loss, compiler)
    t0 = time.perf_counter()
    got = compiled(xc)
    got.backward()
    first = time.perf_counter() - t0
    grad_diff = (xc.grad - xe.grad).abs().max().item()

    def step(f, t):
        def run():
            t.grad = None
            f(t).backward()
        return run
    ours, eager = best_ms(step(compiled, xc), steps), best_ms(step(loss, xe), steps)
    return (f"| {length} | {compiler.__name__} | {first:.2f} | {ours:.2f} | {eager:.2f} | {ours / eager:.2f} "
            f"| {abs(got.item() - want.item()):.1e} | {grad_diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="20,100,200,400")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print("| T | compiler | first step s | step ms | eager ms | ratio | loss diff | grad diff |")
    print("|---|---|---|---|---|---|---|---|")
    for length in (int(t) for t in args.lengths.split(",")):
        for compiler in (nop, xla_compile):
            print(f"  T={length} {compiler.__name__} ...", file=sys.stderr, flush=True)
            print(measure(length, compiler, args.steps), flush=True)


if __name__ == "__main__":
    main()
