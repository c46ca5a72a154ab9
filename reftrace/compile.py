"""Drop-in for ``functorch.compile``: ``from reftrace.compile import aot_function, aot_module, draw_graph``."""
from reftrace.torch_bridge.aot import AOTFunction, AOTModule, RecaptureWarning, aot_function, aot_module
from reftrace.torch_bridge.compilers import (default_partition, fusion_partition, make_boxed_compiler,
                                             make_boxed_func, min_cut_rematerialization_partition, nop, print_compile,
                                             ts_compile, xla_compile)
from reftrace.torch_bridge.drawing import draw_graph
from reftrace.torch_bridge.dynamo import reftrace_backend
from reftrace.torch_bridge.openmp import throttle_openmp_spinning

__all__ = ["aot_function", "aot_module", "draw_graph", "make_boxed_func", "make_boxed_compiler", "nop",
           "print_compile", "ts_compile", "xla_compile", "default_partition",
           "min_cut_rematerialization_partition", "fusion_partition", "AOTFunction", "AOTModule",
           "RecaptureWarning", "reftrace_backend", "throttle_openmp_spinning"]
