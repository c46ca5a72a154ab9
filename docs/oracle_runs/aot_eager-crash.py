"""crash discrepancy: aot_eager vs eager torch (float64 reference)

the target raised RuntimeError: one of the variables needed for gradient computation has been modified by an inplace operation: [torch.FloatTensor [2, 2, 2]], which is output 0 of torch::autograd::CopyBackwards, is at version 1; expected version 0 instead. Hint: enable anomaly detection to find the operation that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True, check_nan=False).
Traceback (most recent call last):
  File "/work/main/reftrace/testing/oracle.py", line 95, in check_program
    run = call_and_differentiate(compiled, case.fresh_inputs(), program.params, case.cotangents)
          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/reftrace/testing/cases.py", line 97, in call_and_differentiate
    grads = gradients(outputs, [inputs[i] for i in params], cotangents)
            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/reftrace/testing/cases.py", line 80, in gradients
    return list(torch.autograd.grad([o for o, _ in pairs], list(params), [c for _, c in pairs],
                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/autograd/__init__.py", line 594, in grad
    result = _engine_run_backward(
             ^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 1072, in _engine_run_backward
    return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/autograd/function.py", line 374, in apply_boxed
    return self._get_user_fn()(self, *args)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_functorch/_aot_autograd/runtime_wrappers.py", line 3532, in backward
    return CompiledFunction._bwd_fn(
           ^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/torch/_functorch/_aot_autograd/codegen.py:codegen(compiled_function_backward)", line 6, in _compiled_backward
RuntimeError: one of the variables needed for gradient computation has been modified by an inplace operation: [torch.FloatTensor [2, 2, 2]], which is output 0 of torch::autograd::CopyBackwards, is at version 1; expected version 0 instead. Hint: enable anomaly detection to find the operation that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True, check_nan=False).


Found by reftrace.testing.check and shrunk to 1 op(s). Run it: python {this file}.
"""
import torch
import torch.nn.functional as F


def program(x1, x2):
    v3 = x1.mul_(x2)
    return v3,


def program_float64(x1, x2):
    v3 = x1.mul_(x2)
    return v3,


def make_inputs(seed, new_shapes=False, dtype=torch.float32):
    if new_shapes:
        g = torch.Generator().manual_seed(seed)
        x1 = (torch.randn((4, 4, 4), generator=g, dtype=torch.float64)).to(dtype)
        x2 = (torch.randn((1, 1), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    else:
        g = torch.Generator().manual_seed(seed)
        x1 = (torch.randn((2, 2, 2), generator=g, dtype=torch.float64)).to(dtype)
        x2 = (torch.randn((1, 1), generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return [x1, x2]


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


PARAMS = [1]
SEED = 0
compiled = torch.compile(program, backend="aot_eager")
target = run(compiled, make_inputs(SEED), SEED)   # raises
