"""The shipped vocabulary loads, round-trips text, and bad paths fail with a UserError."""

import os
import sys

import pytest

from mtx.data import vocab
from mtx.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "tools"))
import train_vocab  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_default_vocabulary_loads_with_t5_ids():
  v = vocab.get_vocabulary()
  assert os.path.isfile(vocab.DEFAULT_SPM_PATH)
  assert v.pad_id == 0 and v.eos_id == 1 and v.unk_id == 2
  assert 512 <= v.vocab_size <= 1024


@pytest.mark.parametrize(
  "text",
  [
    "sort: 42 7 19 3",
    "review: the coffee was not very friendly",
    "mnli hypothesis: The cat sat. premise: Über café, 日本語 ✓",
  ],
)
def test_round_trips_any_text(text):
  v = vocab.get_vocabulary()
  ids = v.encode(text)
  assert v.unk_id not in ids  # Byte fallback: nothing becomes <unk>.
  assert v.decode(ids) == text


def test_demo_inputs_are_short():
  v = vocab.get_vocabulary()
  assert len(v.encode("sort: 42 7 19 3 88 61 5 70")) <= 12


def test_extra_ids_extend_the_vocabulary():
  base = vocab.get_vocabulary()
  assert vocab.get_vocabulary(extra_ids=10).vocab_size == base.vocab_size + 10


def test_missing_path_names_it_and_the_tool(tmp_path):
  path = str(tmp_path / "nope.model")
  with pytest.raises(UserError, match="nope.model.*train_vocab.py"):
    vocab.get_vocabulary(path)


def test_non_sentencepiece_file_is_refused(tmp_path):
  path = tmp_path / "junk.model"
  path.write_bytes(b"this is not a protobuf \x00\xff")
  with pytest.raises(UserError, match="junk.model is not a SentencePiece model"):
    vocab.get_vocabulary(str(path))


def test_a_vocabulary_on_a_filesystem_seqio_cannot_read_is_refused():
  with pytest.raises(UserError, match="memory://bucket/spiece.model is on memory://"):
    vocab.get_vocabulary("memory://bucket/spiece.model")


def test_train_vocab_tool_is_deterministic(tmp_path):
  text = tmp_path / "a.txt"
  text.write_text(
    "\n".join(
      f"line {i} about the quick brown fox and {i * 7 % 13} lazy dogs" for i in range(300)
    ),
    encoding="utf-8",
  )
  pieces = []
  for run in range(2):
    prefix = tmp_path / f"out{run}" / "spm"
    assert (
      train_vocab.main(
        ["--input", str(text), "--vocab_size", "320", "--model_prefix", str(prefix)]
      )
      == 0
    )
    pieces.append((prefix.parent / "spm.vocab").read_text(encoding="utf-8"))
    v = vocab.get_vocabulary(str(prefix) + ".model")
    assert v.decode(v.encode("the lazy fox")) == "the lazy fox"
  assert pieces[0] == pieces[1]  # Same pieces and scores (the .model also stores paths).


def test_train_vocab_tool_reports_missing_input(tmp_path, capsys):
  assert (
    train_vocab.main(
      ["--input", str(tmp_path / "no.txt"), "--model_prefix", str(tmp_path / "x")]
    )
    == 2
  )
  assert "no.txt passed to --input does not exist" in capsys.readouterr().err


def test_vocabulary_reaches_tasks_built_while_their_module_is_imported(
  tmp_path, monkeypatch
):
  """gin's VOCABULARY: registry.import_modules(module, path) gives the module's tasks on
  the default vocabulary that model, and leaves the default as it was afterwards."""
  from mtx.data import registry  # pylint: disable=g-import-not-at-top

  model = tmp_path / "other.model"
  model.write_bytes(open(vocab.DEFAULT_SPM_PATH, "rb").read())
  (tmp_path / "vocab_probe_module.py").write_text(
    "from mtx.data import vocab\nVOCAB = vocab.get_vocabulary()\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  registry.import_modules("vocab_probe_module", str(model))
  import vocab_probe_module  # pylint: disable=g-import-not-at-top

  assert vocab_probe_module.VOCAB.sentencepiece_model_file == str(model)
  assert vocab.default_path() == vocab.DEFAULT_SPM_PATH


def test_the_old_environment_variable_is_refused_not_ignored(monkeypatch):
  monkeypatch.setenv("MTX_VOCAB", "/somewhere/spm.model")
  with pytest.raises(UserError, match="MTX_VOCAB is set but mtx no longer reads it"):
    vocab.get_vocabulary()
