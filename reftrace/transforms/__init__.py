"""Transforms: pure functions Graph -> Graph (and the front-end entry ``trace``)."""
