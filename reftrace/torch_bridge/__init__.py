"""The torch bridge: torch functions and ``nn.Module``s in, reftrace Graphs out (and back).

- ``capture(fn_or_module, *args)`` -> Graph (``rt.trace`` on torch inputs);
  ``capture_tree`` / ``capture_flat`` -> ``Captured`` (graph + input/output bookkeeping).
- ``module_state(module)`` -> ``ModuleState``: the parameter/buffer order of module graphs.
- ``aten_rules``: the ATen -> primitives table (``reftrace.torch_bridge.aten``).
"""
from reftrace.torch_bridge.aten import aten_rules
from reftrace.torch_bridge.capture import Captured, capture, capture_flat, capture_tree
from reftrace.torch_bridge.decompositions import decomposition_table
from reftrace.torch_bridge.modules import ModuleState, functional_module, module_state

__all__ = ["capture", "capture_flat", "capture_tree", "Captured", "decomposition_table", "module_state",
           "ModuleState", "functional_module", "aten_rules"]
