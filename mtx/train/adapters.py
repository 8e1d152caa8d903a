"""LoRA in the trainer: the adapters train, the base is frozen (``mtx.model.lora``).

With ``model_config.lora`` enabled (gin_configs/adapters/*.gin), a run:

* trains the adapters only: ``train.trainable_params`` defaults to ``ADAPTER_PATTERN``
  (the adapter leaves, ``lora.is_adapter``), so the base gets no gradient and no
  optimizer state (``mtx.train.freeze``), and per-task gradients and every mtl method
  cover the adapters only (a set ``train.trainable_params`` still wins);
* has one per-task adapter per task group (``LoraConfig.num_adapters`` is filled in
  from the mixture: tasks, or ``train.task_groups``' groups) when ``per_task``;
* routes the per-task adapters by each token's task (``mtx.train.adapter_ids``);
* starts the base from ``INITIAL_CHECKPOINT_PATH`` (Hugging Face, T5X or mtx) while the
  adapters keep their fresh init (``init_adapters``), or from ``train.adapters_path``'s
  saved adapters (``mtx.runtime.adapters_io``) on top.

>>> cfg = attach(T5Config(lora=LoraConfig(targets="query", per_task=True)), 3)
>>> cfg.lora.num_adapters, trainable_pattern(None, cfg)
(3, '_lora_')
"""

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax

from mtx.errors import UserError
from mtx.model import lora
from mtx.runtime import params as params_lib

# '/'-joined param paths of adapters hold this (``lora.is_adapter``).
ADAPTER_PATTERN = re.escape(lora.MARK)


def enabled(model_config) -> bool:
  """Whether the model has LoRA adapters."""
  return bool(getattr(model_config, "lora", None) and model_config.lora.enabled)


def per_task(model_config) -> bool:
  """Whether the model has per-task adapters (routed by per-token adapter ids)."""
  return enabled(model_config) and model_config.lora.per_task


def attach(model_config, num_groups: int):
  """``model_config`` with ``lora.num_adapters`` = ``num_groups`` for per-task adapters;
  unchanged otherwise.

  Raises:
    UserError: ``num_adapters`` was set to another number (a group would go without
      its adapter, or an adapter would never train).
  """
  if not per_task(model_config):
    return model_config
  if model_config.lora.num_adapters not in (0, num_groups):
    raise UserError(
      f"model.LoraConfig.num_adapters is {model_config.lora.num_adapters} but the "
      f"mixture has {num_groups} task groups, one adapter each; leave num_adapters at "
      "0 (the trainer sets it) or set train.task_groups to that many groups."
    )
  return dataclasses.replace(
    model_config, lora=dataclasses.replace(model_config.lora, num_adapters=num_groups)
  )


def trainable_pattern(pattern: Optional[str], model_config) -> Optional[str]:
  """``train.trainable_params`` as the run uses it: as set, or the adapters for a
  LoRA model when unset (None: every param trains)."""
  if pattern is None and enabled(model_config):
    return ADAPTER_PATTERN
  return pattern


def init_adapters(model: nn.Module, seed: int, lengths: tuple, shardings: Any) -> dict:
  """Fresh adapters (the same values ``params_lib.init_params`` gives them for this
  seed), initialised into ``shardings`` (the adapter subtree's); the base's init is
  dead code XLA removes, so no second copy of the base is ever allocated."""

  def init(key):
    params = nn.unbox(
      model.init(key, **params_lib.dummy_inputs(model, *lengths))["params"]
    )
    return lora.split(params)[0]

  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
