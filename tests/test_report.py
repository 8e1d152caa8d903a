"""tools/report.py on synthetic run directories: figures, HTML, the ablation table, errors."""

import importlib.util
import json
import os
import re

import pytest

pytest.importorskip("matplotlib")

_TOOLS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"
)
TASKS = ["task_a", "task_b", "task_c"]
PRIMARY = {"task_a": "accuracy", "task_b": "exact_match", "task_c": "bleu"}


def _load_tool():
  spec = importlib.util.spec_from_file_location(
    "report", os.path.join(_TOOLS, "report.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tool():
  return _load_tool()


def _eval_numbers(offset: float) -> dict:
  """task -> metrics of one eval, in percent; offset tells the runs apart."""
  return {
    "task_a": {
      "accuracy": 60.0 + offset,
      "f1": 55.5 + offset,
      "loss": 0.9 - offset / 100,
    },
    "task_b": {"exact_match": 40.25 + offset, "loss": 1.5},
    "task_c": {"bleu": 20.0 + 2 * offset, "loss": 2.25 + offset / 10},
  }


def _make_run(
  path,
  *,
  method: str,
  steps,
  offset: float,
  per_task_grads: bool = False,
  weights: bool = False,
  eval_json: bool = True,
  partial_line: bool = False,
  nan_at=None,
):
  """Writes a run directory: tasks.json, config.gin, metrics.jsonl, eval/step_<N>.json."""
  os.makedirs(os.path.join(path, "eval"), exist_ok=True)
  with open(os.path.join(path, "tasks.json"), "w") as f:
    json.dump(
      {
        "mixture": "synth",
        "tasks": [
          {"id": i, "name": t, "group": t, "rate": 1 / 3, "examples": 100}
          for i, t in enumerate(TASKS)
        ],
      },
      f,
    )
  transforms = "[]" if method == "sum" else f"[@mtl.{method}]"
  with open(os.path.join(path, "config.gin"), "w") as f:
    f.write(
      f"MIXTURE_OR_TASK_NAME = 'synth'\nTRAIN_STEPS = {steps[-1]}\n\n"
      f"# Parameters for {method}:\n{method}.reduction = 'sum'\n\n"
      f"T5Config.emb_dim = 32\ntrain.mtl_transforms = {transforms}\n"
    )
  lines = []
  for n, s in enumerate(steps):
    rec = {
      "step": s,
      "loss": 3.0 / (n + 1) + offset / 100,
      "learning_rate": 1e-3,
      "grad_norm": 2.0,
      "timing/step_s": 0.05 + offset / 1000,
      "timing/tokens_per_s": 1000.0 - offset,
    }
    for i, t in enumerate(TASKS):
      rec[f"loss/{t}"] = (i + 1) * 2.0 / (n + 1) + offset / 100
    if nan_at == s:
      rec["loss/task_b"] = "NaN"
    if per_task_grads:
      rec.update(
        {
          "grad_cos/task_a/task_b": -0.25 + 0.01 * n,
          "grad_cos/task_a/task_c": 0.5,
          "grad_cos/task_b/task_c": 0.125,
          "conflict_frac": 1 / 3,
        }
      )
      rec.update({f"grad_norm/{t}": 1.0 + i for i, t in enumerate(TASKS)})
    if weights:
      rec.update({f"mtl/weight/{t}": 1.0 + 0.1 * i * n for i, t in enumerate(TASKS)})
    lines.append(json.dumps(rec))
    if n in (len(steps) // 2, len(steps) - 1) or len(steps) == 1:  # eval at mid and end
      numbers = _eval_numbers(offset if n == len(steps) - 1 else offset - 10)
      ev = {"step": s}
      for t, ms in numbers.items():
        ev.update({f"eval/{t}/{m}": v for m, v in ms.items()})
      mean = sum(numbers[t][PRIMARY[t]] for t in TASKS) / 3
      ev["eval/mean_primary"] = mean
      lines.append(json.dumps(ev))  # a second line for the same step
      if eval_json:
        with open(os.path.join(path, "eval", f"step_{s}.json"), "w") as f:
          json.dump(
            {
              "step": s,
              "split": "validation",
              "tasks": {t: dict(ms, num_examples=10) for t, ms in numbers.items()},
              "primary": PRIMARY,
              "summary": {"mean_primary": mean, "delta_m": None, "baseline": None},
            },
            f,
          )
  text = "\n".join(lines) + "\n"
  if partial_line:
    text += '{"step": 99999, "loss": 1.'  # a run killed mid-write
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write(text)
  return str(path)


def _pngs_ok(out, names):
  for name in names:
    p = os.path.join(out, name)
    assert os.path.getsize(p) > 8000, name  # a real figure, not an empty canvas


def test_one_run_report(tool, tmp_path, capsys):
  run = _make_run(
    tmp_path / "pc",
    method="pcgrad",
    steps=[10, 20, 30, 40],
    offset=0,
    per_task_grads=True,
    weights=True,
  )
  assert tool.main([run]) == 0
  out = os.path.join(run, "report")  # the default place
  assert capsys.readouterr().out.strip() == os.path.join(out, "index.html")
  _pngs_ok(
    out,
    [
      f"r0_{k}.png"
      for k in (
        "train_loss",
        "eval",
        "grad_cos",
        "grad_cos_strip",
        "grad_cos_lines",
        "weights",
        "dynamics",
      )
    ],
  )
  page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
  assert "Not drawn" not in page
  for t in TASKS:
    assert t in page
  assert "train.mtl_transforms = [@mtl.pcgrad]" in page and "pcgrad.reduction" in page
  assert 'src="r0_grad_cos.png"' in page and "http" not in page  # self-contained
  # The newest eval table: task_a's accuracy (primary, starred) and f1 at step 40.
  assert "<td>60.00 *</td><td>55.50</td>" in page


def _table(page):
  """The ablation table as {row label: [cell texts]} and {row label: [is best]}."""
  table = re.search(r'<table class="ablation">(.*?)</table>', page, re.S).group(1)
  values, best = {}, {}
  for row in re.findall(r"<tr><td>(.*?)</tr>", table, re.S):
    label = re.sub(r" [↑↓]$", "", row.split("</td>")[0])
    cells = re.findall(r"<td( class=best)?>(.*?)</td>", row.split("</td>", 1)[1])
    values[label] = [c[1] for c in cells]
    best[label] = [bool(c[0]) for c in cells]
  return values, best


def test_ablation_of_three_runs(tool, tmp_path, capsys):
  a = _make_run(
    tmp_path / "a", method="pcgrad", steps=[10, 20, 30], offset=5, per_task_grads=True
  )
  b = _make_run(
    tmp_path / "b",
    method="uncertainty_weighting",
    steps=[10, 20, 30],
    offset=0,
    weights=True,
    partial_line=True,
    nan_at=30,
  )
  c = _make_run(tmp_path / "c", method="sum", steps=[30], offset=-3, eval_json=False)
  out = str(tmp_path / "out")
  assert tool.main([a, b, c, "--out", out, "--labels", "PC,UW,SUM"]) == 0
  capsys.readouterr()
  _pngs_ok(
    out,
    [
      "ablation_train_loss.png",
      "ablation_eval.png",
      "ablation_conflict.png",
      "r0_grad_cos.png",
      "r1_weights.png",
      "r2_train_loss.png",
      "r2_eval.png",
    ],
  )
  page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
  for name in TASKS + ["PC", "UW", "SUM", "uncertainty_weighting", "sum (default)"]:
    assert name in page
  assert "no pairwise gradient cosines" in page  # UW and SUM have none: a note, no figure
  assert not os.path.exists(os.path.join(out, "r2_grad_cos.png"))

  values, best = _table(page)
  assert values["eval task_a accuracy"] == ["65.00", "60.00", "57.00"]
  assert best["eval task_a accuracy"] == [True, False, False]
  assert values["eval task_c bleu"] == ["30.00", "20.00", "14.00"]
  mean = [(60 + o + 40.25 + o + 20 + 2 * o) / 3 for o in (5, 0, -3)]
  assert values["eval mean of primaries"] == [f"{m:.2f}" for m in mean]
  assert values["eval loss task_a"] == ["0.85", "0.9", "0.93"]
  assert best["eval loss task_a"] == [True, False, False]  # lower is better
  # Final train losses: the newest finite value (UW's task_b is NaN at step 30).
  assert values["final train loss task_c"] == ["2.05", "2", "5.97"]
  assert values["final train loss task_b"] == ["1.383", "2", "3.97"]
  assert values["last logged step"] == ["30", "30", "30"]  # the cut line is ignored
  assert values["tokens / s (median)"] == ["995", "1000", "1003"]
  assert best["tokens / s (median)"] == [False, False, True]


def test_bad_inputs_exit_2(tool, tmp_path, capsys, monkeypatch):
  (tmp_path / "empty").mkdir()
  assert tool.main([str(tmp_path / "empty")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "is not an mtx run directory" in err
  run = _make_run(tmp_path / "r", method="sum", steps=[1], offset=0)
  assert tool.main([run, "--labels", "x,y"]) == 2
  assert "--labels has 2" in capsys.readouterr().err
  monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # not installed
  assert tool.main([run]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'pip install "mtx[report]"' in err
