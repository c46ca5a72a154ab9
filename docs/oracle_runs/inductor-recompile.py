"""recompile discrepancy: inductor vs eager torch (float64 reference)

the new shape raised, while a fresh compile at its inputs works InductorError: TypeError: cannot determine truth value of Relational: s0*s16 < s0

Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/compile_fx.py", line 1660, in codegen_and_compile
    graph.run(*example_inputs)
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/graph.py", line 1135, in run
    return super().run(*args)
           ^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/fx/interpreter.py", line 197, in run
    self.env[node] = self.run_node(node)
                     ^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/graph.py", line 2138, in run_node
    ir.get_stride_order(strides),
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/ir.py", line 377, in get_stride_order
    sorted_idx: Sequence[int] = get_fill_order(seq, shape_env)
                                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/ir.py", line 352, in get_fill_order
    sorted_idx: Sequence[int] = argsort(seq)
                                ^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_inductor/utils.py", line 1555, in argsort
    sort_idx = list(sorted(a_r, key=getter, reverse=True))  # noqa: C413
                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/sympy/core/relational.py", line 519, in __bool__
    raise TypeError(
torch._inductor.exc.InductorError: TypeError: cannot determine truth value of Relational: s0*s16 < s0

Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"



Found by reftrace.testing.check and shrunk to 6 op(s). Run it: python {this file}.
"""
import torch
import torch.nn.functional as F


def program(x1, w5, b6, w9, b10):
    v2 = torch.tanh(x1)
    v3 = v2 @ x1
    v4 = v3.var((0, 2,), correction=0)
    v7 = F.conv2d(v3, w5, b6, stride=1, padding=1)
    v8 = torch.log_softmax(w5, dim=-4)
    v11 = F.linear(v3, w9, b10)
    return v11, v7, v8


def program_float64(x1, w5, b6, w9, b10):
    v2 = torch.tanh(x1)
    v3 = v2 @ x1
    v4 = v3.var((0, 2,), correction=0)
    v7 = F.conv2d(v3, w5, b6, stride=1, padding=1)
    v8 = torch.log_softmax(w5, dim=-4)
    v11 = F.linear(v3, w9, b10)
    return v11, v7, v8


def make_inputs(seed, new_shapes=False, dtype=torch.float32):
    if new_shapes:
        g = torch.Generator().manual_seed(seed)
        x1 = (torch.randn((4, 4, 4, 4), generator=g, dtype=torch.float64) * 100).to(dtype)
        w5 = (torch.randn((2, 4, 3, 3), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        b6 = (torch.randn((2,), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        w9 = (torch.randn((2, 4), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        b10 = (torch.randn((2,), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    else:
        g = torch.Generator().manual_seed(seed)
        x1 = (torch.randn((2, 2, 2, 2), generator=g, dtype=torch.float64) * 100).to(dtype)
        w5 = (torch.randn((2, 2, 3, 3), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        b6 = (torch.randn((2,), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        w9 = (torch.randn((2, 2), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        b10 = (torch.randn((2,), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return [x1, w5, b6, w9, b10]


def normal(like, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.dtype)


def run(fn, inputs, seed, second_order=False, given=None):
    """Outputs, inputs after the call, grads along seeded cotangents, and HVPs along seeded directions."""
    outputs = fn(*inputs)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    params = [inputs[i] for i in PARAMS]
    if given is None:
        cts = [normal(o, seed + 1 + k) if isinstance(o, torch.Tensor) and o.requires_grad else None
               for k, o in enumerate(outputs)]
        dirs = [normal(p, seed + 17 + k) for k, p in enumerate(params)]
    else:
        cts, dirs = given
    pairs = [(o, c) for o, c in zip(outputs, cts) if c is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    grads = [None] * len(params)
    if pairs and params:
        grads = list(torch.autograd.grad([o for o, _ in pairs], params, [c.to(o.dtype) for o, c in pairs],
                                         allow_unused=True, create_graph=second_order))
    hvp = None
    if second_order:
        terms = [(g * v.to(g.dtype)).sum() for g, v in zip(grads, dirs) if g is not None and g.requires_grad]
        hvp = [None] * len(params)
        if terms:
            hvp = list(torch.autograd.grad(sum(terms), params, allow_unused=True))
    return dict(outputs=outputs, inputs=inputs, grads=grads, hvp=hvp, given=(cts, dirs))


def err(got, ref):
    if got is None:
        got = torch.zeros_like(ref)
    if got.shape != ref.shape:
        return float("inf")
    return float((got.detach().double() - ref.detach().double()).abs().nan_to_num(float("inf")).max()) \
        if ref.numel() else 0.0


def compare(what, target, eager, ref):
    """Print each tensor's error against float64 and return the worst ratio to what is allowed."""
    worst = 0.0
    for k, r in enumerate(ref[what]):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            continue
        e = eager[what][k]
        floor = {torch.float64: 1e-11, torch.float32: 2e-05, torch.bfloat16: 0.02, torch.float16: 0.002}.get(e.dtype if e is not None else r.dtype, 1e-5) * max(1.0, r.abs().max().item())
        allowed = 10.0 * err(e, r) + floor
        got = err(target[what][k], r)
        print(f"{what}[{k}]: target err {got:.3e}  eager err {err(e, r):.3e}  allowed ~{allowed:.3e}")
        worst = max(worst, got / allowed)
    return worst


PARAMS = [1, 2, 3, 4]
SEED = 0
compiled = torch.compile(program, backend="inductor")
HAS_NEW_SHAPES = True

first = run(compiled, make_inputs(SEED), SEED)            # the first call compiles
for label, new_shapes, seed in [("second call", False, SEED + 7919), ("new shape", True, SEED + 104729)]:
    if new_shapes and not HAS_NEW_SHAPES:
        continue
    target = run(compiled, make_inputs(seed, new_shapes), seed)
    eager = run(program, make_inputs(seed, new_shapes), seed)
    ref = run(program_float64, make_inputs(seed, new_shapes, torch.float64), seed, given=eager["given"])
    print(label)
    worst = max(compare("outputs", target, eager, ref), compare("grads", target, eager, ref))
    assert worst <= 1, f"{label}: the target's result is off by {worst:.1f}x what is allowed"
