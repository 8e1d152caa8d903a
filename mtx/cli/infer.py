"""``mtx infer``: predictions of a trained run for a task's inputs, as JSONL.

Reads the same gin files as ``mtx train`` plus ``runs/infer.gin``::

    mtx infer --gin_file=gin_configs/demo.gin --gin_file=runs/infer.gin \\
        --gin.INFER_TASK="'demo_sort'" --gin.INFER_INPUT="'in.txt'" \\
        --gin.INFER_OUTPUT="'out.jsonl'"

Input (``INFER_INPUT``; '-' is stdin): a text file, one input per line, or JSONL, one
object per line (by the file's extension, or ``INFER_INPUT_FORMAT``). Each input goes
through the task's own preprocessing (seqio), in one of two ways (``INFER_PREPROCESS``):

- ``'tokenize'``: the input is the model's input text ("sort: 42 7 19", or for GLUE
  "rte sentence1: ... sentence2: ..."); the task's preprocessors from tokenization on
  run (tokenize, EOS, truncation), its text preprocessors are skipped.
- ``'task'``: JSONL objects are examples as the task's source gives them (for GLUE
  ``{"sentence1": ..., "sentence2": ..., "label": -1}``) and every preprocessor runs.
- ``'auto'`` (default): ``'tokenize'`` when the inputs have an "inputs" field (text lines
  always do), ``'task'`` for JSONL objects without one on tasks with text preprocessors.

Output (``INFER_OUTPUT``, written atomically, in input order): one JSON object per input,
``{"inputs": text, "prediction": text, "score": float, ...}`` plus the input object's
other fields. ``score`` is the sum of the prediction's token log-probabilities
(length-penalised for beam search). Decoding (``mtx.infer.predict.Predictor``) is
greedy, sampled or beam search, jitted on the run's mesh, with the newest checkpoint of
MODEL_DIR (or ``INFER_CHECKPOINT_PATH`` / ``INFER_CHECKPOINT_STEP``).
"""

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence, TextIO

import jax
import seqio
import tensorflow as tf

from mtx import parallel, paths
from mtx.data import chat_template, decoder_only, registry
from mtx.data import pipeline as data_pipeline
from mtx.errors import UserError, check_int, close_names
from mtx.infer import decoding
from mtx.infer.predict import Predictor, decoding_pad_id
from mtx.model import LlamaConfig, T5Config
from mtx.runtime import adapters_io, pretrained
from mtx.runtime import params as params_lib
from mtx.runtime import progress as progress_lib

log = logging.getLogger("mtx")

FORMATS = ("auto", "text", "jsonl")
PREPROCESS_MODES = ("auto", "tokenize", "task")
_JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")
_TOKENIZERS = (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos)
# Fields of the output that the predictor owns; an input's own fields never replace them.
_OUTPUT_FIELDS = ("inputs", "prediction", "score", "predictions")


@dataclasses.dataclass
class InferResult:
  """What ``mtx infer`` did; ``str()`` is the line the CLI prints."""

  count: int
  path: str
  task: str
  seconds: float

  def __str__(self) -> str:
    where = "stdout" if self.path == "-" else self.path
    noun = "prediction" if self.count == 1 else "predictions"
    return f"Wrote {self.count} {noun} to {where}."


# ---- reading inputs -------------------------------------------------------------------


def read_records(
  path: str, input_format: str = "auto", stdin: Optional[TextIO] = None
) -> list:
  """The inputs as a list of dicts: text lines become ``{"inputs": line}``.

  Args:
    path: a file, or '-' for ``stdin``.
    input_format: "text", "jsonl", or "auto" (by extension: .jsonl/.json/.ndjson are
      JSONL; for stdin, JSONL when the first non-blank line starts with '{').
    stdin: the stream '-' reads (default ``sys.stdin``).

  Raises:
    UserError: a missing file, an unknown format, or a JSONL line that is not an
      object (with its line number).
  """
  if input_format not in FORMATS:
    raise UserError(
      f"INFER_INPUT_FORMAT {input_format!r} is not one of {FORMATS}; "
      "set it to one of them."
    )
  if path == "-":
    text = (stdin if stdin is not None else sys.stdin).read()
    where = "stdin"
  else:
    if paths.isdir(path):
      raise UserError(
        f"INFER_INPUT {path} is a directory; point it at a text or JSONL file of "
        "inputs (or '-' for stdin)."
      )
    if not paths.isfile(path):
      raise UserError(
        f"INFER_INPUT {path} does not exist; point it at a text or JSONL "
        "file of inputs (or '-' for stdin)."
      )
    text = _read_utf8(path)
    where = path
  lines = text.splitlines()
  if input_format == "auto":
    if path == "-":
      first = next((line for line in lines if line.strip()), "")
      input_format = "jsonl" if first.lstrip().startswith("{") else "text"
    else:
      input_format = "jsonl" if path.lower().endswith(_JSONL_EXTENSIONS) else "text"
  if input_format == "text":
    return [{"inputs": line} for line in lines]
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(
        f"Line {number} of {where} is not valid JSON ({e.msg}); write "
        "one JSON object per line."
      ) from e
    if not isinstance(record, dict):
      raise UserError(
        f"Line {number} of {where} is a JSON {type(record).__name__}, "
        'not an object; write one object with an "inputs" field per '
        "line."
      )
    record["_line"] = number
    records.append(record)
  return records


def _read_utf8(path: str) -> str:
  """The file's text; a UserError naming the first line that is not UTF-8."""
  data = paths.read_bytes(path)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise UserError(
      f"INFER_INPUT {path}:{line} is not valid UTF-8 ({e.reason} at byte "
      f"{e.start}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    ) from e


def _same_path(a: str, b: str) -> bool:
  """Whether two paths name one file (symlinks resolved locally; URLs compared)."""
  if paths.is_remote(a) or paths.is_remote(b):
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output_path: str, input_path: str) -> None:
  """Refuses an INFER_OUTPUT that is a directory or the input itself."""
  if output_path == "-":
    return
  if paths.isdir(output_path):
    raise UserError(
      f"INFER_OUTPUT {output_path} is a directory; name a file in it, e.g. "
      f"{paths.join(output_path, 'predictions.jsonl')} (or '-' for stdout)."
    )
  if input_path != "-" and _same_path(output_path, input_path):
    raise UserError(
      f"INFER_OUTPUT {output_path} is INFER_INPUT too, which the predictions would "
      "overwrite; choose another output file."
    )


# ---- preprocessing --------------------------------------------------------------------


def _is_tokenizer(prep: Any) -> bool:
  fn = prep
  while isinstance(fn, functools.partial):
    fn = fn.func
  return fn in _TOKENIZERS


def split_preprocessors(task: seqio.Task) -> tuple:
  """(text preprocessors, the rest from tokenization on), cache placeholders dropped."""
  preps = [
    p for p in task.preprocessors if not isinstance(p, seqio.CacheDatasetPlaceholder)
  ]
  for i, prep in enumerate(preps):
    if _is_tokenizer(prep):
      return preps[:i], preps[i:]
  return [], preps  # No seqio tokenizer: run everything on the inputs.


def choose_preprocess(
  records: Sequence[dict],
  has_text_preprocessors: bool,
  preprocess: str,
  task_name: str,
  where: str,
) -> str:
  """Resolves ``INFER_PREPROCESS`` ('auto') to 'tokenize' or 'task'; checks "inputs"."""
  if preprocess not in PREPROCESS_MODES:
    raise UserError(
      f"INFER_PREPROCESS {preprocess!r} is not one of "
      f"{PREPROCESS_MODES}; set it to one of them."
    )
  without = [r for r in records if "inputs" not in r]
  if preprocess == "auto":
    if not without:
      return "tokenize"
    if has_text_preprocessors and len(without) == len(records):
      return "task"
  if preprocess == "task":
    return "task"
  if without:
    line = without[0].get("_line", "?")
    hint = (
      " (or give every line the task's source fields and set INFER_PREPROCESS='task')"
      if has_text_preprocessors
      else ""
    )
    raise UserError(
      f'Line {line} of {where} has no "inputs" field; give every JSONL '
      f"object the input text of task '{task_name}' as \"inputs\"{hint}."
    )
  return "tokenize"


def _kind(value: Any) -> Any:
  """The tf dtype of a JSON scalar, or None."""
  if isinstance(value, bool):
    return tf.bool
  if isinstance(value, int):
    return tf.int64
  if isinstance(value, float):
    return tf.float32
  if isinstance(value, str):
    return tf.string
  return None


def _tf_spec(values: Sequence[Any]) -> Optional[tf.TensorSpec]:
  """A TensorSpec that fits every value (scalars, or lists of scalars), or None.

  Ints mixed with floats are floats; lists that are all empty are strings.
  """

  def unify(kinds):
    if kinds <= {tf.int64, tf.float32} and len(kinds) == 2:
      return tf.float32
    return next(iter(kinds)) if len(kinds) == 1 else None

  if all(isinstance(v, list) for v in values):
    inner = {_kind(x) for v in values for x in v}
    kind = unify(inner) if inner else tf.string
    return None if kind is None else tf.TensorSpec([None], kind)
  if any(isinstance(v, list) for v in values):
    return None
  kind = unify({_kind(v) for v in values})
  return None if kind is None else tf.TensorSpec([], kind)


def _source_dataset(
  records: Sequence[dict], mode: str, has_text_preprocessors: bool
) -> tf.data.Dataset:
  """The records as a tf.data source for the task's preprocessors."""
  if mode == "tokenize":
    rows = [{"inputs": str(r["inputs"]), "targets": ""} for r in records]
  else:
    rows = [{k: v for k, v in r.items() if k != "_line"} for r in records]
    if not has_text_preprocessors:
      rows = [dict(r, targets=r.get("targets", "")) for r in rows]
  keys = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
  signature = {}
  for key in keys:
    spec = _tf_spec([r[key] for r in rows])
    if spec is not None:
      signature[key] = spec

  def generate():
    for r in rows:
      yield {k: r[k] for k in signature}

  return tf.data.Dataset.from_generator(generate, output_signature=signature)


def preprocess(
  task: seqio.Task,
  records: Sequence[dict],
  mode: str,
  inputs_length: int,
  targets_length: int,
) -> tuple:
  """Runs the task's preprocessing on the records.

  Returns:
    (token id lists of the inputs, EOS included and cut to ``inputs_length``;
     the input texts: the record's "inputs", or the text the task's preprocessors
     made when ``mode == 'task'``).

  Raises:
    UserError: the preprocessors fail on the records or drop some of them.
  """
  text_preps, token_preps = split_preprocessors(task)
  preps = token_preps if mode == "tokenize" else text_preps + token_preps
  source_ds = _source_dataset(records, mode, bool(text_preps))
  source = seqio.FunctionDataSource(
    lambda split, shuffle_files, seed=None: source_ds, splits=("infer",)
  )
  adhoc = seqio.Task(
    task.name,
    source=source,
    output_features=task.output_features,
    preprocessors=preps,
    shuffle_buffer_size=None,
  )
  try:
    ds = adhoc.get_dataset(
      {"inputs": inputs_length, "targets": targets_length},
      split="infer",
      shuffle=False,
      seed=0,
      try_in_mem_cache=False,
    )
    examples = list(ds.as_numpy_iterator())
  except UserError:
    raise  # a preprocessor's own sentence (UserError is a ValueError too)
  except (KeyError, ValueError, TypeError, tf.errors.OpError) as e:
    text = " ".join(str(e).split())
    missing = re.findall(r"KeyError: '([^']+)'", text)
    if isinstance(e, KeyError) and missing:
      reason = f"no field '{missing[-1]}'"
    else:
      reason = f"{type(e).__name__}: {text[-200:]}"
    raise UserError(
      f"The preprocessors of task '{task.name}' failed on the inputs "
      f"({reason}); give each input the fields the task's source has, "
      "or set INFER_PREPROCESS='tokenize' with an \"inputs\" text."
    ) from e
  if len(examples) != len(records):
    raise UserError(
      f"The preprocessors of task '{task.name}' turned {len(records)} inputs "
      f"into {len(examples)} examples; inference needs one example per "
      "input (use INFER_PREPROCESS='tokenize')."
    )
  tokens = [[int(t) for t in ex["inputs"]] for ex in examples]
  if mode == "tokenize":
    texts = [str(r["inputs"]) for r in records]
  else:
    texts = [
      _text(ex.get("inputs_pretokenized", r.get("inputs", "")))
      for ex, r in zip(examples, records)
    ]
  return tokens, texts


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---- output ---------------------------------------------------------------------------


def output_rows(
  records: Sequence[dict],
  texts: Sequence[str],
  predictions: Sequence,
  scores: Sequence,
) -> list:
  """The output objects: inputs, prediction, score, then the input's other fields.

  An input's prediction and score may be lists (the n best, best first): its
  ``prediction`` and ``score`` are then the best, and ``predictions`` lists all n as
  ``{"prediction": text, "score": float}``.
  """
  rows = []
  for record, text, prediction, score in zip(records, texts, predictions, scores):
    if isinstance(prediction, list):
      n_best = [{"prediction": p, "score": float(s)} for p, s in zip(prediction, score)]
      row = {"inputs": text, **n_best[0], "predictions": n_best}
    else:
      row = {"inputs": text, "prediction": prediction, "score": float(score)}
    row.update(
      {k: v for k, v in record.items() if k not in _OUTPUT_FIELDS and k != "_line"}
    )
    rows.append(row)
  return rows


def write_jsonl(
  path: str, rows: Sequence[Mapping[str, Any]], stdout: Optional[TextIO] = None
) -> None:
  """Writes the rows as JSONL atomically: a temporary file, then a rename; '-' writes
  them to ``stdout`` (default ``sys.stdout``)."""
  text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  if path == "-":
    stream = stdout if stdout is not None else sys.stdout
    stream.write(text)
    stream.flush()
    return
  try:
    paths.makedirs(paths.dirname(paths.absolute(path)))
  except OSError as e:
    raise UserError(
      f"INFER_OUTPUT {path} cannot be written ({e.strerror}); choose a writable path."
    ) from e
  # Temp file, fsync, rename (one upload on object stores); a failed write is one
  # sentence (WriteError, a UserError).
  paths.write_atomically(path, text)


class _InputsProgress(progress_lib.Progress):
  """The training progress bar, counting inputs instead of steps."""

  def line(self, step, info, now=None):
    return super().line(step, info, now).replace(" steps/s", " inputs/s", 1)


# ---- the command ----------------------------------------------------------------------


def _find_task(
  task_name: Optional[str], mixture_or_task_name: str, spec: registry.MixtureSpec
) -> seqio.Task:
  """The task whose preprocessing the inputs get: INFER_TASK or the run's only task."""
  if task_name is None:
    if spec.num_tasks == 1:
      return spec.tasks[0]
    raise UserError(
      f"'{mixture_or_task_name}' has {spec.num_tasks} tasks; set "
      f"INFER_TASK to the one whose inputs these are (e.g. "
      f"--gin.INFER_TASK=\"'{spec.task_names[0]}'\")."
    )
  if task_name not in seqio.TaskRegistry.names():
    if task_name in seqio.MixtureRegistry.names():
      names = sorted(t.name for t in seqio.get_mixture_or_task(task_name).tasks)
      listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
      raise UserError(
        f"INFER_TASK '{task_name}' is a mixture; set it to one of its tasks ({listed})."
      )
    candidates = set(spec.task_names) | set(seqio.TaskRegistry.names())
    raise UserError(
      f"INFER_TASK '{task_name}' is not a registered seqio task"
      f"{close_names(task_name, candidates)}; set it to a task of "
      f"'{mixture_or_task_name}' or set MIXTURE_OR_TASK_MODULE to the "
      "module that registers it."
    )
  task = seqio.get_mixture_or_task(task_name)
  for key in ("inputs", "targets"):
    if key not in task.output_features:
      raise UserError(
        f"INFER_TASK '{task_name}' has no '{key}' output feature; choose "
        "an inputs -> targets task."
      )
  if task.output_features["targets"].vocabulary != spec.vocabulary:
    raise UserError(
      f"INFER_TASK '{task_name}' uses another vocabulary than the run's "
      f"'{mixture_or_task_name}'; choose a task with the run's vocabulary."
    )
  return task


def _default_output(model_dir: str, input_path: str, task_name: str) -> str:
  stem = "stdin" if input_path == "-" else os.path.splitext(paths.basename(input_path))[0]
  return paths.join(model_dir, "infer", f"{stem}.{task_name}.jsonl")


def _checkpoint_path(
  model_dir: str, checkpoint_path: Optional[str], checkpoint_step: Optional[int]
) -> tuple:
  """(the path to read params from, how errors name it)."""
  path = checkpoint_path or model_dir
  what = "INFER_CHECKPOINT_PATH" if checkpoint_path else "MODEL_DIR"
  if checkpoint_step is not None:
    path = paths.join(path, str(int(checkpoint_step)))
    what = f"INFER_CHECKPOINT_STEP {checkpoint_step} in {what}"
  return path, what


def _predict(predictor: Predictor, params, tokens: list, show_progress) -> tuple:
  """(ids, scores) of every input, with a progress bar on process 0 when asked."""
  bar = _InputsProgress(
    len(tokens), enabled=(show_progress if jax.process_index() == 0 else False)
  )
  try:
    return predictor.predict_with_scores(params, tokens, on_batch=bar.update)
  finally:
    bar.close()


def _chat_template(
  model_config, prefix_lm: decoder_only.PrefixLM, feature: seqio.Feature
) -> Optional[chat_template.TokenTemplate]:
  """The prompts' chat template (``decoder_only.PrefixLM.chat_template``, a decoder-only
  model only), or None."""
  if isinstance(model_config, LlamaConfig) and prefix_lm.chat_template:
    return chat_template.TokenTemplate.for_vocabulary(feature.vocabulary)
  return None


def infer(
  *,
  model_dir: str,
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  input_path: Optional[str] = None,
  output_path: Optional[str] = None,
  task_name: Optional[str] = None,
  input_format: str = "auto",
  preprocess_mode: str = "auto",
  mixture_or_task_module: Optional[str] = None,
  vocabulary_path: Optional[str] = None,
  model_config: T5Config = T5Config(),
  prefix_lm: decoder_only.PrefixLM = decoder_only.PrefixLM(),
  checkpoint_path: Optional[str] = None,
  checkpoint_step: Optional[int] = None,
  initial_checkpoint_path: Optional[str] = None,
  batch_size: int = 32,
  inputs_length: Optional[int] = None,
  max_decode_length: Optional[int] = None,
  decode_method: str = "greedy",
  num_beams: int = 4,
  length_penalty: float = 0.6,
  temperature: float = 1.0,
  top_k: int = 0,
  seed: int = 0,
  num_return: int = 1,
  mesh_shape: Optional[Mapping[str, int]] = None,
  dcn_mesh_shape: Optional[Mapping[str, int]] = None,
  logical_axis_rules: Sequence = parallel.DEFAULT_RULES,
  show_progress: Optional[bool] = None,
  devices: Optional[Sequence[jax.Device]] = None,
  stdin: Optional[TextIO] = None,
) -> InferResult:
  """Predicts a task's outputs for the given inputs; see the module docstring.

  Paths may be relative or start with ``~``; they are made absolute here.

  Args:
    model_dir: the trained run (its newest checkpoint is used); a run still training
      may be read (this takes no lock).
    mixture_or_task_name, task_feature_lengths, mixture_or_task_module,
      vocabulary_path, model_config, mesh_shape, dcn_mesh_shape, logical_axis_rules: as
      for training.
    prefix_lm: a decoder-only model's prompts, as for training (``train.prefix_lm``:
      start token, prompt attention); unused by T5.
    input_path: the inputs (INFER_INPUT); '-' reads stdin.
    output_path: the JSONL to write ('-': stdout); None =
      MODEL_DIR/infer/<input name>.<task>.jsonl.
    task_name: the task whose preprocessing the inputs get; None = the run's task
      when it has only one.
    input_format: "auto", "text" or "jsonl".
    preprocess_mode: "auto", "tokenize" or "task" (module docstring).
    checkpoint_path: another MODEL_DIR or step directory to read the params from, or
      a Hugging Face model directory (its config and vocabulary become the run's).
    checkpoint_step: the step to read; None = the newest finished one.
    initial_checkpoint_path: the run's INITIAL_CHECKPOINT_PATH; a pretrained one gives
      the model and vocabulary (``mtx.runtime.pretrained.resolve_run``).
    batch_size: rows decoded together (rounded up to the data-parallel size).
    inputs_length: encoder length; None = TASK_FEATURE_LENGTHS['inputs'].
    max_decode_length: the most tokens predicted; None = TASK_FEATURE_LENGTHS['targets'].
    decode_method, num_beams, length_penalty, temperature, top_k, seed: decoding
      (``mtx.infer.decoding.decode``).
    num_return: the n best predictions per input (beam search, n <= num_beams);
      above 1 each output object lists them under "predictions".
    show_progress: draw a progress bar on stderr; None = when stderr is a terminal.
    devices: the mesh's devices (default all).
    stdin: the stream '-' reads (tests).

  Returns:
    An ``InferResult``; ``str()`` is "Wrote N predictions to PATH." (the CLI prints
    it on stderr when the predictions go to stdout).
  """
  # long: the command's steps in order (check the settings, read and preprocess the
  # inputs, load the model, predict, write), each a call; the formatter's one argument
  # per line makes it long, and splitting it would hand its settings around again.
  start = time.time()
  model_dir, vocabulary_path = paths.absolute(model_dir), paths.absolute(vocabulary_path)
  checkpoint_path = paths.absolute(checkpoint_path)
  if output_path != "-":
    output_path = paths.absolute(output_path)
  if input_path != "-":
    input_path = paths.absolute(input_path)
  if not input_path:
    raise UserError(
      "INFER_INPUT is not set; set it to a text or JSONL file of inputs "
      "(or '-' for stdin), e.g. --gin.INFER_INPUT=\"'inputs.txt'\"."
    )
  if input_path != "-":
    paths.check_reachable("INFER_INPUT", input_path)
  if output_path and output_path != "-":
    paths.check_reachable("INFER_OUTPUT", paths.dirname(output_path), write=True)
  paths.check_reachable("INFER_CHECKPOINT_PATH", checkpoint_path or model_dir)
  for name, value, minimum in (
    ("INFER_BATCH_SIZE", batch_size, 1),
    ("INFER_NUM_BEAMS", num_beams, 1),
    ("INFER_TOP_K", top_k, 0),
    ("INFER_SEED", seed, 0),
    ("INFER_NUM_RETURN", num_return, 1),
  ):
    check_int(name, value, minimum)
  for name, value in (
    ("INFER_CHECKPOINT_STEP", checkpoint_step),
    ("INFER_INPUTS_LENGTH", inputs_length),
    ("INFER_MAX_DECODE_LENGTH", max_decode_length),
  ):
    check_int(name, value, 0 if name == "INFER_CHECKPOINT_STEP" else 1, optional=True)
  decode = decoding.DecodeOptions(
    method=decode_method,
    num_beams=num_beams,
    length_penalty=length_penalty,
    temperature=temperature,
    top_k=top_k,
    seed=seed,
    num_return=num_return,
  )
  decode.check(batch_size, "INFER")
  model_config, vocabulary_path = pretrained.resolve_run(
    checkpoint_path,
    paths.absolute(initial_checkpoint_path),
    model_config,
    vocabulary_path,
    "INFER_CHECKPOINT_PATH",
  )
  registry.import_modules(mixture_or_task_module, vocabulary_path)
  lengths = data_pipeline.check_feature_lengths(task_feature_lengths)
  inputs_length = int(inputs_length or lengths["inputs"])
  max_decode_length = int(max_decode_length or lengths["targets"])
  spec = registry.resolve(mixture_or_task_name)
  task = _find_task(task_name, mixture_or_task_name, spec)
  output_path = output_path or _default_output(model_dir, input_path, task.name)
  check_output_path(output_path, input_path)

  # Inputs first: their mistakes show before the slow part.
  records = read_records(input_path, input_format, stdin)
  where = "stdin" if input_path == "-" else input_path
  text_preps, _ = split_preprocessors(task)
  mode = choose_preprocess(records, bool(text_preps), preprocess_mode, task.name, where)
  tokens, texts = (
    preprocess(task, records, mode, inputs_length, max_decode_length)
    if records
    else ([], [])
  )

  chat = _chat_template(model_config, prefix_lm, task.output_features["targets"])
  if chat is not None:
    tokens = [chat.prompt(t, inputs_length) for t in tokens]

  mesh = parallel.make_mesh(mesh_shape, devices, dcn_mesh_shape)
  rules = tuple(logical_axis_rules)
  path, what = _checkpoint_path(model_dir, checkpoint_path, checkpoint_step)
  model_config = adapters_io.with_num_adapters(model_config, path)  # per-task LoRA
  model, params, shardings = params_lib.load_trained(
    model_config,
    spec.vocabulary.vocab_size,
    mesh,
    rules,
    path,
    inputs_length,
    max_decode_length,
    what=what,
  )
  # LoRA: INFER_TASK's adapter (and the shared one) merged into the base kernels.
  model, params, shardings = adapters_io.for_task(
    model, params, shardings, task.name, path
  )
  vocabulary = task.output_features["targets"].vocabulary
  dp = parallel.data_parallel_size(mesh)
  # A handful of inputs needs no batch of the full size.
  rows = min(batch_size, max(1, math.ceil(len(tokens) / dp)) * dp)
  predictor = Predictor(
    model,
    mesh,
    rules,
    shardings,
    batch_size=rows,
    inputs_length=inputs_length,
    max_decode_length=max_decode_length,
    decode=decode,
    eos_id=vocabulary.eos_id,
    vocab_size=vocabulary.vocab_size,
    start_id=prefix_lm.for_vocabulary(vocabulary).start_id,
    prefix_lm=prefix_lm.bidirectional_inputs,
    pad_id=decoding_pad_id(model, vocabulary),
  )
  ids, scores = _predict(predictor, params, tokens, show_progress)
  if chat is not None:  # the end of the assistant's turn is no answer
    ids = [[chat.strip(y) for y in x] if num_return > 1 else chat.strip(x) for x in ids]
  predictions = [
    [_text(vocabulary.decode(y)) for y in x]
    if num_return > 1
    else _text(vocabulary.decode(x))
    for x in ids
  ]
  if jax.process_index() == 0:
    write_jsonl(output_path, output_rows(records, texts, predictions, scores))
  seconds = time.time() - start
  log.info("Predicted %d inputs of '%s' in %.1f s.", len(tokens), task.name, seconds)
  return InferResult(len(tokens), output_path, task.name, seconds)
