"""Streamed tasks: the in-memory path's guarantees (ids, rates, epochs, shards, exact
resume) without holding the task, plus seqio cached tasks and corrupt records."""

import json
import struct

import numpy as np
import pytest
import seqio
from tsv_tasks import FEATURES, parse_tsv
from tsv_tasks import register_mixture as _register_mixture
from tsv_tasks import register_tsv as _register_tsv

from mtx.data import materialize, pipeline, streaming
from mtx.errors import UserError

LENGTHS = {"inputs": 16, "targets": 16}


def _rows(n, alphabet, seed):
  rng = np.random.default_rng(seed)
  word = lambda: "".join(rng.choice(list(alphabet), rng.integers(1, 9)))
  return [(f"{word()}{i}", word()) for i in range(n)]


def _register_counted(name, path, rows):
  """A TSV task whose source knows its example count (so rates may use it)."""
  _register_tsv(name, path, rows)
  task = seqio.get_mixture_or_task(name)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=seqio.TextLineDataSource(
      {"train": str(path)}, num_input_examples={"train": len(rows)}
    ),
    preprocessors=task.preprocessors,
    output_features=FEATURES,
  )


def _write_cache(task_name, cache_root, num_files):
  """Writes ``task_name``'s precache examples as ``seqio_cache_tasks`` does: TFRecord
  shards of tf.train.Examples, info and stats JSON, COMPLETED."""
  import tensorflow as tf

  task = seqio.get_mixture_or_task(task_name)
  out = cache_root / task_name
  out.mkdir(parents=True)
  ds = task.preprocess_precache(task.source.get_dataset("train", shuffle=False))
  examples = list(ds.as_numpy_iterator())
  for f in range(num_files):
    path = out / f"train.tfrecord-{f:05d}-of-{num_files:05d}"
    with tf.io.TFRecordWriter(str(path)) as w:
      for ex in examples[f::num_files]:
        w.write(seqio.utils.dict_to_tfexample(ex).SerializeToString())
  features = {k: {"shape": [None], "dtype": "int32"} for k in ("inputs", "targets")} | {
    k: {"shape": [], "dtype": "string"}
    for k in examples[0]
    if k.endswith("_pretokenized")
  }
  (out / "info.train.json").write_text(
    json.dumps({"num_shards": num_files, "features": features, "seqio_version": "0.0.20"})
  )
  (out / "stats.train.json").write_text(json.dumps({"examples": len(examples)}))
  (out / "COMPLETED").write_text("")
  return out


def _register_cacheable(name, path, rows):
  _register_tsv(name, path, rows)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=seqio.TextLineDataSource({"train": str(path)}),
    preprocessors=[
      parse_tsv,
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=FEATURES,
  )


@pytest.fixture
def mixed(tmp_path):
  """'big' (streamed, 60 examples, letters) + 'small' (in memory, 30, digits)."""
  _register_counted("s_big", tmp_path / "big.tsv", _rows(60, "abcdef", 0))
  _register_counted("s_small", tmp_path / "small.tsv", _rows(30, "123456", 1))
  _register_mixture("s_mix", [("s_big", 2.0), ("s_small", 1.0)])
  return "s_mix"


def _load(name, units=0, window=8, tasks=("s_big",), **kw):
  layout = pipeline.Layout(8, units, LENGTHS["inputs"], LENGTHS["targets"])
  options = streaming.StreamOptions(tasks=tasks, window=window, **kw.pop("opts", {}))
  return pipeline.load(name, LENGTHS, layout, seed=5, stream=options, **kw)


def _as_tuples(inputs_targets):
  return [tuple(i) + (-1,) + tuple(t) for i, t in inputs_targets]


def _reader(task_name, window=7, shard=0, shards=1, **opts):
  task = seqio.get_mixture_or_task(task_name)
  options = streaming.StreamOptions(window=window, **opts)
  count = streaming.example_count(task, "train", options.use_cached)
  return streaming.TaskReader(task, "train", LENGTHS, shard, shards, 5, options, count)


def _memory(task_name, shard=0, shards=1):
  ex = materialize.read_task(
    seqio.get_mixture_or_task(task_name), "train", LENGTHS, shard, shards
  )
  return _as_tuples((ex.inputs.get(i), ex.targets.get(i)) for i in range(len(ex)))


def test_streamed_task_serves_every_example_once_per_epoch(mixed):
  reader = _reader("s_big")
  whole = sorted(_memory("s_big"))
  epochs = [
    _as_tuples(reader.example(c) for c in range(e * 60, (e + 1) * 60)) for e in range(2)
  ]
  for epoch in epochs:
    assert sorted(epoch) == whole
  assert epochs[0] != epochs[1]  # a new order every epoch
  assert reader.epochs() == pytest.approx(2 - 1 / 60)


def test_mixture_of_streamed_and_in_memory_keeps_task_ids_and_exact_rates(mixed):
  pipe = _load(mixed, units=0)
  assert [type(ex).__name__ for ex in pipe.examples] == ["TaskReader", "TaskExamples"]
  for _ in range(20):
    batch = pipe.next_batch()
    ids, tokens = batch["decoder_task_ids"], batch["decoder_target_tokens"]
    letters = (tokens >= ord("a") + 3) & (tokens <= ord("f") + 3)  # byte ids are +3
    digits = (tokens >= ord("1") + 3) & (tokens <= ord("6") + 3)
    assert np.all(ids[letters] == 0) and np.all(ids[digits] == 1)
  cursors = pipe.shards[0].scheduler.cursors
  # The deficit scheduler keeps every task within one example of its share.
  assert np.all(np.abs(cursors - pipe.rates * cursors.sum()) <= 1)
  assert cursors[0] > 60  # the streamed task went past its first epoch


@pytest.mark.parametrize("units", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restart_at_step_s_is_bit_identical_and_reads_only_one_window(mixed, units):
  straight = _load(mixed, units=units)
  expected, states = [], []
  for _ in range(12):
    expected.append(straight.next_batch())
    states.append(json.loads(json.dumps(straight.get_state())))  # as checkpointed
  resumed = _load(mixed, units=units)
  reader = resumed.examples[0]
  # A reader stands at the scheduler's cursor or, in flat batches, one behind it (its
  # example fitted, another task's did not): resume from both.
  lag = [
    st["shards"]["0"]["cursors"]["s_big"]
    - st["shards"]["0"]["streams"]["s_big"]["cursor"]
    for st in states[:10]
  ]
  assert set(lag) == ({0} if units else {0, 1})
  for s in (
    lag.index(max(lag)),
    9 - lag[::-1].index(0),
  ):  # restored into the same pipeline
    read_before = reader.records_read
    resumed.set_state(states[s])
    saved = states[s]["shards"]["0"]["streams"]["s_big"]
    assert reader.state()["reader"] == saved["reader"]  # its position, not a restart
    for want in expected[s + 1 : s + 3]:
      got = resumed.next_batch()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{s} {key}")
    # No replay: restoring seeks; one window (8) and two batches' worth (<= 8 rows
    # of 16 tokens each) are all the resumed reader pulled.
    assert reader.records_read - read_before <= 8 + 2 * 16
  assert states[9]["shards"]["0"]["cursors"]["s_big"] > 40  # several windows in


def _record_offsets(path):
  offsets, position, data = [], 0, path.read_bytes()
  while position < len(data):
    offsets.append(position)
    (length,) = struct.unpack("<Q", data[position : position + 8])
    position += 12 + length + 4
  return offsets


@pytest.fixture
def cached(tmp_path):
  """A cached task (2 TFRecord shards) and the same task uncached, for reference."""
  rows = _rows(90, "abcdef", 2)
  _register_cacheable("s_cached", tmp_path / "c.tsv", rows)
  _write_cache("s_cached", tmp_path / "cache", num_files=2)
  seqio.set_global_cache_dirs([str(tmp_path / "cache")])
  _register_counted("s_plain", tmp_path / "p.tsv", rows)
  yield tmp_path / "cache" / "s_cached"
  seqio.set_global_cache_dirs([])


def test_cached_task_streams_from_its_tfrecords_with_the_cached_count(cached):
  reader = _reader("s_cached", window=16)
  assert reader.cached and len(reader.files) == 2 and len(reader) == 90
  assert sorted(_as_tuples(reader.example(c) for c in range(90))) == sorted(
    _memory("s_plain")
  )


def test_cache_dirs_setting_finds_the_cache(cached):
  seqio.set_global_cache_dirs([])
  _register_mixture("s_cm", [("s_cached", 1.0), ("s_plain", 1.0)])
  opts = {"cache_dirs": [str(cached.parent)]}
  pipe = _load("s_cm", tasks=("s_cached",), rate_fn="examples_proportional", opts=opts)
  assert pipe.examples[0].cached and len(pipe.examples[0]) == 90
  np.testing.assert_allclose(pipe.rates, [0.5, 0.5])  # the cached count: 90 and 90


def test_resumed_reader_never_reads_the_records_before_its_window(cached):
  """Records already consumed are overwritten with garbage after the save: a reader
  that replayed from the file's start would hit them and stop."""
  reader = _reader("s_cached", window=4)
  for c in range(60):
    reader.example(c)
  state = json.loads(json.dumps(reader.state()))
  want = [reader.example(c) for c in range(60, 90)]
  done = state["epoch_examples"]  # examples of this epoch before the saved window
  for path in sorted(cached.glob("train.tfrecord-*")):
    offsets = _record_offsets(path)
    # each file gives about half of what was read before the window (interleaved)
    end = offsets[min(done // 2 - 4, len(offsets) - 1)]
    path.write_bytes(b"\0" * end + path.read_bytes()[end:])
  fresh = _reader("s_cached", window=4)
  fresh.restore(state)
  got = [fresh.example(c) for c in range(60, 90)]
  assert _as_tuples(got) == _as_tuples(want)


def test_a_position_that_no_longer_fits_the_pipeline_restarts_the_order(cached):
  reader = _reader("s_cached", window=16)
  for c in range(30):
    reader.example(c)
  saved = reader.state()
  saved["reader"] = {k: "AAAA" for k in saved["reader"]}  # not this pipeline's
  other = _reader("s_cached", window=16)
  other.restore(saved)
  assert len(other.example(30)[1]) > 0 and other.state()["window"] == 0


def test_a_position_saved_with_another_window_restarts_the_order(cached):
  reader = _reader("s_cached", window=16)
  for c in range(30):
    reader.example(c)
  other = _reader("s_cached", window=8)
  other.restore(reader.state())
  assert other.state()["cursor"] == 29 and other.state()["reader"] is None
  assert len(other.example(30)[1]) > 0


@pytest.mark.slow
def test_two_shards_in_one_process_equal_two_processes(mixed):
  both = _load(mixed, units=2, num_shards=2)
  one = [_load(mixed, units=2, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    whole, parts = both.next_batch(), [p.next_batch() for p in one]
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
  merged = pipeline.merge_states([p.get_state() for p in one])
  again = _load(mixed, units=2, num_shards=2)
  again.set_state(merged)
  np.testing.assert_array_equal(
    again.next_batch()["decoder_target_tokens"],
    both.next_batch()["decoder_target_tokens"],
  )


def _corrupt_second_record(cache_dir):
  path = sorted(cache_dir.glob("train.tfrecord-*"))[0]
  data = bytearray(path.read_bytes())
  at = _record_offsets(path)[1]
  data[at + 14] ^= 0xFF  # inside the record's payload: its checksum fails
  path.write_bytes(bytes(data))
  return path, at


def test_corrupt_record_stops_naming_the_file_and_record(cached):
  path, at = _corrupt_second_record(cached)
  reader = _reader("s_cached", window=16)
  with pytest.raises(UserError, match=rf"{path.name}, record 1 \(byte {at}\).*'skip'"):
    for c in range(90):
      reader.example(c)


def test_corrupt_record_skipped_and_counted(cached):
  _corrupt_second_record(cached)
  reader = _reader("s_cached", window=16, on_corrupt="skip")
  seen = _as_tuples(reader.example(c) for c in range(40))
  assert reader.corrupt_skipped == 1
  assert len(set(seen)) == 40 and set(seen) < set(_memory("s_plain"))


@pytest.mark.parametrize("cut", ["payload", "header"])
def test_a_truncated_cache_file_stops_naming_it(cached, cut):
  path = sorted(cached.glob("train.tfrecord-*"))[1]
  last = _record_offsets(path)[-1]
  # Cut inside the last record's payload TensorFlow reports; inside its header it
  # ends the file silently, and only the count (89 of the stats' 90) tells.
  path.write_bytes(path.read_bytes()[: last + (20 if cut == "payload" else 5)])
  reader = _reader("s_cached", window=16)
  want = (
    rf"{path.name}, record 44 \(byte {last}\)"
    if cut == "payload"
    else "read 89 examples in epoch 0 .* stats say 90"
  )
  with pytest.raises(UserError, match=want):
    for c in range(91):
      reader.example(c)


def test_proportional_rates_need_stream_counts(tmp_path):
  _register_tsv("s_uncounted", tmp_path / "u.tsv", _rows(10, "ab", 3))
  _register_counted("s_small", tmp_path / "small.tsv", _rows(30, "123456", 1))
  _register_mixture("s_mix2", [("s_uncounted", 1.0), ("s_small", 1.0)])
  with pytest.raises(UserError, match="s_uncounted stream.*num_input_examples"):
    _load("s_mix2", tasks=("s_uncounted",), rate_fn="examples_proportional")
  assert _load("s_mix2", tasks=("s_uncounted",)).next_batch()  # explicit rates do


def test_default_options_keep_small_tasks_in_memory(mixed):
  pipe = pipeline.load(
    mixed, LENGTHS, pipeline.Layout(8, 0, 16, 16), stream=streaming.StreamOptions()
  )
  assert all(isinstance(ex, materialize.TaskExamples) for ex in pipe.examples)
  with pytest.raises(UserError, match="stream_tasks pattern 'nope\\*' matches no task"):
    _load(mixed, tasks=("nope*",))


def test_bad_stream_settings_are_user_errors():
  from mtx.train.settings import DataSettings

  base = dict(mixture_or_task_name="x", task_feature_lengths=LENGTHS)
  with pytest.raises(UserError, match="stream_on_corrupt is 'ignore'"):
    DataSettings(**base, stream_on_corrupt="ignore")
  with pytest.raises(UserError, match="stream_window must be a positive"):
    DataSettings(**base, stream_window=0)
  assert DataSettings(**base, stream_tasks="big").stream.tasks == ("big",)


def _cap_targets(ds, sequence_length):
  """A preprocessor that needs the sequence lengths (as span corruption does)."""
  cap = sequence_length["targets"] - 1
  return ds.map(lambda ex: {**ex, "targets": ex["targets"][:cap]})


def test_preprocessors_that_need_lengths_get_them(tmp_path):
  rows = [("ab", "x" * 30), ("cd", "yy")]
  _register_counted("s_needs", tmp_path / "n.tsv", rows)
  task = seqio.get_mixture_or_task("s_needs")
  seqio.TaskRegistry.remove("s_needs")
  seqio.TaskRegistry.add(
    "s_needs",
    source=task.source,
    preprocessors=[parse_tsv, seqio.preprocessors.tokenize, _cap_targets],
    output_features=FEATURES,
  )
  reader = _reader("s_needs")
  got = sorted(len(reader.example(c)[1]) for c in range(2))
  assert got == [2, 15] and reader.state()["lengths"] is True


@pytest.mark.slow
def test_training_with_a_streamed_task_resumes_bit_identical(tmp_path):
  import tiny_mixture  # noqa: F401  # registers "tiny"
  from loop_helpers import tiny_train

  def losses(model_dir):
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}

  stream = dict(stream_tasks=["tiny_rev"], stream_window=8)
  tiny_train(tmp_path / "straight", 8, **stream)
  tiny_train(tmp_path / "split", 4, **stream)
  tiny_train(tmp_path / "split", 8, **stream)
  want, got = losses(tmp_path / "straight"), losses(tmp_path / "split")
  assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]


@pytest.mark.slow
def test_training_on_a_corrupt_stream_stops_with_one_sentence_and_no_checkpoint(
  cached, tmp_path
):
  import tiny_mixture  # noqa: F401  # registers "tiny_copy"
  from loop_helpers import TINY, loop_train

  from mtx.train import optim

  path, at = _corrupt_second_record(cached)
  _register_mixture("s_corrupt_mix", [("tiny_copy", 1.0), ("s_cached", 1.0)])
  with pytest.raises(UserError, match=rf"{path.name}, record 1 \(byte {at}\)"):
    loop_train(
      model_dir=str(tmp_path / "run"),
      mixture_or_task_name="s_corrupt_mix",
      task_feature_lengths=LENGTHS,
      train_steps=4,
      batch_size=8,
      model_config=TINY,
      optimizer_fn=lambda learning_rate: optim.make_optimizer("adamw", learning_rate),
      learning_rate=1e-3,
      checkpoint_period=1,
      tensorboard=False,
      print_param_table=False,
      stream_tasks=["s_cached"],
    )
  run = tmp_path / "run"
  assert not run.exists() or not [p for p in run.iterdir() if p.name.isdigit()]
