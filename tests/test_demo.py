"""The demo (gin_configs/demo.gin on mixtures/demo.py) shows what the README says it shows."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train_demo(model_dir, steps):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mtx",
      "train",
      "--gin_file=gin_configs/demo.gin",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      "--gin.LOG_PERIOD=50",
      "--gin.EVAL_PERIOD=0",
      "--gin.CHECKPOINT_PERIOD=1000",
      # Per-group gradients (and so grad_cos) for `sum`; TAG itself only at step 0.
      "--gin.train.tag_affinity_period=1000",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = (model_dir / "metrics.jsonl").read_text().splitlines()
  return [row for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.slow
def test_the_demo_conflict_is_the_one_negative_gradient_cosine(tmp_path):
  rows = _train_demo(tmp_path / "demo", 150)
  last = rows[-1]
  cos = {k[len("grad_cos/") :]: v for k, v in last.items() if k.startswith("grad_cos/")}
  assert len(cos) == 28  # 8 tasks
  pair = cos.pop("demo_sentiment/demo_verdict")
  # Measured: -0.53 at step 150 of a 300-step run, -0.9 by step 1500 of the demo; every
  # other pair within ±0.04 from step 200 on.
  assert pair < -0.25, pair
  assert min(cos.values()) > -0.05, min(cos.items(), key=lambda kv: kv[1])
  # Clipped, the loss falls from one log step to the next (it used to rise, unclipped).
  losses = [row["loss"] for row in rows]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
