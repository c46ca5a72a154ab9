"""GPT-2 small trained on 8 simulated devices, data- and parameter-parallel, as one SPMD program per step.

    python examples/sharded_training.py                              # GPT-2 small (124M), 3 steps, batch 8 x 64: FSDP
    python examples/sharded_training.py --config tiny --strategies dp fsdp    # a 2-layer GPT-2, both, seconds

The model is built from ``transformers.GPT2Config()`` with random weights (nothing is downloaded)
and trained in training mode (dropout on) with a causal-LM loss and AdamW. Each strategy runs the
same steps from the same weights: on one device first, then on the 8-device mesh as

- ``fsdp`` (the default): batch, parameters, gradients and AdamW moments split 8 ways; XLA
  all-gathers each parameter where it is used (59 MiB of GPT-2 small's 475 MiB per device);
- ``dp``: batch split, parameters and optimizer state replicated; XLA all-reduces the gradients.
  Every simulated device then holds a full replica of GPT-2 small and its AdamW moments: about
  15 GB of this machine's memory, so ask for it (``--strategies dp fsdp``) where that fits.

The losses must equal the one-device run's to float32 rounding (relative 1e-4: a sharded program
sums in another order; measured differences are about 1e-7). On 2 CPU cores GPT-2 small takes
about 4 minutes (one-device run included), most of it XLA compiling and running 8 simulated
devices on 2 cores; XLA's simulated devices are threads of this CPU, and the same code runs on a
GPU/TPU mesh.
"""
from __future__ import annotations

import os

# XLA reads this flag once, when jax starts: set it before anything imports jax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import reftrace.jax as rj  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
CONFIGS = {
    "small": dict(),  # GPT2Config() defaults: 12 layers, n_embd 768, 12 heads, vocab 50257, 124M parameters
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0),
}


def causal_lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: GPT2LMHeadModel shifts the labels itself."""
    return model(ids, labels=ids, use_cache=False).loss


def train(model: torch.nn.Module, batches: list[torch.Tensor], mesh: jax.sharding.Mesh | None,
          strategy: str) -> tuple[list[float], float, int]:
    """Losses per step, seconds (compile included), and parameter bytes on the first device."""
    start = time.perf_counter()
    step = rj.train_step(model, causal_lm_loss, batches[0], optimizer=optax.adamw(1e-4), mesh=mesh,
                         strategy=strategy)
    state = step.init()
    losses = []
    for ids in batches:
        state, loss = step(state, ids)
        losses.append(float(loss))
    per_device = state.param_bytes_per_device()
    state.copy_to(model)  # the torch module now holds the trained weights
    return losses, time.perf_counter() - start, per_device[jax.devices()[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--strategies", nargs="+", choices=("dp", "fsdp"), default=["fsdp"])
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(**CONFIGS[args.config])
    model = GPT2LMHeadModel(config).train()
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq)) for _ in range(args.steps)]
    n_params = sum(p.numel() for p in model.parameters())
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    print(f"GPT-2 {args.config}: {n_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps of AdamW; mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")

    runs = {}
    for name, run_mesh, strategy in (("1 device", None, "dp"), *((s, mesh, s) for s in args.strategies)):
        losses, seconds, held = train(copy.deepcopy(model), batches, run_mesh, strategy)
        runs[name] = losses
        print(f"{name:>8}: loss per step {' '.join(f'{x:.6f}' for x in losses)}   "
              f"({seconds:.1f} s, {held / 2**20:.1f} MiB of parameters per device)")

    reference = np.array(runs["1 device"])
    for name in args.strategies:
        worst = float(np.max(np.abs(np.array(runs[name]) - reference) / np.abs(reference)))
        print(f"{name} vs 1 device: max relative difference {worst:.1e} (tolerance {RELATIVE_TOLERANCE:.0e})")
        assert worst <= RELATIVE_TOLERANCE, f"{name} losses differ from the one-device run"


if __name__ == "__main__":
    main()
