"""gin at the edges: flag rewriting, parsing, and the operative config.

`--gin.NAME=VALUE` is shorthand for `--gin_bindings='NAME = VALUE'` (t5x).
"""

import logging
import os
import re
import sys
from typing import List, Optional, Sequence

import gin

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


def _patch_gin_file_readers():
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from gin import resource_reader  # pylint: disable=g-import-not-at-top
  gin_config._FILE_READERS[:] = [  # pylint: disable=protected-access
      (reader, _system_path_file_exists
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
  """Parses gin files (searched in the given paths, then the repo's gin/)."""
  paths = list(gin_search_paths or []) + [os.getcwd(), REPO_GIN_DIR]
  for p in paths:
    gin.add_config_file_search_path(p)
  quiet = _QuietSearch()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)
  logging.getLogger().addFilter(quiet)
  if not gin_files:
    raise ValueError("no --gin_file given; e.g. --gin_file=gin/quickstart.gin")
  try:
    gin.parse_config_files_and_bindings(gin_files, gin_bindings,
                                        finalize_config=finalize)
  except IOError as e:
    raise ValueError(f"{e} (searched {paths}; pass --gin_search_paths)") from e


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


def write_operative_config(model_dir: str, name: str = "config.gin"):
  """Writes the operative config (what the run actually used)."""
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, name), "w") as f:
    f.write(gin.operative_config_str())


def run(main):
  """absl.app.run with gin shorthand rewriting."""
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, argv=rewrite_gin_args(sys.argv))
