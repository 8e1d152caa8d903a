"""mtx: multi-task T5 training in JAX."""

from mtx import tf_logs

# Before any module imports TensorFlow (seqio does): its start-up notices are noise here.
tf_logs.install()

__version__ = "0.1.0"
