"""Inference: decoding with the key/value cache (``decoding``), batched and sharded
prediction and scoring (``predict.Predictor``), and the ``mtx infer`` command (``run``)."""

from mtx.infer.decoding import beam_search, decode, sample_loop
from mtx.infer.predict import Predictor

__all__ = ["Predictor", "beam_search", "decode", "sample_loop"]
