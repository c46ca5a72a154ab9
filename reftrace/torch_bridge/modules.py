"""An ``nn.Module``'s state as graph inputs: parameters and buffers, in a documented order.

Order (the leading inputs of every captured module graph):

1. unique parameters, in ``named_parameters()`` order; a Parameter registered
   under two names (tied weights, e.g. input and output embeddings) is ONE
   input, named by its first name, the others recorded as aliases;
2. unique buffers, in ``named_buffers()`` order (same rule);
3. then the user's tensor arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from reftrace.errors import ArgumentError


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


def functional_module(module: torch.nn.Module, state: ModuleState) -> Callable[..., Any]:
    """``f(state_tensors, *args)``: the module run with ``state_tensors`` in place of its own.

    ``torch.func.functional_call`` keeps tied names tied: passing the canonical name
    also rebinds its aliases.
    """
    def call(state_tensors: Sequence[torch.Tensor], *args: Any) -> Any:
        mapping = dict(zip(state.names, state_tensors))
        return torch.func.functional_call(module, mapping, args, tie_weights=True, strict=False)
    return call
