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
