"""Evaluation: per-task metrics and loss (evaluator), files (results), summary, `mtx eval`.

Submodules are imported by name (``from mtx.eval import evaluator``) so that task
modules can use ``mtx.eval.metrics`` without pulling in JAX.
"""
