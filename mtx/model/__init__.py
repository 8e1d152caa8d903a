"""The models: T5 v1.1 (``T5Config``, gin ``model.T5Config``) and the decoder-only
Llama family (``LlamaConfig``, gin ``model.LlamaConfig``)."""

from mtx.model.llama import Llama, LlamaConfig
from mtx.model.t5 import T5, T5Config, init_cache

__all__ = ["Llama", "LlamaConfig", "T5", "T5Config", "init_cache"]
