"""The models: T5 v1.1 (``T5Config``, gin ``model.T5Config``), the decoder-only Llama
family (``LlamaConfig``, gin ``model.LlamaConfig``), and their LoRA adapters
(``LoraConfig``, gin ``model.LoraConfig``; ``mtx.model.lora``)."""

from mtx.model.llama import Llama, LlamaConfig
from mtx.model.lora import LoraConfig, combine, is_adapter, merge, split
from mtx.model.t5 import T5, T5Config, init_cache

__all__ = [
  "Llama",
  "LlamaConfig",
  "LoraConfig",
  "T5",
  "T5Config",
  "combine",
  "init_cache",
  "is_adapter",
  "merge",
  "split",
]
