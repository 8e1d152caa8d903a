"""`mtx infer`: inputs from text, JSONL and stdin through a task's preprocessing, JSONL out."""

import io
import json
import math
import os
import re
import uuid

import gin
import pytest
import seqio
import tiny_mixture  # noqa: F401  (registers the 'tiny' mixture)
import zero_token

from mtx import paths
from mtx.cli import infer as infer_lib
from mtx.cli import main as cli
from mtx.errors import UserError
from mtx.runtime import lock as lock_lib
from mtx.runtime import metrics_writer

TINY_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


def _cli(*args):
  gin.clear_config()
  try:
    return cli.run(list(args))
  finally:
    gin.clear_config()


def _infer_args(model_dir, *extra):
  return [
    "infer",
    "--gin_file=tests/tiny.gin",
    "--gin_file=runs/infer.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    *extra,
  ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("run")
  assert (
    _cli(
      "train",
      "--gin_file=tests/tiny.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.TRAIN_STEPS=2",
      "--gin.CHECKPOINT_PERIOD=0",
    )
    == 0
  )
  return model_dir


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_infer_text_file_greedy(trained, tmp_path, capsys):
  inputs = ["abc", "hgfe", "", "abcdefgh" * 4]  # The last one is cut to 16 tokens.
  (tmp_path / "in.txt").write_text("\n".join(inputs) + "\n")
  out = tmp_path / "sub" / "out.jsonl"
  assert (
    _cli(
      *_infer_args(
        trained,
        "--gin.INFER_TASK='tiny_copy'",
        f"--gin.INFER_INPUT='{tmp_path / 'in.txt'}'",
        f"--gin.INFER_OUTPUT='{out}'",
        "--gin.infer.show_progress=True",
      )
    )
    == 0
  )
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1] == f"Wrote 4 predictions to {out}."
  assert "inputs/s" in captured.err  # The progress bar.
  rows = _read(out)
  assert [r["inputs"] for r in rows] == inputs
  assert all(list(r) == ["inputs", "prediction", "score"] for r in rows)
  assert all(isinstance(r["prediction"], str) for r in rows)
  assert all(math.isfinite(r["score"]) and r["score"] < 0 for r in rows)
  assert os.listdir(out.parent) == ["out.jsonl"]  # Written atomically: no temp left.


def test_infer_jsonl_from_stdin_with_beam_search(trained, tmp_path, monkeypatch, capsys):
  lines = [{"inputs": "abc", "id": 7}, {"inputs": "hg", "meta": {"a": [1]}}]
  monkeypatch.setattr(
    "sys.stdin", io.StringIO("\n".join(json.dumps(x) for x in lines) + "\n\n")
  )
  out = tmp_path / "beam.jsonl"
  assert (
    _cli(
      *_infer_args(
        trained,
        "--gin.INFER_TASK='tiny_rev'",
        "--gin.INFER_INPUT='-'",
        f"--gin.INFER_OUTPUT='{out}'",
        "--gin.INFER_DECODE_METHOD='beam'",
        "--gin.INFER_NUM_BEAMS=3",
        "--gin.INFER_MAX_DECODE_LENGTH=6",
      )
    )
    == 0
  )
  assert f"Wrote 2 predictions to {out}." in capsys.readouterr().out
  rows = _read(out)
  assert [(r["inputs"], r.get("id"), r.get("meta")) for r in rows] == [
    ("abc", 7, None),
    ("hg", None, {"a": [1]}),
  ]
  # At most 6 tokens (bytes) before EOS.
  assert all(len(r["prediction"].encode()) <= 6 and r["score"] < 0 for r in rows)


def test_eval_and_infer_read_a_run_in_training_through_relative_paths(
  trained, tmp_path, monkeypatch, capsys
):
  """`mtx eval` and `mtx infer` only read a run and take no lock: both work while a
  training holds MODEL_DIR's. A relative MODEL_DIR and INFER_INPUT are found from the
  working directory, and '~/out.jsonl' lands in HOME (not in a folder named '~')."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "in.txt").write_text("abc\n")
  model_dir = os.path.relpath(trained, tmp_path)
  with lock_lib.ModelDirLock(str(trained)):
    code = _cli(
      "infer",
      f"--gin_file={TINY_GIN}",
      "--gin_file=runs/infer.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.INFER_TASK='tiny_copy'",
      "--gin.INFER_INPUT='in.txt'",
      "--gin.INFER_OUTPUT='~/out.jsonl'",
    )
    assert code == 0
    out = tmp_path / "home" / "out.jsonl"
    assert f"Wrote 1 prediction to {out}." in capsys.readouterr().out
    assert [r["inputs"] for r in _read(out)] == ["abc"]
    code = _cli(
      "eval",
      f"--gin_file={TINY_GIN}",
      "--gin_file=runs/eval.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.EVAL_MAX_EXAMPLES=8",
      "--gin.EVAL_BATCH_SIZE=8",
      "--gin_bindings=evaluate.tensorboard = False",
    )
    assert code == 0
    assert (trained / "eval" / "step_2.json").exists()
  assert sorted(os.listdir(tmp_path)) == ["home", "in.txt"]


@pytest.mark.parametrize(
  "extra,pattern",
  [
    (
      ["--gin.INFER_TASK='tiny_cpy'", "--gin.INFER_INPUT='x.txt'"],
      "did you mean: tiny_copy",
    ),
    (["--gin.INFER_INPUT='x.txt'"], "has 2 tasks; set INFER_TASK"),
    (["--gin.INFER_TASK='tiny'", "--gin.INFER_INPUT='x.txt'"], "is a mixture"),
    (
      ["--gin.INFER_TASK='tiny_rev'", "--gin.INFER_INPUT='/no/such/file.txt'"],
      "INFER_INPUT /no/such/file.txt does not exist",
    ),
    (["--gin.INFER_TASK='tiny_rev'"], "INFER_INPUT is not set"),
    (
      ["--gin.INFER_TASK='tiny_rev'", "--gin.INFER_INPUT='{bad}'"],
      'Line 2 of .* has no "inputs" field',
    ),
    (
      [
        "--gin.INFER_TASK='tiny_rev'",
        "--gin.INFER_INPUT='{good}'",
        "--gin.MODEL_DIR='{tmp}/none'",
      ],
      "MODEL_DIR .* does not exist",
    ),
    (
      [
        "--gin.INFER_TASK='tiny_rev'",
        "--gin.INFER_INPUT='{good}'",
        "--gin.INFER_DECODE_METHOD='bem'",
      ],
      "INFER_DECODE_METHOD 'bem'",
    ),
  ],
)
def test_bad_input_is_one_sentence(tmp_path, capsys, extra, pattern):
  (tmp_path / "bad.jsonl").write_text('{"inputs": "ab"}\n{"input": "ab"}\n')
  (tmp_path / "good.txt").write_text("ab\n")
  extra = [
    e.format(bad=tmp_path / "bad.jsonl", good=tmp_path / "good.txt", tmp=tmp_path)
    for e in extra
  ]
  gin.clear_config()
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(_infer_args(tmp_path / "run", *extra))
  finally:
    gin.clear_config()
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2
  assert err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err), err


_TRAINED_BAD = [
  ("not_utf8", ["--gin.INFER_INPUT='{latin}'"], r"latin1.txt:2 is not valid UTF-8"),
  ("input_is_dir", ["--gin.INFER_INPUT='{tmp}'"], r"INFER_INPUT .* is a directory"),
  (
    "output_is_dir",
    ["--gin.INFER_INPUT='{good}'", "--gin.INFER_OUTPUT='{tmp}'"],
    r"INFER_OUTPUT .* is a directory; name a file in it",
  ),
  (
    "output_is_input",
    ["--gin.INFER_INPUT='{good}'", "--gin.INFER_OUTPUT='{good}'"],
    r"INFER_OUTPUT .*good.txt is INFER_INPUT too, which the predictions would overwrite",
  ),
  (
    "missing_step",
    ["--gin.INFER_INPUT='{good}'", "--gin.INFER_CHECKPOINT_STEP=7"],
    r"7.*steps? .*2",
  ),
  (
    "num_return_without_beam",
    ["--gin.INFER_INPUT='{good}'", "--gin.INFER_NUM_RETURN=2"],
    r"INFER_NUM_RETURN 2 .* beam",
  ),
  (
    "batch_float",
    ["--gin.INFER_INPUT='{good}'", "--gin.INFER_BATCH_SIZE=8.0"],
    "INFER_BATCH_SIZE must be an integer .*write 8",
  ),
]


@pytest.mark.parametrize(
  "case,extra,pattern", [pytest.param(*c, id=c[0]) for c in _TRAINED_BAD]
)
def test_bad_input_on_a_trained_run(trained, tmp_path, capsys, case, extra, pattern):
  """Mistakes about the inputs, the output and the checkpoint: one sentence, exit 2,
  nothing written (the input, the output folder and the run unchanged)."""
  (tmp_path / "good.txt").write_text("ab\n")
  (tmp_path / "latin1.txt").write_bytes("ab\ncaf\u00e9\n".encode("latin-1"))
  extra = [
    e.format(good=tmp_path / "good.txt", latin=tmp_path / "latin1.txt", tmp=tmp_path)
    for e in extra
  ]
  before = sorted(os.listdir(tmp_path)), sorted(os.listdir(trained))
  gin.clear_config()
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(_infer_args(trained, "--gin.INFER_TASK='tiny_copy'", *extra))
  finally:
    gin.clear_config()
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2, err
  assert err.startswith("mtx: error: ") and "\n" not in err, err
  assert re.search(pattern, err), err
  assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(trained))) == before
  assert (tmp_path / "good.txt").read_text() == "ab\n"


def test_n_best_to_stdout_and_file_mode(trained, tmp_path, capsys):
  """INFER_OUTPUT='-' writes the JSONL to stdout (the summary goes to stderr);
  INFER_NUM_RETURN=n lists the n best beams, the first of them the prediction a
  single-result beam search makes; a file output has the mode of the run's files."""
  (tmp_path / "in.txt").write_text("abc\nhg\n")
  beam = ["--gin.INFER_DECODE_METHOD='beam'", "--gin.INFER_NUM_BEAMS=3"]
  common = ["--gin.INFER_TASK='tiny_copy'", f"--gin.INFER_INPUT='{tmp_path}/in.txt'"]
  assert (
    _cli(
      *_infer_args(
        trained, *common, *beam, "--gin.INFER_NUM_RETURN=2", "--gin.INFER_OUTPUT='-'"
      )
    )
    == 0
  )
  captured = capsys.readouterr()
  rows = [json.loads(line) for line in captured.out.splitlines()]
  assert "Wrote 2 predictions to stdout." in captured.err
  assert not os.path.exists("-") and not os.path.exists(tmp_path / "-")
  out = tmp_path / "one.jsonl"
  assert _cli(*_infer_args(trained, *common, *beam, f"--gin.INFER_OUTPUT='{out}'")) == 0
  single = _read(out)
  for row, one in zip(rows, single):
    assert len(row["predictions"]) == 2
    assert row["predictions"][0] == {
      "prediction": row["prediction"],
      "score": row["score"],
    }
    assert row["prediction"] == one["prediction"]
    assert row["score"] == pytest.approx(one["score"], abs=1e-5)
  mode = os.stat(out).st_mode & 0o777
  assert mode == os.stat(trained / "metrics.jsonl").st_mode & 0o777 == 0o644


def test_read_records_formats(tmp_path):
  (tmp_path / "a.txt").write_text("x y\n{not json}\n")
  assert infer_lib.read_records(str(tmp_path / "a.txt")) == [
    {"inputs": "x y"},
    {"inputs": "{not json}"},
  ]
  assert infer_lib.read_records(
    "-", stdin=io.StringIO('\n{"inputs": "q", "k": 1}\n')
  ) == [{"inputs": "q", "k": 1, "_line": 2}]
  assert infer_lib.read_records("-", stdin=io.StringIO("plain\n")) == [
    {"inputs": "plain"}
  ]
  (tmp_path / "b.jsonl").write_text('{"inputs": "a"}\n[1, 2]\n')
  with pytest.raises(UserError, match="Line 2 of .* not an object"):
    infer_lib.read_records(str(tmp_path / "b.jsonl"))


def test_glue_inputs_as_source_fields_or_as_text():
  """A GLUE task's text preprocessor runs on source fields; model text skips it."""
  import mixtures.glue  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  task = seqio.get_mixture_or_task("glue_rte_v002")
  source = [
    {
      "sentence1": "A cat sat.",
      "sentence2": "An animal sat.",
      "label": -1,
      "idx": 3,
      "_line": 1,
    }
  ]
  text = [{"inputs": "rte sentence1: A cat sat. sentence2: An animal sat."}]
  mode = infer_lib.choose_preprocess(source, True, "auto", task.name, "in.jsonl")
  assert mode == "task"
  assert (
    infer_lib.choose_preprocess(text, True, "auto", task.name, "in.jsonl") == "tokenize"
  )
  tokens, texts = infer_lib.preprocess(task, source, "task", 64, 8)
  tokens2, texts2 = infer_lib.preprocess(task, text, "tokenize", 64, 8)
  assert texts == texts2 == [text[0]["inputs"]]
  assert tokens == tokens2 and tokens[0][-1] == 1
  short, _ = infer_lib.preprocess(task, source, "task", 6, 8)  # Cut, keeping EOS.
  assert short == [tokens[0][:5] + [1]]
  with pytest.raises(UserError, match="no field 'sentence2'"):
    infer_lib.preprocess(task, [{"sentence1": "x", "label": -1}], "task", 64, 8)


def test_infer_and_eval_read_and_write_a_remote_filesystem(trained, capsys):
  """INFER_INPUT, INFER_OUTPUT and an eval's MODEL_DIR on a fake remote (fsspec's
  memory://, no network) go through mtx.paths: the predictions, eval/step_N.json,
  metrics.jsonl and inference_eval/ land there, whole."""
  remote = f"memory://bucket-{uuid.uuid4().hex[:8]}"
  paths.write_atomically(f"{remote}/in.txt", "abc\nhg\n")
  assert (
    _cli(
      *_infer_args(
        trained,
        "--gin.INFER_TASK='tiny_copy'",
        f"--gin.INFER_INPUT='{remote}/in.txt'",
        f"--gin.INFER_OUTPUT='{remote}/out/predictions.jsonl'",
      )
    )
    == 0
  )
  rows = [
    json.loads(x)
    for x in paths.read_text(f"{remote}/out/predictions.jsonl").split("\n")
    if x
  ]
  assert [r["inputs"] for r in rows] == ["abc", "hg"]
  run = f"{remote}/eval-run"
  code = _cli(
    "eval",
    f"--gin_file={TINY_GIN}",
    "--gin_file=runs/eval.gin",
    f"--gin.MODEL_DIR='{run}'",
    f"--gin.EVAL_CHECKPOINT_PATH='{trained}'",
    "--gin.EVAL_MAX_EXAMPLES=8",
    "--gin.EVAL_BATCH_SIZE=8",
    "--gin_bindings=evaluate.tensorboard = False",
  )
  assert code == 0, capsys.readouterr().err
  assert paths.listdir(run) == ["eval", "inference_eval", "metrics.jsonl"]
  assert json.loads(paths.read_text(f"{run}/eval/step_2.json"))["step"] == 2
  assert [r["step"] for r in metrics_writer.read_metrics(run)] == [2]


def test_a_llama_on_a_tokenizer_json_emits_id_0_and_infer_writes_its_text(tmp_path):
  """A decoder-only model whose vocabulary's id 0 is a token ("!", as in Llama 3's and
  Qwen2's tokenizer.json) may emit it: with every logit equal, greedy decoding takes the
  lowest id, 0, and the prediction is its text (a T5 would take EOS: test_decoding)."""
  hf_dir = zero_token.write_hf_dir(tmp_path / "hf", zero_token.params(flat_logits=True))
  (tmp_path / "in.txt").write_text("a b !\nc\n")
  out = tmp_path / "out.jsonl"
  status = _cli(
    "infer",
    "--gin_file=tests/hf.gin",
    f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
    "--gin.INITIAL_CHECKPOINT_PATH=None",
    f"--gin.INFER_CHECKPOINT_PATH='{hf_dir}'",
    f"--gin.INFER_INPUT='{tmp_path / 'in.txt'}'",
    f"--gin.INFER_OUTPUT='{out}'",
    "--gin.INFER_TASK='hf_copy'",
    "--gin.INFER_MAX_DECODE_LENGTH=3",
  )
  assert status == 0
  assert [(r["inputs"], r["prediction"]) for r in _read(out)] == [
    ("a b !", "! ! !"),
    ("c", "! ! !"),
  ]
