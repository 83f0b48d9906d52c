"""The `--grid` of a sweep: gin names x value lists -> named points.

`MASK_PROB=[0.2, 0.4]; builders.bert4rec.dropout_rate=[0.2, 0.5]` is two axes;
their cartesian product (the first axis varies slowest) gives four points.
A name is anything `--gin.NAME=VALUE` accepts: a macro (`TRAIN_STEPS`) or a
(scoped) parameter (`MODEL/builders.bert4rec.dropout_rate`). A value is a gin
literal -- a number, a quoted string, True/False/None, a tuple, list or dict
of those -- or a reference (`%MACRO`, `@name()`), passed on as written.

Each point is named by its bindings, `MASK_PROB=0.2,dropout_rate...`, made
safe as a directory name; the name depends only on the point's own bindings
(in grid order), so growing a grid keeps the names of the points it had.
"""

import ast
import dataclasses
import hashlib
import itertools
import math
import re
from typing import Any, Dict, List, Sequence, Tuple

_NAME = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*")
_REFERENCE = re.compile(r"[@%][A-Za-z_][\w./]*(\(\))?")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")
_MAX_NAME = 150  # bytes of a point directory name (file systems allow 255)
_OPEN = {"(": ")", "[": "]", "{": "}"}


class GridError(ValueError):
  """A bad `--grid`, explained in one line that names the part at fault."""


@dataclasses.dataclass(frozen=True)
class Axis:
  """One `NAME=[v1, v2, ...]` part of the grid; values as gin text."""
  name: str
  values: Tuple[str, ...]
  text: str  # the part as written, for messages


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of the grid: its directory name and (NAME, gin value) pairs."""
  name: str
  bindings: Tuple[Tuple[str, str], ...]

  def flags(self) -> List[str]:
    """`--gin.NAME=VALUE` flags of the point, in grid order."""
    return [f"--gin.{n}={v}" for n, v in self.bindings]


# -- parsing -------------------------------------------------------------------


def _split_top_level(text: str, sep: str) -> List[str]:
  """Splits at `sep` outside brackets and quotes; raises on unbalanced text."""
  parts, depth, start, quote, i = [], [], 0, None, 0
  while i < len(text):
    c = text[i]
    if quote:
      if c == "\\":
        i += 1
      elif c == quote:
        quote = None
    elif c in "'\"":
      quote = c
    elif c in _OPEN:
      depth.append(_OPEN[c])
    elif c in ")]}":
      if not depth or depth.pop() != c:
        raise ValueError(f"unbalanced {c!r}")
    elif c == sep and not depth:
      parts.append(text[start:i])
      start = i + 1
    i += 1
  if quote:
    raise ValueError(f"unterminated string (opened by {quote})")
  if depth:
    raise ValueError(f"unclosed bracket (expected {depth[-1]!r})")
  parts.append(text[start:])
  return parts


def _check_literal(value: Any) -> None:
  """Raises ValueError for literals gin cannot take (sets, bytes, nan)."""
  if isinstance(value, (tuple, list)):
    for v in value:
      _check_literal(v)
  elif isinstance(value, dict):
    for k, v in value.items():
      _check_literal(k)
      _check_literal(v)
  elif isinstance(value, float) and not math.isfinite(value):
    raise ValueError("not a finite number")
  elif not isinstance(value, (str, int, float, bool, type(None))):
    raise ValueError(f"a {type(value).__name__} is not a gin literal")


def parse_value(text: str) -> str:
  """One grid value as the gin text passed to `--gin.NAME=` (normalised).

  Raises:
    ValueError: the text is neither a gin literal nor a reference.
  """
  text = text.strip()
  if not text:
    raise ValueError("empty value")
  if _REFERENCE.fullmatch(text):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError,
          RecursionError) as e:
    hint = (" (strings need quotes, e.g. 'full')"
            if re.fullmatch(r"[A-Za-z_][\w.-]*", text) else "")
    raise ValueError(f"{text!r} is not a gin literal{hint}") from e
  _check_literal(value)
  return repr(value)


def _parse_axis(part: str) -> Axis:
  where = f"--grid part {part.strip()!r}"
  if "=" not in part:
    raise GridError(f"{where}: expected NAME=[value, ...] (no '=')")
  name, values_text = (s.strip() for s in part.split("=", 1))
  if not name:
    raise GridError(f"{where}: no gin name before '='")
  if not _NAME.fullmatch(name):
    raise GridError(f"{where}: {name!r} is not a gin name (a macro such as "
                    "TRAIN_STEPS or a parameter such as "
                    "builders.bert4rec.dropout_rate)")
  if name.split("/")[-1] == "MODEL_DIR":
    raise GridError(f"{where}: the sweep sets MODEL_DIR itself (one run "
                    "directory per point under --sweep_dir)")
  if not (values_text.startswith("[") and values_text.endswith("]")):
    raise GridError(f"{where}: expected a bracketed list of values after "
                    f"'{name}=', e.g. {name}=[0.1, 0.2]")
  inner = values_text[1:-1]
  try:
    items = _split_top_level(inner, ",")
  except ValueError as e:
    raise GridError(f"{where}: cannot read the value list: {e}") from e
  if items and not items[-1].strip():  # a trailing comma: [1, 2,]
    items = items[:-1]
  if not items:
    raise GridError(f"{where}: the value list is empty")
  values = []
  for i, item in enumerate(items, 1):
    try:
      values.append(parse_value(item))
    except ValueError as e:
      raise GridError(f"{where}: value {i}: {e}; expected gin literals "
                      "(numbers, 'quoted strings', True/False/None, tuples) "
                      "or references (%MACRO, @name())") from e
  dup = sorted({v for v in values if values.count(v) > 1})
  if dup:
    raise GridError(f"{where}: {dup[0]} is listed twice")
  return Axis(name, tuple(values), part.strip())


def parse_grid(text: str) -> List[Axis]:
  """Parses `NAME=[v, ...]; NAME=[v, ...]` (a trailing ';' is allowed).

  Raises:
    GridError: one line naming the part of the grid at fault.
  """
  if not text or not text.strip():
    raise GridError("--grid is empty; expected NAME=[v1, v2]; NAME2=[...], "
                    "e.g. --grid=\"MASK_PROB=[0.2, 0.4]\"")
  try:
    parts = _split_top_level(text, ";")
  except ValueError as e:
    for part in text.split(";"):  # the part with the unbalanced bracket
      try:
        _split_top_level(part, ";")
      except ValueError as part_error:
        raise GridError(f"--grid part {part.strip()!r}: {part_error}") from e
    raise GridError(f"--grid {text!r}: {e}") from e
  parts = [p for p in parts if p.strip()]
  axes = [_parse_axis(p) for p in parts]
  seen: Dict[str, Axis] = {}
  for axis in axes:
    if axis.name in seen:
      raise GridError(f"--grid part {axis.text!r}: {axis.name} is already "
                      f"swept by {seen[axis.name].text!r}")
    seen[axis.name] = axis
  return axes


# -- points and their names ----------------------------------------------------


def _name_value(gin_text: str) -> str:
  """A value as it reads in a point name: strings unquoted, tuples joined."""
  if _REFERENCE.fullmatch(gin_text):
    return gin_text.lstrip("@%").replace("()", "")
  value = ast.literal_eval(gin_text)

  def words(v) -> str:
    if isinstance(v, str):
      return v
    if isinstance(v, (tuple, list)):
      return "_".join(words(x) for x in v) if v else "empty"
    if isinstance(v, dict):
      return "_".join(f"{words(k)}-{words(x)}" for k, x in v.items()) or "empty"
    return repr(v)
  return words(value)


def _digest(bindings: Sequence[Tuple[str, str]]) -> str:
  text = "\n".join(f"{n}={v}" for n, v in bindings)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def point_name(bindings: Sequence[Tuple[str, str]]) -> str:
  """The directory name of a point: `NAME=value,NAME=value`, made safe."""
  raw = ",".join(f"{n}={_name_value(v)}" for n, v in bindings)
  name = _UNSAFE.sub("_", raw)
  if name.startswith((".", "-")):
    name = "_" + name
  if len(name) > _MAX_NAME:
    name = f"{name[:_MAX_NAME - 9]}~{_digest(bindings)}"
  return name


def points(axes: Sequence[Axis]) -> List[Point]:
  """The cartesian product of the axes (the first varies slowest), named.

  Points whose safe names coincide (values that differ only in characters a
  directory name cannot hold) get a digest of their bindings appended.
  """
  combos = [tuple(zip([a.name for a in axes], values))
            for values in itertools.product(*(a.values for a in axes))]
  names = [point_name(b) for b in combos]
  clashes = {n for n in names if names.count(n) > 1}
  return [Point(f"{n}~{_digest(b)}" if n in clashes else n, b)
          for n, b in zip(names, combos)]
