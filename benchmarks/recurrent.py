"""Losses and layers that recur over time, compiled: time to the first step and per step, against eager.

    .venv/bin/python benchmarks/recurrent.py [--cases ctc,lstm] [--lengths 20,100,200,400] [--steps 5]

``ctc``: ``F.ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths, zero_infinity=True)`` on
``(T, 8, 32)`` float32 logits, targets of about ``T / 4`` labels (``aot_function``). ``lstm``: a one-layer
``nn.LSTM(32, 64, batch_first=True)`` on ``(8, T, 32)`` float32 inputs, the loss the outputs' sum
(``aot_module``). For ``nop`` and ``xla_compile``; per-step times are the best of ``--steps``. The loss
and the gradients are compared with eager's (the largest difference relative to the largest value).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from reftrace.compile import aot_function, aot_module, nop, xla_compile


def best_ms(step: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def ctc_case(length: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any, torch.Tensor]:
    """(the loss of the logits, the thing to compile, the logits)."""
    n, classes, width = 8, 32, max(length // 4, 1)
    x = torch.randn(length, n, classes)
    targets = torch.randint(1, classes, (n, width))
    il, tl = torch.full((n,), length), torch.randint(width // 2, width + 1, (n,))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.ctc_loss(x.log_softmax(-1), targets, il, tl, zero_infinity=True)
    return loss, loss, x


def lstm_case(length: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any, torch.Tensor]:
    model = torch.nn.LSTM(32, 64, batch_first=True)
    return (lambda x: model(x)[0].sum()), model, torch.randn(8, length, 32)


CASES = {"ctc": ctc_case, "lstm": lstm_case}


def measure(case: str, length: int, compiler: Any, steps: int) -> str:
    torch.manual_seed(0)
    loss, target, x = CASES[case](length)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    if isinstance(target, torch.nn.Module):
        twin = copy.deepcopy(target)
        compiled_module = aot_module(twin, compiler)
        leaves = [*target.parameters(), xe], [*twin.parameters(), xc]

        def compiled(x: torch.Tensor) -> torch.Tensor:
            return compiled_module(x)[0].sum()
    else:
        compiled, leaves = aot_function(target, compiler), ([xe], [xc])
    want = loss(xe)
    want.backward()
    t0 = time.perf_counter()
    got = compiled(xc)
    got.backward()
    first = time.perf_counter() - t0
    grad_diff = (max((a.grad - b.grad).abs().max().item() for a, b in zip(*leaves))
                 / max(a.grad.abs().max().item() for a in leaves[0]))

    def step(f: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, ts: list) -> Callable[[], None]:
        def run() -> None:
            for leaf in ts:
                leaf.grad = None
            f(t).backward()
        return run
    ours, eager = best_ms(step(compiled, xc, leaves[1]), steps), best_ms(step(loss, xe, leaves[0]), steps)
    return (f"| {case} | {length} | {compiler.__name__} | {first:.2f} | {ours:.2f} | {eager:.2f} | {ours / eager:.2f} "
            f"| {abs(got.item() - want.item()) / abs(want.item()):.1e} | {grad_diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="ctc,lstm")
    parser.add_argument("--lengths", default="20,100,200,400")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print("| case | T | compiler | first step s | step ms | eager ms | ratio | loss rel. diff | grad rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        for length in (int(t) for t in args.lengths.split(",")):
            for compiler in (nop, xla_compile):
                print(f"  {case} T={length} {compiler.__name__} ...", file=sys.stderr, flush=True)
                print(measure(case, length, compiler, args.steps), flush=True)


if __name__ == "__main__":
    main()
