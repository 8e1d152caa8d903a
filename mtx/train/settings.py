"""A training run's settings, in a few frozen objects passed whole.

Gin binds them as ``train.*`` (``gin_configs/runs/train.gin`` comments every knob);
``TrainConfig`` is that flat, gin-facing object, and the library takes its groups:

    DataSettings        which examples, how they are mixed and laid out (mtx.data)
    StepSettings        what the jitted step computes: model, optimizer, loss, mtl, mesh
    CheckpointSettings  how often to save, how many to keep, where to start from
    LoopSettings        where the run writes, how long it runs, logging and evaluation

Each setting is defined once, with its default, in its group; ``TrainConfig`` holds
every group's fields (it inherits them), and ``config.data`` etc. return the groups.
``mtx compile`` builds only ``DataSettings`` and ``StepSettings`` (the step's shape
comes from them; of the data settings, the rates, split and data seed only choose
examples), never evaluating MODEL_DIR or TRAIN_STEPS. (T5X's ``DatasetConfig`` / ``CheckpointConfig`` and
MaxText's one config object are the models.)

    config = TrainConfig(model_dir="/tmp/run", mixture_or_task_name="demo",
                         task_feature_lengths={"inputs": 32, "targets": 16},
                         train_steps=100, mixture_or_task_module="mixtures.demo")
    mtx.train.loop.train(config)
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

from mtx import parallel, paths
from mtx.data import decoder_only, streaming
from mtx.errors import UserError, check_int, close_names
from mtx.eval.evaluator import EvalOptions
from mtx.model import T5Config
from mtx.train import freeze, optim

NONFINITE_POLICIES = ("skip", "stop")
TASK_GRADS_ROUTES = ("auto", "stacks", "gramian")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings:
  """Which examples a run trains on, how they are mixed, and the batch layout.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture.
    task_feature_lengths: ``{"inputs": N, "targets": M}``, packed row lengths.
    batch_size: global rows per step; divisible by the data x fsdp devices.
    mixture_or_task_module: module(s) to import that register the tasks.
    vocabulary_path: a SentencePiece model for tasks built on the default vocabulary.
    units: task-major units per batch (per-task gradients only); None = automatic.
    task_groups: ``{task name or fnmatch pattern: group}``; mtl acts on groups.
    rate_fn: "mixture", "equal", "examples_proportional" or "temperature".
    rate_maximum: the examples-proportional cap.
    rate_temperature: the temperature of "temperature".
    split: the seqio split to train on.
    data_seed: the data order's seed; None = StepSettings.seed.
    data_shards: data shards (a multiple of the processes); None = one per process.
    stream_tasks: task names or fnmatch patterns that stream (``mtx.data.streaming``)
      instead of being read into memory.
    stream_above_bytes: other tasks stream when their split's files total more
      bytes; None = only ``stream_tasks``.
    stream_window: examples per shuffle window of a streamed task (its memory and
      resume cost).
    stream_use_cached: streamed tasks read seqio's cache when they have one (T5X's
      ``USE_CACHED_TASKS``).
    stream_on_corrupt: a corrupt record in a stream: "stop" or "skip" (and count).
    stream_cache_dirs: folders added to seqio's cache directories (where
      ``seqio_cache_tasks`` wrote cached tasks).
    prefix_lm: how a decoder-only model's rows are made from the text-to-text
      examples (prefix-LM attention, loss on targets only; ``decoder_only.PrefixLM``);
      unused by T5.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int = 32
  mixture_or_task_module: Optional[str] = None
  vocabulary_path: Optional[str] = None
  units: Optional[int] = None
  task_groups: Optional[Mapping[str, str]] = None
  rate_fn: str = "mixture"
  rate_maximum: Optional[float] = None
  rate_temperature: float = 1.0
  split: str = "train"
  data_seed: Optional[int] = None
  data_shards: Optional[int] = None
  stream_tasks: Sequence[str] = ()
  stream_above_bytes: Optional[int] = 1 << 30
  stream_window: int = 4096
  stream_use_cached: bool = True
  stream_on_corrupt: str = "stop"
  stream_cache_dirs: Sequence[str] = ()
  prefix_lm: decoder_only.PrefixLM = decoder_only.PrefixLM()

  def __post_init__(self):
    _make_absolute(self, "vocabulary_path")
    check_int("BATCH_SIZE", self.batch_size, 1)
    check_int("UNITS", self.units, 1, optional=True)
    check_int("DATA_SHARDS", self.data_shards, 1, optional=True)
    check_int("train.data_seed", self.data_seed, 0, optional=True)
    _ = self.stream

  @property
  def stream(self) -> streaming.StreamOptions:
    """Which tasks stream and how, as the data layer takes it."""
    return streaming.StreamOptions(
      tasks=self.stream_tasks,
      above_bytes=self.stream_above_bytes,
      window=self.stream_window,
      use_cached=self.stream_use_cached,
      on_corrupt=self.stream_on_corrupt,
      cache_dirs=self.stream_cache_dirs,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSettings:
  """What the jitted train step computes.

  Attributes:
    model_config: the model (gin_configs/models/*.gin).
    mtl_transforms: mtl transforms or their factories (gin's ``@mtl.pcgrad``).
    optimizer_fn: ``(learning_rate=schedule) -> optax transform``.
    learning_rate: a float or a schedule; None = T5's rsqrt schedule.
    mesh_shape: ``{"data": d, "fsdp": f, "tensor": t}`` within a slice (ICI); None =
      all devices on data.
    dcn_mesh_shape: the same across slices (multi-slice TPU, GPU hosts: DCN); None =
      one slice (``parallel.make_mesh``).
    logical_axis_rules: logical axis name -> mesh axes.
    grad_accum_steps: microbatches per step.
    z_loss: PaLM's z-loss coefficient on log(Z)^2; 0 turns it off.
    label_smoothing: the cross-entropy's label smoothing.
    seed: params init, dropout and the mtl methods' randomness.
    tag_affinity_period: every N steps, TAG's inter-task affinity; 0 = off.
    tag_affinity_lr: its lookahead learning rate; None = the schedule's.
    debug_inject_nonfinite_steps, debug_inject_nonfinite_task: a testing aid (the
      named task's loss is +Inf at these steps); empty in real runs.
    task_grads_route: how a per-task method gets what it needs: "stacks" (one
      gradient per task group held at once: fastest, memory grows with k),
      "gramian" (their Gram matrix layer by layer, then one weighted backward pass:
      memory of a plain step whatever k, about one more backward pass; Gram-based
      methods only, no grad accumulation or TAG), or "auto"
      (``build.choose_task_grads_route``).
    trainable_params: a regex ``re.search``-ed on each param's '/'-joined path
      (``decoder/layers_0/attention/query/kernel``): only matching params are trained;
      the others are frozen (no gradient, no optimizer or mtl state, never changed;
      ``mtx.train.freeze``). None = every param trains (a LoRA model: its adapters).
    frozen_dtype: the dtype the frozen params are stored in (state, checkpoints):
      "bfloat16" halves the frozen base's memory (an 8B LoRA base: 16 instead of 32
      GB); None keeps float32. The trainable params stay float32.
  """

  model_config: T5Config = T5Config()
  mtl_transforms: Sequence = ()
  optimizer_fn: Callable = optim.make_optimizer
  learning_rate: Any = None
  mesh_shape: Optional[Mapping[str, int]] = None
  dcn_mesh_shape: Optional[Mapping[str, int]] = None
  logical_axis_rules: Sequence = parallel.DEFAULT_RULES
  grad_accum_steps: int = 1
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  seed: int = 0
  tag_affinity_period: int = 0
  tag_affinity_lr: Optional[float] = None
  debug_inject_nonfinite_steps: Sequence[int] = ()
  debug_inject_nonfinite_task: Optional[str] = None
  task_grads_route: str = "auto"
  trainable_params: Optional[str] = None
  frozen_dtype: Optional[str] = None

  def __post_init__(self):
    if self.frozen_dtype not in (None,) + freeze.FROZEN_DTYPES:
      raise UserError(
        f"train.frozen_dtype is {self.frozen_dtype!r}; use 'bfloat16' (half the "
        "frozen params' memory), 'float32' or None."
      )
    if self.trainable_params is not None:
      freeze.compile_pattern(self.trainable_params)  # a bad regex fails now
    if self.task_grads_route not in TASK_GRADS_ROUTES:
      raise UserError(
        f"train.task_grads_route is {self.task_grads_route!r}; use one of "
        f"{', '.join(repr(r) for r in TASK_GRADS_ROUTES)}."
      )
    check_int("train.grad_accum_steps", self.grad_accum_steps, 1)
    check_int("train.tag_affinity_period", self.tag_affinity_period, 0)
    check_int("train.seed", self.seed, 0)
    period, lr = self.tag_affinity_period, self.tag_affinity_lr
    if period < 0 or (lr is not None and lr <= 0):
      raise UserError(
        f"train.tag_affinity_period must be >= 0 (got {period}) and "
        f"train.tag_affinity_lr positive or None (got {lr}); 0 turns TAG off and "
        "None uses the schedule's learning rate."
      )

  @property
  def schedule(self) -> Callable:
    """The learning rate as a schedule (step -> lr)."""
    return optim.as_schedule(
      self.learning_rate if self.learning_rate is not None else optim.rsqrt_schedule()
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
  """Checkpoints of a run (orbax, in MODEL_DIR).

  Attributes:
    checkpoint_period: steps between checkpoints (one is also saved at the end and
      on SIGTERM, SIGINT or SIGHUP).
    keep_checkpoints: how many to keep.
    async_checkpoint: write in the background while training goes on.
    initial_checkpoint_path: another run's MODEL_DIR (or step dir) to start from.
    adapters_path: LoRA adapters saved alone (``mtx export`` with
      EXPORT_ADAPTERS_ONLY: adapters.safetensors + lora.json) to start the adapters
      from, on top of the base (fresh, or INITIAL_CHECKPOINT_PATH's); None = fresh
      adapters. Refused when lora.json's LoraConfig, or (per-task) task groups, differ
      from the run's. Unused when the run resumes from its own checkpoint.
  """

  checkpoint_period: int = 1000
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  initial_checkpoint_path: Optional[str] = None
  adapters_path: Optional[str] = None

  def __post_init__(self):
    _make_absolute(self, "initial_checkpoint_path", "adapters_path")
    check_int("CHECKPOINT_PERIOD", self.checkpoint_period, 0)
    check_int("train.keep_checkpoints", self.keep_checkpoints, 1, optional=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopSettings:
  """Where a run writes, how long it runs, what it logs and evaluates.

  Attributes:
    model_dir: checkpoints, metrics.jsonl, config.gin, tasks.json, TensorBoard; made
      absolute (``~`` expanded) here. One training at a time writes it
      (``mtx.runtime.lock``).
    train_steps: total steps (a resumed run stops here too).
    log_period: steps between metrics.jsonl / TensorBoard lines.
    eval_period: steps between evaluations; 0 = none.
    eval_options: what and how to evaluate (``EvalOptions``); None = its defaults.
    tensorboard: also write TensorBoard events.
    print_param_table: also print the parameter table (it is always written to
      MODEL_DIR/model-info.txt, with a one-line summary in the log).
    nonfinite_policy: "skip" or "stop" on a step with a NaN/Inf (runs/train.gin).
    peak_tflops: one device's peak dense TFLOP/s for ``perf/mfu``; None = from the
      device kind (``mtx.train.flops.PEAK_TFLOPS``; none for CPUs: no ``perf/mfu``).
  """

  model_dir: str
  train_steps: int
  log_period: int = 100
  eval_period: int = 0
  eval_options: Optional[EvalOptions] = None
  tensorboard: bool = True
  print_param_table: bool = False
  nonfinite_policy: str = "skip"
  peak_tflops: Optional[float] = None

  def __post_init__(self):
    _make_absolute(self, "model_dir")
    paths.check_checkpoint_dir("MODEL_DIR", self.model_dir)
    if self.peak_tflops is not None and not self.peak_tflops > 0:
      raise UserError(
        f"train.peak_tflops is {self.peak_tflops}; give one device's peak TFLOP/s "
        "(> 0), or None to take it from the device kind."
      )
    check_int("TRAIN_STEPS", self.train_steps, 1)
    check_int("LOG_PERIOD", self.log_period, 1)
    check_int("EVAL_PERIOD", self.eval_period, 0)
    if self.nonfinite_policy not in NONFINITE_POLICIES:
      raise UserError(
        f"train.nonfinite_policy is '{self.nonfinite_policy}'"
        f"{close_names(str(self.nonfinite_policy), NONFINITE_POLICIES)}; use 'skip' "
        "(skip the update, count it) or 'stop' (stop the run, naming the step)."
      )


def _make_absolute(settings, *names: str) -> None:
  """Makes the named path fields of a frozen settings object absolute (``mtx.paths``)."""
  for name in names:
    object.__setattr__(settings, name, paths.absolute(getattr(settings, name)))


def _group(config, cls):
  return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopSettings, CheckpointSettings, StepSettings, DataSettings):
  """Every ``train.*`` setting: what gin's ``train`` builds and ``mtx train`` runs.

  The fields are the groups' (see each group for their meaning); ``data``, ``step``,
  ``checkpoint`` and ``loop`` return the groups, which check their values.
  """

  def __post_init__(self):
    # Paths are absolute from here on: a relative MODEL_DIR means the same directory
    # to every part of the run, whatever the working directory.
    _make_absolute(
      self, "model_dir", "initial_checkpoint_path", "vocabulary_path", "adapters_path"
    )
    # Building each group checks its values now, before any work.
    _ = (self.data, self.step, self.checkpoint, self.loop)

  @property
  def data(self) -> DataSettings:
    return _group(self, DataSettings)

  @property
  def step(self) -> StepSettings:
    return _group(self, StepSettings)

  @property
  def checkpoint(self) -> CheckpointSettings:
    return _group(self, CheckpointSettings)

  @property
  def loop(self) -> LoopSettings:
    return _group(self, LoopSettings)
