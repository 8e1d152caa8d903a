"""Test setup: fake CPU devices for sharding tests, quiet TensorFlow."""

import os

# Eight fake CPU devices, set before JAX initialises (README, Sharding: tested on one machine).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
