"""Shared test helpers: the tiny T5 of the trainer tests and ``loop.train`` by keywords."""

from mtx.model import T5Config
from mtx.train import loop, optim
from mtx.train.settings import TrainConfig

TINY = T5Config(
  emb_dim=32,
  num_heads=2,
  head_dim=16,
  mlp_dim=64,
  num_encoder_layers=1,
  num_decoder_layers=1,
)


def loop_train(devices=None, **settings):
  """``loop.train`` of the TrainConfig with these settings."""
  return loop.train(TrainConfig(**settings), devices=devices)


def tiny_train(model_dir, steps, **settings):
  """A run of the tiny T5 on tests/tiny_mixture.py's "tiny" mixture (AdamW at 1e-3,
  batch 8, lengths 16/16), logging every step, no periodic checkpoint, TensorBoard or
  parameter table unless ``settings`` say otherwise."""
  settings.setdefault("log_period", 1)
  settings.setdefault("checkpoint_period", 0)
  settings.setdefault("print_param_table", False)
  settings.setdefault("tensorboard", False)
  return loop_train(
    model_dir=str(model_dir),
    mixture_or_task_name="tiny",
    task_feature_lengths={"inputs": 16, "targets": 16},
    train_steps=steps,
    batch_size=8,
    model_config=TINY,
    optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
    learning_rate=1e-3,
    **settings,
  )
