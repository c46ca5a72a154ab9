"""Finding the user's source line behind an ATen op, for error messages that point at model code.

A frame is the user's when its file lies outside torch, reftrace and the Python
standard library; model libraries such as torchvision or transformers count as
user code (that is where the offending line is). Frames are read cheaply by
walking ``sys._getframe``; stack strings use the traceback format so that
``node.meta["stack_trace"]`` can be parsed back.
"""
from __future__ import annotations

import os
import re
import sys
import sysconfig
import types
import weakref
from typing import Iterable

import torch

import reftrace

_SKIP_DIRS = tuple(os.path.normcase(os.path.realpath(d)) + os.sep for d in (
    os.path.dirname(torch.__file__),
    os.path.dirname(reftrace.__file__),
    sysconfig.get_paths()["stdlib"],
))
_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')
_is_user_cache: dict[str, bool] = {}


def is_user_file(filename: str) -> bool:
    """True unless ``filename`` belongs to torch, reftrace or the standard library."""
    hit = _is_user_cache.get(filename)
    if hit is None:
        path = os.path.normcase(os.path.realpath(filename)) if not filename.startswith("<") else filename
        hit = not path.startswith(_SKIP_DIRS) and not filename.startswith("<frozen")
        _is_user_cache[filename] = hit
    return hit


def _describe(filename: str, line: int, name: str) -> str:
    try:
        rel = os.path.relpath(filename)
        shown = rel if not rel.startswith("..") else os.path.basename(filename)
    except ValueError:  # another drive on Windows
        shown = os.path.basename(filename)
    return f"{shown}:{line} in {name}"


def innermost_user_frame(frame: types.FrameType | None = None) -> str | None:
    """``"file.py:LINE in function"`` for the innermost user frame of the current stack.

    A frame running FX-generated code (a Dynamo graph under ``torch.compile``) stands for
    the user line its node was recorded from, when the node has a ``stack_trace``.
    """
    frame = frame or sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if is_user_file(code.co_filename):
            if code.co_filename.startswith("<eval_with_key>"):
                where = _fx_node_location(frame)
                if where is not None:
                    return where
            return _describe(code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None


def torch_module_frame(frame: types.FrameType | None = None) -> str:
    """``", inside torch.nn's FILE:LINE in FUNCTION"`` for the innermost frame of a stock ``torch.nn``
    module's (or ``torch.distributions``') own code on the current stack (the user frame is the line
    that called it), with a hint where that code is known to need one; "" when no such frame is on
    the stack."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        for package, (label, hints) in _TORCH_PACKAGES.items():
            if package in name:
                base = os.path.basename(name)
                where = f", inside {label} {base}:{frame.f_lineno} in {frame.f_code.co_name}"
                return where + hints.get(f"{base}:{frame.f_code.co_name}", hints.get(base, hints.get("*", "")))
        frame = frame.f_back
    return ""


_VALIDATE_ARGS_HINT = ("; a distribution checks its parameters' and samples' values (validate_args): pass "
                       "validate_args=False, or call torch.distributions.Distribution.set_default_validate_args("
                       "False) before compiling")
# torch source folder -> (its possessive in messages, {"file:function", file name or "*": hint})
_TORCH_PACKAGES = {
    "/torch/nn/modules/": ("torch.nn's", {
        "batchnorm.py": "; BatchNorm with momentum=None reads num_batches_tracked as a Python float in training: "
                        "give it a float momentum, or use torch.compile(backend=\"reftrace\"), which breaks the "
                        "graph there",
        "transformer.py:_detect_is_causal_mask": "; without is_causal (tgt_is_causal for a decoder), the "
                                                 "Transformer layers compare the mask's values with a causal mask: "
                                                 "pass it (True for a mask from "
                                                 "nn.Transformer.generate_square_subsequent_mask, else False)"}),
    "/torch/distributions/": ("torch.distributions'", {"*": _VALIDATE_ARGS_HINT}),
}


# generated code object -> {line: the user location of the node that line runs}; one code object per
# GraphModule.recompile(), so lines never go stale
_fx_locations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fx_node_location(frame: types.FrameType) -> str | None:
    """The user location recorded on the FX node that ``frame``'s current line of generated code runs."""
    locations = _fx_locations.get(frame.f_code)
    if locations is None:
        locations = _fx_locations[frame.f_code] = _fx_line_locations(frame.f_locals.get("self"))
    return locations.get(frame.f_lineno)


def _fx_line_locations(gm: object) -> dict[int, str | None]:
    """Every generated line of ``gm.forward`` mapped to the user line its node's ``stack_trace`` names."""
    lineno_map = getattr(gm, "_lineno_map", None)
    if not isinstance(gm, torch.fx.GraphModule) or not lineno_map:
        return {}
    nodes = list(gm.graph.nodes)
    prologue = getattr(gm, "_prologue_start", 0)
    return {line + prologue: location_from_stack_trace(nodes[index].meta.get("stack_trace"))
            for line, index in lineno_map.items() if index is not None and index < len(nodes)}


def user_stack_string(limit: int = 8) -> str:
    """The innermost user frames (outermost first) in traceback format, for ``node.meta["stack_trace"]``."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        if is_user_file(code.co_filename):
            frames.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
        frame = frame.f_back
    return "".join(reversed(frames))


def location_from_stack_trace(stack_trace: str | None) -> str | None:
    """``"file.py:LINE in function"`` for the innermost user frame named in a traceback-format string."""
    if not stack_trace:
        return None
    for m in reversed(list(_FRAME_RE.finditer(stack_trace))):
        if is_user_file(m["file"]):
            return _describe(m["file"], int(m["line"]), m["name"])
    return None


def location_from_traceback(tb: types.TracebackType | None) -> str | None:
    """The innermost user frame of an exception's traceback."""
    found = None
    for frame, lineno in _walk_tb(tb):
        if is_user_file(frame.f_code.co_filename):
            found = _describe(frame.f_code.co_filename, lineno, frame.f_code.co_name)
    return found


def _walk_tb(tb: types.TracebackType | None) -> Iterable[tuple[types.FrameType, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next
