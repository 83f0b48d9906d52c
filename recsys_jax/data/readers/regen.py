"""Reader of REGEN (Reviews Enhanced with GEnerative Narratives) user records.

Official form (office.jsonl / clothing.jsonl): one JSON object per user per
line:
  reviewer_id
  purchase_history: [{item: {asin, title, category, price},
                      review: {summary, rating, text, unix_time},
                      critique (optional)}, ...]
  user: {long_summary, ... any other narrative fields}
  critiques (optional, top level or under user): one per purchase, or one per
    pair of adjacent purchases (then the first purchase has none)

Flattened form (a JSON array or JSONL of one row per purchase, as in
shared/data/regen): reviewer_id, asin, title, category, price, rating,
review, purchase_date (MM/DD/YYYY) or unix_time, optional summary/critique,
and user-level fields such as long_summary repeated on every row.

Every string under `user` becomes a narrative named as in the file (nested
dicts joined with "."); other top-level strings too. Per-purchase review
fields become `per_item` texts `review_<field>` (rating as a string), aligned
with the items. Purchases are ordered by time, ties in file order.
"""

import collections
import datetime
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.data.readers import item_metadata

# Flattened-row fields that describe the item / the review.
_FLAT_ITEM = ("asin", "title", "category", "price")
_FLAT_REVIEW = {"rating": "rating", "review": "text", "summary": "summary",
                "unix_time": "unix_time"}
_FLAT_OTHER = ("reviewer_id", "purchase_date", "critique")


def _records(path: str, policy) -> Iterator[Tuple[int, Any]]:
  """Yields (line, parsed JSON) from a JSONL file or a JSON array file."""
  with item_metadata.open_binary(path) as f:
    head = f.read(4096)
  if head.lstrip()[:1] == b"[":
    yield from _array_records(path)
    return
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               progress="REGEN lines"):
    if not text.strip():
      continue
    try:
      yield lineno, json.loads(text)
    except json.JSONDecodeError as e:
      policy.report("regen_not_json", path, lineno,
                    f"not JSON ({e.msg} at column {e.colno}); expected one "
                    "JSON object per line")


def _array_records(path: str) -> Iterator[Tuple[int, Any]]:
  """Elements of a top-level JSON array, each with the line it starts on."""
  with item_metadata.open_binary(path) as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise bad_input.BadInputError(
        path, line, "not valid UTF-8; expected a UTF-8 JSON array") from None
  decoder = json.JSONDecoder()
  pos = text.index("[") + 1
  while True:
    while pos < len(text) and text[pos] in " \t\r\n,":
      pos += 1
    if pos >= len(text):
      raise bad_input.BadInputError(path, text.count("\n") + 1,
                                    "JSON array not closed; expected ']'")
    if text[pos] == "]":
      return
    line = text.count("\n", 0, pos) + 1
    try:
      obj, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise bad_input.BadInputError(
          path, e.lineno, f"not JSON ({e.msg}); expected a JSON array of "
          "objects") from None
    yield line, obj


def _rating_text(value: Any) -> str:
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return "" if value is None else str(value)


def _date_to_unix(value: str) -> int:
  """MM/DD/YYYY (or YYYY-MM-DD) at UTC midnight, in seconds."""
  for fmt in ("%m/%d/%Y", "%Y-%m-%d"):
    try:
      d = datetime.datetime.strptime(value.strip(), fmt)
    except ValueError:
      continue
    return int(d.replace(tzinfo=datetime.timezone.utc).timestamp())
  raise ValueError(f"date {value!r}; expected MM/DD/YYYY")


def _categories(value: Any) -> List[str]:
  # The flattened sample joins the category path with " - ".
  if isinstance(value, str):
    return [c.strip() for c in value.split(" - ") if c.strip()]
  return item_metadata.flatten_categories(value)


def _narratives(value: Any, prefix: str, out: Dict[str, str]) -> None:
  """Collects every string under `value`; nested dict keys joined by '.'."""
  if isinstance(value, str):
    out[prefix] = value
  elif isinstance(value, dict):
    for k, v in value.items():
      _narratives(v, f"{prefix}.{k}" if prefix else str(k), out)
  elif (isinstance(value, list) and value
        and all(isinstance(v, str) for v in value)):
    out[prefix] = "\n".join(value)


def _critique_text(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, dict):
    for k in ("critique", "text"):
      if isinstance(value.get(k), str):
        return value[k]
    return ""
  return str(value)


class _Error(Exception):
  """A record-level problem: (reason, message)."""


def _user_from_nested(rec: dict, path: str, line: int,
                      items: Dict[str, prepared.ItemMeta],
                      ignored: collections.Counter) -> prepared.UserRecord:
  """Converts one official REGEN record; raises _Error on a bad record."""
  user_id = rec.get("reviewer_id")
  if not isinstance(user_id, (str, int)) or str(user_id) == "":
    raise _Error("regen_missing_field",
                 "no reviewer_id; expected each record to name its user")
  history = rec.get("purchase_history")
  if not isinstance(history, list) or not history:
    raise _Error("user_without_items",
                 f"user {user_id!r}: purchase_history is "
                 f"{type(history).__name__ if history is not None else 'missing'}"
                 "; expected a non-empty list of {item, review}")
  rows = []
  for n, purchase in enumerate(history):
    item = purchase.get("item") if isinstance(purchase, dict) else None
    asin = item.get("asin") if isinstance(item, dict) else None
    if not asin:
      raise _Error("regen_missing_field",
                   f"user {user_id!r}: purchase_history[{n}] has no "
                   "item.asin; expected {item: {asin, ...}, review: {...}}")
    review = purchase.get("review") or {}
    if not isinstance(review, dict):
      raise _Error("regen_missing_field",
                   f"user {user_id!r}: purchase_history[{n}].review is a "
                   f"{type(review).__name__}; expected an object")
    ts = review.get("unix_time")
    if ts is not None:
      try:
        ts = int(ts)
      except (TypeError, ValueError):
        raise _Error("regen_bad_field",
                     f"user {user_id!r}: purchase_history[{n}].review."
                     f"unix_time {ts!r}; expected integer seconds") from None
    rows.append((n, str(asin), item, review, purchase))

  for _, asin, item, _, _ in rows:
    if asin not in items:
      rest = {k: v for k, v in item.items()
              if k not in ("asin", "title", "category", "categories",
                           "price")}
      items[asin] = prepared.ItemMeta(
          item_id=asin, title=str(item.get("title") or "").strip(),
          categories=_categories(item.get("category",
                                          item.get("categories"))),
          price=item_metadata.parse_price(item.get("price")), extra=rest)

  # Critiques: per purchase, or a list at top level / under user.
  critique_list = rec.get("critiques")
  user_block = rec.get("user") if isinstance(rec.get("user"), dict) else {}
  if critique_list is None:
    critique_list = user_block.get("critiques")
  per_purchase = [_critique_text(p.get("critique"))
                  for _, _, _, _, p in rows]
  critiques = None
  if critique_list is not None:
    if not isinstance(critique_list, list):
      raise _Error("critiques_misaligned",
                   f"user {user_id!r}: critiques is a "
                   f"{type(critique_list).__name__}; expected a list")
    texts = [_critique_text(c) for c in critique_list]
    if len(texts) == len(rows) - 1:
      texts = [""] + texts  # one per adjacent pair: before items 2..n
    if len(texts) != len(rows):
      raise _Error("critiques_misaligned",
                   f"user {user_id!r}: {len(critique_list)} critiques for "
                   f"{len(rows)} purchases; expected {len(rows)} or "
                   f"{len(rows) - 1}")
    critiques = texts
  elif any(per_purchase):
    critiques = per_purchase

  # Per-item texts: every review field except the time, and other string
  # fields of a purchase.
  per_item_names = []
  for _, _, _, review, purchase in rows:
    for k, v in review.items():
      if k != "unix_time" and f"review_{k}" not in per_item_names:
        per_item_names.append(f"review_{k}")
    for k, v in purchase.items():
      if (k not in ("item", "review", "critique") and isinstance(v, str)
          and k not in per_item_names):
        per_item_names.append(k)
  per_item = {name: [] for name in per_item_names}
  for _, _, _, review, purchase in rows:
    for name in per_item_names:
      if name.startswith("review_") and name[7:] in review:
        v = review[name[7:]]
        per_item[name].append(_rating_text(v) if name == "review_rating"
                              else ("" if v is None else str(v)))
      else:
        v = purchase.get(name)
        per_item[name].append(v if isinstance(v, str) else "")

  narratives: Dict[str, str] = {}
  for k, v in rec.items():
    if k in ("reviewer_id", "purchase_history", "user", "critiques"):
      continue
    if isinstance(v, str):
      narratives[k] = v
    else:
      ignored[k] += 1
  user_narr: Dict[str, str] = {}
  _narratives({k: v for k, v in user_block.items() if k != "critiques"},
              "", user_narr)
  narratives.update(user_narr)  # fields under `user` win on a clash

  times = [r[3].get("unix_time") for r in rows]
  order = list(range(len(rows)))
  timestamps = None
  if all(t is not None for t in times):
    timestamps = [int(t) for t in times]
    order = sorted(order, key=lambda i: timestamps[i])  # stable
    timestamps = [timestamps[i] for i in order]
  return prepared.UserRecord(
      user_id=str(user_id), item_ids=[rows[i][1] for i in order],
      timestamps=timestamps,
      critiques=None if critiques is None else [critiques[i] for i in order],
      narratives=narratives,
      per_item={k: [v[i] for i in order] for k, v in per_item.items()},
      source=(path, line))


def _nest_flat_rows(user_id: str, rows: List[dict]) -> dict:
  """Turns one user's flattened rows into an official-form record."""
  shared = {}
  for k, v in rows[0].items():
    if (k not in _FLAT_ITEM and k not in _FLAT_REVIEW and k not in _FLAT_OTHER
        and isinstance(v, str) and all(r.get(k) == v for r in rows)):
      shared[k] = v
  history = []
  for r in rows:
    review = {_FLAT_REVIEW[k]: r[k] for k in _FLAT_REVIEW if k in r}
    if "unix_time" not in review and r.get("purchase_date"):
      review["unix_time"] = _date_to_unix(str(r["purchase_date"]))
    purchase = {"item": {k: r[k] for k in _FLAT_ITEM if k in r},
                "review": review}
    if "critique" in r:
      purchase["critique"] = r["critique"]
    for k, v in r.items():
      if (k not in _FLAT_ITEM and k not in _FLAT_REVIEW
          and k not in _FLAT_OTHER and k not in shared):
        purchase[k] = v
    history.append(purchase)
  return {"reviewer_id": user_id, "purchase_history": history, "user": shared}


def read_regen(
    path: str,
    *,
    policy: Optional[bad_input.BadInputPolicy] = None,
) -> Tuple[List[prepared.UserRecord], Dict[str, prepared.ItemMeta], dict]:
  """Reads REGEN user records (official nested JSONL or flattened rows).

  Args:
    path: REGEN file (JSONL of user records, or JSON array / JSONL of
      flattened per-purchase rows; gzip ok).
    policy: bad-input policy (default: raise on the first problem).

  Returns:
    (users, items, source); items keyed by asin, first description wins.
  """
  policy = policy or bad_input.BadInputPolicy("error")
  item_metadata.check_file(path, "REGEN file")
  items: Dict[str, prepared.ItemMeta] = {}
  ignored = collections.Counter()
  nested: List[Tuple[int, dict]] = []
  flat: Dict[str, List[Tuple[int, dict]]] = collections.OrderedDict()
  records = 0
  for line, rec in _records(path, policy):
    records += 1
    if not isinstance(rec, dict):
      policy.report("regen_not_json", path, line,
                    f"a {type(rec).__name__}; expected a JSON object")
      continue
    if "purchase_history" in rec:
      nested.append((line, rec))
    elif "asin" in rec and rec.get("reviewer_id") not in (None, ""):
      flat.setdefault(str(rec["reviewer_id"]), []).append((line, rec))
    else:
      policy.report("regen_missing_field", path, line,
                    "neither purchase_history nor reviewer_id + asin; "
                    "expected a REGEN user record or a flattened purchase row")
  if records == 0:
    raise bad_input.BadInputError(
        path, None, "file is empty; expected REGEN user records")
  for user_id, rows in flat.items():
    try:
      rec = _nest_flat_rows(user_id, [r for _, r in rows])
    except ValueError as e:
      policy.report("regen_bad_field", path, rows[0][0],
                    f"user {user_id!r}: {e}")
      continue
    nested.append((rows[0][0], rec))
  nested.sort(key=lambda x: x[0])

  users, first_line = [], {}
  for line, rec in nested:
    try:
      u = _user_from_nested(rec, path, line, items, ignored)
    except _Error as e:
      reason, message = e.args
      policy.report(reason, path, line, message)
      continue
    if u.user_id in first_line:
      policy.report("duplicate_user", path, line,
                    f"user {u.user_id!r} already appeared on line "
                    f"{first_line[u.user_id]}; expected one record per user")
      continue
    first_line[u.user_id] = line
    users.append(u)
  source = {"format": "regen", "input": path,
            "form": "flattened" if flat else "nested"}
  if ignored:
    source["ignored_top_level_fields"] = dict(sorted(ignored.items()))
  return users, items, source
