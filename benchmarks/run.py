"""Side-by-side benchmark: reftrace.compile vs functorch.compile (and torch eager / torch.compile).

    .venv/bin/python benchmarks/run.py [--quick] [--repeat N] [--torch-compile]

Compile latency: wall time of the first call (capture, autodiff, partition, both compilers
with `nop`) plus the first backward. Each measurement runs in a fresh Python process that
has imported both libraries and compiled one unrelated tiny function with the system under
test (so imports and one-time set-up are not counted, and neither system warms caches for
the other); the median of ``--repeat`` processes is reported.
Per-call overhead: forward + backward of the seed function on 3 elements, median of
repeated timings. Prints ratios reftrace / functorch (lower is better).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def seed_fn(x):
    return x.cos().cos()


def make_mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.GELU(),
                               torch.nn.Linear(128, 128), torch.nn.LayerNorm(128), torch.nn.GELU(),
                               torch.nn.Linear(128, 10)), (torch.randn(32, 64),)


def make_resnet18():
    from torchvision.models import resnet18
    return resnet18(), (torch.randn(1, 3, 64, 64),)


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False)  # functorch.compile's aot_module rejects tied weights
    model = GPT2LMHeadModel(cfg)

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits
    return LogitsOnly(), (torch.randint(0, 100, (2, 16)),)


def first_call_seconds(wrap, target, args, loss_of=lambda out: out.sum()):
    # Both systems trace with torch.compiler.is_compiling() true (reftrace sets it itself, as
    # torch.export does), so libraries such as transformers skip value-dependent checks.
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        t0 = time.perf_counter()
        compiled = wrap(target)
        out = compiled(*args)
    finally:
        torch.compiler._is_compiling_flag = previous
    loss_of(out).backward()
    return time.perf_counter() - t0


def per_call_us(fn, x, repeat=7, number=300):
    fn(x).sum().backward()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(x).sum().backward()
        times.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(times)


def _systems() -> dict:
    import functorch.compile as fc
    import reftrace.compile as rc
    return {
        "reftrace": (lambda f: rc.aot_function(f, rc.nop, rc.nop), lambda m: rc.aot_module(m, rc.nop, rc.nop)),
        "functorch": (lambda f: fc.aot_function(f, fc.nop, fc.nop), lambda m: fc.aot_module(m, fc.nop, fc.nop)),
    }


CASES = {
    "seed fn (3 elems)": lambda: (seed_fn, (torch.randn(3, requires_grad=True),)),
    "MLP LayerNorm/GELU": make_mlp,
    "resnet18 1x3x64x64": make_resnet18,
    "GPT-2 2 layers": make_gpt2,
}


def _child(system: str, case: str) -> None:
    """One compile-latency measurement in this (fresh) process; prints seconds."""
    import transformers  # noqa: F401 - imported by both systems' processes alike, outside the timing
    wrap_fn, wrap_mod = _systems()[system]
    first_call_seconds(wrap_fn, lambda x: (x * 2).sin(), (torch.randn(2, requires_grad=True),))
    make = CASES[case]
    torch.manual_seed(0)
    target, inputs = make()
    print(first_call_seconds(wrap_mod if isinstance(target, torch.nn.Module) else wrap_fn, target, inputs))


def _measure(system: str, case: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", system, case], capture_output=True, text=True,
                             check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip resnet18 and GPT-2")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per compile measurement")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow on CPU)")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    systems = _systems()
    cases = list(CASES)[:2] if args.quick else list(CASES)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\ncompile latency, first call forward+backward, nop compilers (seconds, median of {args.repeat} "
          "fresh processes)")
    print(f"{'case':24s} {'reftrace':>10s} {'functorch':>10s} {'ratio':>8s}")
    for name in cases:
        row = {system: _measure(system, name, args.repeat) for system in systems}
        print(f"{name:24s} {row['reftrace']:10.3f} {row['functorch']:10.3f} "
              f"{row['reftrace'] / row['functorch']:8.2f}", flush=True)

    print("\nper-call overhead, seed fn forward+backward on 3 elements (microseconds, median)")
    x = torch.randn(3, requires_grad=True)
    results = {name: per_call_us(wrap_fn(seed_fn), x) for name, (wrap_fn, _) in systems.items()}
    results["torch eager"] = per_call_us(seed_fn, x)
    if args.torch_compile:
        results["torch.compile"] = per_call_us(torch.compile(seed_fn), x)
    for name, us in results.items():
        print(f"{name:24s} {us:10.1f} us   ratio to functorch {us / results['functorch']:.2f}")


if __name__ == "__main__":
    main()
