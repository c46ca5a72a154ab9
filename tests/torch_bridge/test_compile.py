"""reftrace.compile as a drop-in for functorch.compile: values and gradients against eager torch."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import reftrace as rt
from reftrace.compile import (aot_function, aot_module, default_partition, draw_graph, make_boxed_compiler,
                              min_cut_rematerialization_partition, nop, print_compile, ts_compile, xla_compile)

COMPILERS = {"nop": nop, "ts": ts_compile, "xla": xla_compile, "boxed_nop": make_boxed_compiler(nop)}


def leaf(*shape, dtype=torch.float64, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def grads_of(fn, inputs, ct_seed=1):
    inputs = [i.detach().clone().requires_grad_(i.requires_grad) for i in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(ct_seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o.is_floating_point())
    diff = [i for i in inputs if i.requires_grad]
    grads = torch.autograd.grad(loss, diff, allow_unused=True) if diff else ()
    return [o.detach() for o in outs], list(grads)


def assert_same(fn, compiled, inputs, rtol=1e-10, atol=1e-10):
    o1, g1 = grads_of(fn, inputs)
    o2, g2 = grads_of(compiled, inputs)
    assert len(o1) == len(o2) and len(g1) == len(g2)
    for a, b in zip(o1 + g1, o2 + g2):
        if a is None:  # eager's None gradient stays None (not zeros)
            assert b is None
            continue
        assert b is not None
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def seed_fn(x):
    return x.cos().cos()


def two_input_fn(x, y):
    return (x @ y).tanh().sum(dim=1), torch.nn.functional.gelu(x) * 2.0


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition])
def test_values_and_gradients_match_eager(compiler, partition):
    c = COMPILERS[compiler]
    assert_same(seed_fn, aot_function(seed_fn, c, c, partition_fn=partition), [leaf(3)])
    assert_same(two_input_fn, aot_function(two_input_fn, c, c, partition_fn=partition), [leaf(4, 3), leaf(3, 5)])


def test_backprop_through_with_eager_ops_around():
    nf = aot_function(seed_fn, nop)
    x = leaf(3)
    out = nf(x.cos())
    out.sin().sum().backward()
    x2 = leaf(3)
    seed_fn(x2.cos()).sin().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_inputs_without_requires_grad_get_no_gradient():
    nf = aot_function(two_input_fn, nop)
    x, y = leaf(4, 3), leaf(3, 5, requires_grad=False)
    a, b = nf(x, y)
    (a.sum() + b.sum()).backward()
    assert y.grad is None and x.grad is not None


def test_double_backward_matches_eager():
    fn = lambda x, y: (x.sin() * y).pow(3).sum()  # noqa: E731
    nf = aot_function(fn, nop)
    results = []
    for f in (fn, nf):
        x, y = leaf(5), leaf(5, seed=3)
        (gx,) = torch.autograd.grad(f(x, y), x, create_graph=True)
        gxx, gxy = torch.autograd.grad((gx * torch.arange(5.0, dtype=gx.dtype)).sum(), (x, y))
        results.append((gx.detach(), gxx, gxy))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


def test_guards_recompile_on_shape_dtype_requires_grad_and_constants():
    calls = []

    def fn(x, scale, mode):
        calls.append(1)
        return x * scale if mode == "mul" else x + scale

    nf = aot_function(fn, nop)
    for x, scale, mode in [(leaf(3), 2.0, "mul"), (leaf(4), 2.0, "mul"), (leaf(4, dtype=torch.float32), 2.0, "mul"),
                           (leaf(4, requires_grad=False), 2.0, "mul"), (leaf(4), 3.0, "mul"), (leaf(4), 3.0, "add")]:
        torch.testing.assert_close(nf(x, scale, mode), fn(x, scale, mode))
    assert len(nf.cache) == 6
    n = len(nf.cache)
    nf(leaf(4), 3.0, "add")
    assert len(nf.cache) == n


def test_slice_arguments_are_guarded_by_their_bounds():
    nf = aot_function(lambda x, idx: x[idx] * 2, nop)
    x = leaf(5, 4)
    for idx in [slice(1, 3), slice(0, 5, 2), (slice(None), 1), (Ellipsis, slice(1, None)), slice(1, 3)]:
        (gx,) = torch.autograd.grad(nf(x, idx).sum(), x)
        (ref,) = torch.autograd.grad((x[idx] * 2).sum(), x)
        torch.testing.assert_close(nf(x, idx), x[idx] * 2)
        torch.testing.assert_close(gx, ref)
    assert len(nf.cache) == 4  # the repeated slice(1, 3) reuses its graph


def test_kwargs_and_pytrees():
    def fn(d, *, w):
        return {"a": d["x"] * w, "b": [d["y"].exp()]}
    nf = aot_function(fn, nop)
    d = {"x": leaf(2), "y": leaf(2, seed=1)}
    out = nf(d, w=leaf(2, seed=2))
    ref = fn(d, w=leaf(2, seed=2))
    torch.testing.assert_close(out["a"], ref["a"])
    torch.testing.assert_close(out["b"][0], ref["b"][0])


def test_input_mutation_is_written_back():
    def fn(x, buf):
        buf.add_(x.detach())
        return x * 2
    nf = aot_function(fn, nop)
    x, buf = leaf(3), torch.zeros(3, dtype=torch.float64)
    nf(x, buf)
    torch.testing.assert_close(buf, x.detach())


def test_aot_module_mlp_and_batchnorm_training_updates_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), torch.nn.LayerNorm(5))
    ref = __import__("copy").deepcopy(net)
    compiled = aot_module(net, nop)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        out, out_ref = compiled(x), ref(x)
        out.sum().backward()
        out_ref.sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), (_, c) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)
    net.eval(), ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_tied_weights_get_summed_gradient():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids).tanh())
    torch.manual_seed(0)
    m = Tied()
    ref = __import__("copy").deepcopy(m)
    ids = torch.tensor([[1, 2, 3], [3, 3, 9]])
    aot_module(m, nop)(ids).pow(2).sum().backward()
    ref(ids).pow(2).sum().backward()
    assert m.head.weight is m.emb.weight
    torch.testing.assert_close(m.emb.weight.grad, ref.emb.weight.grad)


def test_draw_graph_writes_svg(tmp_path):
    def drawer(name):
        def f(fx_g, _):
            draw_graph(fx_g, str(tmp_path / name))
            return fx_g
        return f
    aot_function(seed_fn, drawer("forward"), drawer("backward"))(leaf(3))
    for name in ("forward.svg", "backward.svg"):
        assert os.path.getsize(tmp_path / name) > 100
        assert "<svg" in (tmp_path / name).read_text()


def test_print_compile_prints_both_graphs(capsys):
    aot_function(seed_fn, print_compile)(leaf(3))
    text = capsys.readouterr().out
    assert text.count("def forward") == 2 and "cos" in text


def test_unsupported_operator_names_the_op():
    lib = torch.library.Library("reftrace_test", "DEF")
    lib.define("mystery(Tensor x) -> Tensor")
    lib.impl("mystery", lambda x: x * 3, "CompositeExplicitAutograd")
    lib.impl("mystery", lambda x: torch.empty_like(x), "Meta")
    fn = lambda x: torch.ops.reftrace_test.mystery(x) + 1  # noqa: E731
    with pytest.raises(rt.UnsupportedOperatorError, match="mystery"):
        aot_function(fn, nop)(leaf(3))


def test_data_dependent_control_flow_is_reported():
    def fn(x):
        if x.sum() > 0:
            return x * 2
        return x
    with pytest.raises(rt.DataDependentControlFlowError, match="test_compile.py"):
        aot_function(fn, nop)(leaf(3))


def test_a_stock_modules_data_dependent_read_names_the_module_and_what_to_do():
    """BatchNorm(momentum=None) reads num_batches_tracked as a Python float in training: the error
    names the line inside torch.nn and says how to compile such a module."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(rt.DataDependentControlFlowError, match="test_compile.py.*inside torch.nn's batchnorm.py:"
                                                               r"\d+ in forward; BatchNorm with momentum=None.*"
                                                               "torch.compile"):
        aot_module(model, nop)(torch.randn(8, 4))


def test_a_transformer_mask_compared_with_the_causal_mask_says_to_pass_is_causal():
    """nn.Transformer compares ``tgt_mask``'s values with a causal mask when ``tgt_is_causal`` is not
    given: the error says to pass it, and with it the step is eager's."""
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=16, dropout=0.0, batch_first=True).double()
    src, tgt = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    with pytest.raises(rt.DataDependentControlFlowError, match=r"inside torch.nn's transformer.py:\d+ in "
                                                               r"_detect_is_causal_mask; without is_causal .*"
                                                               r"generate_square_subsequent_mask, else False"):
        aot_module(model, nop)(src, tgt, tgt_mask=mask)
    twin = copy.deepcopy(model)
    aot_module(model, nop)(src, tgt, tgt_mask=mask, tgt_is_causal=True).pow(2).sum().backward()
    twin(src, tgt, tgt_mask=mask, tgt_is_causal=True).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_xla_compile_crosses_without_copies_and_keeps_unchanged_parameters():
    """Tensors cross to JAX and back through DLPack sharing memory; a parameter whose version counter
    did not move since the last call is not transferred again, and an in-place update is seen."""
    import jax.numpy as jnp
    from reftrace.backends import jax as jax_backend
    from reftrace.backends.jax import array_to_tensor, tensor_to_jax
    t = torch.randn(64, 32)
    assert tensor_to_jax(t, 0).unsafe_buffer_pointer() == t.data_ptr()
    view = tensor_to_jax(t.requires_grad_(), 0, host_numpy=True)  # what a CPU call passes to the executable
    assert isinstance(view, np.ndarray) and view.ctypes.data == t.data_ptr()
    array = jnp.ones((16, 8))
    for on_cpu in (False, True):
        assert array_to_tensor(array, on_cpu).data_ptr() == array.unsafe_buffer_pointer()

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    compiled = aot_module(model, xla_compile, xla_compile)
    x = torch.randn(3, 8)
    transfers = []
    original = jax_backend.tensor_to_jax

    def counting(tensor, index, host_numpy=False):
        transfers.append(tensor)
        return original(tensor, index, host_numpy)
    try:
        jax_backend.tensor_to_jax = counting
        compiled(x).sum().backward()
        first = len(transfers)
        compiled(x).sum().backward()
        assert len(transfers) - first == first - 2  # weight and bias stayed on the JAX side
        with torch.no_grad():
            model.weight.mul_(2)
        out = compiled(x)
    finally:
        jax_backend.tensor_to_jax = original
    torch.testing.assert_close(out, model(x))


def test_xla_compile_sees_updates_through_data_of_a_parameter_jax_had_to_copy():
    """A parameter at an unaligned offset into a flat buffer crosses to JAX as a copy; an update through
    ``.data`` (an EMA, weight clipping) does not bump its version counter, so that copy must not be
    kept. A parameter whose memory JAX reads is kept, and sees the update. Found by a sweep: the first
    kept the old weights and gave outputs off by 1.5."""
    torch.manual_seed(0)
    flat = torch.randn(16)
    model = torch.nn.Linear(4, 3)
    model.weight = torch.nn.Parameter(flat[1:13].view(3, 4))  # 4 bytes into the buffer: not aligned for XLA
    compiled = aot_module(model, xla_compile, xla_compile)
    x = torch.randn(2, 4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), model(x))
        model.weight.data.mul_(0.5)
        model.bias.data.add_(1.0)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    torch.testing.assert_close(model.weight.grad, x.sum(0).expand(3, 4))


def test_xla_compile_call_takes_any_layout_and_names_a_wrong_argument():
    """The compiled call's fast path (numpy views of CPU tensors, no per-argument check) gives the same
    values for tensors numpy cannot view as they are (transposed, conjugated, bfloat16, requiring grad),
    and a call with a wrong shape still raises ``ArgumentError`` naming the argument."""
    def f(a, b):
        return torch.sin(a) * b + a.sum()

    cases = [(torch.randn(5, 3).t(), torch.randn(3, 5)),                          # strided view
             (torch.randn(3, 4, dtype=torch.complex64).conj(), torch.randn(3, 4, dtype=torch.complex64)),
             (torch.randn(2, 3).to(torch.bfloat16), torch.randn(2, 3).to(torch.bfloat16)),
             (leaf(2, 3), leaf(2, 3, seed=1))]
    for a, b in cases:
        gm = torch.fx.symbolic_trace(f)
        compiled = xla_compile(gm, [a, b])
        torch.testing.assert_close(compiled(a, b)[0], f(a, b).detach())
    compiled = xla_compile(torch.fx.symbolic_trace(f), [torch.randn(2, 3), torch.randn(2, 3)])
    with pytest.raises(rt.ReftraceError, match="argument 1 .*f32\\[2,3\\].*f32\\[3,2\\]"):
        compiled(torch.randn(2, 3), torch.randn(3, 2))


def test_xla_compile_backward_reads_an_expanded_cotangent_unexpanded():
    """``y.sum()``'s cotangent is one number expanded to ``y``'s shape (``y.sum(0)``'s, a row): the XLA
    backward takes it as it is stored and broadcasts inside the computation, with the gradients eager
    gives; a cotangent stored in full takes the computation without the broadcast."""
    from reftrace.backends import jax as jax_backend
    seen = []
    original = jax_backend.JaxExecutable._run_broadcasting

    def recording(self, args):
        seen.append([tuple(a.shape) for a in args])
        return original(self, args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()).double()
    twin = copy.deepcopy(model)
    compiled = aot_module(model, xla_compile, xla_compile)
    x = torch.randn(4, 6, dtype=torch.float64)
    losses = [lambda y: y.sum(), lambda y: y.sum(0).pow(2).sum(), lambda y: (y * y).sum()]
    try:
        jax_backend.JaxExecutable._run_broadcasting = recording
        for loss in losses:
            model.zero_grad(), twin.zero_grad()
            loss(compiled(x)).backward()
            loss(twin(x)).backward()
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    finally:
        jax_backend.JaxExecutable._run_broadcasting = original
    assert [shapes[-1] for shapes in seen] == [(1, 1), (1, 5)]  # the full cotangent of (y * y).sum(): no broadcast


def test_xla_compile_partitions_for_fusion_unless_a_partition_is_named():
    """With ``xla_compile`` as the backward's compiler and no ``partition_fn``, the ``"fusion"`` min cut:
    a chain of ``cos`` hands the backward its input only (XLA recomputes the chain inside the backward's
    loop), where ``default_partition`` hands over each link's derivative; the same gradients, eager's.
    ``torch.compile``'s ``"xla"`` option leaves the choice to the compiler too."""
    from reftrace.torch_bridge.dynamo import BackendOptions

    def chain(x):
        for _ in range(4):
            x = x.cos()
        return x
    for partition, saved in ((None, 1), (default_partition, 4)):
        x = leaf(6)
        compiled = aot_function(chain, xla_compile, partition_fn=partition)
        compiled(x).sum().backward()
        assert next(iter(compiled.cache.values())).run.num_saved == saved
        y = leaf(6)
        chain(y).sum().backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)
    assert aot_function(chain, nop).partitioner is default_partition
    assert BackendOptions.parse({"compiler": "xla"}).partition is None


@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_a_compiled_function_inside_a_torch_func_transform_is_refused_and_the_transform_compiles(transform):
    """``torch.func.grad(compiled)``: the transform cannot see into the compiled function (torch failed
    with an internal assert, or an AttributeError): a TracingError says to compile the transformed function,
    ``aot_function(torch.func.grad(f))``, which gives the transform's values."""
    def f(x):
        return (x.sin() * x).sum()
    make = getattr(torch.func, transform)
    x = torch.randn(2, 3, dtype=torch.float64) if transform == "vmap" else torch.randn(3, dtype=torch.float64)
    with pytest.raises(rt.ReftraceError, match=r"inside a torch.func transform.*aot_function\(torch.func.grad"):
        make(aot_function(f, nop))(x)
    torch.testing.assert_close(aot_function(make(f), nop)(x), make(f)(x))


def test_xla_compile_warms_up_glibc_malloc_once():
    """After the XLA backend's first executable, an 8 MiB block comes from glibc's heap instead of a fresh
    mapping (the chunk header's IS_MMAPPED bit), so steps stop page-faulting their outputs in; with
    REFTRACE_MALLOC_WARM_UP=0 malloc is left as it was."""
    import platform
    if platform.libc_ver()[0] != "glibc" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("glibc's malloc only")
    program = (
        "import ctypes, numpy as np, reftrace as rt, reftrace.numpy as rnp\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]\n"
        "def mapped(size):\n"
        "    p = libc.malloc(size); bit = ctypes.c_size_t.from_address(p - 8).value & 2\n"
        "    libc.free(ctypes.c_void_p(p)); return bool(bit)\n"

        "rt.lower(rt.trace(rnp.sin, np.ones(3, np.float32)), 'jax')(np.ones(3, np.float32))\n"
        "print(mapped(8 << 20))\n")
    for setting, expected in (("1", "False"), ("0", "True")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["REFTRACE_MALLOC_WARM_UP"] = setting
        out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split("\n")[-2] == expected, (setting, out.stdout, out.stderr)


def test_aot_module_tensor_call_reuses_one_signature():
    """``aot_module``'s call of tensors only skips flattening its arguments; it compiles once, agrees
    with the general path (keyword arguments), and recompiles when a plain attribute changes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).double()
    compiled = aot_module(model, nop, nop)
    x = leaf(2, 4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled._compiled.cache) == 1
    torch.testing.assert_close(compiled(input=x), model(x))
    model[1].eps = 1e-2
    torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled._compiled.cache) == 3


def test_xla_compile_passes_inputs_it_returns_through_uncopied():
    """A forward that hands primals to the backward returns those very tensors (as ``nop`` does),
    not copies XLA would make on every call; the values and gradients stay eager's."""
    from reftrace.torch_bridge.compilers import xla_compile as xla
    seen = {}

    def spying_xla(gm, inputs):
        run = xla(gm, inputs)

        def call(*args):
            outs = run(*args)
            seen.setdefault("calls", []).append((args, outs))
            return outs
        return call

    w, x = leaf(4, 3), leaf(2, 4, seed=1)
    fn = aot_function(lambda w, x: torch.tanh(x @ w) * x.sum(), spying_xla, spying_xla)
    got, want = grads_of(fn, [w, x]), grads_of(lambda w, x: torch.tanh(x @ w) * x.sum(), [w, x])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    fw_args, fw_outs = seen["calls"][0]
    passed = [o for o in fw_outs if any(o is a for a in fw_args)]
    assert passed, "the backward reads a primal: the forward hands it over"


@pytest.mark.parametrize("compiler", COMPILERS)
def test_changing_an_output_the_backward_needs_is_refused_as_in_eager(compiler):
    """``exp``'s backward reads its output. Changed in place by the user, that output no longer holds
    what the backward needs: eager refuses the backward, and so must every compiler, whose forward
    hands the backward that very tensor (not a second tensor sharing its memory with its own
    version counter, which would let the backward read the changed values: gradients 2x eager's).
    A value returned twice comes back as one tensor, as in eager. (The partition is named: the
    ``"fusion"`` min cut, ``xla_compile``'s own, saves ``x`` and recomputes ``exp``, and then the change
    is harmless.)"""
    def f(x):
        y = x.exp()
        return y, torch.tanh(x) * 2, y

    x = leaf(4)
    y, t, again = aot_function(f, COMPILERS[compiler], partition_fn=default_partition)(x)
    assert again is y
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + t.sum()).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ey, et, _ = f(x)
        ey.mul_(2)
        (ey.sum() + et.sum()).backward()


def _views_and_copies(x, w):
    y = w * 2
    return x.t(), x[1], x.sum(-1), x, y, y.view(-1)


def _change_views_then_differentiate(fn):
    w, base = leaf(3, 4), leaf(3, 4, seed=1)
    x = base * 1  # not a leaf: its views may be changed in place
    outs = fn(x, w)
    t, row, _, same, y, flat = outs
    aliasing = (t._base is x, row._base is x, same is x, flat._base is y)
    t.mul_(2)  # changes x, and row with it
    flat.add_(1)  # changes y
    loss = (x * x).sum() + (row * 3).sum() + outs[2].sum() + (y * y).sum() + same.sum()
    return aliasing, [o.detach().clone() for o in (x, *outs)], torch.autograd.grad(loss, [w, base])


@pytest.mark.parametrize("compiler", COMPILERS)
def test_outputs_that_are_views_of_inputs_or_outputs_stay_views(compiler):
    """``x.t()``, ``x[1]``, ``x`` itself and ``y.view(-1)`` next to ``y`` are views in eager: changing one in
    place changes what it views. Every compiler returns them as views of the same tensors (a copy would
    leave ``x`` unchanged, silently), and values and gradients after the changes match eager's."""
    want_aliasing, want_values, want_grads = _change_views_then_differentiate(_views_and_copies)
    aliasing, values, grads = _change_views_then_differentiate(aot_function(_views_and_copies, COMPILERS[compiler]))
    assert aliasing == want_aliasing == (True, True, True, True)
    for a, b in zip(values + list(grads), want_values + list(want_grads), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the inference path too
        x = leaf(3, 4)
        t = aot_function(_views_and_copies, COMPILERS[compiler])(x, leaf(3, 4, seed=2))[0]
        t.zero_()
    assert not x.any()


def test_a_module_output_that_views_a_parameter_is_that_view():
    """``self.weight.t()`` comes back as a view of the parameter, with eager's gradient; changing a view
    of a leaf parameter in place is refused as in eager."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            return x @ self.weight, self.weight.t()

    model, x = Tied(), leaf(2, 4, requires_grad=False)
    out, wt = aot_module(model, xla_compile)(x)
    assert wt._base is model.weight
    (out.sum() + (wt * wt).sum()).backward()
    got = model.weight.grad.clone()
    model.weight.grad = None
    out, wt = model(x)
    (out.sum() + (wt * wt).sum()).backward()
    torch.testing.assert_close(got, model.weight.grad)
    with pytest.raises(RuntimeError, match="view of a leaf Variable that requires grad"):
        aot_module(model, xla_compile)(x)[1].mul_(2)


def _hooked_inside(x):
    h = x * 2
    h.register_hook(lambda g: g * 10)
    return (h * h).sum()


def _retains_inside(x):
    h = x * 2
    h.retain_grad()
    return (h * h).sum()


@pytest.mark.parametrize("fn, what", [(_hooked_inside, "registers a gradient hook"),
                                      (_retains_inside, "retain the gradient")])
def test_autograd_hooks_on_values_inside_are_refused_by_name(fn, what):
    """Eager runs a hook on an intermediate inside its backward (here scaling the gradient 10x);
    reftrace's backward is its own, so ignoring the hook would change gradients silently."""
    with pytest.raises(rt.TracingError, match=f"{what}.*test_compile.py.*torch.compile"):
        aot_function(fn, nop)(leaf(3))


def test_module_backward_hooks_are_refused_also_when_added_after_compiling():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    compiled = aot_module(model, nop)
    x = leaf(2, 3, dtype=torch.float32)
    compiled(x).sum().backward()
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 0,))
    with pytest.raises(rt.TracingError, match="Linear has a backward hook"):
        compiled(x)


@pytest.mark.parametrize("compiler", ["nop", "xla"])
def test_hooks_on_inputs_and_parameters_run_as_in_eager(compiler):
    """Registered outside the compiled function, on what autograd reaches through its backward."""
    def run(call_model, model):
        x = leaf(2, 3, dtype=torch.float32)
        x.register_hook(lambda g: g * 3)
        handle = model.weight.register_hook(lambda g: g.clamp(max=0.1))
        call_model(x).sum().backward()
        handle.remove()
        return x.grad, model.weight.grad

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    want = run(model, model)
    model.weight.grad = None
    got = run(aot_module(model, COMPILERS[compiler]), model)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


class _ClipsThroughData(torch.nn.Module):
    """Older code clips or rescales weights in ``forward`` through ``.data`` / ``.detach()``: autograd
    does not see the write, so ``weight`` stays a leaf whose later uses get the gradient."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        if self.how == "data":
            self.fc.weight.data.mul_(0.9)
        elif self.how == "detach":
            self.fc.weight.detach().clamp_(-0.3, 0.3)
        else:  # a view of the alias
            self.fc.weight.data[0].zero_()
        return torch.tanh(self.fc(x)).sum()


@pytest.mark.parametrize("compiler", ["nop", "xla"])
@pytest.mark.parametrize("how", ["data", "detach", "view of data"])
def test_writes_through_data_in_forward_train_as_in_eager(compiler, how):
    """Three SGD steps: weights and gradients match eager's (the gradient of ``fc.weight`` was None)."""
    torch.manual_seed(0)
    eager, model = _ClipsThroughData(how), _ClipsThroughData(how)
    model.load_state_dict(eager.state_dict())
    compiled = aot_module(model, COMPILERS[compiler])
    x = torch.randn(5, 4)
    for m, call in ((eager, eager), (model, compiled)):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            call(x).backward()
            opt.step()
    assert model.fc.weight.grad is not None
    for a, b in zip([*model.parameters(), model.fc.weight.grad], [*eager.parameters(), eager.fc.weight.grad]):
        torch.testing.assert_close(a, b)


class _WritesItsState(torch.nn.Module):
    """A forward that updates its own buffers by reassignment, as research code does."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("avg", torch.zeros(3))
        self.register_buffer("seen", torch.zeros(0, 3))  # grows: rebound to a new shape every call
        self.register_buffer("first", None)  # set by the first call

    def forward(self, x):
        self.count = self.count + 1
        self.avg = 0.9 * self.avg + 0.1 * x.mean(0)
        self.seen = torch.cat([self.seen, x[:1]])
        if self.first is None:
            self.first = x[0] * 1
        return (self.fc(x) * self.count).sum() + self.first.sum()


@pytest.mark.parametrize("compiler", ["nop", "xla"])
def test_buffers_a_forward_reassigns_are_updated_as_in_eager(compiler):
    """Reassigned in their shape, written back in place; in a new shape (or where it was None), rebound
    after the call. Three calls: buffers, losses and gradients match eager's (they were dropped)."""
    torch.manual_seed(0)
    eager, model = _WritesItsState(), _WritesItsState()
    model.load_state_dict(eager.state_dict())
    compiled = aot_module(model, COMPILERS[compiler])
    for step in range(3):
        x = torch.randn(4, 3) + step
        want, got = eager(x), compiled(x)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], b)
    torch.testing.assert_close(model.fc.weight.grad, eager.fc.weight.grad)
    assert model.seen.shape == (3, 3)


def test_a_tensor_kept_in_a_plain_attribute_is_there_after_each_call():
    """``self.weights = ...`` in forward (kept for a later look): after each compiled call the attribute
    holds that call's tensor, as in eager (it used to hold a tracing tensor from the capture). A graph
    alone cannot store it: ``rt.trace`` refuses by name."""
    class KeepsAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.weights = None

        def forward(self, x):
            self.weights = torch.softmax(self.fc(x), -1)
            return self.weights.sum()

    model = KeepsAttention()
    compiled = aot_module(model, xla_compile)
    for scale in (1.0, 3.0):
        x = torch.randn(2, 3) * scale
        compiled(x)
        got = model.weights
        model(x)
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, model.weights)
    with pytest.raises(rt.TracingError, match="the forward sets 'weights' .*aot_module"):
        rt.trace(model, torch.randn(2, 3))


class _TensorAttributes(torch.nn.Module):
    """Tensors kept in plain attributes, not registered: a scale and a mask."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.scale = torch.tensor(2.0)
        self.mask = torch.tril(torch.ones(3, 3))

    def forward(self, x):
        return ((self.fc(x) @ self.mask) / self.scale).sum()


@pytest.mark.parametrize("compiler", ["nop", "xla"])
def test_tensors_in_plain_attributes_are_read_again_after_a_change(compiler):
    """They are constants of the graph: changed in place or rebound after compiling, the next call captures
    again and reads the new values, as eager does (the graph kept the old ones). One that requires grad
    would get no gradient: refused by name."""
    torch.manual_seed(0)
    model = _TensorAttributes()
    compiled = aot_module(model, COMPILERS[compiler])
    x = torch.randn(4, 3)
    for change in (lambda m: None, lambda m: m.scale.fill_(4.0), lambda m: setattr(m, "mask", torch.eye(3))):
        change(model)
        got = compiled(x)
        got.backward()
        grad = model.fc.weight.grad
        model.fc.weight.grad = None
        want = model(x)
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, model.fc.weight.grad)
        model.fc.weight.grad = None
    model.gain = torch.ones(3, requires_grad=True)
    model.forward = lambda x: (model.fc(x) * model.gain).sum()
    with pytest.raises(rt.TracingError, match="require grad from its enclosing scope.*nn.Parameter"):
        aot_module(model, COMPILERS[compiler])(x)


def test_a_tensor_read_from_the_enclosing_scope_is_read_again_after_an_in_place_change():
    """It is a constant of the graph; written in place, the next call captures again with its new values."""
    scale = torch.tensor(3.0)
    compiled = aot_function(lambda x: x * scale, nop)
    x = leaf(2)
    torch.testing.assert_close(compiled(x), x * 3)
    scale.fill_(5.0)
    torch.testing.assert_close(compiled(x), x * 5)
    assert len(compiled.cache) == 1


_NORMED = {
    "weight_norm (hook)": lambda: torch.nn.utils.weight_norm(torch.nn.Linear(4, 3)),
    "spectral_norm (hook)": lambda: torch.nn.utils.spectral_norm(torch.nn.Linear(4, 3)),
    "weight_norm (parametrization)": lambda: torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 3)),
    "spectral_norm (parametrization)": lambda: torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(4, 3)),
}


@pytest.mark.parametrize("compiler", ["nop", "xla"])
@pytest.mark.parametrize("norm", _NORMED)
def test_weight_and_spectral_norm_train_as_in_eager(norm, compiler):
    """The hook-based forms recompute ``module.weight`` (a plain attribute) in a forward pre-hook and, for
    spectral norm, update ``u`` and ``v`` in place: three SGD steps match eager's parameters, buffers and
    ``module.weight`` (which was left holding a tracing tensor)."""
    torch.manual_seed(0)
    eager = _NORMED[norm]().double()
    torch.manual_seed(0)
    model = _NORMED[norm]().double()
    compiled = aot_module(model, COMPILERS[compiler])
    x = torch.randn(5, 4, dtype=torch.float64)
    for m, call in ((eager, eager), (model, compiled)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            call(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip([*model.parameters(), *model.buffers()], [*eager.parameters(), *eager.buffers()], strict=True):
        torch.testing.assert_close(a, b)
    if "hook" in norm:
        torch.testing.assert_close(model.weight, eager.weight)


def test_a_counter_bumped_in_forward_recaptures_every_call_and_says_so():
    """``self.steps += 1`` (a Python int the forward reads) is part of the guard: every call captures
    again, which keeps eager's values; at the 8th capture a RecaptureWarning names the attribute."""
    from reftrace.compile import RecaptureWarning

    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.steps = 0

        def forward(self, x):
            self.steps += 1
            return self.fc(x).sum() * (2.0 if self.steps % 2 else 1.0)

    torch.manual_seed(0)
    eager, model = Counts(), Counts()
    model.load_state_dict(eager.state_dict())
    compiled = aot_module(model, nop)
    x = torch.randn(2, 3)
    with pytest.warns(RecaptureWarning, match=r"captured and compiled 8 times.*steps: 6 -> 7"):
        for _ in range(8):
            torch.testing.assert_close(compiled(x), eager(x))
    assert model.steps == eager.steps == 8


_SPIN_PROBE = r"""
import os, threading, time, torch
from reftrace.compile import throttle_openmp_spinning

def others_cpu_ms_after_a_parallel_op():
    # CPU the process's other threads burn while this one sleeps right after a parallel torch op
    tick = os.sysconf("SC_CLK_TCK")
    def cpu():
        me, total = str(threading.get_native_id()), 0
        for tid in os.listdir("/proc/self/task"):
            if tid != me:
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / tick * 1e3
    x, before = torch.randn(256, 512), cpu()
    for _ in range(20):
        x.sum()
        time.sleep(0.03)
    return (cpu() - before) / 20

spinning = others_cpu_ms_after_a_parallel_op()
print(spinning, throttle_openmp_spinning(), others_cpu_ms_after_a_parallel_op())
"""


def test_throttled_openmp_workers_stop_spinning_after_a_torch_op():
    """Where torch's OpenMP workers spin after a parallel op (libgomp's default, more than one
    thread), ``throttle_openmp_spinning`` makes them sleep at once: the CPU the idle process burns
    after each op drops from milliseconds to almost none."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    spinning, throttled, after = out.stdout.split()
    if float(spinning) < 1.0:
        pytest.skip(f"torch's OpenMP workers do not spin here ({spinning} ms of CPU after an op)")
    assert throttled == "True"
    assert float(after) < 0.25 * float(spinning), (spinning, after)
