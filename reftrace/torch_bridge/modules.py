"""An ``nn.Module``'s state as graph inputs: parameters and buffers, in a documented order.

Order (the leading inputs of every captured module graph):

1. unique parameters, in ``named_parameters()`` order; a Parameter registered
   under two names (tied weights, e.g. input and output embeddings) is ONE
   input, named by its first name, the others recorded as aliases;
2. unique buffers, in ``named_buffers()`` order (same rule);
3. then the user's tensor arguments.

Tensors kept in plain attributes (``self.scale = torch.tensor(2.0)``) are not inputs: a forward
reads them as constants (guarded: ``reftrace.torch_bridge.aot``), or writes them (old-style
``weight_norm`` recomputes ``self.weight`` in a pre-hook: ``module_writes``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.nn.utils._named_member_accessor import swap_tensor

from reftrace.errors import ArgumentError
from reftrace.torch_bridge.module_writes import ForwardWrites


@dataclass(frozen=True)
class ModuleState:
    """The tensors a module reads, as leading graph inputs.

    ``names[i]`` and ``tensors[i]`` describe input ``i``; ``is_param[i]`` says
    parameter or buffer; ``aliases`` maps every other name of a tied tensor to
    the canonical name in ``names``.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...] = field(repr=False)
    is_param: tuple[bool, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(self.is_param)

    @property
    def num_buffers(self) -> int:
        return len(self.names) - self.num_params

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for n, p in zip(self.names, self.is_param) if p)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return tuple(n for n, p in zip(self.names, self.is_param) if not p)

    def index(self, name: str) -> int:
        """The input position of parameter/buffer ``name`` (aliases of tied tensors included)."""
        return self.names.index(self.aliases.get(name, name))

    def __len__(self) -> int:
        return len(self.names)


def module_state(module: torch.nn.Module) -> ModuleState:
    """The module's unique parameters then unique buffers, with aliases for tied names."""
    if not isinstance(module, torch.nn.Module):
        raise ArgumentError(f"module_state expects an nn.Module, got {type(module).__name__}")
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    is_param: list[bool] = []
    aliases: dict[str, str] = {}
    canonical: dict[int, str] = {}
    for param, items in ((True, module.named_parameters(remove_duplicate=False)),
                         (False, module.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t is None:
                continue
            if id(t) in canonical:
                aliases[name] = canonical[id(t)]
                continue
            canonical[id(t)] = name
            names.append(name)
            tensors.append(t)
            is_param.append(param)
    return ModuleState(tuple(names), tuple(tensors), tuple(is_param), aliases)


def functional_module(module: torch.nn.Module, state: ModuleState,
                      rebound: dict[str, torch.Tensor] | None = None) -> Callable[..., Any]:
    """``f(state_tensors, *args, **kwargs)``: the module run with ``state_tensors`` in place of its own.

    Tied names stay tied: the canonical name's tensor also goes in place of its aliases
    (``_reparametrized``). What the forward writes into the module itself is settled as
    ``reftrace.torch_bridge.module_writes`` says: a buffer reassigned in its form is an update of
    its input; a buffer rebound to another form, and a tensor stored in a plain attribute, go into
    ``rebound`` (``{name: tensor}``, rebound after each call), or raise where ``rebound`` is ``None``.
    """
    def call(state_tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        mapping = dict(zip(state.names, state_tensors))
        writes = ForwardWrites(module)
        with _reparametrized(module, mapping, state.aliases):
            out = module(*args, **kwargs)
        writes.settle(state.names, state_tensors, mapping, rebound)  # _reparametrized put reassignments in mapping
        return out
    return call


@contextlib.contextmanager
def _reparametrized(module: torch.nn.Module, mapping: dict[str, torch.Tensor],
                    aliases: Mapping[str, str]) -> Iterator[None]:
    """``module`` holding ``mapping``'s tensors (a tied name's aliases too) in place of its own while the
    block runs, as ``torch.func.functional_call(..., tie_weights=True)``; afterwards each name in
    ``mapping`` holds what its place held at the end of the block (a buffer the forward reassigned).

    Each place (submodule, attribute) is swapped once and restored once: torch's swaps a submodule
    reachable by two paths (``self.l`` and ``self.seq[0]``) twice, the second time saving the tensor it
    had just put there, and restores that, leaving the capture's tensors in the user's module."""
    places: dict[tuple[int, str], tuple[torch.nn.Module, str, str]] = {}  # place -> (owner, attribute, name)
    for name in [*mapping, *aliases]:  # the names in ``mapping`` first: each keeps its own place
        canonical = aliases.get(name, name)
        if canonical in mapping:
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            places.setdefault((id(owner), attr), (owner, attr, name))
    swapped: list[tuple[torch.nn.Module, str, str, Any]] = []
    try:
        for owner, attr, name in places.values():
            swapped.append((owner, attr, name, swap_tensor(owner, attr, mapping[aliases.get(name, name)])))
        yield
    finally:
        for owner, attr, name, original in reversed(swapped):
            now = swap_tensor(owner, attr, original)
            if name in mapping:
                mapping[name] = now


_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    """Numbers, strings, flags, None and tuples of them: what a trace bakes in when it reads them."""
    if type(value) is tuple:
        return all(_plain(v) for v in value)
    return type(value) in _PLAIN


# a module's dicts whose contents (by identity) the compiled graph depends on: a submodule swapped or a
# hook added after compiling makes the next call capture again (a backward hook is then refused:
# ``autograd_hooks``); a parameter or buffer replaced only makes the guard read the state again
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")
_STRUCTURE_DICTS = ("_modules", "_parameters", "_buffers", *_HOOK_DICTS)
# hooks every module runs (``register_module_forward_hook`` and friends)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called", "_global_backward_hooks", "_global_backward_pre_hooks")


class ModuleGuard:
    """What a compiled module depends on besides its tensors' shapes, checked cheaply per call.

    Two parts: the module's *structure* — its submodules, their parameter and buffer objects,
    their forward and backward hooks (and torch's global module hooks) and a ``forward`` set on an
    instance, compared by identity — and its *attributes*: every submodule's plain attributes
    (``training``, ``eps``, ``momentum``, ``scale``...), compared by value. While the structure holds,
    the ``ModuleState`` is reused. The attributes go into the compile cache key, after a number that
    stands for the structure less the parameter and buffer objects (their names count): changing
    ``ln.eps``, adding a forward hook or swapping ``nn.Tanh`` for ``nn.Sigmoid`` after compiling
    recompiles instead of reusing a stale graph, while a parameter replaced by another of its shape
    does not. Plain attributes added after the first call are not seen.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        # each code structure seen (by the ids of its objects) -> its number, and weak references to the
        # objects: an entry whose objects died (so their ids may be reused) is not trusted
        self._versions: dict[tuple[Any, ...], tuple[int, list[Callable[[], Any]]]] = {}
        self._next_version = 0
        self._snapshot()

    def _snapshot(self) -> None:
        paths = [path for path, _ in self.module.named_modules()]
        self.dicts = [m.__dict__ for m in self.module.modules()]
        self.plain_names = [tuple(k for k, v in d.items() if _plain(v)) for d in self.dicts]
        self.attribute_names = tuple(zip(paths, self.plain_names))
        self.structure = self._structure()
        self.state = module_state(self.module)
        self.version = self._number(*self._code_structure())

    def _structure(self) -> tuple[int, ...]:
        ids: list[int] = []
        for d in self.dicts:
            for key in _STRUCTURE_DICTS:
                ids.extend(map(id, d.get(key, {}).values()))
                ids.append(-1)  # a separator, so moving an object between dicts changes the tuple
            ids.append(id(d.get("forward")))
        for key in _GLOBAL_HOOKS:
            ids.extend(map(id, getattr(torch.nn.modules.module, key, {}).values()))
        return tuple(ids)

    def _code_structure(self) -> tuple[tuple[Any, ...], list[Any]]:
        """What decides the code a call runs, by identity: each module's class, submodules, hooks and
        parameter and buffer names (which of them is None too), not the tensors (graph inputs). Returns
        the key (ids and names) and the objects whose ids it holds."""
        objects: list[Any] = []

        def ident(obj: Any) -> int:
            objects.append(obj)
            return id(obj)

        def items(d: dict) -> tuple[tuple[Any, int], ...]:
            return tuple((k, ident(v)) for k, v in d.items())
        parts: list[Any] = []
        for m, d in zip(self.module.modules(), self.dicts):
            parts.append((ident(type(m)), items(d["_modules"]), ident(d.get("forward")),
                          tuple((k, v is None) for k, v in d["_parameters"].items()),
                          tuple((k, v is None) for k, v in d["_buffers"].items()),
                          *(items(d.get(key, {})) for key in _HOOK_DICTS)))
        parts.extend(items(getattr(torch.nn.modules.module, key, {})) for key in _GLOBAL_HOOKS)
        return tuple(parts), objects

    def _number(self, key: tuple[Any, ...], objects: list[Any]) -> int:
        """The number of the code structure ``key``: the one it had when seen before, if every object
        it names is still the same object (no reused id), else a new one. Objects are held weakly where
        they allow it, so a removed hook's closure (and what it holds) is not kept alive."""
        known = self._versions.get(key)
        if known is not None and all(ref() is obj for ref, obj in zip(known[1], objects)):
            return known[0]
        number, self._next_version = self._next_version, self._next_version + 1
        self._versions[key] = (number, [_reference(obj) for obj in objects])
        return number

    def check(self) -> tuple[ModuleState, tuple[Any, ...]]:
        """The module's state tensors (re-read if its structure changed) and its plain attributes now."""
        try:
            if self._structure() != self.structure:
                self._snapshot()
            attributes = tuple(tuple(d[k] for k in names) for d, names in zip(self.dicts, self.plain_names))
        except KeyError:  # an attribute was deleted: look again
            self._snapshot()
            attributes = tuple(tuple(d[k] for k in names) for d, names in zip(self.dicts, self.plain_names))
        attributes = _Attributes((self.version, *attributes))
        attributes.names = self.attribute_names
        return self.state, attributes


def _reference(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj``, or a strong one where it takes none (None, bools, some callables)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class _Attributes(tuple):
    """A module's structure number, then its plain attributes, as one guard value (one pytree leaf,
    hashed once per call). ``names``: per submodule, its path and attribute names (for saying what
    changed)."""

    names: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def changes_since(self, old: Any) -> list[str]:
        """``path.name: old -> new`` for each attribute whose value differs from ``old``'s."""
        if not isinstance(old, _Attributes) or old[0] != self[0]:
            return ["the module's structure (its submodules, hooks, or parameter and buffer names)"]
        if old.names != self.names:
            return ["the module's attributes"]
        return [f"{path + '.' if path else ''}{name}: {a!r} -> {b!r}"
                for (path, keys), before, now in zip(self.names, old[1:], self[1:])
                for name, a, b in zip(keys, before, now) if a != b]
