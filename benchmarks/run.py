"""Side-by-side benchmark: reftrace.compile vs functorch.compile (and torch eager / torch.compile).

    .venv/bin/python benchmarks/run.py [--quick] [--torch-compile]

Compile latency: wall time of the first call (capture, autodiff, partition, both compilers
with `nop`) plus the first backward, each measured in a fresh process-local object.
Per-call overhead: forward + backward of the seed function on 3 elements, median of
repeated timings. Prints ratios reftrace / functorch (lower is better).
"""
from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip resnet18 and GPT-2")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow on CPU)")
    args = parser.parse_args()

    import functorch.compile as fc
    import reftrace.compile as rc

    systems = {
        "reftrace": (lambda f: rc.aot_function(f, rc.nop, rc.nop), lambda m: rc.aot_module(m, rc.nop, rc.nop)),
        "functorch": (lambda f: fc.aot_function(f, fc.nop, fc.nop), lambda m: fc.aot_module(m, fc.nop, fc.nop)),
    }
    cases = [("seed fn (3 elems)", lambda: (seed_fn, (torch.randn(3, requires_grad=True),)), False),
             ("MLP LayerNorm/GELU", make_mlp, True)]
    if not args.quick:
        cases += [("resnet18 1x3x64x64", make_resnet18, True), ("GPT-2 2 layers", make_gpt2, True)]

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for wrap_fn, _ in systems.values():  # one-time imports and caches are not compile latency
        first_call_seconds(wrap_fn, lambda x: (x * 2).sin(), (torch.randn(2, requires_grad=True),))
    print("\ncompile latency, first call forward+backward, nop compilers (seconds)")
    print(f"{'case':24s} {'reftrace':>10s} {'functorch':>10s} {'ratio':>8s}")
    for name, make, is_module in cases:
        row = {}
        for sys_name, (wrap_fn, wrap_mod) in systems.items():
            torch.manual_seed(0)
            target, inputs = make()
            row[sys_name] = first_call_seconds(wrap_mod if is_module else wrap_fn, target, inputs)
        print(f"{name:24s} {row['reftrace']:10.3f} {row['functorch']:10.3f} "
              f"{row['reftrace'] / row['functorch']:8.2f}")

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
