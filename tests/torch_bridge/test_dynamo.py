"""``torch.compile(..., backend="reftrace")``: Dynamo in front, reftrace's capture, VJP and compilers behind.

Every compiled result is compared with eager torch: values, gradients, module state after the call.
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from reftrace.errors import ArgumentError, DataDependentControlFlowError, ReftraceError
from reftrace.torch_bridge.dynamo import ReftraceGraph, reftrace_backend

TS_WARNINGS = [pytest.mark.filterwarnings("ignore::FutureWarning"),
               pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches per code object (and gives up after 8 recompiles): every test starts clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def graph_calls(monkeypatch):
    """Counts calls into reftrace's compiled graphs, so a silent fallback to eager cannot pass a test."""
    calls = []
    original = ReftraceGraph.__call__

    def counted(self, *args):
        calls.append(self)
        return original(self, *args)
    monkeypatch.setattr(ReftraceGraph, "__call__", counted)
    return calls


def run_in_fresh_process(code: str) -> str:
    """Run ``code`` in a new interpreter of this environment (nothing of reftrace imported beforehand)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# ----------------------------------------------------------------------------- by name, in a fresh process

def test_backend_is_found_by_name_without_importing_reftrace():
    out = run_in_fresh_process("""
        import sys
        import torch
        assert "reftrace" in torch._dynamo.list_backends(), "entry point missing: pip install -e ."
        f = torch.compile(lambda x: x.sin(), backend="reftrace")
        x = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
        y = f(x)
        y.sum().backward()
        torch.testing.assert_close(y, x.detach().sin(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x.detach().cos(), rtol=1e-12, atol=1e-12)
        assert "reftrace.torch_bridge.dynamo" in sys.modules  # loaded by Dynamo through the entry point

        from reftrace.errors import ArgumentError
        g = torch.compile(lambda x: x.cos(), backend="reftrace", options={"compiler": "inductor"})
        try:
            g(torch.ones(2))
        except ArgumentError as err:
            print(type(err).__name__, err)
    """)
    assert out.startswith("ArgumentError unknown reftrace compiler 'inductor'")


# ----------------------------------------------------------------------------- Python control flow

def branchy(x):
    if x.sum() > 0:
        return x.sin()
    else:
        return x.cos() * 2


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_data_dependent_branch_values_and_grads_equal_eager(sign, graph_calls):
    compiled = torch.compile(branchy, backend="reftrace")
    for seed in (0, 1):  # a second call with new values takes the cached graph
        x = sign * torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5 * sign
        x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_comp = branchy(x_eager), compiled(x_comp)
        (y_eager * torch.arange(6.0, dtype=x.dtype)).sum().backward()
        (y_comp * torch.arange(6.0, dtype=x.dtype)).sum().backward()
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-14, atol=1e-14)
    assert graph_calls


def test_both_branches_in_one_process():
    compiled = torch.compile(branchy, backend="reftrace")
    for x in (torch.ones(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)):
        torch.testing.assert_close(compiled(x), branchy(x), rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- HuggingFace BERT

def small_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=211, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


def bert_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return ids, mask


def bert_loss(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean()


BERT_OPTIONS = {
    "default": None,
    "xla": {"compiler": "xla"},
    "ts": pytest.param({"compiler": "ts"}, marks=TS_WARNINGS),
    "mincut": {"partition": "mincut"},
}


@pytest.mark.parametrize("options", BERT_OPTIONS.values(), ids=BERT_OPTIONS.keys())
def test_bert_loss_and_grads_equal_eager(options, graph_calls):
    eager = small_bert()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="reftrace", options=options)
    ids, mask = bert_inputs()
    loss_eager, loss = bert_loss(eager, ids, mask), bert_loss(compiled, ids, mask)
    loss_eager.backward()
    loss.backward()
    assert graph_calls
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for (name, p_eager), p in zip(eager.named_parameters(), model.parameters()):
        if p_eager.grad is None:
            continue  # the None-ness is checked by test_unreached_parameters_keep_grad_none
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_unreached_parameters_keep_grad_none():
    """The loss uses only last_hidden_state: eager leaves the pooler's .grad None, and so must reftrace."""
    eager = small_bert()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="reftrace")
    ids, mask = bert_inputs()
    bert_loss(eager, ids, mask).backward()
    bert_loss(compiled, ids, mask).backward()
    unreached = [n for n, p in eager.named_parameters() if p.grad is None]
    assert unreached  # the pooler
    assert [n for n, p in model.named_parameters() if p.grad is None] == unreached


def test_bert_three_adamw_steps_equal_eager(graph_calls):
    # float64: Adam divides by sqrt(v) + 1e-8, so in float32 a gradient entry near 1e-8 (rare embedding
    # rows) turns roundoff-sized differences into steps of a fraction of lr; that is Adam's
    # conditioning, not the compiler's, and would hide a real error behind a loose tolerance.
    eager = small_bert().double()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="reftrace")
    ids, mask = bert_inputs()

    def loss_of(m):  # reaches every parameter (pooler included): AdamW treats None and zero grads differently
        out = m(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.square().mean() + out.pooler_output.square().mean()

    for m, run in ((eager, eager), (model, compiled)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(3):
            opt.zero_grad()
            loss_of(run).backward()
            opt.step()
    assert len(graph_calls) == 3
    for (name, p_eager), p in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, p_eager, rtol=1e-10, atol=1e-10, msg=name)


# ----------------------------------------------------------------------------- module state

class NormedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 5)
        self.bn = torch.nn.BatchNorm1d(5)

    def forward(self, x):
        return torch.relu(self.bn(self.linear(x))) * 2


def test_batchnorm_training_outputs_grads_and_running_stats_equal_eager(graph_calls):
    torch.manual_seed(0)
    eager = NormedMLP().double().train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="reftrace")
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        y_eager, y = eager(x), compiled(x)
        torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
        y_eager.pow(2).sum().backward()
        y.pow(2).sum().backward()
        for (name, p_eager), p in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-12, atol=1e-12, msg=name)
        for (name, b_eager), b in zip(eager.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, b_eager, rtol=1e-12, atol=1e-12, msg=name)
    assert int(model.bn.num_batches_tracked) == 3
    eager.eval(), model.eval()  # Dynamo guards on the mode: eval reads the running statistics
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == 3


def test_input_mutation_is_written_back_as_in_eager():
    def accumulate(x, total):
        total.add_(x.detach() * 2)
        return x.exp()

    compiled = torch.compile(accumulate, backend="reftrace")
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    total_eager, total = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    accumulate(x, total_eager)
    compiled(x, total).sum().backward()
    torch.testing.assert_close(total, total_eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x.detach().exp(), rtol=1e-14, atol=1e-14)


def test_returning_a_mutated_input_returns_that_tensor():
    def bump(x):
        x.add_(1)
        return x, x * 2

    x = torch.zeros(3)
    y, doubled = torch.compile(bump, backend="reftrace")(x)
    assert y is x
    torch.testing.assert_close(x, torch.ones(3), rtol=0, atol=0)
    torch.testing.assert_close(doubled, torch.full((3,), 2.0), rtol=0, atol=0)


def test_returning_a_view_of_a_mutated_input_returns_a_view():
    """As eager (and aot_eager): the output is a view of x, taken after x's new value is written back."""
    def bump_tail(x):
        x.add_(1)
        return x[1:]

    x = torch.zeros(3)
    tail = torch.compile(bump_tail, backend="reftrace")(x)
    assert tail._base is x
    torch.testing.assert_close(tail, torch.ones(2), rtol=0, atol=0)
    tail.mul_(3)
    torch.testing.assert_close(x, torch.tensor([1.0, 3.0, 3.0]), rtol=0, atol=0)


def test_parameter_update_under_no_grad_inside_the_graph():
    def sgd_step(p):
        loss = (p * p).sum()
        with torch.no_grad():
            p.sub_(0.1)
        return loss

    p_eager, p = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    torch.testing.assert_close(torch.compile(sgd_step, backend="reftrace")(p), sgd_step(p_eager))
    torch.testing.assert_close(p, p_eager, rtol=0, atol=0)


# ----------------------------------------------------------------------------- grad mode

def test_inference_under_no_grad_and_without_inputs_requiring_grad():
    def fn(x, w):
        return torch.tanh(x @ w)

    compiled = torch.compile(fn, backend="reftrace")
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = compiled(x, w)
    assert not y.requires_grad
    torch.testing.assert_close(y, fn(x, w).detach(), rtol=1e-14, atol=1e-14)
    y = compiled(x, w.detach())  # grad mode on, nothing requires grad
    assert not y.requires_grad
    torch.testing.assert_close(y, fn(x, w.detach()), rtol=1e-14, atol=1e-14)
    y = compiled(x, w)  # and training afterwards (a recompile, not a stale inference graph)
    assert y.requires_grad


def test_no_grad_block_inside_the_function_stops_gradients_as_in_eager():
    def fn(x):
        with torch.no_grad():
            scale = x * 3
        return x.sin() * scale

    compiled = torch.compile(fn, backend="reftrace")
    x_eager = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = x_eager.detach().clone().requires_grad_()
    fn(x_eager).sum().backward()
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-14, atol=1e-14)


def test_enable_grad_inside_a_function_called_under_no_grad():
    def fn(x):
        with torch.enable_grad():
            z = x * 2
        return z, z.sin()

    compiled = torch.compile(fn, backend="reftrace")
    x = torch.linspace(0.1, 1, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z_eager, s_eager = fn(x)
        z, s = compiled(x)
        assert not torch.is_grad_enabled()
    assert (z.requires_grad, s.requires_grad) == (z_eager.requires_grad, s_eager.requires_grad) == (True, False)
    torch.testing.assert_close(torch.autograd.grad(z.sum(), x)[0], torch.full_like(x, 2.0), rtol=0, atol=0)


def test_graph_break_inside_no_grad_block():
    def fn(x):
        with torch.no_grad():
            y = x * 2
            torch._dynamo.graph_break()
            z = y * 3 + x
        return x * z

    compiled = torch.compile(fn, backend="reftrace")
    x_eager = torch.linspace(0.1, 1, 4, dtype=torch.float64, requires_grad=True)
    x = x_eager.detach().clone().requires_grad_()
    fn(x_eager).sum().backward()
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- higher-order ops

class RoundStraightThrough(torch.autograd.Function):
    """A custom backward that is not the forward's derivative (round's is zero)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


def with_custom_function(x):
    return (RoundStraightThrough.apply(x * 2) * x).sum()


def with_hook_on_intermediate(x):
    y = x.sin()
    y.register_hook(lambda g: g * 10)
    return (y * y.detach()).sum()


def with_checkpoint(x):
    def block(t):
        return RoundStraightThrough.apply(t.exp()) * t.cos()
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum() + x.sum()


@pytest.mark.parametrize("fn", [with_custom_function, with_hook_on_intermediate, with_checkpoint])
def test_custom_backwards_and_hooks_run_as_in_eager(fn, graph_calls):
    """Custom autograd.Function backwards and tensor hooks run eagerly between reftrace graphs."""
    x_eager = torch.linspace(0.1, 1.3, 5, dtype=torch.float64, requires_grad=True)
    x = x_eager.detach().clone().requires_grad_()
    y_eager, y = fn(x_eager), torch.compile(fn, backend="reftrace")(x)
    y_eager.backward()
    y.backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-14, atol=1e-14)
    assert graph_calls


@torch.compiler.nested_compile_region
def sin_cos_region(t):
    return t.sin().cos()


def checkpointed_sin_cos(x):
    return torch.utils.checkpoint.checkpoint(lambda t: t.sin().cos(), x, use_reentrant=False).sum()


def regional_sin_cos(x):
    return sin_cos_region(x).sum()


@pytest.mark.parametrize("fn", [checkpointed_sin_cos, regional_sin_cos])
def test_subgraph_calls_are_inlined_into_one_reftrace_graph(fn, graph_calls):
    x = torch.linspace(0.1, 1.3, 5, dtype=torch.float64, requires_grad=True)
    torch.compile(fn, backend="reftrace")(x).backward()
    torch.testing.assert_close(x.grad, -x.detach().sin().sin() * x.detach().cos(), rtol=1e-14, atol=1e-14)
    assert len(graph_calls) == 1 and graph_calls[0].gm.graph.find_nodes(op="get_attr") == []


# ----------------------------------------------------------------------------- shapes and recompiles

class ShapeReporter(torch.nn.Module):
    """Returns a size next to a tensor: with dynamic shapes Dynamo's graph outputs a SymInt."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x):
        return self.linear(x).relu() * x.shape[0], x.shape[0]


@pytest.mark.parametrize("dynamic", [None, False, True], ids=["automatic", "static", "dynamic"])
def test_new_values_and_new_shapes_are_never_stale(dynamic, graph_calls):
    torch.manual_seed(0)
    eager = ShapeReporter()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="reftrace", dynamic=dynamic)
    for n, seed in [(2, 0), (2, 1), (5, 2), (7, 3), (2, 4)]:
        x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        (y, size), (y_eager, size_eager) = compiled(x), eager(x)
        assert size == size_eager == n and type(size) is int
        torch.testing.assert_close(y, y_eager, rtol=1e-14, atol=1e-14)
        (grad,) = torch.autograd.grad(y.sum(), model.linear.weight)
        (grad_eager,) = torch.autograd.grad(y_eager.sum(), eager.linear.weight)
        torch.testing.assert_close(grad, grad_eager, rtol=1e-14, atol=1e-14)
    assert len(graph_calls) == 5


# ----------------------------------------------------------------------------- the backend called directly

def test_graph_modules_returning_lists_tuples_and_single_tensors():
    def fn(x, y):
        return [x * y, (x.exp(), y.sum())]

    for f, wrap in [(fn, lambda out: out), (lambda x, y: (x * y,), list), (lambda x, y: x - y, lambda o: [o])]:
        gm = torch.fx.symbolic_trace(f)
        x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        compiled = reftrace_backend(gm, [x, y])
        out, ref = compiled(x, y), f(x, y)
        assert type(out) is type(ref)
        torch.testing.assert_close(wrap(out), wrap(ref), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("partition", ["default", "mincut", lambda eqn: True])
def test_custom_compiler_sees_forward_and_backward(partition):
    seen = []

    def compiler(gm, example_inputs):
        seen.append(gm)
        return gm

    compiled = torch.compile(lambda x: x.sin().sin(), backend="reftrace",
                             options={"compiler": compiler, "partition": partition})
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    compiled(x).sum().backward()
    assert len(seen) == 2  # the forward and the backward, both compiled at the first call
    torch.testing.assert_close(x.grad, x.detach().sin().cos() * x.detach().cos(), rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- random operators

def test_dropout_backward_uses_the_forward_mask():
    compiled = torch.compile(lambda x: torch.nn.functional.dropout(x, 0.5, training=True), backend="reftrace")
    x = torch.ones(64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = compiled(x)
    y.sum().backward()
    assert set(y.detach().unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(x.grad, y.detach(), rtol=0, atol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)  # reproducible under torch.manual_seed


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    ({"options": {"compilr": "nop"}}, "unknown reftrace backend option(s) ['compilr']"),
    ({"options": {"compiler": "inductor"}}, "unknown reftrace compiler 'inductor'"),
    ({"options": {"compiler": 3}}, "options['compiler'] must be"),
    ({"options": {"partition": "fastest"}}, "unknown partition policy 'fastest'"),
    ({"options": {"decompositions": [1]}}, "options['decompositions'] must be a dict"),
    ({"mode": "max-autotune"}, "mode='max-autotune'"),
])
def test_bad_options_raise_argument_error_naming_the_cause(kwargs, message):
    compiled = torch.compile(lambda x: x.sin(), backend="reftrace", **kwargs)
    with pytest.raises(ArgumentError) as info:
        compiled(torch.ones(2))
    assert message in str(info.value)
    assert isinstance(info.value, ReftraceError)


def test_capture_errors_reach_the_caller_unwrapped():
    compiled = torch.compile(lambda x: torch.special.zeta(x, x), backend="reftrace")
    with pytest.raises(ReftraceError, match="aten::special_zeta has no reftrace mapping"):
        compiled(torch.rand(3) + 2)


def test_errors_name_the_users_line_not_the_generated_graph():
    def uses_zeta(x):
        y = x * 2
        return torch.special.zeta(y, y)  # the line the error names

    line = uses_zeta.__code__.co_firstlineno + 2
    with pytest.raises(ReftraceError, match=rf"test_dynamo.py:{line} in uses_zeta"):
        torch.compile(uses_zeta, backend="reftrace")(torch.rand(3) + 2)


def test_values_read_inside_a_graph_point_at_dynamo_config():
    compiled = torch.compile(lambda x: x * x.sum().item(), backend="reftrace")
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        with pytest.raises(DataDependentControlFlowError, match="capture_scalar_outputs back to False"):
            compiled(torch.ones(3))


def test_decompositions_option_reaches_the_capture():
    aten = torch.ops.aten
    compiled = torch.compile(lambda x: torch.special.zeta(x, x), backend="reftrace",
                             options={"decompositions": {aten.special_zeta.default: lambda x, y: x * 0 + 1}})
    torch.testing.assert_close(compiled(torch.rand(3) + 2), torch.ones(3))

