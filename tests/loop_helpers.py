"""Shared test helpers: the tiny T5 of the trainer tests and ``loop.train`` by keywords."""

from mtx.model import T5Config
from mtx.train import loop
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
