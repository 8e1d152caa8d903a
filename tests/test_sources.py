"""Local TSV/JSONL/text sources: examples come through, shards partition, mistakes point at file:line."""

import json

import pytest
import seqio

from mtx.data import sources
from mtx.errors import UserError


def _write(path, text, encoding="utf-8"):
  path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
  return str(path)


def _examples(source, split="train", **kwargs):
  kwargs.setdefault("shuffle", False)
  out = []
  for ex in source.get_dataset(split, **kwargs).as_numpy_iterator():
    out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()})
  return out


def test_tsv_reads_columns_across_globbed_files(tmp_path):
  _write(tmp_path / "train-0.tsv", "a\tA\nb\tB\n\n")
  _write(tmp_path / "train-1.tsv", "c\tC\r\n")
  src = sources.tsv_source({"train": str(tmp_path / "train-*.tsv")})
  assert isinstance(src, seqio.DataSource)
  assert src.num_input_examples("train") == 3
  assert _examples(src) == [
    {"inputs": "a", "targets": "A"},
    {"inputs": "b", "targets": "B"},
    {"inputs": "c", "targets": "C"},
  ]


def test_tsv_header_and_custom_columns(tmp_path):
  path = _write(tmp_path / "d.tsv", "q,a,label\nx,y,1\n")
  src = sources.tsv_source(
    {"validation": path}, columns=("q", "a", "label"), delimiter=",", skip_header_lines=1
  )
  assert _examples(src, "validation") == [{"q": "x", "a": "y", "label": "1"}]


def test_jsonl_types_and_field_mapping(tmp_path):
  rows = [
    {"question": "2+2?", "answer": "4", "n": 1, "score": 0.5, "ok": True},
    {"question": "3+3?", "answer": "6", "n": 2, "score": 1, "ok": False},
  ]
  path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
  src = sources.jsonl_source(
    {"train": path},
    fields={
      "inputs": "question",
      "targets": "answer",
      "n": "n",
      "score": "score",
      "ok": "ok",
    },
  )
  got = _examples(src)
  assert [g["inputs"] for g in got] == ["2+2?", "3+3?"]
  assert [int(g["n"]) for g in got] == [1, 2]
  assert [float(g["score"]) for g in got] == [0.5, 1.0]
  assert [bool(g["ok"]) for g in got] == [True, False]


def test_textline_source(tmp_path):
  path = _write(tmp_path / "t.txt", "\ufeffhello world\n\nsecond line\n")
  src = sources.textline_source({"train": path})
  assert _examples(src) == [{"text": "hello world"}, {"text": "second line"}]


def test_shards_cover_every_example_once_and_shuffle_is_seeded(tmp_path):
  path = _write(tmp_path / "d.tsv", "".join(f"{i}\t{i}\n" for i in range(11)))
  src = sources.tsv_source({"train": path})
  assert src.supports_arbitrary_sharding
  seen = []
  for index in range(3):
    shard = _examples(src, shard_info=seqio.ShardInfo(index, 3), shuffle=True, seed=5)
    seen += [int(ex["inputs"]) for ex in shard]
  assert sorted(seen) == list(range(11))
  first = [ex["inputs"] for ex in _examples(src, shuffle=True, seed=3)]
  again = [ex["inputs"] for ex in _examples(src, shuffle=True, seed=3)]
  assert first == again and first != [str(i) for i in range(11)]


def test_task_over_source_shards_through_seqio(tmp_path):
  path = _write(tmp_path / "d.tsv", "".join(f"in {i}\tout {i}\n" for i in range(10)))
  task = seqio.Task(
    "test_sources_tsv_task",
    source=sources.tsv_source({"train": path}),
    output_features={},
    preprocessors=[],
  )
  seen = []
  for index in range(2):
    ds = task.get_dataset(
      None, "train", shuffle=False, shard_info=seqio.ShardInfo(index, 2)
    )
    seen += [ex["inputs"].decode() for ex in ds.as_numpy_iterator()]
  assert sorted(seen) == sorted(f"in {i}" for i in range(10))


def _error(fn):
  with pytest.raises(UserError) as info:
    fn()
  return str(info.value)


@pytest.mark.parametrize(
  "content, line, words",
  [
    ("a\tA\nb\tB\textra\n", 2, "3"),
    ("a\tA\nonly\n", 2, "1"),
  ],
)
def test_tsv_wrong_column_count_names_file_line(tmp_path, content, line, words):
  path = _write(tmp_path / "bad.tsv", content)
  msg = _error(lambda: sources.tsv_source({"train": path}).num_input_examples("train"))
  assert f"{path}:{line}" in msg and words in msg


def test_non_utf8_names_file_line(tmp_path):
  path = _write(tmp_path / "latin.tsv", "ok\tfine\ncaf\xe9\tx\n", encoding="latin-1")
  msg = _error(lambda: sources.tsv_source({"train": path}).get_dataset("train"))
  assert f"{path}:2" in msg and "UTF-8" in msg


@pytest.mark.parametrize(
  "content, line, words",
  [
    (
      '{"inputs": "a", "targets": "b"}\n{"inputs": "a", "targets": \n',
      2,
      "not valid JSON",
    ),
    ('["a", "b"]\n', 1, "JSON list"),
    ('{"inputs": "a", "target": "b"}\n', 1, "did you mean: target"),
    ('{"inputs": "a", "targets": "b"}\n{"inputs": 3, "targets": "b"}\n', 2, "int"),
    ('{"inputs": {"x": 1}, "targets": "b"}\n', 1, "dict"),
  ],
)
def test_jsonl_errors_name_file_line(tmp_path, content, line, words):
  path = _write(tmp_path / "bad.jsonl", content)
  msg = _error(lambda: sources.jsonl_source({"train": path}).num_input_examples("train"))
  assert f"{path}:{line}" in msg and words in msg


def test_missing_file_and_empty_glob(tmp_path):
  missing = str(tmp_path / "missing.tsv")
  assert "missing.tsv" in _error(lambda: sources.tsv_source({"train": missing}))
  pattern = str(tmp_path / "none-*.jsonl")
  msg = _error(lambda: sources.jsonl_source({"validation": pattern}))
  assert pattern in msg and "matches no file" in msg and "validation" in msg


def test_data_files_on_a_remote_filesystem_are_read_like_local_ones(tmp_path):
  from mtx import paths

  paths.write_atomically("memory://srcs/a-0.tsv", "x\ty\n")
  paths.write_atomically("memory://srcs/a-1.tsv", "u\tv\nw\tz\n")
  _write(tmp_path / "a-0.tsv", "x\ty\n")
  _write(tmp_path / "a-1.tsv", "u\tv\nw\tz\n")
  remote = sources.tsv_source({"train": "memory://srcs/a-*.tsv"})
  local = sources.tsv_source({"train": str(tmp_path / "a-*.tsv")})
  assert remote.list_shards("train") == ["memory://srcs/a-0.tsv", "memory://srcs/a-1.tsv"]
  assert remote.num_input_examples("train") == local.num_input_examples("train") == 3
  read = lambda src: [
    {k: v.decode() for k, v in ex.items()}
    for ex in src.get_dataset("train", shuffle=False).as_numpy_iterator()
  ]
  assert read(remote) == read(local)
  msg = _error(lambda: sources.textline_source({"train": "nofs://bucket/data.txt"}))
  assert "nofs://" in msg and "no filesystem" in msg


def test_empty_split_and_unknown_split(tmp_path):
  path = _write(tmp_path / "empty.tsv", "\n\n")
  src = sources.tsv_source({"train": path})
  assert "no examples" in _error(src.validate)
  good = sources.tsv_source({"train": _write(tmp_path / "g.tsv", "a\tb\n")})
  assert "did you mean: train" in _error(lambda: good.num_input_examples("trian"))


def test_a_header_line_of_a_plain_seqio_tsv_is_warned_about(tmp_path, caplog):
  """A TextLineDataSource whose file starts with the feature names: a warning naming
  the task and the fix (skip_header_lines=1); without the header, no warning."""
  import seqio
  import tsv_tasks

  from mtx.data import materialize

  tsv_tasks.register_tsv(
    "hdr_task", tmp_path / "h.tsv", [("inputs", "targets"), ("a", "b")]
  )
  tsv_tasks.register_tsv("plain_task", tmp_path / "p.tsv", [("a", "b")])
  with caplog.at_level("WARNING"):
    materialize.warn_header_lines(seqio.get_mixture_or_task("plain_task"), "train")
    assert not caplog.records
    materialize.warn_header_lines(seqio.get_mixture_or_task("hdr_task"), "train")
  assert "Task hdr_task: the first line" in caplog.text
  assert "skip_header_lines=1" in caplog.text


def test_eval_names_the_tasks_without_the_eval_split(tmp_path, caplog):
  """EVAL_PERIOD on a mixture where some task has no validation split: the run goes
  on, and a warning says which tasks evaluation leaves out."""
  import seqio
  import tiny_mixture  # noqa: F401  (registers tiny_copy)
  import tsv_tasks

  from mtx.eval import evaluator

  tsv_tasks.register_tsv("train_only", tmp_path / "t.tsv", [("a", "b")])
  tsv_tasks.register_mixture("with_train_only", [("tiny_copy", 1.0), ("train_only", 1.0)])
  with caplog.at_level("WARNING", logger="mtx"):
    tasks = evaluator.eval_tasks("with_train_only", "validation")
  assert sorted(t.name for t in tasks) == ["tiny_copy", "train_only"]
  assert "leaves out task(s) train_only: they have no 'validation' split" in caplog.text
  seqio.MixtureRegistry.remove("with_train_only")
