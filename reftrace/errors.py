"""One exception hierarchy: every failure a user can cause is a ReftraceError."""
from __future__ import annotations


class ReftraceError(Exception):
    """Base of every error reftrace raises on purpose."""


class GraphError(ReftraceError):
    """A malformed graph: a variable used before definition, defined twice, a bad joint spec."""


class ShapeError(ReftraceError, ValueError):
    """Shapes or dtypes that a primitive's rule rejects."""


class TracingError(ReftraceError):
    """Something in the traced function that reftrace cannot capture."""


class DataDependentControlFlowError(TracingError):
    """Python control flow (if/while/bool/item) that depends on a traced value."""


class UnsupportedOperatorError(ReftraceError, NotImplementedError):
    """An operator (ATen op or primitive rule) that reftrace has no mapping or rule for."""


class ArgumentError(ReftraceError, TypeError):
    """A call with the wrong number, kind, shape or dtype of arguments."""


class PartitionError(ReftraceError):
    """A partition request that cannot be satisfied (not a joint graph, a bad policy)."""


class CompilerError(ReftraceError):
    """A compiler or partitioner handed to ``aot_function``/``aot_module`` broke its contract."""


def expect_graph(value: object, verb: str) -> None:
    """Raise ArgumentError unless ``value`` is a Graph, saying how to get one from what was passed."""
    from reftrace.graph import Graph  # graph.py imports this module
    if isinstance(value, Graph):
        return
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Graph) for v in value):
        hint = "this is a (forward, backward) pair such as a Partition: pass p.forward or p.backward"
    elif isinstance(getattr(value, "reftrace_graph", None), Graph):
        hint = "this module was emitted from a reftrace Graph: pass its .reftrace_graph"
    elif callable(value):
        hint = "trace the function first: rt.trace(fn, *example_arrays)"
    else:
        hint = "make one with rt.trace(fn, *example_arrays)"
    raise ArgumentError(f"{verb} expects a reftrace Graph, got {type(value).__name__}; {hint}")
