"""An installed mtx (``pip install .``, not editable) finds its gin files from any
directory: the README's demo command works outside the repository."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARSE = """
from mtx.cli import main
main.parse_gin(["gin_configs/demo.gin", "mtl/pcgrad.gin"], [], [], [], ())
import gin, mtx
assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "demo"
assert not mtx.__file__.startswith(sys.argv[1]), mtx.__file__
print("parsed")
"""


@pytest.mark.slow
def test_installed_package_parses_the_demo_gin_files_from_another_directory(tmp_path):
  target = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
     "--target", str(target), REPO],
    check=True, capture_output=True, timeout=600,
  )  # fmt: skip
  assert (target / "gin_configs" / "runs" / "train.gin").is_file()
  env = dict(os.environ, PYTHONPATH=str(target))
  done = subprocess.run(
    [sys.executable, "-c", "import sys\n" + PARSE, REPO],
    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().endswith("parsed")
