"""The T5 v1.1 model: ``T5Config`` (gin: ``model.T5Config``) and the ``T5`` module."""

from mtx.model.t5 import T5, T5Config, init_cache

__all__ = ["T5", "T5Config", "init_cache"]
