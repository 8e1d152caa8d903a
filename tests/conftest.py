"""Test setup: fake CPU devices for sharding tests, quiet TensorFlow."""

import os
import sys

import pytest

# Eight fake CPU devices, set before JAX initialises (README, Sharding: tested on one machine).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _fresh_hf_mixture():
  """tests/hf_mixture.py's tasks take the default vocabulary of the checkpoint the run
  loads when the module is imported; a later test on another checkpoint (T5, then a
  Llama) imports it again, as a new process would."""
  sys.modules.pop("hf_mixture", None)
  yield
