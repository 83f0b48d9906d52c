"""Line reading and item-metadata parsing shared by every raw-format reader.

Raw files are read as bytes (gzip detected by its magic bytes, not the file
name) and decoded one line at a time, so a bad byte is reported with the
line it is on. Metadata records become `ItemMeta`; fields the reader does not
know are kept in `ItemMeta.extra`, never dropped.
"""

import ast
import gzip
import json
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from recsys_jax.data import bad_input
from recsys_jax.data import prepared

ItemMeta = prepared.ItemMeta
GZIP_MAGIC = b"\x1f\x8b"

# ItemMeta fields and the raw keys they are read from (first present wins).
_TITLE_KEYS = ("title",)
_CATEGORY_KEYS = ("categories", "category")
_BRAND_KEYS = ("brand",)
_DESCRIPTION_KEYS = ("description",)
_PRICE_KEYS = ("price",)
_PRICE_RE = re.compile(r"^\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)")


def check_file(path: str, what: str) -> None:
  """Raises a BadInputError (not a traceback) when `path` is not a file."""
  if not os.path.isfile(path):
    raise bad_input.BadInputError(
        path, None, f"{what} not found; expected an existing file" + (
            " (this is a directory)" if os.path.isdir(path) else ""))


def is_gzip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == GZIP_MAGIC


def open_binary(path: str):
  """Opens `path` for binary reading, decompressing gzip transparently."""
  return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def iter_lines(
    path: str,
    policy: bad_input.BadInputPolicy,
    *,
    encoding: str = "utf-8",
    fallback_encoding: Optional[str] = None,
    progress: Optional[str] = None,
) -> Iterator[Tuple[int, str]]:
  """Yields (1-based line number, text without line ending) of a raw file.

  A line that is not valid `encoding` is reported to `policy` as "not_utf8"
  (naming the line and byte offset) and skipped in skip mode. Latin-1 never
  fails, so MovieLens' u.item can be read with encoding="latin-1".

  Args:
    path: file to read; gzip-compressed files are detected by magic bytes.
    policy: where undecodable lines are reported.
    encoding: text encoding of the file.
    fallback_encoding: if set, a line that is not valid `encoding` is decoded
      with this one instead of being reported (MovieLens .dat files mix
      UTF-8 and Latin-1 across releases).
    progress: if set, prints "<progress>: N" every few seconds.
  """
  ticker = prepared._Progress(progress) if progress else None  # pylint: disable=protected-access
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      if ticker:
        ticker.tick()
      try:
        text = raw.decode(encoding)
      except UnicodeDecodeError as e:
        if fallback_encoding:
          yield lineno, raw.decode(fallback_encoding).rstrip("\r\n")
          continue
        policy.report(
            "not_utf8", path, lineno,
            f"byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} is not "
            f"valid {encoding}; expected {encoding} text")
        continue
      yield lineno, text.rstrip("\r\n")


def parse_record(text: str, *, allow_python_literal: bool = False) -> Any:
  """Parses one JSON line; optionally a Python literal (Amazon 2014 metadata).

  Python literals are parsed with `ast.literal_eval` only, which accepts
  literals (dicts, lists, strings, numbers) and never evaluates code.

  Raises:
    ValueError: when the line is neither.
  """
  try:
    return json.loads(text)
  except json.JSONDecodeError as json_error:
    if not allow_python_literal:
      raise ValueError(f"not JSON ({json_error.msg} at column "
                       f"{json_error.colno})") from None
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError,
            TypeError) as e:
      raise ValueError(
          f"neither JSON ({json_error.msg}) nor a Python literal dict "
          f"({type(e).__name__})") from None


def flatten_categories(value: Any) -> List[str]:
  """Flattens a category string, list, or nested list into one path list.

  Nested lists (Amazon 2014 `categories`: several paths) are concatenated in
  order with repeats removed, so [["Beauty", "Makeup"], ["Beauty", "Nails"]]
  becomes ["Beauty", "Makeup", "Nails"].
  """
  out: List[str] = []
  seen = set()

  def visit(v):
    if v is None:
      return
    if isinstance(v, (list, tuple)):
      for x in v:
        visit(x)
      return
    s = str(v).strip()
    if s and s not in seen:
      seen.add(s)
      out.append(s)

  visit(value)
  return out


def parse_price(value: Any) -> Optional[float]:
  """Reads a price from a number or a string such as "$1,299.99"."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  m = _PRICE_RE.match(str(value))
  return float(m.group(1).replace(",", "")) if m else None


def _text(value: Any) -> str:
  """A string field, or a list of strings joined (2018 `description`)."""
  if value is None:
    return ""
  if isinstance(value, (list, tuple)):
    return " ".join(str(v).strip() for v in value if str(v).strip())
  return str(value).strip()


def _first(record: Mapping[str, Any], keys) -> Tuple[Optional[str], Any]:
  for k in keys:
    if k in record:
      return k, record[k]
  return None, None


def item_meta_from_record(record: Mapping[str, Any], item_id: str) -> ItemMeta:
  """Builds ItemMeta from a raw metadata dict; unknown keys go to extra."""
  used = set()
  fields = {}
  for name, keys in (("title", _TITLE_KEYS), ("brand", _BRAND_KEYS),
                     ("description", _DESCRIPTION_KEYS)):
    k, v = _first(record, keys)
    if k is not None:
      used.add(k)
      fields[name] = _text(v)
  k, v = _first(record, _CATEGORY_KEYS)
  categories = []
  if k is not None:
    used.add(k)
    categories = flatten_categories(v)
  price = None
  k, v = _first(record, _PRICE_KEYS)
  extra: Dict[str, Any] = {}
  if k is not None:
    used.add(k)
    price = parse_price(v)
    if price is None and v not in (None, ""):
      extra["price_raw"] = v  # e.g. "$10.00 - $20.00": kept, not guessed
  for key, value in record.items():
    if key not in used and key not in extra:
      extra[key] = value
  return ItemMeta(item_id=item_id, categories=categories, price=price,
                  extra=extra, **fields)



def read_item_metadata(
    path: str,
    policy: bad_input.BadInputPolicy,
    *,
    id_key: str = "item_id",
    allow_python_literal: bool = False,
    keep: Optional[set] = None,
) -> Dict[str, ItemMeta]:
  """Reads a metadata file with one JSON object (or literal dict) per line.

  Args:
    path: the metadata file (gzip ok).
    policy: where bad lines are reported: "metadata_not_json",
      "metadata_missing_id", "duplicate_item_metadata".
    id_key: the key holding the item id ("item_id", or "asin" for Amazon).
    allow_python_literal: also accept Python literal dicts (Amazon 2014).
    keep: if given, only these item ids are kept (saves memory on big files).

  Returns:
    item id (as str) -> ItemMeta, in file order.
  """
  check_file(path, "item metadata file")
  items: Dict[str, ItemMeta] = {}
  first_line: Dict[str, int] = {}
  for lineno, text in iter_lines(path, policy, progress="metadata lines"):
    if not text.strip():
      continue
    try:
      record = parse_record(text, allow_python_literal=allow_python_literal)
    except ValueError as e:
      policy.report("metadata_not_json", path, lineno,
                    f"{e}; expected one JSON object per line")
      continue
    if not isinstance(record, dict):
      policy.report("metadata_not_json", path, lineno,
                    f"a {type(record).__name__}, expected one JSON object "
                    "per line")
      continue
    raw_id = record.get(id_key)
    if raw_id is None or str(raw_id).strip() == "":
      policy.report("metadata_missing_id", path, lineno,
                    f"no {id_key!r} key; expected every metadata record to "
                    f"name its item with {id_key!r}")
      continue
    item_id = str(raw_id).strip()
    if keep is not None and item_id not in keep:
      continue
    if item_id in items:
      policy.report("duplicate_item_metadata", path, lineno,
                    f"{id_key} {item_id!r} already described on line "
                    f"{first_line[item_id]}; expected one record per item")
      continue
    first_line[item_id] = lineno
    rest = {k: v for k, v in record.items() if k != id_key}
    items[item_id] = item_meta_from_record(rest, item_id)
  return items
