"""The lines of a recommend session: requests in, answers out.

A request line is either JSON,

  {"history": ["Title A", 12, "#57"], "critique": "cheaper", "top_k": 5,
   "include_history": false}

(`history` may also be one string in the plain syntax), or plain text: the
history entries separated by ';' (`Title A; 12; #57`). Keys left out take
the command line's values. Answers are JSON objects (`--format=json`, one
line each) or a few lines of text.
"""

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

Entry = Union[str, int]
KEYS = ("history", "critique", "top_k", "include_history")


class RequestError(ValueError):
  """A request line that cannot be read (one line: what was expected)."""


@dataclasses.dataclass
class Request:
  history: List[Entry]
  critique: Optional[str] = None
  top_k: Optional[int] = None
  include_history: Optional[bool] = None


def split_history(text: str) -> List[str]:
  """'a; b; c' -> ['a', 'b', 'c'] (one trailing ';' allowed)."""
  parts = [p.strip() for p in str(text).split(";")]
  if len(parts) > 1 and not parts[-1]:
    parts.pop()
  return [] if parts == [""] else parts


def parse_line(line: str) -> Optional[Request]:
  """The request of one input line; None for a blank line.

  Raises:
    RequestError: malformed JSON, unknown keys or values of the wrong type.
  """
  text = line.strip()
  if not text:
    return None
  if not text.startswith("{"):
    return Request(split_history(text))
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise RequestError(f"invalid JSON at column {e.colno}: {e.msg}") from e
  return from_json(obj)


def from_json(obj: Any) -> Request:
  """A `Request` from a decoded JSON object (module docstring)."""
  if not isinstance(obj, dict):
    raise RequestError("expected a JSON object with 'history'")
  unknown = sorted(set(obj) - set(KEYS))
  if unknown:
    raise RequestError(f"unknown keys {unknown}; expected some of "
                       f"{list(KEYS)}")
  if "history" not in obj:
    raise RequestError("no 'history' (a list of ids / titles, or 'a; b; c')")
  history = obj["history"]
  if isinstance(history, str):
    history = split_history(history)
  elif not (isinstance(history, list) and all(
      isinstance(e, str) or (isinstance(e, int) and not isinstance(e, bool))
      for e in history)):
    raise RequestError("'history' must be a list of item ids (integers) and "
                       "titles (strings), or one 'a; b; c' string")
  critique = obj.get("critique")
  if critique is not None and not isinstance(critique, str):
    raise RequestError("'critique' must be a string or null")
  top_k = obj.get("top_k")
  if top_k is not None and (isinstance(top_k, bool)
                            or not isinstance(top_k, int)):
    raise RequestError("'top_k' must be an integer")
  include = obj.get("include_history")
  if include is not None and not isinstance(include, bool):
    raise RequestError("'include_history' must be true or false")
  return Request(list(history), critique, top_k, include)


def format_json(answer: Mapping[str, Any]) -> str:
  return json.dumps(answer, ensure_ascii=False)


def _label(item: Mapping[str, Any]) -> str:
  title = item.get("title")
  return f"{item['id']} {title!r}" if title is not None else str(item["id"])


def format_text(answer: Mapping[str, Any]) -> str:
  """A few readable lines: history, critique, notes, then ranked items."""
  history = []
  for h in answer["history"]:
    label = _label(h)
    if h["match"] in ("contains", "fuzzy"):
      label += f" ({h['match']} match of {h['entry']!r})"
    history.append(label)
  lines = ["history: " + "; ".join(history)]
  crit = answer.get("critique")
  if crit:
    how = {"table": "", "normalised": " (as written in the model's table)",
           "encoded": " (new text, encoded by the model's text encoder)"}
    lines.append(f"critique: {crit['text']!r}{how.get(crit['how'], '')}")
  lines += [f"note: {n}" for n in answer.get("notes", ())]
  recs = answer["recommendations"]
  width = len(str(max((r["id"] for r in recs), default=0)))
  for r in recs:
    title = "" if r.get("title") is None else f"  {r['title']}"
    lines.append(f"{r['rank']:>3}. {r['id']:>{width}}  {r['score']:9.4f}"
                 f"{title}")
  return "\n".join(lines)


def error_answer(message: str, line: Optional[int] = None
                 ) -> Dict[str, Any]:
  out: Dict[str, Any] = {"error": message}
  if line is not None:
    out["line"] = line
  return out


def history_entries(entries: Sequence[Entry]) -> List[str]:
  """Entries as strings (ints become their digits)."""
  return [str(e) for e in entries]
