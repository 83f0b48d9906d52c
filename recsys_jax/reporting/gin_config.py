"""A run's config.gin as bindings, read as text (no gin parsing, which would
import every configurable the run used).

config.gin is gin's operative config: `import` lines, then `NAME = value`
macros and `scope/module.fn.param = value` bindings, a value continuing on
indented lines (long lists and dicts; after a trailing backslash for long
values), comments starting with '#'.
"""

import ast
import os
from typing import Dict, List, Optional, Sequence, Tuple


def bindings(text: str) -> Dict[str, str]:
  """{binding or macro name: value text (continuation lines joined)}."""
  out: Dict[str, str] = {}
  name = None
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
      continue
    if line[0].isspace():
      if name is not None:  # a continuation of the value above
        out[name] = (out[name].rstrip("\\").rstrip() + " " + stripped
                     ).strip()
      continue
    if stripped.startswith(("from ", "import ")) or " = " not in stripped:
      name = None
      continue
    name, value = stripped.split(" = ", 1)
    name = name.strip()
    out[name] = value.strip()
  return out


def literal(value: Optional[str]):
  """The Python value of a binding's text when it is a literal, else None."""
  if value is None:
    return None
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return None


def differences(configs: Sequence[Optional[str]]
                ) -> List[Tuple[str, List[Optional[str]]]]:
  """[(name, [value in each config or None])] where the configs differ
  (runs without a config.gin are left out)."""
  parsed = [bindings(c) for c in configs if c is not None]
  if len(parsed) < 2:
    return []
  names: Dict[str, None] = {}
  for b in parsed:
    names.update(dict.fromkeys(b))
  rows = []
  for name in names:
    values = [b.get(name) for b in parsed]
    if len(set(values)) > 1:
      rows.append((name, values))
  return rows


def data_dir(text: Optional[str], model_dir: str) -> Optional[str]:
  """The run's DATA_DIR where it can be found: as written (relative to the
  working directory, as the run used it), else relative to each directory
  above MODEL_DIR (a report made from elsewhere)."""
  value = literal(bindings(text or "").get("DATA_DIR"))
  if not isinstance(value, str) or not value:
    return None
  if os.path.isabs(value) or os.path.isdir(value):
    return value if os.path.isdir(value) else None
  parent = os.path.abspath(model_dir)
  while True:
    candidate = os.path.join(parent, value)
    if os.path.isdir(candidate):
      return candidate
    up = os.path.dirname(parent)
    if up == parent:
      return None
    parent = up
