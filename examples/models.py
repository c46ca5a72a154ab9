"""Small models for ``python -m reftrace show examples/models.py:<name> --input ...``.

Each name is a function returning an ``nn.Module`` built from a config with random weights
(nothing is downloaded):

    python -m reftrace show examples/models.py:resnet18 --input 1x3x64x64 --partition mincut
    python -m reftrace show examples/models.py:gpt2 --input 1x32:int64 --kwarg use_cache=False --joint
"""
from __future__ import annotations

import torch


def mlp() -> torch.nn.Module:
    """512 -> 2048 -> 512 with GELU and a LayerNorm: ``--input 8x512``."""
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512),
                               torch.nn.LayerNorm(512))


def resnet18() -> torch.nn.Module:
    """torchvision's resnet18 (training mode): ``--input 1x3x64x64``."""
    from torchvision.models import resnet18 as build
    return build()


def gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 with tied embeddings, n_embd 64: ``--input 1x32:int64 --kwarg use_cache=False``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))
