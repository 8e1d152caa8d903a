"""tools/ablate.py: the table from run folders, the command line, and a tiny smoke run."""

import importlib.util
import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablate", REPO / "tools" / "ablate.py")
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)


def _run(root, name, step, tasks, step_times, older=None):
  """A fake run folder: eval/step_<step>.json (+ an older one) and metrics.jsonl."""
  d = root / name
  (d / "eval").mkdir(parents=True)

  def record(s, values):
    return {
      "step": s,
      "split": "validation",
      "tasks": {
        t: {"loss": 1.0, "num_examples": 10, m: v} for t, (m, v) in values.items()
      },
      "primary": {t: m for t, (m, v) in values.items()},
      "summary": {"mean_primary": 0.0, "delta_m": None, "baseline": None},
    }

  (d / "eval" / f"step_{step}.json").write_text(json.dumps(record(step, tasks)))
  if older:
    (d / "eval" / "step_5.json").write_text(json.dumps(record(5, older)))
  lines = [
    json.dumps({"step": i + 1, "loss": 1.0, "timing/step_s": t})
    for i, t in enumerate(step_times)
  ]
  lines.append(json.dumps({"step": 9, "eval/mean_primary": 1.0}))
  (d / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 10, "lo')  # torn
  return d


def test_table_numbers_from_fabricated_runs(tmp_path):
  _run(
    tmp_path,
    "sum",
    20,
    {"a": ("exact_match", 40.0), "b": ("accuracy", 80.0), "c": ("loss", 2.0)},
    [0.5, 0.1, 0.2],
    older={"a": ("exact_match", 1.0), "b": ("accuracy", 1.0), "c": ("loss", 9.0)},
  )
  _run(
    tmp_path,
    "pcgrad",
    20,
    {"a": ("exact_match", 50.0), "b": ("accuracy", 60.0), "c": ("loss", 1.0)},
    [0.3, 0.4],
  )
  (tmp_path / "mgda").mkdir()  # started, never evaluated
  runs = [(m, ablate.summarize(str(tmp_path / m))) for m in ("sum", "pcgrad", "mgda")]
  s, p, none = (r[1] for r in runs)
  assert none is None and s.step == 20  # the newest evaluation, not step 5
  assert s.step_s == pytest.approx(0.2) and p.step_s == pytest.approx(0.35)  # medians
  # The loss-scored task is left out of the mean of percentages.
  assert ablate.mean_primary(s) == pytest.approx(60.0)
  assert ablate.mean_primary(p) == pytest.approx(55.0)
  # (50-40)/40 = +25%, (60-80)/80 = -25%, loss 2 -> 1 = +50% (lower is better).
  assert ablate.delta_m(p, s) == pytest.approx(100 * (0.25 - 0.25 + 0.5) / 3)
  assert ablate.delta_m(s, s) == 0.0

  table = ablate.build_table(runs, "sum", ["made by a test"])
  lines = table.splitlines()
  assert lines[0] == "made by a test"
  assert lines[2] == ("| method | a | b | c | mean primary | Δm% vs sum | step (s) |")
  assert lines[4] == ("| sum | 40.0 | **80.0** | 2.0 | **60.00** | +0.00 | **0.200** |")
  assert lines[5] == (
    "| pcgrad | **50.0** | 60.0 | **1.0** | 55.00 | **+16.67** | 0.350 |"
  )
  assert lines[6].startswith("| mgda (no eval) | — |")
  assert "a: exact_match, b: accuracy, c: loss" in table


def test_command_line_errors_are_one_line(tmp_path, capsys):
  assert ablate.main(["--out", str(tmp_path), "--methods", "pcgrad,pcgard"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pcgard" in err[0] and "gin_configs/mtl" in err[0]
  (tmp_path / "sum").mkdir()
  (tmp_path / "sum" / "metrics.jsonl").write_text("{}\n")
  assert ablate.main(["--out", str(tmp_path), "--methods", "sum"]) == 2
  assert "--resume" in capsys.readouterr().err
  assert ablate.choose_methods("")[0] == "sum"
  assert "static_weights" not in ablate.choose_methods("")
  assert len(ablate.choose_methods("")) == len(ablate.available_methods()) - 1


@pytest.mark.slow
def test_smoke_two_methods_on_the_tiny_mixture(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(
    "PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
  )
  args = [
    "--out",
    str(tmp_path),
    "--gin_file",
    str(REPO / "tests" / "tiny.gin"),
    "--methods",
    "sum,pcgrad",
    "--steps",
    "3",
    "--eval_max_examples",
    "4",
  ]
  logs = tmp_path / "logs"
  assert ablate.main(args) == 0, [p.read_text()[-2000:] for p in logs.glob("*.log")]
  table = (tmp_path / "ablation.md").read_text()
  assert "| sum | " in table and "| pcgrad | " in table and "tiny_copy" in table
  for m in ("sum", "pcgrad"):
    assert (tmp_path / m / "eval" / "step_3.json").exists()
  capsys.readouterr()
  assert ablate.main(args + ["--resume"]) == 0  # nothing left to run
  assert capsys.readouterr().out.count("skipped (--resume)") == 2
  assert (tmp_path / "ablation.md").read_text() == table
