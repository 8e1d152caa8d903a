"""Evaluation: per-task metrics and loss (evaluator), files (results), summary, periodic
evaluation in training. The `mtx eval` command is `mtx.cli.evaluate`.

Submodules are imported by name (``from mtx.eval import evaluator``) so that task
modules can use ``mtx.eval.metrics`` without pulling in JAX.
"""
