"""Composite primitives of neural networks (the ``jax.nn`` of reftrace).

Each function here binds one composite primitive (``reftrace.composite``): one equation
with a decomposition into core primitives (its meaning), its own VJP rule emitting
composite backward equations, and fused lowerings in the backends (torch: the ATen
kernel; JAX: what XLA fuses). The torch bridge captures the matching ATen ops as these.

    activations: relu, gelu, silu, softmax, log_softmax (and their backward equations), hardsigmoid (torch's slope)
    norms:       layer_norm, group_norm, batch_norm_train, batch_norm_eval (and backward equations)
    attention:   dot_product_attention (and its backward equation)
    linear:      linear (x @ w + b, torch's addmm)
    convolution: convolution (torch's layout, bias fused; input and weight gradient equations)
    pooling:     max_pool (values and torch's indices; and its backward equation)
    embedding:   embedding (and its backward equation)
    losses:      nll_loss (cross-entropy = log_softmax + nll_loss), binary_cross_entropy (and their backward
                 equations)
    ctc:         ctc_loss (torch's values and gradient; and its backward equation)
    rnn:         lstm_layer (one layer, one direction; and its backward equation)
    special:     xlogy, xlog1py, entr (torch's VJPs: no NaN from a zero cotangent where a log is ``-inf``)
    vector norms: vector_norm (torch's kernel and its norm_backward formula)
"""
from reftrace.nn.activations import gelu, hardsigmoid, log_softmax, relu, silu, softmax
from reftrace.nn.attention import dot_product_attention
from reftrace.nn.convolution import convolution
from reftrace.nn.ctc import ctc_loss
from reftrace.nn.rnn import lstm_layer
from reftrace.nn.pooling import max_pool
from reftrace.nn.embeddings import embedding
from reftrace.nn.losses import binary_cross_entropy, nll_loss
from reftrace.nn.dense import linear
from reftrace.nn.norms import batch_norm_eval, batch_norm_train, group_norm, layer_norm
from reftrace.nn.special import entr, xlog1py, xlogy
from reftrace.nn.vector_norms import vector_norm

__all__ = ["relu", "gelu", "silu", "hardsigmoid", "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm_train", "batch_norm_eval", "dot_product_attention",
           "linear", "convolution", "max_pool", "embedding", "nll_loss", "binary_cross_entropy", "ctc_loss", "lstm_layer", "xlogy", "xlog1py",
           "entr", "vector_norm"]
