"""``mtx train|eval|infer|compile|export ...``: the command line, with T5X's gin flags.

    mtx train --gin_file=gin_configs/demo.gin --gin.MODEL_DIR="'/tmp/demo'"
    mtx train --gin_file=runs/train.gin --gin_file=mtl/pcgrad.gin \\
        --gin.MIXTURE_OR_TASK_NAME="'demo'" --gin_bindings="train.seed = 3"

Flags: ``--gin_file`` (repeatable, searched in ``--gin_search_paths`` and the repo's
gin_configs/), ``--gin.NAME=VALUE`` (one binding; strings need quotes, as in T5X),
``--gin_bindings`` (repeatable), and for several hosts ``--coordinator_address``,
``--num_processes``, ``--process_id`` (passed to ``jax.distributed.initialize``), or
``--distributed`` to let JAX detect them (TPU pods, SLURM, Open MPI).

A mistake the user can fix prints one line and exits with status 2; that line is the
last on stderr, whole, even when a library's background thread (orbax's checkpoint
writers on a full disk) logs at the same time, and a traceback a library logs takes one
line unless ``--verbose``. ``mtx train`` stopped by a signal saves after the current
step and exits 0 for SIGTERM (preemption), 130 for SIGINT (Ctrl-C) and 129 for SIGHUP
(a closed terminal), as shells expect; a second Ctrl-C aborts at once, without saving,
with status 130.
"""

import argparse
import logging
import os
import re
import sys
import threading
from typing import Optional, Sequence

import gin

import gin_configs
from mtx import paths as paths_lib
from mtx.cli import gin_check
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


def _help_epilog() -> str:
  """What --help says about gin flags and each command's required macros."""
  lines = [
    "Configuration is gin, as in T5X:",
    "  --gin_file=FILE         a gin file (repeatable), e.g. runs/train.gin, mtl/pcgrad.gin",
    "  --gin.NAME=VALUE        one binding: a macro (--gin.TRAIN_STEPS=1000) or a",
    "                          parameter (--gin.model.T5Config.num_heads=8); strings need",
    "                          quotes inside the value: --gin.MODEL_DIR=\"'/tmp/run'\"",
    "  --gin_bindings='A = B'  a binding in gin syntax (repeatable)",
    "",
    "Macros each command requires (set them in a gin file or with --gin.NAME=VALUE):",
  ]
  for command, (_, required) in sorted(COMMANDS.items()):
    lines.append(f"  {command:8s} {', '.join(required)}")
  lines += [
    "",
    "Example:",
    "  mtx train --gin_file=gin_configs/demo.gin --gin.MODEL_DIR=\"'/tmp/demo'\"",
  ]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mtx",
    description="Multi-task T5 training in JAX.",
    epilog=_help_epilog(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "command",
    choices=sorted(COMMANDS),
    help="train | eval | infer | compile | export (the macros each requires: below)",
  )
  p.add_argument(
    "--gin_file", action="append", default=[], help="a gin file (repeatable)"
  )
  p.add_argument(
    "--gin_bindings",
    action="append",
    default=[],
    help="a gin binding, 'NAME = VALUE' (repeatable); or --gin.NAME=VALUE",
  )
  p.add_argument(
    "--gin_search_paths",
    action="append",
    default=[],
    help="folders to search for gin files (the repo's gin_configs/ is always searched)",
  )
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
      if value.count("{") != value.count("}") or value.count("[") != value.count("]"):
        raise UserError(
          f"--gin.{name}={value} is cut off: the shell split the value at its spaces "
          "(and removed its quotes); quote the whole flag, e.g. "
          f"\"--gin.{name}={{'inputs': 64, 'targets': 32}}\"."
        )
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
  """Parses gin files and bindings, turning gin's errors into one-line UserErrors.

  Parses twice: first before mtx's configurables are registered (they import JAX and
  TensorFlow, seconds), which checks the files, includes, syntax, values and the
  required macros at once; then with every configurable, which checks the names
  (configurables, parameters, macros) and keeps the bindings.
  """
  paths = _add_search_paths(
    list(search_paths) + [GIN_DIR, os.path.dirname(GIN_DIR), os.getcwd()]
  )
  _parse_files(gin_files, paths, skip_unknown=True)
  _parse_bindings(flag_bindings, extra_bindings, skip_unknown=True)
  _check_required(required)
  gin_check.check(gin_files, flag_bindings, extra_bindings, paths)
  gin.clear_config()
  # lazy: the configurables import JAX and TensorFlow; gin mistakes are reported first.
  import mtx.cli.configurables  # pylint: disable=g-import-not-at-top,unused-import # lazy: JAX/TF

  _parse_files(gin_files, paths)
  _parse_bindings(flag_bindings, extra_bindings)
  _check_macros(flag_bindings, required)


_SEARCH_PATHS_ADDED = []  # gin keeps its search paths for the process: add each once


def _read_gin_urls() -> None:
  """Lets gin read ``--gin_file=gs://...`` (and its includes) through ``mtx.paths``,
  as T5X lets it through gfile; local files keep gin's own reader."""
  if not _URL_READER_ADDED:
    gin.config.register_file_reader(
      lambda path: paths_lib.open_file(path, "r"),
      lambda path: paths_lib.is_remote(path) and paths_lib.isfile(path),
    )
    _URL_READER_ADDED.append(True)


_URL_READER_ADDED = []  # gin keeps its file readers for the process: add ours once


def _add_search_paths(search_paths: Sequence[str]) -> list:
  _read_gin_urls()
  paths = list(dict.fromkeys(search_paths))
  for path in paths:
    if path not in _SEARCH_PATHS_ADDED:
      gin.add_config_file_search_path(path)
      _SEARCH_PATHS_ADDED.append(path)
  return paths


def _gin_files_known(search_paths: Sequence[str]) -> list:
  """The .gin files under the search paths, as --gin_file would name them."""
  found = []
  for root in search_paths:
    if not os.path.isdir(root) or root == os.path.dirname(GIN_DIR):
      continue
    for folder, dirs, files in os.walk(root):
      dirs[:] = [d for d in dirs if not d.startswith(".")][:50]
      found += [
        os.path.relpath(os.path.join(folder, f), root)
        for f in files
        if f.endswith(".gin")
      ]
      if len(found) > 2000:
        return found
  return found


def _parse_files(
  gin_files: Sequence[str], search_paths: Sequence[str], skip_unknown: bool = False
) -> None:
  if not gin_files:
    raise UserError(
      "No --gin_file given; start from --gin_file=gin_configs/demo.gin or "
      "gin_configs/runs/train.gin."
    )
  for f in gin_files:
    if not any(
      paths_lib.isfile(paths_lib.join(p, f)) if p else paths_lib.isfile(f)
      for p in [""] + list(search_paths)
    ):
      raise UserError(
        f"Gin file {f} was not found here or in the search paths "
        f"{list(search_paths)}{close_names(f, _gin_files_known(search_paths))}; check "
        "the path or add its folder with --gin_search_paths."
      )
    try:
      gin.parse_config_file(f, skip_unknown=skip_unknown)
    except UserError:
      raise  # a task module's own sentence (UserError is a ValueError too)
    except IOError as e:
      missing = re.search(r"Unable to open file: (.*?)\. Searched", str(e))
      if missing and missing.group(1) != f:
        name = missing.group(1)
        raise UserError(
          f"Gin file {f} includes {name}, which was not found in the search paths "
          f"{list(search_paths)}{close_names(name, _gin_files_known(search_paths))}; "
          "fix the include or add its folder with --gin_search_paths."
        ) from e
      raise UserError(
        f"Gin file {f} was not found ({_one_line(e)}); check the path or add its "
        "folder with --gin_search_paths."
      ) from e
    except (SyntaxError, ValueError) as e:
      raise UserError(
        f"Gin file {f} does not parse: {_one_line(e)}{_did_you_mean(e)}; fix that line."
      ) from e


def _did_you_mean(e: Exception) -> str:
  """Close names for gin's 'no parameter named' error, else ''."""
  m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", str(e))
  if not m:
    return ""
  params = gin_check.parameters(gin.get_configurable(m.group(1)))
  return close_names(m.group(2), params) if params else ""


def _value_hint(name: str, value: str) -> str:
  """Why a --gin.NAME=VALUE value may not parse: quotes the shell removed."""
  if re.match(r"^[\w./~-]+$", value) and not re.match(r"^[\d.eE+-]+$", value):
    return f" (strings need quotes: --gin.{name}=\"'{value}'\")"
  if value[:1] in "{[" and re.search(r"[{\[,]\s*[A-Za-z_][\w.]*\s*:", value):
    return (
      " (the shell removed the quotes of the keys: quote the whole flag, e.g. "
      f"\"--gin.{name}={{'inputs': 64, 'targets': 32}}\")"
    )
  return ""


def _parse_bindings(
  flag_bindings: Sequence[tuple],
  extra_bindings: Sequence[str],
  skip_unknown: bool = False,
) -> None:
  for name, value in flag_bindings:
    try:
      gin.parse_config(f"{name} = {value}", skip_unknown=skip_unknown)
    except UserError:
      raise
    except (SyntaxError, ValueError) as e:
      hint = _value_hint(name, value) or _did_you_mean(e)
      raise UserError(
        f"--gin.{name}={value} does not parse: {_one_line(e)}{hint}."
      ) from e
  for text in extra_bindings:
    try:
      gin.parse_config(text, skip_unknown=skip_unknown)
    except UserError:
      raise
    except (SyntaxError, ValueError) as e:
      raise UserError(
        f"--gin_bindings '{text}' does not parse: {_one_line(e)}{_did_you_mean(e)}."
      ) from e


def _check_required(required: Sequence[str]) -> None:
  missing = [name for name in required if _is_required(name)]
  if missing:
    raise UserError(
      f"Required setting(s) {', '.join(missing)} not given; set them in "
      f"your gin file or with --gin.{missing[0]}=VALUE."
    )


def _check_macros(flag_bindings: Sequence[tuple], required: Sequence[str]) -> None:
  """Required macros set; every macro used defined; every --gin.MACRO used."""
  _check_required(required)
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


class _Stderr:
  """``sys.stderr`` of the command line: whole lines, whichever threads write them.

  Libraries write to stderr from their own threads while mtx reports an error: orbax's
  checkpoint writers log a traceback each when a full disk fails them, tensorstore's
  callbacks print theirs, some of it after mtx has printed its sentence. Python writes
  a traceback in pieces and two threads' writes can interleave, gluing one's text into
  the other's line; here each thread's text is held until its line is complete (or the
  thread flushes, as the progress bar does) and a line is written in one go.
  ``say_last`` writes mtx's last line, after which, unless ``--verbose``, nothing more
  is written: the sentence is whole, on a line of its own, and last.
  """

  def __init__(self, stream, verbose: bool):
    self.stream, self.verbose = stream, verbose
    self._lock = threading.RLock()  # A signal handler may log while a write runs.
    self._partial: dict[int, str] = {}  # thread id -> the start of its next line
    self._said_last = False

  def write(self, text: str) -> int:
    with self._lock:
      thread = threading.get_ident()
      lines, newline, rest = (self._partial.pop(thread, "") + text).rpartition("\n")
      if rest:
        self._partial[thread] = rest
      if newline:
        self._emit(lines + newline)
    return len(text)

  def flush(self) -> None:
    with self._lock:
      self._emit(self._partial.pop(threading.get_ident(), ""))
      self.stream.flush()

  def restart(self, verbose: bool) -> None:
    """For another command of this process (tests): writes go through again."""
    with self._lock:
      self.verbose, self._said_last = verbose, False

  def say_last(self, line: str) -> None:
    with self._lock:
      self._emit(line + "\n")
      self.stream.flush()
      self._said_last = not self.verbose

  def _emit(self, text: str) -> None:
    if text and not self._said_last:
      self.stream.write(text)

  def __getattr__(self, name: str):  # fileno, isatty, encoding, ...
    return getattr(self.stream, name)


class _FoldedTracebacks(logging.StreamHandler):
  """The log on stderr; a logged traceback (a library's) takes its record's one line,
  once (tensorstore reports the same closed event loop for each array of a failed
  save)."""

  def __init__(self):
    super().__init__()
    self._folded = set()

  def emit(self, record: logging.LogRecord) -> None:
    if record.exc_info:
      error = record.exc_info[1]
      message = record.getMessage()
      text = " ".join(str(error).split())[:300]
      if text and text not in message:
        message = f"{message} ({type(error).__name__}: {text})"
      if message in self._folded:
        return
      self._folded.add(message)
      record = logging.makeLogRecord(record.__dict__)
      record.msg, record.args = message, None
      record.exc_info = record.exc_text = record.stack_info = None
    super().emit(record)


def _log_unraisable(unraisable) -> None:
  """``sys.unraisablehook``: an error Python can only report (tensorstore's callbacks
  into a closed event loop, after a failed save) goes to the log, folded like others."""
  logging.getLogger(__name__).error(
    "%s: %r",
    unraisable.err_msg or "Exception ignored in",
    unraisable.object,
    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
  )


def _log_thread_error(args) -> None:
  """``threading.excepthook``: a thread's uncaught error goes to the log too."""
  if args.exc_type is SystemExit:
    return
  logging.getLogger(__name__).error(
    "Exception in thread %s",
    args.thread.name if args.thread is not None else "?",
    exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
  )


def _setup_logging(verbose: bool) -> None:
  """Logs to stderr, as ``logging.basicConfig`` (so not when the process already logs:
  tests), through a line-whole ``sys.stderr``; unless ``verbose``, a traceback logged
  or reported from a background thread takes one line."""
  root = logging.getLogger()
  if isinstance(sys.stderr, _Stderr):  # An earlier command of this process.
    sys.stderr.restart(verbose)
  elif root.handlers:
    return
  else:
    sys.stderr = _Stderr(sys.stderr, verbose)
  for handler in root.handlers[:]:
    if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
      root.removeHandler(handler)
  handler = logging.StreamHandler() if verbose else _FoldedTracebacks()
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  root.addHandler(handler)
  root.setLevel(logging.INFO if verbose else logging.WARNING)
  sys.unraisablehook = sys.__unraisablehook__ if verbose else _log_unraisable
  threading.excepthook = threading.__excepthook__ if verbose else _log_thread_error


def _say_last(line: str) -> None:
  """Prints mtx's last line to stderr: whole, on its own line, after every log line."""
  if isinstance(sys.stderr, _Stderr):
    sys.stderr.say_last(line)
  else:
    print(line, file=sys.stderr, flush=True)


def run(argv: Sequence[str]) -> int:
  """Runs a command; returns the exit status."""
  rest, flag_bindings = split_gin_flags(argv)
  args = _parser().parse_args(rest)
  _setup_logging(args.verbose)
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
  except TypeError as e:  # gin: a configurable called without a required argument
    missing = re.search(
      r"No values supplied by Gin or caller for arguments: \[([^\]]*)\].*"
      r"In call to configurable '([\w.]+)'",
      _one_line(e),
    )
    if not missing:
      raise
    args_, name = missing.group(1).replace("'", "").split(", "), missing.group(2)
    raise UserError(
      f"{name} needs a value for {', '.join(args_)}; bind it in a gin file or with "
      f"--gin.{name}.{args_[0]}=VALUE."
    ) from e
  except ValueError as e:  # gin's missing-required-binding error
    msg = _one_line(e)
    if "Required bindings" in msg or "REQUIRED" in msg:
      raise UserError(
        f"A required setting is missing ({msg}); set it in your gin file "
        "or with --gin.NAME=VALUE."
      ) from e
    raise
  # Predictions written to stdout keep it for themselves.
  to = sys.stderr if getattr(result, "path", None) == "-" else sys.stdout
  print(_summary(args.command, result), file=to, flush=True)
  failure = getattr(result, "failure", None)  # e.g. `mtx compile`: does not fit
  if failure:
    _say_last(f"mtx: error: {failure}")
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
    if result.step == result.start_step:
      # Exit status 0: a finished job started again (a scheduler's retry) succeeded.
      return (
        f"Nothing to train: the checkpoint is at step {result.step}, which is "
        "TRAIN_STEPS; raise TRAIN_STEPS to train on."
      )
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


def import_from_working_directory() -> None:
  """Puts the working directory first on ``sys.path``, as ``python -m`` does.

  A console script's ``sys.path`` starts with the script's own directory (the venv's
  ``bin/``), not the working directory, so ``MIXTURE_OR_TASK_MODULE='my_tasks'`` would
  not find ``./my_tasks.py``; with this it does, as the README's example runs it.
  """
  cwd = os.getcwd()
  if cwd not in sys.path and "" not in sys.path:
    sys.path.insert(0, cwd)


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  import_from_working_directory()
  try:
    status = run(argv)
  except UserError as e:
    # gin appends "In call to configurable ..." lines; the first line is the sentence.
    _say_last(f"mtx: error: {str(e).splitlines()[0]}")
    status = 2
  except KeyboardInterrupt:
    # A second Ctrl-C of `mtx train` (the first one saves and stops), or a first one
    # of the other commands. A save cut short is never taken for a checkpoint.
    _say_last(
      "mtx: aborted by Ctrl-C without saving; a training's newest checkpoint is "
      "intact, and the same command run again resumes from it."
    )
    _exit_now(ABORT_STATUS)
  sys.exit(status)


if __name__ == "__main__":
  main()
