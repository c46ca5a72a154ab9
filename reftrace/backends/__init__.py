"""Backends: a rule table per backend plus one interpreter (``reftrace.interpreter.eval_graph``)."""
