"""Inference: decoding with the key/value cache (``decoding``, ``DecodeOptions``), batched
and sharded prediction and scoring (``predict.Predictor``). The ``mtx infer`` command is
``mtx.cli.infer``."""

from mtx.infer.decoding import DecodeOptions, beam_search, decode, sample_loop
from mtx.infer.predict import Predictor

__all__ = ["DecodeOptions", "Predictor", "beam_search", "decode", "sample_loop"]
