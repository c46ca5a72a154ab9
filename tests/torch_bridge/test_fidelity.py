"""Real-use fidelity: what eager torch does, reftrace.compile does too (issues found with real models).

Models come from configs with random weights. Training runs several AdamW steps with weight decay
(which turns a zero gradient where eager has None into a parameter change) against a deepcopy
trained eagerly, and checks that compiling never changes the module.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

import reftrace as rt
from reftrace.compile import aot_function, aot_module, draw_graph, nop, xla_compile
from reftrace.errors import ArgumentError, CompilerError, UnsupportedOperatorError

COMPILERS = {"nop": nop, "xla": xla_compile}


class Logits(torch.nn.Module):
    """A model returning ``.logits`` (or another field) of its output."""

    def __init__(self, model: torch.nn.Module, field: str = "logits") -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, *args, **kwargs):
        return getattr(self.model(*args, **kwargs), self.field)


def t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                               vocab_size=211, dropout_rate=0.0, decoder_start_token_id=0))


def bert_model() -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=101, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def gpt2(**config) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config))


def _projection_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss with gradients everywhere (a mean of squares after LayerNorm is constant)."""
    g = torch.Generator().manual_seed(7)
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()


def _train_adamw(model: torch.nn.Module, run, args, kwargs, loss_fn, steps: int = 3) -> list[str]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    none_grads = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(run(*args, **kwargs)).backward()
        none_grads = [n for n, p in model.named_parameters() if p.grad is None]
        opt.step()
    return none_grads


def _assert_trains_like_eager(make_model, args, kwargs, loss_fn, compiler, dtype=torch.float64):
    torch.manual_seed(0)
    model = make_model().to(dtype)
    eager = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    names_before = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    compiled = aot_module(model, compiler)
    got_none = _train_adamw(model, compiled, args, kwargs, loss_fn)
    want_none = _train_adamw(eager, eager, args, kwargs, loss_fn)
    assert got_none == want_none  # eager's None gradients stay None (weight decay would move zeros)
    assert [id(p) for p in model.parameters()] == params_before  # the module is never changed
    assert [n for n, _ in model.named_parameters(remove_duplicate=False)] == names_before
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    return model, compiled


@pytest.mark.parametrize("compiler", COMPILERS)
def test_t5_tied_weights_stay_tied_and_train_like_eager(compiler):
    ids = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(0, 211, (2, 5), generator=torch.Generator().manual_seed(2))
    model, _ = _assert_trains_like_eager(lambda: Logits(t5()), (), {"input_ids": ids, "decoder_input_ids": dec},
                                         _projection_loss, COMPILERS[compiler])
    t5_model = model.model
    assert t5_model.lm_head.weight is t5_model.shared.weight
    assert t5_model.encoder.embed_tokens.weight is t5_model.shared.weight
    assert t5_model.shared.weight.grad is not None


class _SharedSubmodule(torch.nn.Module):
    """One Linear reachable by three paths (``l``, ``seq.0``, ``seq.2``), another tied to it by weight."""

    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(4, 4)
        self.seq = torch.nn.Sequential(self.l, torch.nn.Tanh(), self.l)
        self.other = torch.nn.Linear(4, 4)
        self.other.weight = self.l.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x) + self.other(x).sin()


@pytest.mark.parametrize("compiler", COMPILERS)
def test_a_submodule_reachable_by_two_paths_keeps_its_parameters(compiler):
    """Capturing swaps the module's parameters for the capture's tensors and back. torch's
    ``functional_call`` swapped ``l.weight`` again through ``seq.0`` and restored what it had just put
    there: after the first call the user's module held FunctionalTensors, and its next eager call
    failed. Each place is now swapped once; the module keeps its Parameters and trains as eager."""
    x = torch.randn(3, 4, dtype=torch.float64)
    model, _ = _assert_trains_like_eager(_SharedSubmodule, (x,), {}, _projection_loss, COMPILERS[compiler])
    assert model.seq[0] is model.l and model.other.weight is model.l.weight
    assert all(type(p) is torch.nn.Parameter for _, p in model.named_parameters(remove_duplicate=False))
    model(x).sum().backward()  # eager still runs on it


@pytest.mark.parametrize("compiler", COMPILERS)
def test_unreached_parameters_keep_none_gradients(compiler):
    """BertModel's pooler runs, but a loss on last_hidden_state leaves its gradients None in eager."""
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(1))
    model, _ = _assert_trains_like_eager(lambda: Logits(bert_model(), "last_hidden_state"), (ids,), {},
                                         _projection_loss, COMPILERS[compiler])
    assert model.model.pooler.dense.weight.grad is None
    assert model.model.embeddings.word_embeddings.weight.grad is not None


def test_unreached_inputs_get_none_and_partly_reached_get_values():
    def fn(x, y, z):
        return x * 2, y.sin() + x, z.detach() * 3

    x, y, z = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a, b, c = aot_function(fn, nop)(x, y, z)
    assert not c.requires_grad  # a detached value carries no gradient, as in eager
    a.sum().backward(retain_graph=True)  # y is not reached from a
    assert y.grad is None and z.grad is None
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0, dtype=torch.float64))
    b.sum().backward()
    torch.testing.assert_close(y.grad, y.detach().cos())
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_gpt2_default_outputs_with_cache(compiler):
    """use_cache=True by default: the output holds a DynamicCache, rebuilt with compiled tensors."""
    torch.manual_seed(0)
    model = gpt2().double()
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    got = aot_module(model, COMPILERS[compiler])(input_ids=ids, labels=ids)
    want = eager(input_ids=ids, labels=ids)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    assert type(got.past_key_values) is type(want.past_key_values)
    assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length() == 8
    for lg, lw in zip(got.past_key_values.layers, want.past_key_values.layers, strict=True):
        assert type(lg) is type(lw) and lg.is_initialized == lw.is_initialized
        torch.testing.assert_close(lg.keys, lw.keys)
        torch.testing.assert_close(lg.values, lw.values)
    torch.testing.assert_close(got.loss, want.loss)
    got.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_t5_encoder_decoder_cache_output():
    from transformers.cache_utils import EncoderDecoderCache
    torch.manual_seed(0)
    model = t5()
    ids = torch.randint(0, 211, (2, 7))
    got = aot_module(model, nop)(input_ids=ids, labels=ids)
    want = model(input_ids=ids, labels=ids)
    assert isinstance(got.past_key_values, EncoderDecoderCache)
    assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length()
    torch.testing.assert_close(got.loss, want.loss)


def test_outputs_in_objects_dataclasses_and_namedtuples():
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Out:
        value: torch.Tensor
        extra: dict
        label: str = "x"

    class Holder:
        def __init__(self, t):
            self.t = t
            self.me = self  # a cycle is kept

    def fn(x):
        return Out(x.sin(), {"pair": Pair(x * 2, None), "holder": Holder(x.exp())}, "y"), None

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    got, none = aot_function(fn, nop)(x)
    want, _ = fn(x)
    assert none is None and isinstance(got, Out) and got.label == "y"
    assert isinstance(got.extra["pair"], Pair) and got.extra["pair"].b is None
    holder = got.extra["holder"]
    assert isinstance(holder, Holder) and holder.me is holder
    torch.testing.assert_close(holder.t, want.extra["holder"].t)
    (got.value.sum() + got.extra["pair"].a.sum() + holder.t.sum()).backward()
    torch.testing.assert_close(x.grad, x.detach().cos() + 2 + x.detach().exp())


def test_static_values_and_tensors_in_sets():
    x = torch.randn(3)
    assert aot_function(lambda x: (x * 2, x.shape[0], "tag"), nop)(x)[1:] == (3, "tag")
    with pytest.raises(rt.TracingError, match="set"):
        aot_function(lambda x: {x * 2}, nop)(x)
    with pytest.raises(rt.TracingError, match="returns a str"):
        rt.trace(lambda x: (x * 2, "hello"), x)


def test_tensors_inside_argument_objects_are_refused():
    class Box:
        def __init__(self, t):
            self.t = t
    with pytest.raises(ArgumentError, match="Box holding tensors"):
        aot_function(lambda x, box: x + box.t, nop)(torch.ones(2), Box(torch.ones(2)))


@pytest.mark.parametrize("make", [lambda x: x.cdouble(), lambda x: torch.view_as_complex(x.reshape(-1, 2)).real,
                                  lambda x: torch.fft.fft(x).abs()])
def test_real_to_complex_and_back_keeps_the_gradient(make):
    """Complex intermediates carry gradients back to real inputs (once refused, never detached)."""
    x = torch.randn(4, requires_grad=True)
    xc = x.detach().clone().requires_grad_()
    expected, got = make(x), aot_function(make, nop)(xc)
    torch.testing.assert_close(got, expected)
    ct = torch.randn_like(expected)
    expected.backward(ct)
    got.backward(ct)
    torch.testing.assert_close(xc.grad, x.grad)


# ----------------------------------------------------------------------------- edge semantics

def test_aliased_inputs_mutated_in_place():
    def f(a, b):
        a.mul_(2)
        return a + b

    for _ in range(2):  # the second call reuses the aliased variant
        y, y_eager = torch.ones(3), torch.ones(3)
        torch.testing.assert_close(aot_function(f, nop)(y, y), f(y_eager, y_eager))
        torch.testing.assert_close(y, y_eager)
    compiled = aot_function(f, nop)
    a, b = torch.ones(3), torch.ones(3)
    torch.testing.assert_close(compiled(a, b), torch.full((3,), 3.0))  # not aliased: its own graph
    y = torch.ones(3)
    torch.testing.assert_close(compiled(y, y), torch.full((3,), 4.0))


def test_overlapping_views_mutated_in_place():
    def g(a, b):
        a.add_(1)
        return b * 1

    base, base_eager = torch.arange(6.0), torch.arange(6.0)
    compiled = aot_function(g, nop)
    torch.testing.assert_close(compiled(base[:2], base), g(base_eager[:2], base_eager))
    torch.testing.assert_close(base, base_eager)
    m, m_eager = torch.arange(12.0).reshape(3, 4), torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(compiled(m[:, 1], m.t()), g(m_eager[:, 1], m_eager.t()))
    torch.testing.assert_close(m, m_eager)
    # disjoint slices of one storage are independent: no aliasing variant is needed
    d = torch.arange(6.0)
    torch.testing.assert_close(compiled(d[:3], d[3:]), torch.tensor([3.0, 4.0, 5.0]))


def test_mutated_input_keeps_its_gradient_history():
    def h(a):
        a.mul_(2)
        return a.sum()

    def k(x, buf):
        buf.add_(x)
        return x * 2

    x, x_eager = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        x_eager.copy_(x)
    a, a_eager = x * 1, x_eager * 1
    s, s_eager = aot_function(h, nop)(a), h(a_eager)
    (a.sum() + s).backward()
    (a_eager.sum() + s_eager).backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    buf, buf_eager = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    out, out_eager = aot_function(k, nop)(x, buf), k(x_eager, buf_eager)
    assert buf.requires_grad == buf_eager.requires_grad is True
    x.grad = x_eager.grad = None
    (out.sum() + (buf * 3).sum()).backward()
    (out_eager.sum() + (buf_eager * 3).sum()).backward()
    torch.testing.assert_close(x.grad, x_eager.grad)


def test_batchnorm_buffers_do_not_require_grad():
    bn = torch.nn.BatchNorm1d(3).train()
    out = aot_module(bn, nop)(torch.randn(4, 3, requires_grad=True))
    assert out.requires_grad and not bn.running_mean.requires_grad and not bn.running_var.requires_grad


def test_device_moves_are_refused():
    x = torch.randn(3)
    target = "meta" if torch.cuda.is_available() else "cuda"
    with pytest.raises(UnsupportedOperatorError, match="device"):
        aot_function(lambda x, d: x.to(d) * 2, nop)(x, target)
    torch.testing.assert_close(aot_function(lambda x: x.to("cpu") * 2, nop)(x), x * 2)


def test_module_attributes_changed_after_compiling_recompile():
    ln = torch.nn.LayerNorm(4)
    compiled = aot_module(ln, nop)
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), ln(x))
    ln.eps = 10.0
    torch.testing.assert_close(compiled(x), ln(x))

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.scale = 2.0

        def forward(self, x):
            return self.lin(x) * self.scale

    m = Scaled()
    compiled = aot_module(m, nop)
    torch.testing.assert_close(compiled(x), m(x))
    m.scale = 5.0
    torch.testing.assert_close(compiled(x), m(x))
    m.lin = torch.nn.Linear(4, 4)  # a replaced submodule: its new parameters are read
    torch.testing.assert_close(compiled(x), m(x))
    m.act = torch.nn.Identity()
    m.train(False)
    torch.testing.assert_close(compiled(x), m(x))


def test_hooks_and_submodules_changed_after_compiling_recompile():
    """A forward hook, a swapped activation (no attributes of its own to tell it by), a ``forward`` set on
    an instance and a global module hook, each after the first call: eager runs them, so the next call
    captures again."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    compiled = aot_module(m, nop)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), m(x))
    handle = m[1].register_forward_hook(lambda mod, args, out: out * 3)
    torch.testing.assert_close(compiled(x), m(x))
    handle.remove()
    m[1].register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    torch.testing.assert_close(compiled(x), m(x))
    m[1] = torch.nn.Sigmoid()
    torch.testing.assert_close(compiled(x), m(x))
    m[2].forward = lambda t: t.sum(-1)
    torch.testing.assert_close(compiled(x), m(x))
    calls = []  # a global hook runs for the compiled wrapper too (a module): this one only counts calls
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, args: calls.append(mod))
    try:
        torch.testing.assert_close(compiled(x), m(x))
        assert m[1] in calls[:5]  # the new capture ran it on the submodules
    finally:
        handle.remove()
    torch.testing.assert_close(compiled(x), m(x))


def test_a_removed_hook_is_not_kept_alive_and_an_unhashable_one_is_guarded():
    """The guard remembers structures by weak reference: a feature-capturing hook's closure (and what it
    stored) is freed once the hook is removed. A hook whose class defines ``__eq__`` (so no hash) works."""
    import gc
    import weakref

    class Store:
        def __init__(self):
            self.outputs = []

        def __call__(self, module, args, out):
            self.outputs.append(tuple(out.shape))  # not the tensor: a capture refuses a tensor kept outside

        def __eq__(self, other):  # unhashable, as a dataclass
            return self is other
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    compiled = aot_module(m, nop)
    x = torch.randn(2, 4)
    compiled(x)
    store = Store()
    handle = m[1].register_forward_hook(store)
    compiled(x)
    assert len(store.outputs) >= 1  # ran while capturing
    handle.remove()
    torch.testing.assert_close(compiled(x), m(x))
    alive = weakref.ref(store)
    del store, handle
    gc.collect()
    assert alive() is None


def test_a_parameter_replaced_by_one_of_its_shape_is_read_without_a_new_capture():
    m = torch.nn.Linear(3, 2)
    compiled = aot_module(m, nop)
    x = torch.randn(4, 3)
    compiled(x)
    m.weight = torch.nn.Parameter(torch.randn(2, 3))
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, m(x))
    assert m.weight.grad is not None and compiled._compiled.captures == 1


def test_an_embedding_with_max_norm_renormalises_its_rows_as_eager():
    """``max_norm`` rescales, in place and under no_grad, each looked-up row whose norm exceeds it (a row
    named twice once): the table after each step, the outputs and the gradients are eager's. The rows
    above the limit are scaled by a float64 ``max_norm / (norm + 1e-7)`` rounded to the table's dtype."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for norm_type in (1.0, 2.0, 3.0, float("inf")):
            eager = torch.nn.Embedding(30, 6, max_norm=1.3, norm_type=norm_type).to(dtype)
            with torch.no_grad():
                eager.weight[3] *= 0.01  # a named row under the limit stays as it is
            mine = copy.deepcopy(eager)
            compiled = aot_module(mine, nop)
            for _ in range(3):
                idx = torch.randint(0, 30, (4, 5))
                idx[0, :3] = 3
                out_e, out_r = eager(idx), compiled(idx)
                (out_e.float() ** 2).sum().backward()
                (out_r.float() ** 2).sum().backward()
                # eager's bits: the norms are torch's kernel (reftrace.nn.vector_norm)
                assert torch.equal(out_r, out_e)
                assert torch.equal(mine.weight, eager.weight)
                assert torch.equal(mine.weight.grad, eager.weight.grad)
                with torch.no_grad():
                    for m in (eager, mine):
                        m.weight -= 0.1 * m.weight.grad
                        m.weight.grad = None


class _SparseTables(torch.nn.Module):
    """An Embedding and an EmbeddingBag with sparse gradients, and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(12, 4, sparse=True, padding_idx=2)
        self.bags = torch.nn.EmbeddingBag(9, 4, mode="sum", sparse=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, bag_ids: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.words(ids).mean(1) + self.bags(bag_ids, offsets, per_sample_weights=weights)))


@pytest.mark.parametrize("compiler", COMPILERS)
def test_sparse_embedding_tables_get_sparse_gradients_and_train_with_sparse_adam_as_eager(compiler):
    """``sparse=True`` tables get a sparse gradient of the looked-up rows (the padding row left out), so
    ``SparseAdam`` trains them; it refuses a dense one. Before, reftrace's gradients came back dense."""
    torch.manual_seed(0)
    eager = _SparseTables().double()
    mine = copy.deepcopy(eager)
    compiled = aot_module(mine, COMPILERS[compiler])
    optimizers = {}
    for m in (eager, mine):
        tables = [m.words.weight, m.bags.weight]
        optimizers[m] = (torch.optim.SparseAdam(tables, lr=0.05), torch.optim.Adam(m.head.parameters(), lr=0.05))
    for step in range(4):
        ids = (torch.tensor([[1, 2, 1, 7], [4, 4, 2, 9], [0, 2, 11, 3]]) + step) % 12   # row 2 is padding
        bag_ids, offsets = (torch.tensor([1, 2, 4, 5, 4, 3, 8]) + step) % 9, torch.tensor([0, 3, 3])
        weights = torch.rand(7, dtype=torch.float64)
        for m, fn in ((eager, eager), (mine, compiled)):
            for opt in optimizers[m]:
                opt.zero_grad()
            (fn(ids, bag_ids, offsets, weights) ** 2).sum().backward()
            for opt in optimizers[m]:
                opt.step()
        for table in ("words", "bags"):
            want, got = getattr(eager, table).weight.grad, getattr(mine, table).weight.grad
            assert got.is_sparse
            got, want = got.coalesce(), want.coalesce()
            assert torch.equal(got.indices(), want.indices())
            torch.testing.assert_close(got.values(), want.values(), rtol=1e-12, atol=1e-12)
        for name, p in eager.named_parameters():
            torch.testing.assert_close(dict(mine.named_parameters())[name], p, rtol=1e-12, atol=1e-12)


def test_a_sparse_table_read_otherwise_too_or_with_computed_indices_gets_a_dense_gradient():
    """Tied to a dense layer, eager sums a dense gradient in: dense in both. Looked up with a view of the
    argument, sparse. Looked up with indices the function computes, the bridge cannot name the rows
    after the backward: dense, and it says so."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True).double()
    tied = lambda w, ids: torch.nn.functional.embedding(ids, w, sparse=True) @ w[:3].t()  # noqa: E731
    ids = torch.tensor([[1, 2], [2, 5]])
    w_eager = table.weight.detach().clone().requires_grad_()
    w_mine = table.weight.detach().clone().requires_grad_()
    tied(w_eager, ids).sum().backward()
    aot_function(tied, nop)(w_mine, ids).sum().backward()
    assert not w_eager.grad.is_sparse and not w_mine.grad.is_sparse
    torch.testing.assert_close(w_mine.grad, w_eager.grad, rtol=1e-12, atol=1e-12)

    viewed = lambda w, ids: torch.nn.functional.embedding(ids.view(-1).int(), w, sparse=True) * 2  # noqa: E731
    w_mine.grad = w_eager.grad = None
    viewed(w_eager, ids).sum().backward()
    aot_function(viewed, nop)(w_mine, ids).sum().backward()   # a view and a cast of the argument name its rows
    assert w_mine.grad.is_sparse
    torch.testing.assert_close(w_mine.grad.to_dense(), w_eager.grad.to_dense(), rtol=0, atol=0)

    shifted = lambda w, ids: torch.nn.functional.embedding(ids + 1, w, sparse=True)  # noqa: E731
    w_mine.grad = None
    with pytest.warns(rt.torch_bridge.sparse_gradients.SparseGradientWarning, match="computed inside"):
        out = aot_function(shifted, nop)(w_mine, ids)
    out.sum().backward()
    w_eager.grad = None
    shifted(w_eager, ids).sum().backward()
    torch.testing.assert_close(w_mine.grad, w_eager.grad.to_dense(), rtol=0, atol=0)

    renormed = torch.nn.Embedding(10, 3, sparse=True, max_norm=1.0).double()  # written in place, then looked up
    with pytest.warns(rt.torch_bridge.sparse_gradients.SparseGradientWarning, match="max_norm"):
        aot_module(renormed, nop)(ids).sum().backward()
    assert not renormed.weight.grad.is_sparse


def test_a_deep_copy_of_a_compiled_module_compiles_its_own_module():
    """``copy.deepcopy`` (``AveragedModel`` makes one) gives a compiled module of the copied module. It had
    shared the compiled function, which traces its module: the copy ran the original's code and
    attributes (a BatchNorm momentum changed on the copy was ignored, without a word)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 1)).double()
    mine = copy.deepcopy(eager)
    compiled = aot_module(mine, nop)
    averages = [AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9)) for m in (eager, compiled)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, mine)]
    for _ in range(3):
        x = torch.randn(16, 4, dtype=torch.float64)
        for fn, opt, average in zip((eager, compiled), optimizers, averages):
            opt.zero_grad()
            fn(x).pow(2).mean().backward()
            opt.step()
            average.update_parameters(fn)
    twin = copy.deepcopy(compiled)
    assert isinstance(twin, type(compiled)) and twin.orig_module is not mine
    for average in averages + [(eager_twin := copy.deepcopy(eager))]:
        bn = (average.module if isinstance(average, AveragedModel) else average)
        bn = getattr(bn, "orig_module", bn)[1]
        bn.momentum = 0.5
    twin.orig_module[1].momentum = 0.5
    x = torch.randn(16, 4, dtype=torch.float64)
    for fn in (*averages, eager_twin, twin):
        fn(x)
    want, got = averages[0].module, averages[1].module.orig_module
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    for (name, a), b in zip(eager_twin.state_dict().items(), twin.orig_module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    assert mine[1].momentum == 0.1
    mine[1].eval()  # a submodule in eval mode inside a training model stays so in the copy
    assert compiled.training and not copy.deepcopy(compiled).orig_module[1].training


def test_a_compiled_module_saved_whole_loads_as_a_compiled_module_of_its_copy():
    """``torch.save(compiled)`` (the whole module, not its state dict) pickles the module and how to compile
    it; it had failed on the compiled function's closures. The loaded one trains as the original."""
    import io
    torch.manual_seed(0)
    mine = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh()).double()
    compiled = aot_module(mine, xla_compile)
    x = torch.randn(16, 4, dtype=torch.float64)
    compiled(x)
    buffer = io.BytesIO()
    torch.save(compiled, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(compiled) and loaded.orig_module is not mine
    for fn in (compiled, loaded):
        fn(x).pow(2).sum().backward()
    for (name, a), b in zip(mine.state_dict().items(), loaded.orig_module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for (name, p), q in zip(mine.named_parameters(), loaded.orig_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_the_default_dtype_is_guarded():
    """``torch.tensor(0.1)`` inside makes a tensor of the default dtype; after ``set_default_dtype`` a
    stale graph returned float32 where eager promotes to float64."""
    f = lambda x: x.sum() + torch.tensor(0.1) + torch.arange(3) * 0.5  # noqa: E731
    compiled = aot_function(f, nop)
    x = torch.randn(3)
    before = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.float64, torch.float32):
            torch.set_default_dtype(dtype)
            out, expected = compiled(x), f(x)
            assert out.dtype == expected.dtype
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    finally:
        torch.set_default_dtype(before)


def _gradient_of_saved_outputs(x, w):
    z = x @ w
    loss = (torch.tanh(z).sum() + torch.exp(-z * z).sum() + torch.sigmoid(z).log().sum() + z.softmax(-1).pow(2).sum()
            + torch.nn.functional.layer_norm(z, (5,)).pow(3).sum())
    g, = torch.autograd.grad(loss, x, create_graph=True)
    return g.pow(2).sum(1)


def _detached_and_saved(x, w):
    y = torch.exp(x @ w)
    z = y.detach() * 2  # detached by the user, then used: no gradient through it, in the backward too
    g, = torch.autograd.grad((z * y).sum() + torch.sigmoid(y.detach() + x.sum(1, keepdim=True)).sum(), x,
                             create_graph=True)
    return g * 3


def _hessian_vector(x, w):
    g, = torch.autograd.grad(torch.tanh(x @ w).pow(2).sum(), w, create_graph=True)
    h, = torch.autograd.grad((g * torch.ones_like(g)).sum(), w, create_graph=True)
    return h


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("fn", [_gradient_of_saved_outputs, _detached_and_saved, _hessian_vector])
def test_autograd_grad_with_create_graph_inside_differentiates_saved_outputs(fn, compiler):
    """``exp``, ``tanh``, ``sigmoid``, softmax and layer norm save their outputs; autograd unpacks them with
    a ``detach`` reftrace took for the user's, so the gradient of a gradient taken inside the function
    missed every path through a saved output."""
    torch.manual_seed(0)
    x0, w0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    xe, we = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    expected, out = fn(xe, we), aot_function(fn, COMPILERS[compiler])(xr, wr)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    expected.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(wr.grad, we.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-10, atol=1e-12)


class _HeatPINN(torch.nn.Module):
    """A physics-informed network: the loss is the residual of ``u_t = 0.1 u_xx``, from ``autograd.grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                       torch.nn.Softplus(), torch.nn.Linear(16, 1))

    def forward(self, xt):
        u = self.net(xt)
        du, = torch.autograd.grad(u.sum(), xt, create_graph=True)
        uxx, = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)
        return ((du[:, 1] - 0.1 * uxx[:, 0]) ** 2).mean() + (u ** 2).mean()


@pytest.mark.parametrize("compiler", COMPILERS)
def test_a_physics_informed_network_trains_as_eager(compiler):
    """Four Adam steps; before, the parameters were 0.03 apart after them."""
    torch.manual_seed(0)
    eager = _HeatPINN().double()
    mine = copy.deepcopy(eager)
    compiled = aot_module(mine, COMPILERS[compiler])
    opt_e, opt_r = torch.optim.Adam(eager.parameters(), 1e-2), torch.optim.Adam(mine.parameters(), 1e-2)
    for _ in range(4):
        xt = torch.rand(32, 2, dtype=torch.float64)
        loss_e, loss_r = eager(xt.clone().requires_grad_()), compiled(xt.clone().requires_grad_())
        torch.testing.assert_close(loss_r, loss_e, rtol=1e-12, atol=1e-14)
        loss_e.backward()
        loss_r.backward()
        for opt in (opt_e, opt_r):
            opt.step()
            opt.zero_grad()
    for p, q in zip(eager.parameters(), mine.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_calls_under_inference_mode_run_through_xla():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    compiled = aot_module(m, xla_compile)
    x = torch.randn(5, 3)
    compiled(x).sum().backward()
    m.eval()
    with torch.inference_mode():
        out = compiled(x)
        torch.testing.assert_close(out, m(x))
    assert out.is_inference()


def test_none_outputs_are_returned():
    x = torch.randn(3, requires_grad=True)
    out, none = aot_function(lambda x: (x * 2, None), nop)(x)
    assert none is None
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_draw_graph_with_matmuls_and_einsums(tmp_path):
    os.chdir(tmp_path)
    seen = []

    def drawer(name):
        def compiler(gm, _):
            seen.append(gm.code)
            draw_graph(gm, name)
            return gm
        return compiler

    lin = torch.nn.Linear(4, 3).requires_grad_(False)  # a constant of the graph (one requiring grad is refused)
    fn = aot_function(lambda x, w: (torch.einsum("abc,cd->abd", x, w).relu().sum() + lin(x.sum(0)).sum()),
                      drawer("fw"), drawer("bw"))
    fn(torch.randn(2, 3, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True)).backward()
    assert any("matmul" in code for code in seen)
    for name in ("fw.svg", "bw.svg"):
        assert (tmp_path / name).read_text().lstrip().startswith(("<?xml", "<svg"))
    # an FX graph whose arguments hold graphviz's record syntax ("->")
    einsum = torch.fx.symbolic_trace(lambda x, y: torch.einsum("ab,bc->ac", x, y))
    draw_graph(einsum, "einsum")
    assert "ab,bc" in (tmp_path / "einsum.svg").read_text()
    g = rt.trace(lambda x: torch.einsum("abc,cd->abd", x, x[0]).sum(), torch.randn(2, 4, 4))
    draw_graph(rt.vjp(g), "joint")
    assert (tmp_path / "joint.svg").stat().st_size > 0


def test_torch_partitioners_as_partition_fn():
    from functorch.compile import default_partition, min_cut_rematerialization_partition

    def fn(x):
        return (x.sin() ** 3 * x.unsqueeze(0).expand(2, 5)).sum()

    for partition in (default_partition, min_cut_rematerialization_partition):
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        out = aot_function(fn, nop, partition_fn=partition)(x)
        out.backward()
        fn(x_eager).backward()
        torch.testing.assert_close(out, fn(x_eager))
        torch.testing.assert_close(x.grad, x_eager.grad)


def test_compiler_contract_errors():
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(CompilerError, match="returned NoneType"):
        aot_function(lambda x: x * 2, lambda gm, ex: None)(x)
    with pytest.raises(ArgumentError, match="fw_compiler"):
        aot_function(lambda x: x * 2, None)
    with pytest.raises(ArgumentError, match="nn.Module"):
        aot_module(lambda x: x, nop)


def test_custom_autograd_function_backward_ignored_is_said():
    from reftrace.torch_bridge.capture import CustomBackwardIgnoredWarning

    class RoundSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.round()

        @staticmethod
        def backward(ctx, grad):
            return grad

    with pytest.warns(CustomBackwardIgnoredWarning, match="RoundSTE"):
        aot_function(lambda x: RoundSTE.apply(x) * 3, nop)(torch.randn(3, requires_grad=True))


def test_view_of_a_parameter_updated_under_no_grad_inside_the_function():
    def step(p):
        loss = (p * p).sum()
        with torch.no_grad():
            p[:2].sub_(0.5)
        return loss

    for view in (lambda t: t, lambda t: t[:]):  # the leaf itself, and a view of it as the argument
        p, p_eager = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
        torch.testing.assert_close(aot_function(step, nop)(view(p)), step(view(p_eager)))
        torch.testing.assert_close(p, p_eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_gradient_stays_finite_on_the_linear_branch(dtype):
    """softplus(x) = x above the threshold; the soft branch's exp must not overflow there, or its
    inf / inf gradient leaks through the select as 0 * nan (found by reftrace.testing: a float32
    program with softplus of a value near 100)."""
    x = torch.tensor([100.0, 1000.0, -100.0, 0.5, 25.0], dtype=dtype)
    x_eager = x.clone().requires_grad_()
    torch.nn.functional.softplus(x_eager).sum().backward()
    x_compiled = x.clone().requires_grad_()
    aot_function(torch.nn.functional.softplus, nop)(x_compiled).sum().backward()
    assert torch.isfinite(x_compiled.grad).all()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


@pytest.mark.parametrize("compiler", [nop, xla_compile])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_padding_row_gets_no_gradient(compiler, scale_grad_by_freq):
    """nn.Embedding(padding_idx=...): occurrences of the padding index contribute nothing to the
    table's gradient (BERT's word embeddings pad with 0), and scale_grad_by_freq divides by counts."""
    torch.manual_seed(0)
    eager = torch.nn.Embedding(6, 3, padding_idx=0, scale_grad_by_freq=scale_grad_by_freq).double()
    compiled_module = copy.deepcopy(eager)
    compiled = aot_module(compiled_module, compiler, compiler)
    ids = torch.tensor([[0, 1, 0, 2], [2, 2, 5, 0]])
    ct = torch.randn(2, 4, 3, dtype=torch.float64)
    compiled(ids).backward(ct)
    eager(ids).backward(ct)
    assert compiled_module.weight.grad[0].abs().sum() == 0
    torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, rtol=1e-12, atol=1e-12)


def test_linear_weight_gradients_are_laid_out_like_eager():
    """The compiled backward returns a Linear weight's gradient contiguous, as eager's mm writes it: a
    transposed view would make AccumulateGrad copy it into the parameter's layout on every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    returned = []

    def recording(gm, _):
        def run(*args):
            outs = gm(*args)
            returned.extend(outs)
            return outs
        return run
    compiled = aot_module(model, nop, recording)
    compiled(torch.randn(5, 8)).sum().backward()
    weights = [g for g in returned if g.ndim == 2]
    assert len(weights) == 2 and all(g.is_contiguous() for g in weights), [g.stride() for g in weights]


@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
@pytest.mark.parametrize("var_shape, full, reduction", [((4, 3), False, "mean"), ((4,), True, "sum"),
                                                        ((4, 1), False, "none")])
def test_gaussian_nll_loss_with_a_variance_tensor(compiler, var_shape, full, reduction):
    """torch checks ``torch.any(var < 0)`` in Python; the capture computes the same loss and gradients
    (the clamp stays out of the gradient, as torch's no_grad clamp keeps it), including variances
    below ``eps``, and returns NaN where torch would raise on a negative variance."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    var = torch.rand(var_shape, dtype=torch.float64) + 0.1
    var.view(-1)[0] = 1e-9  # clamped to eps in the value, not in the gradient

    def loss(x, var):
        return torch.nn.functional.gaussian_nll_loss(x, y, var, full=full, reduction=reduction)
    compiled = aot_function(loss, compiler, compiler)
    inputs = [t.clone().requires_grad_() for t in (x, var)]
    eager_inputs = [t.clone().requires_grad_() for t in (x, var)]
    out, expected = compiled(*inputs), loss(*eager_inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    ct = torch.randn_like(expected)
    grads = torch.autograd.grad(out, inputs, ct)
    eager_grads = torch.autograd.grad(expected, eager_inputs, ct)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)

    negative = var.clone()
    negative.view(-1)[-1] = -1.0
    with pytest.raises(ValueError, match="negative"):
        loss(x, negative)
    assert torch.isnan(compiled(x, negative)).any()


_F = torch.nn.functional
REDUCED_PRECISION = {
    # torch multiplies or divides a float16/bfloat16 tensor by a Python number in float32, unrounded
    "mul by a number": lambda x: x * 1.3, "number times": lambda x: 0.37 * x, "div by a number": lambda x: x / 0.3,
    "mul by a 0-dim float32": lambda x: x * torch.tensor(1.3), "in place": lambda x: x.clone().mul_(0.7),
    "add a number": lambda x: x + 0.3, "number minus": lambda x: 0.37 - x, "chain": lambda x: (x * 1.3 + 0.2) / 0.7,
    # reductions and scans accumulate in float32, rounded once
    "sum": lambda x: x.sum(), "mean": lambda x: x.mean(1), "var": lambda x: x.var(1), "std": lambda x: x.std(0),
    "cumsum": lambda x: x.flatten().cumsum(0), "cumprod": lambda x: (x.flatten()[:600] * 0.01 + 0.9).cumprod(0),
    "exp then sum": lambda x: (x * 3 + 0.7).exp().sum(), "mse": lambda x: _F.mse_loss(x, x * 0.9 + 0.1),
    # torch's fused kernels compute in float32
    "softmax": lambda x: x.softmax(1), "gelu": lambda x: _F.gelu(x), "layer_norm": lambda x: _F.layer_norm(x, (96,)),
    "matmul": lambda x: x @ x.T,
    # activations torch's kernels compute in float32 and round once
    "hardswish": lambda x: _F.hardswish(x * 3), "hardsigmoid": lambda x: _F.hardsigmoid(x * 3),
    "leaky_relu": lambda x: _F.leaky_relu(x), "elu": lambda x: _F.elu(x), "selu": lambda x: _F.selu(x),
    "softplus": lambda x: _F.softplus(x * 3),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
def test_reduced_precision_results_equal_eager(compiler, dtype):
    """float16/bfloat16 as torch's CPU kernels compute them: a Python number multiplying or dividing in
    float32, sums, means, variances and scans accumulated in float32, every op's result rounded to its
    dtype (XLA would keep a fused intermediate in float32: ``(x * 0.01 + 0.9).cumprod(0)`` gave 0.41
    where torch gives 1.0; bfloat16 sums added in bfloat16 were 3% off). Through ``nop`` each result
    equals eager's bit for bit, except ``mse_loss``, which torch's decomposition rounds ``x - y`` before
    squaring where its kernel does not; through XLA each is within one rounding of eager's (XLA's float32
    ``exp``/``erf`` and scan order differ from torch's in the last bit, which moves a rounding now and then)."""
    x = (torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    eps = torch.finfo(dtype).eps
    different = []
    for name, fn in REDUCED_PRECISION.items():
        got, want = aot_function(fn, compiler)(x).double(), fn(x).double()
        if compiler is nop and name != "mse":
            ok = torch.equal(got, want)
        else:
            ok = bool(((got == want) | ((got - want).abs() <= eps * want.abs().clamp_min(1e-3))).all())
        if not ok:
            different.append(name)
    assert different == []


@pytest.mark.parametrize("fn", [lambda x: x // 0, lambda x: x % 0, lambda x: torch.fmod(x, 0),
                                lambda x: torch.div(x, 0, rounding_mode="trunc")],
                         ids=["floordiv", "remainder", "fmod", "trunc"])
def test_integer_division_by_the_number_zero_is_refused(fn):
    """Eager raises ZeroDivisionError; XLA would return some integer. A float division by 0 is inf or NaN,
    as eager."""
    x = torch.tensor([3, -5])
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        fn(x)
    for compiler in (nop, xla_compile):
        with pytest.raises(rt.ReftraceError, match="ZeroDivisionError"):
            aot_function(fn, compiler)(x)
        torch.testing.assert_close(aot_function(fn, compiler)(x.double()), fn(x.double()), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
def test_sign_of_nan_and_negative_zero_is_torchs(compiler):
    """torch.sign gives 0 (not NaN) for NaN and +0.0 for -0.0; XLA's sign kept both."""
    x = torch.tensor([float("nan"), -0.0, 0.0, -2.0, float("inf")])
    got, want = aot_function(torch.sign, compiler)(x), torch.sign(x)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
def test_an_output_the_loss_does_not_read_adds_nothing_to_the_gradient(compiler):
    """Eager runs no backward for an output without a cotangent. With zeros in its place, ``0 * inf``
    (``sqrt``'s slope at 0) made the gradient NaN where eager's is 2: missing cotangents are symbolic zeros."""
    x = torch.tensor([0.0, 4.0], requires_grad=True)
    _, doubled = aot_function(lambda x: (x.sqrt(), x * 2), compiler)(x)
    doubled.sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0, 2.0]))
    x.grad = None
    root, doubled = aot_function(lambda x: (x.sqrt(), x * 2), compiler)(x)
    (root.sum() + doubled.sum()).backward()  # both read: sqrt's infinite slope counts, as in eager
    assert torch.equal(x.grad, torch.tensor([float("inf"), 2.25]))
    _, squared = aot_function(lambda x: (x.sqrt(), x * x), compiler)(x)
    (slope,) = torch.autograd.grad(squared.sum(), x, create_graph=True)  # double backward too
    assert torch.equal(slope, torch.tensor([0.0, 8.0]))
    assert torch.equal(torch.autograd.grad(slope.sum(), x)[0], torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("compiler", [nop, xla_compile], ids=["nop", "xla"])
def test_outputs_computed_alike_are_separate_tensors(compiler):
    """``(x.exp(), x.exp())`` are two tensors in eager; the graph computes them once, and they used to come
    back as one tensor, so ``a.add_(1)`` changed ``b`` too."""
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    a, b = aot_function(lambda x: (x.exp(), x.exp()), compiler)(x)
    assert a is not b
    with torch.no_grad():
        a.add_(1)
    torch.testing.assert_close(b, x.exp())
    y, same = aot_function(lambda x: (x * 2,) * 2, compiler)(x)
    assert y is same  # one tensor in eager, one here


def test_in_place_write_into_a_leaf_that_requires_grad_is_refused_as_in_eager():
    """Eager refuses ``x.add_(1)`` on a leaf that requires grad, with grad mode on; reftrace wrote it back
    under ``no_grad`` and went on. Writes eager allows stay allowed: under ``no_grad()`` (inside the
    function or around the call), through ``.data``, into a copy or a non-leaf."""
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.zeros(3, requires_grad=True).add_(1)
    with pytest.raises(rt.ReftraceError, match="leaf Variable that requires grad"):
        aot_function(lambda x: x.add_(1), nop)(x)
    with pytest.raises(rt.ReftraceError, match="or a view of one"):  # eager: "a view of a leaf Variable"
        aot_function(lambda x: x[1:].mul_(2), nop)(x)
    with torch.no_grad():
        aot_function(lambda x: x.add_(1), nop)(x)
    assert torch.equal(x.detach(), torch.ones(3))

    def sgd_step(p, g):
        with torch.no_grad():
            p.sub_(0.5 * g)
        return p * 2
    aot_function(sgd_step, nop)(x, torch.ones(3))
    aot_function(lambda p: (p.data.mul_(2), p * 3)[1], nop)(x)
    assert torch.equal(x.detach(), torch.ones(3))
    not_a_leaf = torch.ones(3, requires_grad=True) * 2
    aot_function(lambda q: q.add_(1), nop)(not_a_leaf)
    assert torch.equal(not_a_leaf.detach(), torch.full((3,), 3.0))


OVERWRITES = {
    "zero_": lambda y: y.zero_(),
    "fill_": lambda y: y.fill_(0.5),
    "copy_ from a constant": lambda y: y.copy_(torch.linspace(0, 1, y.shape[-1], dtype=y.dtype)),
    "y[:] = 0": lambda y: y.__setitem__(slice(None), 0.0),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("overwrite", OVERWRITES)
def test_a_value_overwritten_in_place_keeps_eagers_autograd_links(compiler, overwrite):
    """``y = x * 2; y.zero_()``: the value no longer depends on ``x``, but eager's output still requires
    grad and ``x`` gets zeros (not None): before, the compiled output did not require grad at all
    (``backward()`` raised) and ``x.grad`` stayed None."""
    def fn(x, w):
        y = x * 2
        OVERWRITES[overwrite](y)
        return (y * 3).sum(), (y + w).sum()

    x, w = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = {}
    for name, f in (("eager", fn), ("compiled", aot_function(fn, COMPILERS[compiler]))):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        only_y, with_w = f(xi, wi)
        assert only_y.requires_grad
        only_y.backward(retain_graph=True)
        after_first = xi.grad.clone(), wi.grad
        with_w.backward()
        grads[name] = (*after_first, xi.grad, wi.grad)
    (x1, w1, x2, w2), (ex1, ew1, ex2, ew2) = grads["compiled"], grads["eager"]
    assert w1 is None and ew1 is None
    for got, want in ((x1, ex1), (x2, ex2), (w2, ew2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(x2, torch.zeros(4, dtype=torch.float64))


class _DisabledGate(torch.nn.Module):
    """A gate branch switched off by overwriting its output in place: eager still gives ``gate`` zero
    gradients, so AdamW's weight decay moves it each step."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.gate = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = 2 * self.gate(x)
        g.fill_(1.0)
        return self.body(x) * g


@pytest.mark.parametrize("compiler", COMPILERS)
def test_parameters_behind_an_overwritten_value_get_zero_gradients_and_train_like_eager(compiler):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    model, _ = _assert_trains_like_eager(_DisabledGate, (x.double(),), {}, _projection_loss, COMPILERS[compiler])
    assert torch.equal(model.gate.weight.grad, torch.zeros_like(model.gate.weight))


COVARIANCES = {
    "cov": lambda x, fw, aw: torch.cov(x),
    "cov, correction 0": lambda x, fw, aw: torch.cov(x, correction=0),
    "cov, correction above the observations": lambda x, fw, aw: torch.cov(x, correction=9),
    "cov of a vector": lambda x, fw, aw: x[0].cov(),
    "fweights": lambda x, fw, aw: torch.cov(x, fweights=fw),
    "aweights": lambda x, fw, aw: torch.cov(x, aweights=aw),
    "both weights": lambda x, fw, aw: torch.cov(x, fweights=fw, aweights=aw),
    "both weights, correction 2": lambda x, fw, aw: torch.cov(x, correction=2, fweights=fw, aweights=aw),
    "one observation, aweights": lambda x, fw, aw: torch.cov(x[:, :1] * 1, aweights=aw[:1]),
    "corrcoef": lambda x, fw, aw: torch.corrcoef(x),
    "corrcoef of a vector": lambda x, fw, aw: x[1].corrcoef(),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", COVARIANCES)
def test_cov_and_corrcoef_match_eager(compiler, case):
    """ATen's ``cov`` reads ``norm_factor <= 0`` as a Python bool (to warn and zero it), which a capture
    cannot do: it was refused as data-dependent. Now it is captured, values and gradients as eager's,
    including its corner cases (a correction of at least the number of observations, one observation)."""
    fn = COVARIANCES[case]
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fw = torch.tensor([1, 2, 0, 3, 1])
    aw = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = {}
    for name, f in (("eager", fn), ("compiled", aot_function(fn, COMPILERS[compiler]))):
        xi, awi = x.clone().requires_grad_(), aw.clone().requires_grad_()
        with pytest.warns() if "correction above" in case or "one observation" in case else contextlib.nullcontext():
            out = f(xi, fw, awi)
        ct = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
        results[name] = (out, *torch.autograd.grad(out, (xi, awi), ct, allow_unused=True))
    for got, want in zip(results["compiled"], results["eager"], strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_cov_gives_nan_where_torch_refuses_the_weights():
    x = torch.randn(2, 4, dtype=torch.float64)
    negative, zero_sum = torch.tensor([1, -1, 2, 1]), torch.tensor([0, 0, 0, 0])
    for fw in (negative, zero_sum):
        with pytest.raises(RuntimeError, match="fweights cannot be negative|weights sum to zero"):
            torch.cov(x, fweights=fw)
        assert aot_function(lambda x, fw: torch.cov(x, fweights=fw), nop)(x, fw).isnan().all()


LAYOUTS = {
    "transpose then contiguous": lambda x: (x * 2).t().contiguous(),
    "transposed": lambda x: (x * 2).t(),
    "channels last": lambda x: (x * 2).reshape(1, 4, 5, 1).contiguous(memory_format=torch.channels_last),
    "a transposed clone": lambda x: (x.t() * 2).clone(),
    "contiguous, and a view of it": lambda x: (lambda y: (y, y.view(-1)))((x * 2).t().contiguous()),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", LAYOUTS)
def test_outputs_have_eagers_strides(compiler, case):
    """A graph value has no strides: the torch backend returned ``x.t().contiguous()`` as a transpose
    (the copy is a no-op on values), so the caller's ``out.view(-1)`` raised where eager's works, and
    XLA returned every output row-major. Dense outputs now come back in eager's strides."""
    fn = LAYOUTS[case]
    x = torch.randn(4, 5, requires_grad=True)
    want, got = fn(x), aot_function(fn, COMPILERS[compiler])(x)
    for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want)), strict=True):
        assert g.stride() == w.stride() and g.is_contiguous() == w.is_contiguous()
        torch.testing.assert_close(g, w)
    first = got[0] if isinstance(got, tuple) else got
    first.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiler", COMPILERS)
def test_hard_activation_slopes_are_torchs_at_every_dtype(compiler, dtype):
    """``hardsigmoid``'s slope is torch's ``1.0f / 6.0f`` (a float32 constant in its float64 kernel too: the
    exact 1/6 was 1.5e-8 off eager's float64 gradient), and in float16/bfloat16 both activations compute
    in float32 as torch's kernels do (``x + 3`` rounded to bfloat16 first moved the kinks: slopes off by
    up to 1.5 next to -3 and 3)."""
    x = torch.cat([torch.linspace(-4, 4, 801), torch.tensor([-3.0, 3.0, 0.0, float("nan")])]).to(dtype)
    ct = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for fn in (_F.hardsigmoid, _F.hardswish):
        want_in, got_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = torch.autograd.grad(fn(want_in), want_in, ct)[0]
        got = torch.autograd.grad(aot_function(fn, COMPILERS[compiler])(got_in), got_in, ct)[0]
        if fn is _F.hardsigmoid and compiler == "nop":
            assert torch.equal(got, want) or torch.equal(got.isnan(), want.isnan()) and torch.equal(
                got.nan_to_num(), want.nan_to_num())
        else:  # one rounding of the result apart at most
            ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1.0)
            assert ((got - want).abs() <= 2 * ulp).all(), (fn.__name__, (got - want).abs().max())


class _AutocastNet(torch.nn.Module):
    """Linear (autocast: bfloat16), GELU, LayerNorm and GroupNorm/BatchNorm on bfloat16 inputs with float32
    parameters (torch's mixed-type kernels: float32 statistics), and a matmul kept in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(8, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 48)
        self.gn, self.bn = torch.nn.GroupNorm(2, 6), torch.nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.ln(torch.nn.functional.gelu(self.fc1(x))))
        h = self.bn(self.gn(h.view(-1, 6, 8))).flatten(1)
        with torch.autocast("cpu", enabled=False):
            return h.float() @ self.fc2.weight.float()


@pytest.mark.parametrize("compiler", COMPILERS)
def test_training_under_autocast_matches_eager(compiler):
    """Under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the backward raised (layer norm's statistics
    came out bfloat16 where torch's mixed-type kernel keeps float32, and its backward refused them), and
    a graph compiled outside autocast was reused inside it (float32 outputs where eager gives bfloat16).
    Through ``nop`` every output and parameter is eager's over three SGD steps to float32 rounding (the
    group norm's backward is reftrace's, in float32; everything else is torch's kernels)."""
    torch.manual_seed(0)
    model = _AutocastNet()
    eager = copy.deepcopy(model)
    compiled = aot_module(model, COMPILERS[compiler])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert compiled(x).dtype == eager(x).dtype == torch.float32  # captured without autocast first
    tol = 1e-5 if compiler == "nop" else 3e-2  # XLA: bfloat16 roundings of its own
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (model, eager)]
    for _ in range(3):
        outs = []
        for run, opt in zip((compiled, eager), opts):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(x)
                inner = run.fc1(x) if run is eager else None
            out.pow(2).mean().backward()
            opt.step()
            outs.append(out)
            assert inner is None or inner.dtype == torch.bfloat16
        assert outs[0].dtype == outs[1].dtype
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    for got, want in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm", "batch_norm"])
def test_mixed_type_normalizations_match_eager(norm):
    """A bfloat16 input with float32 parameters (as autocast leaves them): torch's CPU kernels keep the
    saved mean and rstd in float32, and their backward refuses bfloat16 ones; the output and every
    gradient are eager's."""
    x = torch.randn(4, 6, 3).bfloat16()
    w, b = torch.randn(6), torch.randn(6)
    fns = {"layer_norm": lambda x, w, b: _F.layer_norm(x.transpose(1, 2), [6], w, b),
           "group_norm": lambda x, w, b: _F.group_norm(x, 2, w, b),
           "batch_norm": lambda x, w, b: _F.batch_norm(x, None, None, w, b, training=True)}
    fn = fns[norm]
    results = []
    for f in (fn, aot_function(fn, nop)):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        out = f(*args)
        ct = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
        results.append((out, *torch.autograd.grad(out, args, ct)))
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0 if norm != "group_norm" else 1e-2,
                                   atol=0 if norm != "group_norm" else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fn", [torch.tanh, torch.sigmoid, _F.tanhshrink], ids=["tanh", "sigmoid", "tanhshrink"])
def test_fused_backward_kernels_give_eagers_gradient_bits(fn, dtype):
    """torch's ``tanh_backward`` and ``sigmoid_backward`` are single kernels that compute float16/bfloat16
    in float32 and round once (sigmoid's float16 kernel excepted: it rounds after each operation), in
    their own order of operations; the VJP rules do the same, so ``nop`` gives eager's bits (before:
    about a third of the bfloat16 gradients were one rounding off)."""
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    ct = torch.randn(4096, generator=torch.Generator().manual_seed(1)).to(dtype)
    want_in, got_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = torch.autograd.grad(fn(want_in), want_in, ct)[0]
    got = torch.autograd.grad(aot_function(fn, nop)(got_in), got_in, ct)[0]
    if dtype == torch.float64 and fn is not torch.sigmoid:  # torch's float64 tanh kernel rounds otherwise
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    else:
        assert torch.equal(got, want), (got != want).sum()
