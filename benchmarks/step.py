"""Training-step benchmark: forward + backward time of compiled models, systems side by side.

    .venv/bin/python benchmarks/step.py [--models mlp,resnet18,...] [--repeat N] [--quick] [--inductor] [--no-jax]

One step is ``fn(*inputs).sum().backward()`` with every gradient set to None beforehand (outside
the timing). Per cell (model x system), in one process: a fresh model built with
``torch.manual_seed(0)``, two warm-up steps (the first compiles), then the median and the
min-max range of ``--repeat`` timed steps, in milliseconds. A system that fails on a model
shows "fails (ExceptionClass)" in its cell; the exception's first line is listed below the
tables. The first step's gradients are compared with eager's and deviations are listed too.

With ``--jax`` (the default), hand-written pure-JAX twins of some models
(``jax.jit(jax.value_and_grad(loss))``, weights copied from the torch model) are timed with
``block_until_ready`` on the loss and gradients, next to ``reftrace xla``.

The process runs two thread pools, torch's OpenMP threads and XLA's. OpenMP threads spin for
a while after each parallel region, and on a machine with few cores they take the cores XLA's
threads need: in one process, every XLA step (reftrace's and the JAX twins') then runs up to 1.5x
slower, depending on what torch ran just before. So the benchmark sets ``OMP_WAIT_POLICY=PASSIVE``
(sleeping OpenMP threads) before torch starts, for every system alike; ``--omp-wait-policy
default`` leaves the environment as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator


def _omp_wait_policy(argv: list[str]) -> str:
    """``--omp-wait-policy`` read before torch is imported (OpenMP reads the variable once, at start)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--omp-wait-policy"):
            return arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
    return "PASSIVE"


if (_POLICY := _omp_wait_policy(sys.argv[1:])) != "default":
    os.environ["OMP_WAIT_POLICY"] = _POLICY

import torch  # noqa: E402 - after OMP_WAIT_POLICY is set

warnings.filterwarnings("ignore")

GRAD_TOLERANCE = 1e-3  # max |grad - eager grad| relative to max |eager grad|, per step


# ----------------------------------------------------------------------------- models

@dataclass
class Case:
    """What one step runs: ``target(*inputs)``; a module's parameters and the inputs requiring grad get gradients."""

    target: torch.nn.Module | Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    uses_transformers: bool = False

    def leaves(self) -> list[torch.Tensor]:
        params = list(self.target.parameters()) if isinstance(self.target, torch.nn.Module) else []
        return params + [t for t in self.inputs if t.requires_grad]


class Block(torch.nn.Module):
    """One pre-LN transformer block (BERT-like sizes, erf GELU, LayerNorm eps 1e-5)."""

    def __init__(self, hidden: int = 256, heads: int = 4, mlp: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.ln2 = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, mlp)
        self.fc2 = torch.nn.Linear(mlp, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Output(torch.nn.Module):
    """A transformers model called with ``use_cache=False`` (when it has a cache), returning one output field."""

    def __init__(self, model: torch.nn.Module, field: str, **kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.field = field
        self.kwargs = kwargs

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=ids, **self.kwargs), self.field)


def build_mlp() -> Case:
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512),
                                torch.nn.LayerNorm(512))
    return Case(model, (torch.randn(256, 512),))


def build_resnet18() -> Case:
    from torchvision.models import resnet18
    return Case(resnet18().train(), (torch.randn(8, 3, 64, 64),))


def build_bert(attention: str = "eager") -> Case:
    from transformers import BertConfig, BertModel
    cfg = BertConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                     vocab_size=1000, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=attention)
    return Case(Output(BertModel(cfg), "last_hidden_state"), (torch.randint(0, 1000, (4, 128)),), True)


def build_gpt2(attention: str = "eager") -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000, n_positions=128, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attention)  # tied embeddings
    return Case(Output(GPT2LMHeadModel(cfg), "logits", use_cache=False), (torch.randint(0, 1000, (4, 128)),), True)


def cos_chain(x: torch.Tensor) -> torch.Tensor:
    for _ in range(10):
        x = x.cos()
    return x


def build_cos_chain() -> Case:
    return Case(cos_chain, (torch.randn(1_000_000, requires_grad=True),))


def build_convnet() -> Case:
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    return Case(model, (torch.randn(32, 3, 32, 32),))


def build_block() -> Case:
    return Case(Block(), (torch.randn(4, 128, 256),))


class UNetResBlock(torch.nn.Module):
    """A diffusion U-Net's residual block: GroupNorm, SiLU, 3x3 convolution, twice."""

    def __init__(self, channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        nn = torch.nn
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        silu = torch.nn.functional.silu
        return x + self.conv2(silu(self.norm2(self.conv1(silu(self.norm1(x))))))


def build_unet_block() -> Case:
    return Case(UNetResBlock(), (torch.randn(8, 64, 32, 32),))


MODELS: dict[str, Callable[[], Case]] = {
    "mlp": build_mlp,
    "resnet18": build_resnet18,
    "bert": build_bert,
    "gpt2": build_gpt2,
    "cos-chain": build_cos_chain,
    "convnet": build_convnet,
    "block": build_block,
    "unet-block": build_unet_block,
    "bert-sdpa": lambda: build_bert("sdpa"),
    "gpt2-sdpa": lambda: build_gpt2("sdpa"),
}
DEFAULT_MODELS = ["mlp", "resnet18", "bert", "gpt2", "cos-chain", "convnet", "block", "unet-block"]
QUICK_MODELS = ["mlp", "cos-chain", "convnet"]


# ----------------------------------------------------------------------------- systems

@dataclass
class System:
    wrap: Callable[[Any], Callable[..., torch.Tensor]]
    aot: bool  # traced by AOT autograd: the first call runs with torch.compiler.is_compiling() true


def _aot(lib: Any, compiler: Callable[..., Any], **kwargs: Any) -> System:
    def wrap(target: Any) -> Callable[..., torch.Tensor]:
        if isinstance(target, torch.nn.Module):
            return lib.aot_module(target, compiler, compiler, **kwargs)
        return lib.aot_function(target, compiler, compiler, **kwargs)
    return System(wrap, aot=True)


def systems(inductor: bool) -> dict[str, System]:
    import functorch.compile as fc
    import reftrace.compile as rc
    table = {
        "eager": System(lambda target: target, aot=False),
        "functorch nop": _aot(fc, fc.nop),
        "reftrace nop": _aot(rc, rc.nop),
        "reftrace mincut": _aot(rc, rc.nop, partition_fn=rc.min_cut_rematerialization_partition),
        "reftrace xla": _aot(rc, rc.xla_compile),
        "reftrace xla mincut": _aot(rc, rc.xla_compile, partition_fn=rc.min_cut_rematerialization_partition),
    }
    if inductor:
        table["torch.compile"] = System(torch.compile, aot=False)
    return table


# ----------------------------------------------------------------------------- torch timing

def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass
class Cell:
    times_ms: list[float] | None = None
    first_s: float = 0.0
    grads: list[torch.Tensor | None] | None = None  # after the first step
    error: Exception | None = None

    def text(self) -> str:
        if self.error is not None:
            return f"fails ({type(self.error).__name__})"
        return f"{statistics.median(self.times_ms):.2f}"

    def progress_text(self) -> str:
        if self.error is not None:
            return f"fails: {first_line(self.error)}"
        return f"{self.text():>9s} ms   first step (compiles) {self.first_s:.2f} s"

    def range_text(self) -> str:
        return "-" if self.times_ms is None else f"{min(self.times_ms):.2f}-{max(self.times_ms):.2f}"


@contextlib.contextmanager
def compiling_flag(on: bool) -> Iterator[None]:
    """Trace with ``torch.compiler.is_compiling()`` true so transformers skips value-dependent checks (as run.py)."""
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = on or previous
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


def step_ms(fn: Callable[..., torch.Tensor], case: Case, leaves: list[torch.Tensor], compiling: bool = False) -> float:
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    with compiling_flag(compiling):
        loss = fn(*case.inputs).sum()
    loss.backward()
    return (time.perf_counter() - t0) * 1e3


def measure(system: System, build: Callable[[], Case], repeat: int) -> Cell:
    torch.manual_seed(0)
    case = build()
    leaves = case.leaves()
    cell = Cell()
    try:
        fn = system.wrap(case.target)
        cell.first_s = step_ms(fn, case, leaves, compiling=system.aot and case.uses_transformers) / 1e3
        cell.grads = [None if t.grad is None else t.grad.clone() for t in leaves]
        step_ms(fn, case, leaves)
        cell.times_ms = [step_ms(fn, case, leaves) for _ in range(repeat)]
    except Exception as e:  # noqa: BLE001 - reported in the table
        cell.error = e
    return cell


def grad_deviation(grads: list[torch.Tensor | None], reference: list[torch.Tensor | None]) -> float:
    """max |g - ref| / max |ref| over all leaves (a missing gradient counts as zeros)."""
    diff = scale = 0.0
    for g, ref in zip(grads, reference, strict=True):
        if ref is None and g is None:
            continue
        g = torch.zeros_like(ref) if g is None else g.detach().float()
        ref = torch.zeros_like(g) if ref is None else ref.float()
        diff = max(diff, (g - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return diff / max(scale, 1e-12)


# ----------------------------------------------------------------------------- JAX twins

def _jax_params(model: torch.nn.Module) -> dict[str, Any]:
    import jax.numpy as jnp
    return {name: jnp.asarray(p.detach().numpy()) for name, p in model.named_parameters()}


def _linear(p: dict[str, Any], name: str, x: Any) -> Any:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _layer_norm(p: dict[str, Any], name: str, x: Any, eps: float = 1e-5) -> Any:
    import jax
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def jax_mlp(case: Case) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import jax

    def loss(p: dict[str, Any], x: Any) -> Any:
        h = jax.nn.gelu(_linear(p, "0", x), approximate=False)
        return _layer_norm(p, "3", _linear(p, "2", h)).sum()
    return loss, (_jax_params(case.target), case.inputs[0].numpy())


def jax_cos_chain(case: Case) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import jax.numpy as jnp

    def loss(x: Any) -> Any:
        for _ in range(10):
            x = jnp.cos(x)
        return x.sum()
    return loss, (jnp.asarray(case.inputs[0].detach().numpy()),)


def jax_convnet(case: Case) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import jax

    def conv(p: dict[str, Any], name: str, x: Any, stride: int) -> Any:
        y = jax.lax.conv_general_dilated(x, p[f"{name}.weight"], (stride, stride), [(1, 1), (1, 1)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jax.nn.relu(y + p[f"{name}.bias"][None, :, None, None])

    def loss(p: dict[str, Any], x: Any) -> Any:
        x = conv(p, "4", conv(p, "2", conv(p, "0", x, 1), 2), 1)
        return _linear(p, "8", x.mean(axis=(2, 3))).sum()
    return loss, (_jax_params(case.target), case.inputs[0].numpy())


def jax_block(case: Case) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    import jax
    heads = case.target.heads

    def loss(p: dict[str, Any], x: Any) -> Any:
        b, s, h = x.shape
        d = h // heads
        q, k, v = _linear(p, "qkv", _layer_norm(p, "ln1", x)).reshape(b, s, 3, heads, d).transpose(2, 0, 3, 1, 4)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(d), axis=-1)
        x = x + _linear(p, "proj", (att @ v).transpose(0, 2, 1, 3).reshape(b, s, h))
        x = x + _linear(p, "fc2", jax.nn.gelu(_linear(p, "fc1", _layer_norm(p, "ln2", x)), approximate=False))
        return x.sum()
    return loss, (_jax_params(case.target), case.inputs[0].numpy())


JAX_TWINS: dict[str, Callable[[Case], tuple[Callable[..., Any], tuple[Any, ...]]]] = {
    "mlp": jax_mlp,
    "cos-chain": jax_cos_chain,
    "convnet": jax_convnet,
    "block": jax_block,
}


def measure_jax(twin: Callable[[Case], tuple[Callable[..., Any], tuple[Any, ...]]], build: Callable[[], Case],
                repeat: int) -> Cell:
    """Median step time of ``jax.jit(jax.value_and_grad(loss))``, gradients taken with respect to the first argument."""
    import jax
    torch.manual_seed(0)
    cell = Cell()
    try:
        loss, args = twin(build())
        step = jax.jit(jax.value_and_grad(loss))

        def timed() -> float:
            t0 = time.perf_counter()
            jax.block_until_ready(step(*args))
            return (time.perf_counter() - t0) * 1e3

        cell.first_s = timed() / 1e3
        timed()
        cell.times_ms = [timed() for _ in range(repeat)]
    except Exception as e:  # noqa: BLE001 - reported in the table
        cell.error = e
    return cell


# ----------------------------------------------------------------------------- report

def ratio(a: Cell | None, b: Cell | None) -> str:
    if a is None or b is None or a.times_ms is None or b.times_ms is None:
        return "-"
    return f"{statistics.median(a.times_ms) / statistics.median(b.times_ms):.2f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """First column left-aligned, the others right-aligned, each as wide as its widest entry."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)} (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=7, help="timed steps per cell (default 7)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)}")
    parser.add_argument("--inductor", action="store_true", help="add a torch.compile (inductor) column")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                        help="OMP_WAIT_POLICY for the process (default PASSIVE; see the module docstring)")
    parser.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True,
                        help="time hand-written JAX twins (default on)")
    args = parser.parse_args()
    models = QUICK_MODELS if args.quick else args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")

    import jax
    import transformers
    transformers.logging.set_verbosity_error()
    table = systems(args.inductor)
    print(f"torch {torch.__version__}, jax {jax.__version__}, transformers {transformers.__version__}; "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f} (other processes inflate and scatter the times)")
    print(f"step = forward + .sum() + backward; median of {args.repeat} steps after 2 warm-up steps; "
          "bert/gpt2 use eager attention (transformers' default is sdpa: models bert-sdpa, gpt2-sdpa)", flush=True)

    results: dict[str, dict[str, Cell]] = {}
    twins: dict[str, Cell] = {}
    for model in models:
        results[model] = {}
        for name, system in table.items():
            cell = results[model][name] = measure(system, MODELS[model], args.repeat)
            progress(f"  {model:10s} {name:16s} {cell.progress_text()}")
        if args.jax and model in JAX_TWINS:
            cell = twins[model] = measure_jax(JAX_TWINS[model], MODELS[model], args.repeat)
            progress(f"  {model:10s} {'jax':16s} {cell.progress_text()}")

    names = list(table)
    print(f"\ntraining step, median ms ({args.repeat} steps)")
    print_table(["model", *names, "rt nop/ft nop", "rt nop/eager", "rt xla/jax"],
                [[m, *(row[n].text() for n in names), ratio(row["reftrace nop"], row["functorch nop"]),
                  ratio(row["reftrace nop"], row["eager"]), ratio(row["reftrace xla"], twins.get(m))]
                 for m, row in results.items()])
    print("\nmin-max ms")
    print_table(["model", *names], [[m, *(row[n].range_text() for n in names)] for m, row in results.items()])

    if twins:
        print("\nreftrace xla vs hand-written JAX (jax.jit(jax.value_and_grad(loss))), median ms")
        print_table(["case", "reftrace xla", "jax", "ratio", "jax min-max"],
                    [[m, results[m]["reftrace xla"].text(), cell.text(), ratio(results[m]["reftrace xla"], cell),
                      cell.range_text()] for m, cell in twins.items()])

    notes = [f"{m} / {n}: {first_line(c.error)}" for m, row in results.items() for n, c in row.items()
             if c.error is not None]
    notes += [f"{m} / jax: {first_line(c.error)}" for m, c in twins.items() if c.error is not None]
    for m, row in results.items():
        reference = row["eager"].grads
        for n, c in row.items():
            if c.grads is None or reference is None:
                continue
            if (dev := grad_deviation(c.grads, reference)) > GRAD_TOLERANCE:
                notes.append(f"{m} / {n}: first-step gradients differ from eager by {dev:.1e} of max |grad|")
    notes.append(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("\nnotes")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
