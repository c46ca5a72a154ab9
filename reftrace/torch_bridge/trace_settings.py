"""The torch settings a capture runs under, each a context manager that restores what it changed."""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch



@contextlib.contextmanager
def compiling_flag() -> Any:
    """Say ``torch.compiler.is_compiling()`` while tracing, as torch.export's non-strict tracing does.

    Libraries check it to skip value-dependent shortcuts that no ahead-of-time capture can
    take (e.g. transformers' packed-sequence detection reads position ids with ``.all()``).
    """
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


@contextlib.contextmanager
def fake_tensor_logs_silenced() -> Any:
    """FakeTensorMode logs a traceback for every meta kernel that raises; the error reftrace raises says it."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


@contextlib.contextmanager
def mkldnn_disabled() -> Any:
    """Turn oneDNN off: LSTM then decomposes to portable ATen ops instead of mkldnn's fused kernel."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)
