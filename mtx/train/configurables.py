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

# Evaluation (gin_configs/runs/eval.gin): `mtx eval` and the options of periodic eval.
from mtx.eval import evaluate as eval_command  # pylint: disable=g-import-not-at-top,wrong-import-position
from mtx.eval import evaluator as eval_evaluator  # pylint: disable=g-import-not-at-top,wrong-import-position

gin.external_configurable(eval_command.evaluate, name="evaluate")
gin.external_configurable(eval_evaluator.EvalOptions, name="EvalOptions", module="eval")

# `mtx compile` (gin_configs/runs/compile.gin): the train step compiled for a target mesh.
from mtx.train import compile as compile_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

gin.external_configurable(compile_lib.compile_train, name="compile_train")

# `mtx infer` (gin_configs/runs/infer.gin): predictions for a task's inputs, as JSONL.
from mtx.infer import run as infer_command  # pylint: disable=g-import-not-at-top,wrong-import-position

gin.external_configurable(infer_command.infer, name="infer")
