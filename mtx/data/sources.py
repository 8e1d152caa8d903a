"""seqio DataSources over TSV, JSON Lines and plain-text files, checked line by line.

The files are local or on any path ``mtx.paths`` reaches (``gs://...``); each source
reads a whole split into memory in Python the first
time the split is used (``num_input_examples`` or ``get_dataset``; call ``validate()`` to
check every split at once). Every line is checked before a single example is handed to
seqio, and each mistake becomes a ``UserError`` naming ``file:line``: a missing file or a
glob with no match (checked on construction), bytes that are not UTF-8, a
wrong number of TSV columns, a line that is not a JSON object or lacks a field, and a
split with no examples. Blank lines are skipped in every format.

    task = seqio.Task(
        "my_task",
        source=mtx.data.sources.tsv_source({"train": "data/train*.tsv",
                                            "validation": "data/dev.tsv"}),
        output_features=..., preprocessors=[seqio.preprocessors.tokenize, ...])

Sharding: seqio hands a source ``seqio.ShardInfo(index, num_shards)`` (one shard per data
process). Shard ``index`` gets examples ``i`` with ``i % num_shards == index``, counting
over the split's files in sorted order, so the shards partition the split exactly.
Shuffling permutes a shard's examples with ``seed`` (None: a fresh permutation).
``num_input_examples(split)`` is exact, so examples-proportional mixing rates
(``seqio.mixing_rate_num_examples``) work without caching the task.

Data built in code rather than read from files: use ``seqio.FunctionDataSource``
(re-exported here as ``FunctionDataSource``) with ``dataset_fn(split, shuffle_files,
seed=None) -> tf.data.Dataset`` and ``num_input_examples={split: n}`` so rates work. It
cannot shard at the source; seqio's Task then shards the examples (``ds.shard``), which
still gives every process a disjoint part. ``mixtures/demo.py`` is a worked example.
"""

import glob
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf

from mtx import paths
from mtx.errors import UserError, close_names

FunctionDataSource = seqio.FunctionDataSource

FilePatterns = Union[str, Sequence[str]]
Columns = Dict[str, list]


def _resolve(split: str, patterns: FilePatterns) -> Tuple[str, ...]:
  """Expands one split's paths and globs to a sorted tuple of existing files."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    pattern = paths.absolute(os.fspath(pattern))
    matches = paths.glob(pattern)
    if not matches and paths.isdir(pattern):
      raise UserError(
        f"File pattern {pattern} for split '{split}' is a directory; name "
        f"its files, e.g. {paths.join(pattern, '*.tsv')}."
      )
    if not matches:
      what = "matches no file" if glob.has_magic(pattern) else "does not exist"
      raise UserError(
        f"File pattern {pattern} for split '{split}' {what}; check the path."
      )
    files.extend(matches)
  if not files:
    raise UserError(f"Split '{split}' lists no files; give it at least one path or glob.")
  return tuple(dict.fromkeys(files))  # Drops repeats, keeps order.


def _read_lines(path: str) -> List[Tuple[int, str]]:
  """Returns the (1-based line number, text) pairs of a file's non-blank lines."""
  try:
    data = paths.read_bytes(path)
  except OSError as e:
    raise UserError(
      f"Data file {path} cannot be read ({e.strerror}); fix its "
      f"permissions or remove it from the file pattern."
    ) from e
  lines = []
  for lineno, raw in enumerate(data.split(b"\n"), start=1):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(
        f"{path}:{lineno} is not valid UTF-8 (byte {raw[e.start]:#04x} "
        f"at column {e.start + 1}); re-save the file as UTF-8."
      ) from e
    if lineno == 1:
      text = text.removeprefix("\ufeff")  # A byte order mark is not data.
    text = text.removesuffix("\r")
    if text.strip():
      lines.append((lineno, text))
  return lines


class LocalFileSource(seqio.DataSource):
  """Base of the local file sources: per-split files, parsed lazily, validated fully.

  Subclasses implement ``_parse(path, lines)`` returning one list per feature.
  """

  def __init__(
    self,
    split_to_filepattern: Mapping[str, FilePatterns],
    skip_header_lines: int = 0,
    caching_permitted: bool = True,
  ):
    if not split_to_filepattern:
      raise UserError(
        f"{type(self).__name__} got no splits; pass a mapping such as "
        f"{{'train': 'data/train.tsv'}}."
      )
    if skip_header_lines < 0:
      raise UserError(
        f"skip_header_lines={skip_header_lines} is negative; pass 0 or "
        f"the number of header lines in each file."
      )
    self._split_to_files = {
      str(split): _resolve(str(split), patterns)
      for split, patterns in split_to_filepattern.items()
    }
    self._skip_header_lines = skip_header_lines
    self._loaded: Dict[str, Columns] = {}
    super().__init__(
      splits=self._split_to_files.keys(), caching_permitted=caching_permitted
    )

  # --- seqio.DataSource -------------------------------------------------------------

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # Sharding is by example index, so any number of shards works.

  def list_shards(self, split: str) -> Sequence[str]:
    return list(self._files(split))

  def num_input_examples(self, split: str) -> int:
    columns = self._load(split)
    return len(next(iter(columns.values())))

  def get_dataset(
    self,
    split: str = "train",
    shuffle: bool = True,
    seed: Optional[int] = None,
    shard_info: Optional[seqio.ShardInfo] = None,
    *,
    sequence_length: Optional[Mapping[str, int]] = None,
    use_cached: bool = False,
    num_epochs: Optional[int] = 1,
  ) -> tf.data.Dataset:
    """Returns the split's examples (this shard's, optionally shuffled) as tf.data.

    Args:
      split: a split given on construction.
      shuffle: whether to permute the shard's examples.
      seed: the permutation's seed; None draws a fresh one.
      shard_info: ``seqio.ShardInfo(index, num_shards)``; this shard gets the examples
        whose position in the split is ``index`` modulo ``num_shards``.
      sequence_length: unused (seqio's signature).
      use_cached: unused (seqio's signature).
      num_epochs: unused; seqio's Task repeats.

    Returns:
      A ``tf.data.Dataset`` of feature dicts.
    """
    del sequence_length, use_cached, num_epochs
    columns = self._load(split)
    n = len(next(iter(columns.values())))
    index, num_shards = 0, 1
    if shard_info is not None:
      index, num_shards = int(shard_info.index), int(shard_info.num_shards)
      if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(
          f"Invalid shard_info {shard_info}: need 0 <= index < num_shards."
        )
    order = np.arange(index, n, num_shards)
    if shuffle:
      rng = np.random.default_rng(None if seed is None else int(seed))
      order = rng.permutation(order)
    features = {}
    for name, values in columns.items():
      dtype = self._dtype(name)
      picked = [values[i] for i in order]
      features[name] = tf.constant(picked, dtype=dtype, shape=[len(picked)])
    return tf.data.Dataset.from_tensor_slices(features)

  # --- checks and parsing -----------------------------------------------------------

  def validate(self) -> None:
    """Reads and checks every split now (sources otherwise do it at a split's first use)."""
    for split in self.splits:
      self._load(split)

  def _files(self, split: str) -> Tuple[str, ...]:
    if split not in self._split_to_files:
      raise UserError(
        f"{type(self).__name__} has no split '{split}' (it has "
        f"{', '.join(self._split_to_files)}){close_names(split, self.splits)}; "
        f"ask for one of those or add the split's files."
      )
    return self._split_to_files[split]

  def _load(self, split: str) -> Columns:
    if split in self._loaded:
      return self._loaded[split]
    files = self._files(split)
    columns: Optional[Columns] = None
    for path in files:
      lines = _read_lines(path)
      if self._skip_header_lines:
        lines = [(i, t) for i, t in lines if i > self._skip_header_lines]
      parsed = self._parse(path, lines)
      if columns is None:
        columns = parsed
      else:
        for name, values in parsed.items():
          columns[name].extend(values)
    if columns is None or not next(iter(columns.values())):
      raise UserError(
        f"Split '{split}' has no examples in {', '.join(files)}; add data "
        f"to the files or drop the split."
      )
    self._loaded[split] = columns
    return columns

  def _parse(self, path: str, lines: List[Tuple[int, str]]) -> Columns:
    raise NotImplementedError

  def _dtype(self, name: str) -> tf.DType:
    del name
    return tf.string

  def __repr__(self):
    return f"{type(self).__name__}({self._split_to_files!r})"


class TsvDataSource(LocalFileSource):
  """One example per line, fields separated by a delimiter (tab by default)."""

  def __init__(
    self,
    split_to_filepattern: Mapping[str, FilePatterns],
    columns: Sequence[str] = ("inputs", "targets"),
    delimiter: str = "\t",
    skip_header_lines: int = 0,
    caching_permitted: bool = True,
  ):
    self._columns = tuple(columns)
    if not self._columns or len(set(self._columns)) != len(self._columns):
      raise UserError(
        f"tsv_source columns {self._columns} must be distinct feature "
        f"names and at least one; pass e.g. ('inputs', 'targets')."
      )
    if not delimiter:
      raise UserError("tsv_source delimiter is empty; pass a character such as '\\t'.")
    self._delimiter = delimiter
    super().__init__(split_to_filepattern, skip_header_lines, caching_permitted)

  def _parse(self, path, lines):
    out = {name: [] for name in self._columns}
    for lineno, text in lines:
      fields = text.split(self._delimiter)
      if len(fields) != len(self._columns):
        raise UserError(
          f"{path}:{lineno} has {len(fields)} {self._delimiter!r}-separated fields but "
          f"columns={self._columns} expects {len(self._columns)}; fix the line or pass "
          f"columns matching the file."
        )
      for name, value in zip(self._columns, fields):
        out[name].append(value)
    return out


_JSON_DTYPES = {str: tf.string, bool: tf.bool, int: tf.int64, float: tf.float32}


class JsonlDataSource(LocalFileSource):
  """One JSON object per line; chosen fields become features.

  Field values may be strings, integers, floats or booleans (a field keeps the type of
  its first value; integers are accepted in a float field); nested values are refused.
  """

  def __init__(
    self,
    split_to_filepattern: Mapping[str, FilePatterns],
    fields: Union[Sequence[str], Mapping[str, str]] = ("inputs", "targets"),
    caching_permitted: bool = True,
  ):
    if isinstance(fields, Mapping):
      self._fields = {str(k): str(v) for k, v in fields.items()}
    else:
      self._fields = {str(f): str(f) for f in fields}
    if not self._fields:
      raise UserError(
        "jsonl_source got no fields; pass e.g. fields=('inputs', 'targets') "
        "or {'inputs': 'question', 'targets': 'answer'}."
      )
    self._types: Dict[str, type] = {}
    super().__init__(split_to_filepattern, 0, caching_permitted)

  def _parse(self, path, lines):
    out = {name: [] for name in self._fields}
    for lineno, text in lines:
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise UserError(
          f"{path}:{lineno} is not valid JSON ({e.msg} at column "
          f"{e.colno}); write one JSON object per line."
        ) from e
      if not isinstance(record, dict):
        raise UserError(
          f"{path}:{lineno} holds a JSON {type(record).__name__} but "
          f"jsonl_source needs one JSON object per line; wrap it as "
          f'{{"field": ...}}.'
        )
      for name, key in self._fields.items():
        if key not in record:
          raise UserError(
            f"{path}:{lineno} has no field '{key}'"
            f"{close_names(key, record)}; add it or change fields=."
          )
        out[name].append(self._check_value(path, lineno, name, key, record[key]))
    return out

  def _check_value(self, path: str, lineno: int, name: str, key: str, value: Any) -> Any:
    kind = type(value)
    if kind not in _JSON_DTYPES:
      raise UserError(
        f"{path}:{lineno} field '{key}' is a JSON "
        f"{'null' if value is None else kind.__name__} but features must "
        f"be strings, numbers or booleans; flatten it to one of those."
      )
    expected = self._types.setdefault(name, kind)
    if expected is float and kind is int:
      return float(value)
    if kind is not expected:
      raise UserError(
        f"{path}:{lineno} field '{key}' is {kind.__name__} but earlier "
        f"lines made it {expected.__name__}; use one type per field."
      )
    return value

  def _dtype(self, name):
    return _JSON_DTYPES[self._types.get(name, str)]


class TextLineDataSource(LocalFileSource):
  """One example per non-blank line, as a single string feature."""

  def __init__(
    self,
    split_to_filepattern: Mapping[str, FilePatterns],
    feature: str = "text",
    skip_header_lines: int = 0,
    caching_permitted: bool = True,
  ):
    self._feature = feature
    super().__init__(split_to_filepattern, skip_header_lines, caching_permitted)

  def _parse(self, path, lines):
    del path
    return {self._feature: [text for _, text in lines]}


def tsv_source(
  split_to_filepattern: Mapping[str, FilePatterns],
  columns: Sequence[str] = ("inputs", "targets"),
  delimiter: str = "\t",
  skip_header_lines: int = 0,
  caching_permitted: bool = True,
) -> TsvDataSource:
  """A source of delimiter-separated lines, one feature per column.

  Args:
    split_to_filepattern: split name -> a path, a glob, or a list of them.
    columns: the feature name of each column, in order; every line must have exactly
      this many fields (fields are taken verbatim, no quoting or escapes).
    delimiter: the field separator.
    skip_header_lines: lines to drop at the top of every file.
    caching_permitted: whether seqio may cache the task offline.

  Returns:
    A ``seqio.DataSource`` of string features.
  """
  return TsvDataSource(
    split_to_filepattern, columns, delimiter, skip_header_lines, caching_permitted
  )


def jsonl_source(
  split_to_filepattern: Mapping[str, FilePatterns],
  fields: Union[Sequence[str], Mapping[str, str]] = ("inputs", "targets"),
  caching_permitted: bool = True,
) -> JsonlDataSource:
  """A source of JSON Lines files.

  Args:
    split_to_filepattern: split name -> a path, a glob, or a list of them.
    fields: JSON keys to keep (feature names equal keys), or a mapping from feature
      name to JSON key; other keys are ignored.
    caching_permitted: whether seqio may cache the task offline.

  Returns:
    A ``seqio.DataSource``; strings, int64, float32 or bool features by JSON type.
  """
  return JsonlDataSource(split_to_filepattern, fields, caching_permitted)


def textline_source(
  split_to_filepattern: Mapping[str, FilePatterns],
  feature: str = "text",
  skip_header_lines: int = 0,
  caching_permitted: bool = True,
) -> TextLineDataSource:
  """A source with one string feature per non-blank line (for pretraining text).

  Args:
    split_to_filepattern: split name -> a path, a glob, or a list of them.
    feature: the feature name of the line.
    skip_header_lines: lines to drop at the top of every file.
    caching_permitted: whether seqio may cache the task offline.

  Returns:
    A ``seqio.DataSource``.
  """
  return TextLineDataSource(
    split_to_filepattern, feature, skip_header_lines, caching_permitted
  )
