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


def test_run_summary_from_a_fabricated_run(tmp_path):
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
  s, p, none = (ablate.summarize(str(tmp_path / m)) for m in ("sum", "pcgrad", "mgda"))
  assert none is None and s.step == 20  # the newest evaluation, not step 5
  assert s.step_s == pytest.approx(0.2) and p.step_s == pytest.approx(0.35)  # medians
  # The loss-scored task is left out of the mean of percentages.
  assert ablate.mean_primary(s) == pytest.approx(60.0)
  assert ablate.mean_primary(p) == pytest.approx(55.0)
  # (50-40)/40 = +25%, (60-80)/80 = -25%, loss 2 -> 1 = +50% (lower is better).
  assert ablate.delta_m(p, s) == pytest.approx(100 * (0.25 - 0.25 + 0.5) / 3)
  assert ablate.delta_m(s, s) == 0.0


def _seeds(root, method, values_by_seed, step_s=0.1):
  """<root>/<method>/seed_<i>/ runs, one per dict of task -> (metric, value)."""
  for i, values in enumerate(values_by_seed):
    _run(root / method, f"seed_{i}", 20, values, [step_s])


def test_mean_standard_error_and_noise():
  e = ablate.estimate([40.0, 44.0, 48.0])
  assert (e.mean, e.n) == (44.0, 3) and e.se == pytest.approx(4 / 3**0.5)
  assert ablate.estimate([5.0]).se is None and ablate.estimate([]) is None
  a, b = ablate.Estimate(50.0, 1.0, 3), ablate.Estimate(46.0, 1.0, 3)
  assert ablate.beyond_noise(a, b)  # 4 > 2 * sqrt(2) = 2.83
  assert not ablate.beyond_noise(a, ablate.Estimate(48.0, 1.0, 3))  # 2 < 2.83
  assert not ablate.beyond_noise(a, ablate.Estimate(0.0, None, 1))  # one seed: no noise


def test_table_over_seeds_marks_noise_and_bolds_only_a_clear_best(tmp_path):
  em = "exact_match"
  # sum: a = 40, 42, 44 (mean 42, SE 1.15); b = 80 on every seed (SE 0).
  _seeds(tmp_path, "sum", [{"a": (em, v), "b": ("accuracy", 80.0)} for v in (40, 42, 44)])
  # pcgrad: a clearly better (60 +- 1.15), b clearly worse (70 +- 0).
  _seeds(
    tmp_path, "pcgrad", [{"a": (em, v), "b": ("accuracy", 70.0)} for v in (58, 60, 62)]
  )
  # mgda: a within noise of sum (43 +- 3.2), b = 80.
  _seeds(
    tmp_path, "mgda", [{"a": (em, v), "b": ("accuracy", 80.0)} for v in (38, 44, 47)]
  )
  # famo: one seed, a = 90: no noise estimate, never marked or bold.
  _seeds(tmp_path, "famo", [{"a": (em, 90.0), "b": ("accuracy", 99.0)}])
  runs = [
    (m, ablate.collect(str(tmp_path), m)) for m in ("sum", "pcgrad", "mgda", "famo")
  ]
  runs.append(("nash_mtl", ablate.collect(str(tmp_path), "nash_mtl")))  # no runs
  assert [len(ss) for _, ss in runs] == [3, 3, 3, 1, 0]
  lines = ablate.build_table(runs, "sum", ["made by a test"]).splitlines()
  assert lines[0] == "made by a test"
  assert lines[2] == (
    "| method | seeds | a | b | mean primary | Δm% vs sum | step (s) | peak RSS (MiB) |"
  )
  assert lines[4] == (
    "| sum | 3 | 42.0 ± 1.2 | 80.0 ± 0.0 | 61.00 ± 0.58 | +0.00 ± 1.37 | 0.100 | n/a |"
  )
  # a: +18, beyond noise: better (▲); b: worse (▼); Delta-m = ((60-42)/42 - 10/80)/2.
  # Not bold: famo's single seed scores higher and has no noise estimate.
  assert lines[5] == (
    "| pcgrad | 3 | 60.0 ± 1.2 ▲ | 70.0 ± 0.0 ▼ | 65.00 ± 0.58 ▲ | +15.18 ± 1.37 ▲ | 0.100 | n/a |"
  )
  assert lines[6] == (
    "| mgda | 3 | 43.0 ± 2.6 | 80.0 ± 0.0 | 61.50 ± 1.32 | +1.19 ± 3.15 | 0.100 | n/a |"
  )
  # The single seed's 90 and 99 are the largest values, yet not bold: no noise estimate.
  assert lines[7] == "| famo | 1 | 90.0 | 99.0 | 94.50 | +69.02 | 0.100 | n/a |"
  assert lines[8].startswith("| nash_mtl (no eval) | — |")
  assert "within noise" in lines[10] and "single seed" in lines[10]
  # Without the single seed, pcgrad's a and mean primary beat every other row beyond
  # noise (65 - 61.5 = 3.5 > 2 sqrt(0.58^2 + 1.32^2) = 2.9): bold; b's best is a tie
  # (sum and mgda, 80): not bold.
  lines = ablate.build_table(runs[:3], "sum").splitlines()
  assert lines[2] == (
    "| sum | 3 | 42.0 ± 1.2 | 80.0 ± 0.0 | 61.00 ± 0.58 | +0.00 ± 1.37 | 0.100 | n/a |"
  )
  assert lines[3].startswith(
    "| pcgrad | 3 | **60.0 ± 1.2 ▲** | 70.0 ± 0.0 ▼ | **65.00 ± 0.58 ▲** | "
  )


def test_command_line_errors_are_one_line(tmp_path, capsys):
  assert ablate.main(["--out", str(tmp_path), "--methods", "pcgrad,pcgard"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pcgard" in err[0] and "gin_configs/mtl" in err[0]
  (tmp_path / "sum" / "seed_0").mkdir(parents=True)
  (tmp_path / "sum" / "seed_0" / "metrics.jsonl").write_text("{}\n")
  assert ablate.main(["--out", str(tmp_path), "--methods", "sum"]) == 2
  assert "--resume" in capsys.readouterr().err
  assert ablate.main(["--out", str(tmp_path), "--seeds", "0"]) == 2
  assert "--seeds" in capsys.readouterr().err
  assert ablate.choose_methods("")[0] == "sum"
  assert "static_weights" not in ablate.choose_methods("")
  assert len(ablate.choose_methods("")) == len(ablate.available_methods()) - 1


_FAKE_MTX = """#!/usr/bin/env python3
# Stands in for `python -m mtx train|eval`: writes eval/step_<TRAIN_STEPS>.json whose
# score is 10 * (train.seed + 1), and logs its command line.
import json, os, sys
args = dict(a[len("--gin."):].split("=", 1) for a in sys.argv if a.startswith("--gin."))
run_dir, steps = args["MODEL_DIR"].strip("'"), int(args["TRAIN_STEPS"])
seed = int(args["train.seed"])
with open(os.path.join(os.path.dirname(os.path.dirname(run_dir)), "calls"), "a") as f:
  f.write(f"{sys.argv[3]} {os.path.basename(os.path.dirname(run_dir))} {seed}\\n")
os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
if sys.argv[3] == "train":
  record = {"step": steps, "tasks": {"t": {"accuracy": 10.0 * (seed + 1)}},
            "primary": {"t": "accuracy"}}
  with open(os.path.join(run_dir, "eval", f"step_{steps}.json"), "w") as f:
    json.dump(record, f)
"""


def test_seeds_run_per_method_and_seed_and_resume_runs_only_the_missing(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_MTX)
  fake.chmod(0o755)
  out = tmp_path / "out"
  args = [
    "--out",
    str(out),
    "--methods",
    "sum,mean",
    "--steps",
    "7",
    "--python",
    str(fake),
  ]
  assert ablate.main(args + ["--seeds", "2"]) == 0
  calls = (out / "calls").read_text().split("\n")
  assert calls[:-1] == ["train sum 0", "train mean 0", "train sum 1", "train mean 1"]
  # A third seed later: --resume trains only the missing (method, seed) runs.
  assert ablate.main(args + ["--seeds", "3", "--resume"]) == 0
  calls = (out / "calls").read_text().split("\n")
  assert calls[4:-1] == ["train sum 2", "train mean 2"]
  table = (out / "ablation.md").read_text()
  # Seeds score 10, 20, 30: mean 20, SE 5.8; seeds 0..2 in the notes.
  assert "| sum | 3 | 20.0 ± 5.8 |" in table and "seeds (`train.seed`) 0..2" in table


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
    "--seeds",
    "2",
    "--eval_max_examples",
    "4",
  ]
  logs = tmp_path / "logs"
  assert ablate.main(args) == 0, [p.read_text()[-2000:] for p in logs.glob("*.log")]
  table = (tmp_path / "ablation.md").read_text()
  assert "| sum | 2 | " in table and "| pcgrad | 2 | " in table and "tiny_copy" in table
  for m in ("sum", "pcgrad"):
    for seed in (0, 1):
      assert (tmp_path / m / f"seed_{seed}" / "eval" / "step_3.json").exists()
  capsys.readouterr()
  assert ablate.main(args + ["--resume"]) == 0  # nothing left to run
  assert capsys.readouterr().out.count("skipped (--resume)") == 4
  assert (tmp_path / "ablation.md").read_text() == table


def test_a_method_with_more_gin_files_is_its_own_row_with_its_peak_memory(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(
    _FAKE_MTX
    + "if sys.argv[3] == 'train':\n"
    + "  files = [a for a in sys.argv if a.startswith('--gin_file=')]\n"
    + "  with open(os.path.join(run_dir, 'files'), 'w') as f:\n"
    + "    f.write('\\n'.join(files))\n"
  )
  fake.chmod(0o755)
  out = tmp_path / "out"
  args = ["--out", str(out), "--steps", "7", "--seeds", "1", "--python", str(fake)]
  assert ablate.main(args + ["--methods", "sum,sum+models/llama_tiny"]) == 0
  run = out / "sum+models.llama_tiny" / "seed_0"
  files = (run / "files").read_text().split("\n")
  i = next(i for i, f in enumerate(files) if f.endswith("gin_configs/mtl/sum.gin"))
  assert files[i + 1].endswith("gin_configs/models/llama_tiny.gin")
  assert "models/llama_tiny" not in (out / "sum" / "seed_0" / "files").read_text()
  peak = json.loads((run / ablate.RUN_INFO).read_text())["peak_mib"]
  assert 1 < peak < 10_000  # a small Python process, in MiB
  table = (out / "ablation.md").read_text()
  assert "| sum+models/llama_tiny | 1 | 10.0 |" in table and "peak RSS (MiB)" in table
  row = next(r for r in table.splitlines() if r.startswith("| sum+models/llama_tiny"))
  assert row.rstrip(" |").split("| ")[-1] == f"{peak:.0f}"


def test_a_method_naming_a_missing_gin_file_is_one_line(tmp_path, capsys):
  args = ["--out", str(tmp_path), "--methods", "sum,pcgrad+adapters/nothing"]
  assert ablate.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "gin_configs/adapters/nothing.gin" in err[0]
