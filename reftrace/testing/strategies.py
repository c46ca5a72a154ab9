"""``programs()``: a hypothesis strategy for valid random torch programs.

Validity holds by construction: every drawn line is checked on meta tensors before it is kept
(``reftrace.testing.draft``). Every choice is one integer, ordered so hypothesis shrinks toward
fewer ops, fewer inputs, the earlier vocabulary entries, the most recent operand, scale 1 and
trainable inputs. ``random_program`` draws the same programs uniformly (hypothesis's own
generation favours the smallest choices: most of its programs would be one ``tanh``).

What the strategy cannot see — values — is handled by ``reftrace.testing.cases``: guards on
kinks, and rejection of inputs that overflow (see ``docs/oracle.md``).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch
from hypothesis import strategies as st

from reftrace.testing.draft import Choices, Draft
from reftrace.testing.program import DATA, PARAM, Program
from reftrace.testing.vocabulary import VOCABULARY, WEIGHTS

# ----------------------------------------------------------------------------- the strategy

SCALES = (1.0, 100.0, 10.0)
OFFSETS = (0.0, 0.0, 0.0, 100.0)    # now and then values around 100: naive variances cancel there


def build_program(choices: Choices, *, dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                  max_ops: int = 8, max_inputs: int = 3, ops: Sequence[str] | None = None,
                  scales: Sequence[float] = SCALES) -> Program:
    """Draw one program from ``choices`` (see ``programs`` for the options)."""
    entries = [(name, build) for name, build in VOCABULARY.items() if ops is None or name in ops
               for _ in range(WEIGHTS.get(name, 1))]
    if not entries:
        raise ValueError(f"no vocabulary entry among {list(ops or ())}; names: {sorted(VOCABULARY)}")
    draft = Draft(choices)
    # float32 twice as often as float64: overflow and cancellation show at float32
    draft.dtype = draft.sample(list(dtypes) + [d for d in dtypes if d == torch.float32])
    draft.sizes = [draft.integer(2, 4) for _ in choices.repeat(1, 3)]
    first: list[int] | None = None
    for _ in choices.repeat(1, max_inputs):
        if first is not None and draft.boolean():
            # broadcastable against the first input: a suffix of its shape with some dims 1
            shape = [1 if draft.integer(0, 2) == 0 else s for s in first[draft.integer(0, len(first)):]]
        else:
            ndim = (2, 1, 3, 0, 4)[draft.integer(0, 4)]
            shape = [draft.size() if draft.integer(0, 4) else 1 for _ in range(ndim)]
        first = shape if first is None else first
        kind = draft.sample([PARAM, DATA])
        scale = draft.sample(list(scales))
        offset = draft.sample(OFFSETS)
        draft.add_input(draft.new_input("x", shape, [2 * s if s > 1 else s for s in shape], kind, scale,
                                        offset=offset))
    for _ in choices.repeat(1, max_ops):
        draft.entry, build = draft.sample(entries)
        build(draft)
    if not draft.ops:
        draft.entry = "scale"
        draft.emit(f"{draft.values[-1].name} * 2.0")
    # every line's value reaches an output: the last value and up to two other values no line used
    results = [v.name for v in draft.values if v.input_kind is None]
    sinks = [name for name in results[:-1] if name not in draft.used]
    return draft.program([results[-1], *sinks[-2:]])


@st.composite
def programs(draw: Callable[[st.SearchStrategy], Any], *, dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
             max_ops: int = 8, max_inputs: int = 3, ops: Sequence[str] | None = None,
             scales: Sequence[float] = SCALES) -> Program:
    """Valid random torch programs (``Program`` values) for ``@given``.

    ``dtypes``: the float dtypes a program's inputs may have (one per program); ``max_ops`` lines
    (at least 1); ``max_inputs`` initial inputs (modules add their own weights and buffers);
    ``ops``: restrict the vocabulary to these entry names (``reftrace.testing.VOCABULARY``);
    ``scales``: input magnitudes (values are ``offset + scale * N(0, 1)``; 100 reaches the large
    inputs where naive kernels overflow; the offset is 100 for one input in four).
    """
    return build_program(Choices.hypothesis(draw), dtypes=dtypes, max_ops=max_ops, max_inputs=max_inputs, ops=ops,
                         scales=scales)


def random_program(seed: int, **options: Any) -> tuple[Program, list[int]]:
    """A program drawn uniformly from ``seed``, and its choice sequence (for hypothesis to replay)."""
    choices = Choices.uniform(random.Random(seed))
    return build_program(choices, **options), choices.recorded
