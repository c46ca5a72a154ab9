"""The ATen table: ``aten_rules[OpOverload] -> rule``, one file per op family.

To map a new operator, add a row to the family file it belongs to::

    @register(aten.my_op.default)
    def my_op(x, alpha=1.0):
        return lax.mul(x, literal(alpha, x.dtype))

Rules receive TracedArrays for tensors and static Python values for everything
else; see ``_common`` for the helpers and the contract.
"""
from reftrace.torch_bridge.aten import (bitwise, complex, creation, elementwise, indexing, linalg,  # noqa: F401
                                       losses, nn, quantization, random, reductions, sampling, special, views)
from reftrace.torch_bridge.aten._common import NodeContext, aten_rules, register, rule_for

__all__ = ["aten_rules", "register", "rule_for", "NodeContext"]
