"""Literal values of a run's config.gin, read without importing anything.

Parsing a config.gin with gin imports every module it names (the input
pipeline, hence TensorFlow and SeqIO: seconds). Serving needs a few plain
values only (the dataset directory, the model's compute dtype, cache
paths), so this reads the file with gin's own parser and a delegate that
records references instead of resolving them.
"""

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from gin import config_parser


@dataclasses.dataclass(frozen=True)
class Reference:
  """`@name()` (evaluate=True) or `@name` in a config, unresolved."""
  name: str
  evaluate: bool


@dataclasses.dataclass(frozen=True)
class Macro:
  """`%NAME` in a config, unresolved."""
  name: str


class _Delegate(config_parser.ParserDelegate):

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return Reference(scoped_configurable_name, bool(evaluate))

  def macro(self, macro_name):
    return Macro(macro_name)


class ConfigText:
  """The bindings of one gin file, as written (later bindings win).

  Attributes:
    path: the file read.
    macros: `{NAME: value}` of the top-level macro bindings.
    bindings: `{(scope, selector, arg): value}` of the other bindings.
  """

  def __init__(self, path: str):
    self.path = path
    self.macros: Dict[str, Any] = {}
    self.bindings: Dict[Tuple[str, str, str], Any] = {}
    try:
      with open(path) as f:
        for statement in config_parser.ConfigParser(f, _Delegate()):
          if not isinstance(statement, config_parser.BindingStatement):
            continue  # imports and includes: nothing to read here
          if not statement.scope and not statement.arg_name:
            self.macros[statement.selector] = statement.value
          else:
            self.bindings[(statement.scope, statement.selector,
                           statement.arg_name)] = statement.value
    except SyntaxError as e:
      raise ValueError(f"{path}:{e.lineno}: not a gin file gin can parse "
                       f"({e.msg})") from e

  def resolve(self, value: Any, _depth: int = 0) -> Any:
    """`value` with macros replaced by their values (references stay)."""
    if _depth > 32:
      raise ValueError(f"{self.path}: macros refer to each other in a cycle")
    if isinstance(value, Macro):
      if value.name not in self.macros:
        raise KeyError(f"{self.path}: macro {value.name} is not bound")
      return self.resolve(self.macros[value.name], _depth + 1)
    if isinstance(value, (list, tuple)):
      return type(value)(self.resolve(v, _depth + 1) for v in value)
    return value

  def macro(self, name: str, default: Any = None) -> Any:
    """The resolved value of macro `name` (`default` when unbound)."""
    if name not in self.macros:
      return default
    return self.resolve(self.macros[name])

  def model_builder(self) -> Optional[str]:
    """The configurable `MODEL` evaluates (e.g. 'builders.flare'), or None."""
    value = self.macros.get("MODEL")
    while isinstance(value, Macro):
      value = self.macros.get(value.name)
    return value.name if isinstance(value, Reference) else None

  def model_arg(self, arg: str, default: Any = None) -> Any:
    """The resolved argument `arg` bound to the `MODEL` builder (its
    `MODEL/` scoped binding first, then an unscoped one)."""
    builder = self.model_builder()
    if builder is None:
      return default
    for scope in ("MODEL", ""):
      key = (scope, builder, arg)
      if key in self.bindings:
        return self.resolve(self.bindings[key])
    return default


def read(export_dir: str) -> Optional[ConfigText]:
  """The export's config.gin, or None when it has none."""
  path = os.path.join(export_dir, "config.gin")
  return ConfigText(path) if os.path.exists(path) else None
