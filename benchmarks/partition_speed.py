"""How long ``partition`` takes on a joint graph of about 5,000 equations.

    .venv/bin/python benchmarks/partition_speed.py [--model mlp|transformer|gpt2|bert] [--eqns 5000] [--repeat 3]

Builds the joint graph (``vjp``) of a deep model grown until the joint has at least ``--eqns``
equations: ``mlp``, a residual MLP with LayerNorm-like normalisation and tanh/GELU-style
activations written with ``reftrace.numpy``; ``transformer``, pre-norm GPT blocks (layer norm,
causal attention, tanh GELU) built from ``reftrace.nn`` composites and decomposed to core
primitives (``rt.decompose``: the partitioner sees every elementwise step); or ``gpt2`` / ``bert``,
transformers' GPT-2 / BERT (masked LM) from a config (width 64, 4 heads, vocab 512, 2x32 tokens,
dropout 0) captured from torch as a user's model is (composites kept). Then it times
``simplify`` and ``partition`` under each policy (best of ``--repeat``, wall and
process CPU time). Tracing
and ``vjp`` are not timed. The targets: under a second for ``"mincut"``, under two seconds for
``rt.optimal`` (budgets None and 0.5; other budgets can take longer, see docs/partition.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import reftrace as rt
import reftrace.nn as nn
import reftrace.numpy as rnp
from reftrace.transforms.policies import dots_saveable, save_nothing


def block(x, w, b, gamma):
    h = x @ w + b
    mean = rnp.mean(h, axis=-1, keepdims=True)
    centered = h - mean
    var = rnp.mean(centered * centered, axis=-1, keepdims=True)
    normed = centered / rnp.sqrt(var + 1e-5) * gamma
    act = 0.5 * normed * (1.0 + rnp.tanh(0.79788456 * (normed + 0.044715 * normed * normed * normed)))
    return x + act


def model_graph(depth: int, batch: int = 32, width: int = 128) -> rt.Graph:
    def fn(x, *params):
        for i in range(depth):
            w, b, gamma = params[3 * i: 3 * i + 3]
            x = block(x, w, b, gamma)
        return rnp.sum(x * x)

    rng = np.random.default_rng(0)
    args = [rng.standard_normal((batch, width)).astype(np.float32)]
    for _ in range(depth):
        args += [rng.standard_normal((width, width)).astype(np.float32),
                 np.zeros(width, np.float32), np.ones(width, np.float32)]
    return rt.trace(fn, *args)


def transformer_block(x, ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b, w1, b1, w2, b2, *, batch, heads):
    tokens, width = x.shape
    h = nn.layer_norm(x, ln1w, ln1b, normalized_ndim=1, eps=1e-5)[0]
    qkv = rnp.reshape(nn.linear(h, wqkv, bqkv), batch, tokens // batch, 3, heads, width // heads)
    q, k, v = [rnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3)]
    a = nn.dot_product_attention(q, k, v, causal=True)[0]
    x = x + nn.linear(rnp.reshape(rnp.transpose(a, (0, 2, 1, 3)), tokens, width), wo, bo)
    h = nn.layer_norm(x, ln2w, ln2b, normalized_ndim=1, eps=1e-5)[0]
    return x + nn.linear(nn.gelu(nn.linear(h, w1, b1), approximate="tanh"), w2, b2)


def transformer_graph(depth: int, batch: int = 2, seq: int = 64, width: int = 128, heads: int = 4) -> rt.Graph:
    def fn(x, *params):
        for i in range(depth):
            x = transformer_block(x, *params[12 * i: 12 * i + 12], batch=batch, heads=heads)
        return rnp.sum(x * x)

    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    args = [weight(batch * seq, width)]
    for _ in range(depth):
        args += [ones, zeros, weight(width, 3 * width), weight(3 * width), weight(width, width), weight(width),
                 ones, zeros, weight(width, 4 * width), weight(4 * width), weight(4 * width, width), weight(width)]
    return rt.decompose(rt.trace(fn, *args))


def transformers_graph(kind: str, depth: int) -> rt.Graph:
    """A transformers model with ``depth`` layers, captured from torch (``rt.trace`` of the module)."""
    import torch
    import transformers as hf
    torch.manual_seed(0)
    if kind == "gpt2":
        model = hf.GPT2LMHeadModel(hf.GPT2Config(n_layer=depth, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0))
        options = {"use_cache": False}
    else:
        model = hf.BertForMaskedLM(hf.BertConfig(num_hidden_layers=depth, hidden_size=64, num_attention_heads=4,
                                                 intermediate_size=128, vocab_size=512, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0))
        options = {}
    return rt.trace(model, torch.randint(0, 512, (2, 32)), return_dict=False, **options)


MODELS = {"mlp": model_graph, "transformer": transformer_graph,
          "gpt2": lambda depth: transformers_graph("gpt2", depth),
          "bert": lambda depth: transformers_graph("bert", depth)}


def joint_with_at_least(num_eqns: int, model: str = "mlp") -> rt.Graph:
    depth = 1
    while True:
        joint = rt.vjp(MODELS[model](depth))
        if len(joint.eqns) >= num_eqns:
            return joint
        per_block = max(1, len(joint.eqns) // depth)
        depth = max(depth + 1, -(-num_eqns // per_block))


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time and best CPU time of this process (CPU time is steadier on a busy machine)."""
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--eqns", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    joint = joint_with_at_least(args.eqns, args.model)
    print(f"joint graph: {len(joint.eqns)} equations, {len(joint.inputs)} inputs, {len(joint.outputs)} outputs")
    wall, cpu, simple = best_time(lambda: rt.simplify(joint), args.repeat)
    print(f"simplify                wall {wall * 1000:6.1f} ms  cpu {cpu * 1000:6.1f} ms  "
          f"({len(simple.eqns)} equations after)")
    for name, policy in [("default", "default"), ("mincut", "mincut"), ("dots_saveable", dots_saveable),
                         ("save_nothing", save_nothing), ("optimal(None)", rt.optimal()),
                         ("optimal(1.0)", rt.optimal(1.0)), ("optimal(0.85)", rt.optimal(0.85)),
                         ("optimal(0.7)", rt.optimal(0.7)), ("optimal(0.5)", rt.optimal(0.5)),
                         ("optimal(0.35)", rt.optimal(0.35)), ("optimal(0.2)", rt.optimal(0.2)),
                         ("optimal(0.1)", rt.optimal(0.1))]:
        wall, cpu, part = best_time(lambda: rt.partition(joint, policy), args.repeat)
        print(f"partition {name:<14}wall {wall * 1000:6.1f} ms  cpu {cpu * 1000:6.1f} ms  "
              f"saved {len(part.saved):4d} values, "
              f"{part.saved_bytes / 2**20:8.2f} MiB  (forward {len(part.forward.eqns)} eqns, "
              f"backward {len(part.backward.eqns)} eqns)")


if __name__ == "__main__":
    main()
