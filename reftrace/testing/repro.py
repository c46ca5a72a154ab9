"""Standalone repro scripts: torch only (plus the target's import) and the shrunk program.

The script rebuilds the exact inputs, cotangents and directions ``check`` used, runs the target
and eager at the program's dtype, and measures both against eager float64 (casts promoted) —
torch's own stand-in for reftrace's reference, which agrees with it on every program whose
repro is written (``check`` reports disagreements separately). It prints each quantity's error
and fails with an AssertionError on the discrepancy's kind.
"""
from __future__ import annotations

import textwrap

from reftrace.testing.cases import NEW_SHAPE_SEED, SECOND_CALL_SEED
from reftrace.testing.program import Program
from reftrace.testing.targets import Target
from reftrace.testing.tolerance import FLOOR, MULTIPLE

_TEMPLATE = '''\
"""{title}

{message}

Found by reftrace.testing.check and shrunk to {num_ops} op(s). Run it: python {{this file}}.
"""
import torch
import torch.nn.functional as F
{setup}

{source}

{reference}

def make_inputs(seed, new_shapes=False, dtype={dtype}):
    if new_shapes:
{new_inputs}
    else:
{inputs}
    return [{names}]


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
    return float((got.detach().double() - ref.detach().double()).abs().nan_to_num(float("inf")).max()) \\
        if ref.numel() else 0.0


def compare(what, target, eager, ref):
    """Print each tensor's error against float64 and return the worst ratio to what is allowed."""
    worst = 0.0
    for k, r in enumerate(ref[what]):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            continue
        e = eager[what][k]
        floor = {floors}.get(e.dtype if e is not None else r.dtype, 1e-5) * max(1.0, r.abs().max().item())
        allowed = {multiple} * err(e, r) + floor
        got = err(target[what][k], r)
        print(f"{{what}}[{{k}}]: target err {{got:.3e}}  eager err {{err(e, r):.3e}}  allowed ~{{allowed:.3e}}")
        worst = max(worst, got / allowed)
    return worst


PARAMS = {params}
SEED = {seed}
compiled = {spelling}
{body}
'''

_BODIES = {
    "recompile": '''
first = run(compiled, make_inputs(SEED), SEED)            # the first call compiles
for label, new_shapes, seed in [("second call", False, SEED + {second}), ("new shape", True, SEED + {new})]:
    if new_shapes and not HAS_NEW_SHAPES:
        continue
    target = run(compiled, make_inputs(seed, new_shapes), seed)
    eager = run(program, make_inputs(seed, new_shapes), seed)
    ref = run(program_float64, make_inputs(seed, new_shapes, torch.float64), seed, given=eager["given"])
    print(label)
    worst = max(compare("outputs", target, eager, ref), compare("grads", target, eager, ref))
    assert worst <= 1, f"{label}: the target's result is off by {worst:.1f}x what is allowed"
''',
    "second_order": '''
target = run(compiled, make_inputs(SEED), SEED, second_order=True)
eager = run(program, make_inputs(SEED), SEED, second_order=True)
ref = run(program_float64, make_inputs(SEED, dtype=torch.float64), SEED, second_order=True, given=eager["given"])
worst = compare("hvp", target, eager, ref)
assert worst <= 1, f"Hessian-vector product off by {worst:.1f}x what is allowed"
''',
    "crash": '''
target = run(compiled, make_inputs(SEED), SEED)   # raises
''',
}

_BODY = '''
target = run(compiled, make_inputs(SEED), SEED)
eager = run(program, make_inputs(SEED), SEED)
ref = run(program_float64, make_inputs(SEED, dtype=torch.float64), SEED, given=eager["given"])
worst = compare({what!r}, target, eager, ref)
assert worst <= 1, "{kind}: the target is off by " + f"{{worst:.1f}}x what is allowed"
'''

_WHAT = {"value": "outputs", "mutation": "inputs", "grad": "grads"}


def repro_script(program: Program, target: Target, kind: str, message: str, seed: int) -> str:
    """A standalone script that shows the failure ``kind`` of ``program`` under ``target``."""
    body = _BODIES.get(kind) or _BODY.format(what=_WHAT.get(kind, "outputs"), kind=kind)
    body = body.replace("{second}", str(SECOND_CALL_SEED)).replace("{new}", str(NEW_SHAPE_SEED))
    if kind == "recompile":
        body = f"HAS_NEW_SHAPES = {program.has_new_shapes}\n" + body
    indent = " " * 8
    new_inputs = (_seeded(program.inputs_source(0, new_shapes=True), indent) if program.has_new_shapes
                  else indent + "raise ValueError('no new shapes')")
    dtypes = [x.dtype for x in program.inputs if x.dtype.is_floating_point]
    return _TEMPLATE.format(
        title=f"{kind} discrepancy: {target.name} vs eager torch (float64 reference)",
        message=textwrap.indent(message, ""),
        num_ops=program.num_ops,
        setup=target.setup,
        source=program.render(),
        reference=program.render(name="program_float64", promote=True),
        inputs=_seeded(program.inputs_source(0), indent),
        new_inputs=new_inputs,
        dtype=str(dtypes[0]) if dtypes else "torch.float32",
        names=", ".join(x.name for x in program.inputs),
        floors="{" + ", ".join(f"{_dtype_name(k)}: {v!r}" for k, v in FLOOR.items()) + "}",
        multiple=MULTIPLE,
        params=list(program.params),
        seed=seed,
        spelling=target.spelling,
        body=body.strip("\n"),
    )


def _seeded(source: str, indent: str) -> str:
    """The inputs' source with the seed and the float dtype as the script's parameters."""
    source = source.replace("manual_seed(0)", "manual_seed(seed)")
    source = source.replace(".to(torch.float32)", ".to(dtype)").replace(".to(torch.float64)", ".to(dtype)")
    return textwrap.indent(source, indent).rstrip("\n")


def _dtype_name(dtype: object) -> str:
    return str(dtype)
