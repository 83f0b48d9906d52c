"""gin at the edges: flag rewriting, parsing, and the operative config.

`--gin.NAME=VALUE` is shorthand for `--gin_bindings='NAME = VALUE'` (t5x).
`parse_gin` checks what it parsed (`gin_checks`: a macro nothing reads, a value
of the wrong type) and reports every mistake as one-line `GinConfigError`.
"""

import logging
import os
import re
import sys
from typing import List, Optional, Sequence

import gin
from gin import config as gin_config

from recsys_jax.cli import gin_checks
from recsys_jax.cli import gin_errors
from recsys_jax.cli import gin_sources

GinConfigError = gin_checks.GinConfigError
_GIN_SHORTHAND = re.compile(r"^--gin\.([^=]+)=(.*)$", re.S)
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "gin")


def _system_path_file_exists(config_path: str) -> bool:
  """gin's package-resource check, minus its crash on namespace packages."""
  import importlib.util  # pylint: disable=g-import-not-at-top,unused-import
  from gin import resource_reader  # pylint: disable=g-import-not-at-top
  # (gin calls importlib.util without importing it.)
  try:
    return resource_reader.system_path_file_exists(config_path)
  except TypeError:
    # 'runs/train.gin' with a `runs/` directory (the default MODEL_DIR parent)
    # in the working directory: `runs` imports as a namespace package whose
    # origin is None, and gin raises instead of trying the next search path.
    return False


# Paths of the gin files read (includes too) while `parse_gin` runs.
_FILES_READ: List[str] = []


def _logged(reader):
  """A gin file reader that records the paths it opens in _FILES_READ."""
  if getattr(reader, "_logs_reads", False):
    return reader

  def read(path):
    _FILES_READ.append(path)
    return reader(path)
  read._logs_reads = True  # pylint: disable=protected-access
  return read


def _patch_gin_file_readers():
  from gin import resource_reader  # pylint: disable=g-import-not-at-top
  gin_config._FILE_READERS[:] = [  # pylint: disable=protected-access
      (_logged(reader), _system_path_file_exists
       if exists is resource_reader.system_path_file_exists else exists)
      for reader, exists in gin_config._FILE_READERS]  # pylint: disable=protected-access


_patch_gin_file_readers()


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """Turns `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    m = _GIN_SHORTHAND.match(arg)
    out.append(f"--gin_bindings={m.group(1)} = {m.group(2)}" if m else arg)
  return out


class _QuietSearch(logging.Filter):
  """gin logs an error for every search-path miss while resolving includes."""

  def filter(self, record):
    return not str(record.msg).startswith(("Path not found",
                                           "system_path_file_exists"))


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              gin_search_paths: Optional[Sequence[str]] = None,
              finalize: bool = True):
  """Parses gin files (searched in the given paths, then the repo's gin/).

  Files are parsed in order, then the bindings (flags), then the result is
  checked (`gin_checks.check_parsed_config`) and finalized.

  Raises:
    GinConfigError: one line naming the flag or file and line at fault, and
      what was expected.
  """
  paths = list(gin_search_paths or []) + [os.getcwd(), REPO_GIN_DIR]
  for p in paths:
    if p not in gin_config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(p)
  quiet = _QuietSearch()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)
  logging.getLogger().addFilter(quiet)
  if not gin_files:
    raise GinConfigError(
        "no --gin_file given; e.g. --gin_file=gin/quickstart.gin")
  del _FILES_READ[:]
  for gin_file in gin_files:
    try:
      gin.parse_config_file(gin_file)
    except IOError as e:
      raise GinConfigError(f"{gin_errors.explain_parse_error(e)} (searched "
                           f"{paths}; see --gin_search_paths)") from e
    except gin_sources.PARSE_ERRORS as e:
      raise GinConfigError(gin_errors.explain_parse_error(
          e, files_read=_FILES_READ)) from e
  for binding in gin_bindings:
    try:
      gin.parse_config(binding)
    except gin_sources.PARSE_ERRORS as e:
      raise GinConfigError(gin_errors.explain_parse_error(
          e, flag=gin_sources.flag_text(binding))) from e
  gin_checks.check_parsed_config(
      gin_sources.Sources.read(list(_FILES_READ), gin_bindings),
      gin_sources.repo_macro_reads(REPO_GIN_DIR))
  if finalize:
    try:
      gin.finalize()
    except ValueError as e:
      raise GinConfigError(required_error_message(e)) from e


def required_error_message(err: Exception) -> str:
  """Explains a missing %gin.REQUIRED value by the flag that sets it."""
  msg = str(err)
  m = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", msg)
  if m:
    return (f"the gin macro {m.group(1)} is required: pass "
            f"--gin.{m.group(1)}=VALUE (strings quoted, e.g. "
            f"--gin.{m.group(1)}=\"'runs/my_run'\")")
  m = re.search(r"([\w.]+) set to `%gin\.REQUIRED`", msg)
  if m:
    return (f"the gin parameter {m.group(1)} is required: pass "
            f"--gin.{m.group(1)}=VALUE")
  return msg


def config_validation_message(err: Exception) -> Optional[str]:
  """The message of an error a config class raised validating its values.

  gin builds config dataclasses (`trainer.TrainLoopConfig`, ...) when the run
  function is called; their `__post_init__` rejects bad combinations with a
  message naming the fields. Returns that message without gin's "In call to
  configurable" suffix, or None if `err` was not raised by a `__post_init__`.
  """
  tb = err.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "__post_init__":
      message = str(err).split("\n  In call to configurable")[0]
      return " ".join(line.strip() for line in message.strip().splitlines())
    tb = tb.tb_next
  return None


def write_operative_config(model_dir: str, name: str = "config.gin"):
  """Writes the operative config (what the run actually used)."""
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, name), "w") as f:
    f.write(gin.operative_config_str())


def run(main):
  """absl.app.run with gin shorthand rewriting."""
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, argv=rewrite_gin_args(sys.argv))
