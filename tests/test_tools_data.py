"""tools/inspect_mixture.py on a tiny TSV-backed mixture: report contents and errors."""

import importlib.util
import os

import pytest
import seqio
from tsv_tasks import register_tsv as _register_tsv

_TOOL = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "tools",
  "inspect_mixture.py",
)


def _load_tool():
  spec = importlib.util.spec_from_file_location("inspect_mixture", _TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tool():
  return _load_tool()


@pytest.fixture
def tiny_mixture(tmp_path):
  _register_tsv(
    "im_short", tmp_path / "s.tsv", [("ab", "x"), ("cd", "y"), ("ef", "z"), ("gh", "w")]
  )
  # One over-long example: 20 input bytes + EOS > 16.
  _register_tsv(
    "im_long",
    tmp_path / "l.tsv",
    [("hello world", "dlrow"), ("abcdefghijklmnopqrst", "tsr"), ("spam", "maps")],
  )
  seqio.MixtureRegistry.remove("im_mix")
  seqio.MixtureRegistry.add("im_mix", [("im_short", 3.0), ("im_long", 1.0)])
  return "im_mix"


def test_report_mentions_tasks_rates_and_packing(tool, tiny_mixture, capsys):
  status = tool.main(
    [
      tiny_mixture,
      "--module",
      "",
      "--inputs_length",
      "16",
      "--targets_length",
      "8",
      "--batch_size",
      "4",
      "--batches",
      "5",
      "--examples",
      "2",
    ]
  )
  out = capsys.readouterr().out
  assert status == 0
  assert "im_short" in out and "im_long" in out
  assert "0.7500" in out and "0.2500" in out  # rates 3:1, normalised.
  assert "packing efficiency" in out
  assert "'hello world' -> 'dlrow'" in out  # decoded with the task's vocabulary.
  assert "truncated at 16: 1" in out
  assert "min/mean/p50/p95/max 5/12.7/12/20.1/21" in out  # untrimmed input lengths.


def test_task_major_and_rate_fn(tool, tiny_mixture, capsys):
  status = tool.main(
    [
      tiny_mixture,
      "--module",
      "",
      "--batch_size",
      "4",
      "--units",
      "2",
      "--batches",
      "3",
      "--examples",
      "0",
      "--rate_fn",
      "equal",
    ]
  )
  out = capsys.readouterr().out
  assert status == 0
  assert "task-major, 2 units x 2 rows" in out
  assert "units per group" in out
  assert out.count("0.5000") >= 2


def test_unknown_name_exits_2_with_suggestion(tool, tiny_mixture, capsys):
  status = tool.main(["im_mixx", "--module", ""])
  err = capsys.readouterr().err
  assert status == 2
  assert err.startswith("error: ")
  assert "did you mean: im_mix" in err


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--units", "3"], "not divisible by UNITS"),
    (["--targets_length", "0"], "TASK_FEATURE_LENGTHS"),
    (["--split", "validation"], "no split 'validation'"),
    (["--module", "no_such_module_xyz"], "could not be imported"),
  ],
)
def test_bad_arguments_exit_2(tool, tiny_mixture, capsys, argv, match):
  argv = [tiny_mixture] + (argv if "--module" in argv else argv + ["--module", ""])
  assert tool.main(argv) == 2
  assert match in capsys.readouterr().err
