"""Gin registration of mtx's knobs, in one place at the edge (library code stays gin-free).

Names as gin files use them:
  train.*                 mtx.train.loop.train (the run: data, steps, mesh, logging)
  model.T5Config.*        model size and options (gin_configs/models/*.gin)
  optim.make_optimizer.*  optimizer (Adafactor or AdamW, clipping, weight decay)
  optim.learning_rate_fn.*  schedule (rsqrt, warmup_cosine, constant)
  mtl.*                   multi-task methods (gin_configs/mtl/*.gin)
Each command of the CLI (mtx.train.cli.COMMANDS) calls one configurable registered here.
"""

import gin

from mtx.model import T5Config
from mtx.train import loop, optim

gin.external_configurable(loop.train, name="train")
gin.external_configurable(T5Config, name="T5Config", module="model")
gin.external_configurable(optim.make_optimizer, name="make_optimizer", module="optim")
gin.external_configurable(optim.learning_rate_fn, name="learning_rate_fn", module="optim")

import mtx.mtl.configurables  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
