"""A first look at the gin files and flags, before mtx's configurables are registered.

Registering them imports JAX and TensorFlow (seconds); a misspelt parameter or macro
should not wait for that. This module reads the same files and bindings with gin's own
parser and checks them against ``configurables.json``, the parameters of every
configurable ``mtx.cli.configurables`` registers (kept current by
``tests/test_cli.py``; regenerate with ``python -m mtx.cli.gin_check``). It only
refuses what is surely wrong: a parameter that a known configurable lacks, a macro used
but defined nowhere, a ``--gin.MACRO`` that nothing uses. Configurables it does not
know (a user's own) are left to gin's full parse.
"""

import inspect
import io
import json
import os
import re
import sys
from typing import Iterable, Optional, Sequence

import gin
from gin import config_parser

from mtx import paths
from mtx.errors import UserError, close_names

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurables.json")
_MACRO = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parameters(configurable) -> Optional[list]:
  """The named parameters of a configurable; None when it takes ``**kwargs`` (any
  name). A class comes back from gin as a subclass whose __init__ takes (*args,
  **kwargs): its bases are looked at too."""
  for candidate in getattr(configurable, "__mro__", (configurable,)):
    try:
      params = inspect.signature(candidate).parameters
    except (ValueError, TypeError):
      continue
    named = [
      n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if named:
      any_name = any(p.kind == p.VAR_KEYWORD for p in params.values())
      return None if any_name else named
  return None


def _manifest() -> dict:
  try:
    with open(MANIFEST, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}  # An install without it: gin's full parse checks everything.


def _find(filename: str, search_paths: Sequence[str]) -> Optional[str]:
  for prefix in [""] + list(search_paths):
    path = paths.join(prefix, filename) if prefix else filename
    if paths.isfile(path):
      return path
  return None


def _statements(source, where: str, search_paths: Sequence[str], seen: set) -> list:
  """(where, BindingStatement) of a gin text and the files it includes."""
  out = []
  delegate = gin.config.ParserDelegate(skip_unknown=True)
  for statement in config_parser.ConfigParser(source, delegate):
    if isinstance(statement, config_parser.BindingStatement):
      out.append((where, statement))
    elif isinstance(statement, config_parser.IncludeStatement):
      path = _find(statement.filename, search_paths)
      if path and paths.absolute(path) not in seen:
        seen.add(paths.absolute(path))
        with paths.open_file(path, "r") as f:
          out += _statements(f, f"Gin file {path}", search_paths, seen)
  return out


def _macro_names(value) -> Iterable[str]:
  """Names of the macros a parsed binding value refers to (``%NAME``)."""
  if isinstance(value, gin.config.ConfigurableReference):
    selector = value.scoped_selector
    if selector.endswith("gin.macro"):
      yield selector.split("/")[0]
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      yield from _macro_names(v)
  elif isinstance(value, dict):
    for v in value.values():
      yield from _macro_names(v)


def check(
  gin_files: Sequence[str],
  flag_bindings: Sequence[tuple],
  extra_bindings: Sequence[str],
  search_paths: Sequence[str],
) -> None:
  """Raises a UserError for a surely wrong parameter or macro (see the module
  docstring); files and bindings must already parse."""
  manifest = _manifest()
  seen, found = set(), []
  for f in gin_files:
    path = _find(f, search_paths)
    if path:
      seen.add(paths.absolute(path))
      with paths.open_file(path, "r") as fh:
        found += _statements(fh, f"Gin file {f}", search_paths, seen)
  for name, value in flag_bindings:
    found += _statements(f"{name} = {value}", f"--gin.{name}={value}", search_paths, seen)
  for text in extra_bindings:
    found += _statements(text, f"--gin_bindings '{text}'", search_paths, seen)
  for where, st in found:
    if st.arg_name:
      _check_parameter(where, st.selector, st.arg_name, manifest)
  _check_macros(found, flag_bindings)


def _check_parameter(where: str, selector: str, arg: str, manifest: dict) -> None:
  keys = [k for k in manifest if k == selector or k.endswith("." + selector)]
  if len(keys) != 1 or manifest[keys[0]] is None or arg in manifest[keys[0]]:
    return  # Not one of mtx's configurables (or ambiguous): gin's parse decides.
  raise UserError(
    f"{where} does not parse: Configurable '{keys[0]}' doesn't have a parameter named "
    f"'{arg}'{close_names(arg, manifest[keys[0]])}; check its spelling."
  )


def _check_macros(found: list, flag_bindings: Sequence[tuple]) -> None:
  defined = {st.selector for _, st in found if not st.arg_name}
  used = {m for _, st in found for m in _macro_names(st.value)}
  undefined = sorted(used - defined - {"gin.REQUIRED"})
  if undefined:
    name = undefined[0]
    raise UserError(
      f"Macro %{name} is used but never defined{close_names(name, defined)}; define "
      f"it in a gin file ({name} = ...) or with --gin.{name}=VALUE."
    )
  for name, value in flag_bindings:
    if _MACRO.match(name) and name not in used:
      raise UserError(
        f"--gin.{name}={value} binds a macro that no configuration uses"
        f"{close_names(name, used)}; check its spelling."
      )


def write_manifest(names: Sequence[str], out=None) -> None:
  """Writes ``configurables.json`` for the registered ``names`` (to ``out``)."""
  manifest = {}
  for name in sorted(names):
    params = parameters(gin.get_configurable(name))
    manifest[name] = None if params is None else sorted(params)
  (out or sys.stdout).write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
  # lazy: registering the configurables imports JAX and TF; only to regenerate.
  from mtx.cli import configurables  # pylint: disable=g-import-not-at-top

  # lazy: as above.
  from mtx.runtime import metrics_writer  # pylint: disable=g-import-not-at-top

  text = io.StringIO()
  write_manifest(configurables.NAMES, text)  # all of it, before the file is replaced
  metrics_writer.write_atomically(MANIFEST, text.getvalue())
