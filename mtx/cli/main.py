"""``mtx train|eval|infer|compile|export ...``: the command line, with T5X's gin flags.

    mtx train --gin_file=gin_configs/demo.gin --gin.MODEL_DIR="'/tmp/demo'"
    mtx train --gin_file=runs/train.gin --gin_file=mtl/pcgrad.gin \\
        --gin.MIXTURE_OR_TASK_NAME="'demo'" --gin_bindings="train.seed = 3"

Flags: ``--gin_file`` (repeatable, searched in ``--gin_search_paths`` and the repo's
gin_configs/), ``--gin.NAME=VALUE`` (one binding; strings need quotes, as in T5X),
``--gin_bindings`` (repeatable), and for several hosts ``--coordinator_address``,
``--num_processes``, ``--process_id`` (passed to ``jax.distributed.initialize``), or
``--distributed`` to let JAX detect them (TPU pods, SLURM, Open MPI).

A mistake the user can fix prints one line and exits with status 2. ``mtx train``
stopped by a signal saves after the current step and exits 0 for SIGTERM (preemption),
130 for SIGINT (Ctrl-C) and 129 for SIGHUP (a closed terminal), as shells expect; a
second Ctrl-C aborts at once, without saving, with status 130.
"""

import argparse
import logging
import os
import re
import sys
from typing import Optional, Sequence

import gin

import gin_configs
from mtx.errors import UserError, close_names

# The shipped gin files (a package, so an installed mtx has them too): searched as
# `models/tiny.gin` and as `gin_configs/models/tiny.gin`, from any directory.
GIN_DIR = os.path.dirname(os.path.abspath(gin_configs.__file__))
REQUIRED_MACROS = (
  "MIXTURE_OR_TASK_NAME",
  "TASK_FEATURE_LENGTHS",
  "TRAIN_STEPS",
  "MODEL_DIR",
)
# command -> (the gin configurable it calls, the macros it requires). Every command reads
# the same gin files as ``mtx train`` (a run is described once); the configurables are
# registered in mtx/cli/configurables.py.
COMMANDS = {
  "train": ("train", REQUIRED_MACROS),
  "eval": ("evaluate", ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "MODEL_DIR")),
  "infer": ("infer", ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "MODEL_DIR")),
  "compile": ("compile_train", ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS")),
  "export": ("export", ("MODEL_DIR",)),
}
_MACRO = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The exit status of a training stopped by a signal (after saving); SIGTERM, the
# preemption notice, is a normal end (0).
SIGNAL_STATUS = {"SIGINT": 130, "SIGHUP": 129}
ABORT_STATUS = 130


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mtx", description="Multi-task T5 training in JAX.")
  p.add_argument("command", choices=sorted(COMMANDS))
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--gin_search_paths", action="append", default=[])
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument(
    "--distributed",
    action="store_true",
    help="jax.distributed.initialize() with what it detects (TPU pods, "
    "SLURM, Open MPI), completed by the three flags above if given.",
  )
  p.add_argument("--verbose", action="store_true")
  return p


def split_gin_flags(argv: Sequence[str]) -> tuple:
  """Separates ``--gin.NAME=VALUE`` flags (T5X's shorthand) from the others."""
  rest, bindings = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--gin."):
      body = arg[len("--gin.") :]
      if "=" not in body:
        try:
          body = body + "=" + next(it)
        except StopIteration:
          raise UserError(f"Flag {arg} has no value; write --gin.NAME=VALUE.") from None
      name, value = body.split("=", 1)
      bindings.append((name, value))
    else:
      rest.append(arg)
  return rest, bindings


def _macro_references() -> set:
  """Names of the macros that some binding refers to (``%NAME``)."""
  found = set()

  def visit(value):
    if isinstance(value, gin.config.ConfigurableReference):
      if value.configurable.name == "macro" or value.configurable.selector == "gin.macro":
        found.add(value.scoped_selector.split("/")[0])
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        visit(v)
    elif isinstance(value, dict):
      for v in value.values():
        visit(v)

  for bindings in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for v in bindings.values():
      visit(v)
  return found


def parse_gin(
  gin_files: Sequence[str],
  flag_bindings: Sequence[tuple],
  extra_bindings: Sequence[str],
  search_paths: Sequence[str],
  required: Sequence[str] = REQUIRED_MACROS,
) -> None:
  """Parses gin files and bindings, turning gin's errors into one-line UserErrors."""
  # lazy: the configurables import JAX and TensorFlow; `mtx --help` should not wait.
  import mtx.cli.configurables  # pylint: disable=g-import-not-at-top,unused-import # lazy: JAX/TF

  _parse_files(
    gin_files,
    list(search_paths) + [GIN_DIR, os.path.dirname(GIN_DIR), os.getcwd()],
  )
  _parse_bindings(flag_bindings, extra_bindings)
  _check_macros(flag_bindings, required)


def _parse_files(gin_files: Sequence[str], search_paths: Sequence[str]) -> None:
  for path in search_paths:
    gin.add_config_file_search_path(path)
  if not gin_files:
    raise UserError(
      "No --gin_file given; start from --gin_file=gin_configs/demo.gin or "
      "gin_configs/runs/train.gin."
    )
  for f in gin_files:
    if not any(os.path.isfile(os.path.join(p, f)) for p in [""] + list(search_paths)):
      raise UserError(
        f"Gin file {f} was not found here or in the search paths "
        f"{list(search_paths)}; check the path or add its folder with "
        "--gin_search_paths."
      )
    try:
      gin.parse_config_file(f)
    except UserError:
      raise  # a task module's own sentence (UserError is a ValueError too)
    except IOError as e:
      raise UserError(
        f"Gin file {f} was not found ({e}); check the path or add its "
        "folder with --gin_search_paths."
      ) from e
    except (SyntaxError, ValueError) as e:
      raise UserError(
        f"Gin file {f} does not parse: {_one_line(e)}; fix that line."
      ) from e


def _parse_bindings(
  flag_bindings: Sequence[tuple], extra_bindings: Sequence[str]
) -> None:
  for name, value in flag_bindings:
    try:
      gin.parse_config(f"{name} = {value}")
    except UserError:
      raise
    except (SyntaxError, ValueError) as e:
      hint = (
        f" (strings need quotes: --gin.{name}=\"'{value}'\")"
        if re.match(r"^[A-Za-z_][\w./-]*$", value)
        else ""
      )
      raise UserError(
        f"--gin.{name}={value} does not parse: {_one_line(e)}{hint}."
      ) from e
  for text in extra_bindings:
    try:
      gin.parse_config(text)
    except UserError:
      raise
    except (SyntaxError, ValueError) as e:
      raise UserError(f"--gin_bindings '{text}' does not parse: {_one_line(e)}.") from e


def _check_macros(flag_bindings: Sequence[tuple], required: Sequence[str]) -> None:
  """Required macros set; every macro used defined; every --gin.MACRO used."""
  missing = [name for name in required if _is_required(name)]
  if missing:
    raise UserError(
      f"Required setting(s) {', '.join(missing)} not given; set them in "
      f"your gin file or with --gin.{missing[0]}=VALUE."
    )
  used = _macro_references()
  defined = {
    scope
    for scope, selector in gin.config._CONFIG  # pylint: disable=protected-access
    if selector == "gin.macro"
  }
  undefined = sorted(used - defined)
  if undefined:
    name = undefined[0]
    raise UserError(
      f"Macro %{name} is used but never defined"
      f"{close_names(name, defined)}; define it in a gin file "
      f"({name} = ...) or with --gin.{name}=VALUE."
    )
  for name, value in flag_bindings:
    if _MACRO.match(name) and name not in used:
      raise UserError(
        f"--gin.{name}={value} binds a macro that no configuration uses"
        f"{close_names(name, used)}; check its spelling."
      )


def _is_required(macro: str) -> bool:
  """Whether ``macro`` is defined and still bound to ``%gin.REQUIRED``."""
  try:
    value = gin.query_parameter(f"%{macro}")
  except ValueError:
    return False  # Not defined by the loaded files: gin reports its own uses.
  return (
    isinstance(value, gin.config.ConfigurableReference)
    and value.scoped_selector.split("/")[0] == "gin.REQUIRED"
  )


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def _init_distributed(args) -> None:
  """Starts JAX's multi-process runtime when asked (before anything else uses JAX)."""
  given = (args.coordinator_address, args.num_processes, args.process_id)
  if not args.distributed and all(v is None for v in given):
    return
  # JAX only for multi-host runs: `mtx --help` and gin errors should not wait for it.
  import jax  # pylint: disable=g-import-not-at-top

  if not args.distributed and any(v is None for v in given):
    raise UserError(
      "Multi-host runs need all of --coordinator_address, "
      "--num_processes and --process_id (or --distributed to detect "
      "them on a TPU pod, SLURM or Open MPI)."
    )
  try:
    jax.distributed.initialize(*given)
  except (ValueError, RuntimeError) as e:
    raise UserError(
      f"jax.distributed.initialize failed ({_one_line(e)[:300]}); check "
      "--coordinator_address (host:port reachable from every process), "
      "--num_processes and --process_id."
    ) from e


def run(argv: Sequence[str]) -> int:
  """Runs a command; returns the exit status."""
  rest, flag_bindings = split_gin_flags(argv)
  args = _parser().parse_args(rest)
  logging.basicConfig(
    level=logging.INFO if args.verbose else logging.WARNING,
    format="%(levelname)s %(name)s: %(message)s",
  )
  for noisy in ("absl", "orbax", "tensorflow", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  # gin tries each search path in turn and logs every miss at ERROR: not an error here.
  logging.getLogger().addFilter(
    lambda record: not record.getMessage().startswith("Path not found:")
  )
  _init_distributed(args)
  configurable, required = COMMANDS[args.command]
  parse_gin(
    args.gin_file, flag_bindings, args.gin_bindings, args.gin_search_paths, required
  )
  fn = gin.get_configurable(configurable)
  try:
    result = fn()
    if args.command == "train":
      # lazy: JAX and TensorFlow load only once the gin files are known to parse.
      from mtx.train import loop  # pylint: disable=g-import-not-at-top # lazy: JAX/TF

      result = loop.train(result, operative_config=gin.operative_config_str)
  except UserError:
    raise
  except ValueError as e:  # gin's missing-required-binding error
    msg = _one_line(e)
    if "Required bindings" in msg or "REQUIRED" in msg:
      raise UserError(
        f"A required setting is missing ({msg}); set it in your gin file "
        "or with --gin.NAME=VALUE."
      ) from e
    raise
  print(_summary(args.command, result), flush=True)
  failure = getattr(result, "failure", None)  # e.g. `mtx compile`: does not fit
  if failure:
    print(f"mtx: error: {failure}", file=sys.stderr, flush=True)
    return 1
  return SIGNAL_STATUS.get(getattr(result, "signal", None), 0)


def _summary(command: str, result) -> str:
  """The last line a command prints: what it did."""
  if command == "train":
    if result.preempted and result.step == 0:
      return f"Stopped by {result.signal} before the first step: nothing to save."
    if result.preempted and result.signal in SIGNAL_STATUS:
      return (
        f"Interrupted by {result.signal}: saved step {result.step}; run the same "
        "command again to resume."
      )
    if result.preempted:
      return f"Preempted: saved step {result.step}."
    return f"Done: {result.step} steps."
  return str(result)


def _exit_now(status: int) -> None:
  """Exits without waiting for background threads (a checkpoint save in flight)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(status)


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    status = run(argv)
  except UserError as e:
    # gin appends "In call to configurable ..." lines; the first line is the sentence.
    print(f"mtx: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    status = 2
  except KeyboardInterrupt:
    # A second Ctrl-C of `mtx train` (the first one saves and stops), or a first one
    # of the other commands. A save cut short is never taken for a checkpoint.
    print(
      "mtx: aborted by Ctrl-C without saving; a training's newest checkpoint is "
      "intact, and the same command run again resumes from it.",
      file=sys.stderr,
      flush=True,
    )
    _exit_now(ABORT_STATUS)
  sys.exit(status)


if __name__ == "__main__":
  main()
