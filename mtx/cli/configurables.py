"""Gin registration of mtx's knobs, in one place at the edge (library code stays gin-free).

Names as gin files use them:
  train.*                 mtx.train.settings.TrainConfig (the run: data, step, checkpoints,
                          logging; gin_configs/runs/train.gin)
  model.T5Config.*        model size and options (gin_configs/models/*.gin)
  model.LoraConfig.*      LoRA adapters (gin_configs/adapters/*.gin)
  optim.make_optimizer.*  optimizer (Adafactor or AdamW, clipping, weight decay)
  optim.learning_rate_fn.*  schedule (rsqrt, warmup_cosine, constant)
  mtl.*                   multi-task methods (gin_configs/mtl/*.gin), e.g.
                          ``train.mtl_transforms = [@mtl.uncertainty_weighting, @mtl.pcgrad]``
  eval.EvalOptions.*      evaluation (gin_configs/runs/eval.gin)
  decoder_only.PrefixLM.*  a decoder-only model's rows (runs/train.gin; train, eval, infer)
  evaluate.*, infer.*, compile_train.*, export.*  the other commands
                          (runs/{eval,infer,compile,export}.gin)
Each command of the CLI (``mtx.cli.main.COMMANDS``) calls one configurable registered here.
"""

import gin

from mtx import mtl
from mtx.cli import compile as compile_command
from mtx.cli import evaluate as eval_command
from mtx.cli import export as export_command
from mtx.cli import infer as infer_command
from mtx.data import decoder_only
from mtx.eval.evaluator import EvalOptions
from mtx.model import LlamaConfig, LoraConfig, T5Config
from mtx.train import optim
from mtx.train.settings import TrainConfig

gin.external_configurable(TrainConfig, name="train")
gin.external_configurable(T5Config, name="T5Config", module="model")
gin.external_configurable(LlamaConfig, name="LlamaConfig", module="model")
gin.external_configurable(LoraConfig, name="LoraConfig", module="model")
gin.external_configurable(optim.make_optimizer, name="make_optimizer", module="optim")
gin.external_configurable(optim.learning_rate_fn, name="learning_rate_fn", module="optim")
for _name, _fn in sorted(mtl.METHODS.items()):
  gin.external_configurable(_fn, name=_name, module="mtl")
gin.external_configurable(mtl.masked, name="masked", module="mtl")
gin.external_configurable(EvalOptions, name="EvalOptions", module="eval")
gin.external_configurable(decoder_only.PrefixLM, name="PrefixLM", module="decoder_only")
gin.external_configurable(eval_command.evaluate, name="evaluate")
gin.external_configurable(compile_command.compile_train, name="compile_train")
gin.external_configurable(infer_command.infer, name="infer")
gin.external_configurable(export_command.export, name="export")

# Every name registered above, as gin selects it (``mtx.cli.gin_check`` checks flags
# against their parameters before this module is imported).
NAMES = (
  "train",
  "model.T5Config",
  "model.LlamaConfig",
  "model.LoraConfig",
  "optim.make_optimizer",
  "optim.learning_rate_fn",
  *(f"mtl.{name}" for name in sorted(mtl.METHODS)),
  "mtl.masked",
  "eval.EvalOptions",
  "decoder_only.PrefixLM",
  "evaluate",
  "compile_train",
  "infer",
  "export",
)
