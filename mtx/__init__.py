"""mtx: multi-task T5 training in JAX."""

__version__ = "0.1.0"
