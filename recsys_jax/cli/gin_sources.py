"""gin bindings as written: where each `KEY = VALUE` of a parse came from.

gin keeps no record of which file or flag set a value. `Sources` re-reads the
files gin opened and the command-line bindings with gin's own parser, without
resolving anything, so errors can name the flag or the file and line.
"""

import dataclasses
import functools
import glob
import os
import re
import tokenize
from typing import Any, List, Optional, Sequence, Set, Tuple

from gin import config_parser

# Errors gin raises (or lets through) while parsing a file or a binding.
PARSE_ERRORS = (ValueError, SyntaxError, tokenize.TokenError, NameError,
                AttributeError, ImportError, TypeError)


class Written:
  """A reference (`@name`, `%NAME`) in a statement parsed without registry."""

  def __init__(self, name: str, is_macro: bool):
    self.name, self.is_macro = name, is_macro

  def __repr__(self):
    return ("%" if self.is_macro else "@") + self.name


class _WrittenDelegate(config_parser.ParserDelegate):
  """Parses references as `Written` placeholders and records macro reads."""

  def __init__(self):
    self.macro_reads: Set[str] = set()

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return Written(scoped_configurable_name, is_macro=False)

  def macro(self, macro_name):
    self.macro_reads.add(macro_name)
    return Written(macro_name, is_macro=True)


@dataclasses.dataclass(frozen=True)
class Statement:
  """One `KEY = VALUE` binding as written: a flag, or a line of a file."""
  scope: str
  selector: str   # as written ('trainer.OptimizerConfig'); a macro's name
  arg_name: str   # '' for a macro
  value: Any      # the literal, with `Written` in place of references
  where: str      # '--gin.TRAIN_STEPS=5' or 'gin/x.gin, line 3'
  text: str       # the binding's line as written
  from_flag: bool

  @property
  def macro(self) -> Optional[str]:
    """The (scoped) macro name this statement sets, or None."""
    if self.arg_name:
      return None
    return f"{self.scope}/{self.selector}" if self.scope else self.selector

  def describe(self) -> str:
    return self.where if self.from_flag else f"{self.text!r} ({self.where})"


def flag_text(binding: str) -> str:
  """How a binding string is written as a flag: `--gin.NAME=VALUE`."""
  m = re.match(r"^\s*([^\s=]+)\s*=\s*(.*?)\s*$", binding, re.S)
  if m and "\n" not in binding.strip():
    return f"--gin.{m.group(1)}={m.group(2)}"
  return f"--gin_bindings={binding!r}"


def display_path(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def parse_written(text: str, where=None, flag: Optional[str] = None
                  ) -> Tuple[List[Statement], Set[str]]:
  """(binding statements, macro names read) of gin text, nothing resolved.

  Args:
    text: gin statements (a file's text or one binding).
    where: the file path whose line numbers `Statement.where` names.
    flag: for a command-line binding: the flag `Statement.where` names.
  """
  delegate = _WrittenDelegate()
  statements = []
  for st in config_parser.ConfigParser(text, delegate):
    if not isinstance(st, config_parser.BindingStatement):
      continue
    line = (st.location.line_content or "").strip()
    statements.append(Statement(
        scope=st.scope, selector=st.selector, arg_name=st.arg_name,
        value=st.value, text=line, from_flag=flag is not None,
        where=flag if flag is not None else
        f"{display_path(where)}, line {st.location.line_num}"))
  return statements, delegate.macro_reads


@functools.lru_cache(maxsize=None)
def repo_macro_reads(gin_dir: str) -> frozenset:
  """Names of the macros that some gin file under `gin_dir` reads (`%NAME`)."""
  reads = set()
  for path in glob.glob(os.path.join(gin_dir, "**", "*.gin"), recursive=True):
    try:
      with open(path) as f:
        reads |= parse_written(f.read(), where=path)[1]
    except (OSError,) + PARSE_ERRORS:  # a broken file fails where it is used
      continue
  return frozenset(reads)


class Sources:
  """Where each binding of a parse was written (files in read order, flags)."""

  def __init__(self, statements: Sequence[Statement]):
    self.statements = list(statements)

  @classmethod
  def read(cls, files: Sequence[str], bindings: Sequence[str]) -> "Sources":
    statements = []
    for path in files:
      try:
        with open(path) as f:
          statements += parse_written(f.read(), where=path)[0]
      except (OSError,) + PARSE_ERRORS:
        continue
    for binding in bindings:
      statements += parse_written(binding, flag=flag_text(binding))[0]
    return cls(statements)

  def of_macro(self, name: str, value: Any = None) -> List[Statement]:
    """Statements setting macro `name`, those with `value` first, last first."""
    found = [s for s in reversed(self.statements) if s.macro == name]
    return sorted(found, key=lambda s: not _same_literal(s.value, value))

  def of_parameter(self, scope: str, complete_selector: str, arg_name: str,
                   value: Any = None) -> Optional[Statement]:
    """The statement that bound this parameter (with `value` if given)."""
    found = [s for s in reversed(self.statements)
             if s.arg_name == arg_name and s.scope == scope
             and _selector_matches(s.selector, complete_selector)]
    found.sort(key=lambda s: not _same_literal(s.value, value))
    return found[0] if found else None


def _same_literal(a: Any, b: Any) -> bool:
  if isinstance(a, Written) or isinstance(b, Written):
    return False
  try:
    return type(a) is type(b) and a == b
  except Exception:  # pylint: disable=broad-except
    return False


def _selector_matches(written: str, complete: str) -> bool:
  return complete == written or complete.endswith("." + written)
