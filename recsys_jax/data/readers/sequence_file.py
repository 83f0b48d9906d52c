"""Reader of sequence files: `user item1 item2 ...` per line, in time order.

This is the SASRec / S3-Rec / P5 format (e.g. Beauty.txt): whitespace
separated, one user per line, items already in time order. Item metadata, when
given, is a JSONL file keyed by `item_id` (see `item_metadata.py`).
"""

from typing import Dict, Iterator, Optional, Tuple

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.data.readers import item_metadata


def iter_sequence_users(
    path: str, policy: bad_input.BadInputPolicy
) -> Iterator[prepared.UserRecord]:
  """Streams the users of a sequence file, reporting bad lines to `policy`.

  Problems: a non-UTF-8 line ("not_utf8"), a line with a user id and no items
  ("user_without_items"), a user id seen before ("duplicate_user"). Blank
  lines are not records and are passed over. An empty file raises.
  """
  first_line: Dict[str, int] = {}
  records = 0
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               progress="sequence lines"):
    fields = text.split()
    if not fields:
      continue
    records += 1
    user, items = fields[0], fields[1:]
    if not items:
      policy.report("user_without_items", path, lineno,
                    f"user {user!r} has no items; expected 'user item1 item2 "
                    "...' (whitespace separated)")
      continue
    if user in first_line:
      policy.report("duplicate_user", path, lineno,
                    f"user {user!r} already appeared on line "
                    f"{first_line[user]}; expected one line per user")
      continue
    first_line[user] = lineno
    yield prepared.UserRecord(user_id=user, item_ids=items,
                              source=(path, lineno))
  if records == 0:
    raise bad_input.BadInputError(
        path, None, "file is empty; expected one line per user: "
        "'user item1 item2 ...'")


def read_sequence_file(
    path: str,
    *,
    item_metadata_path: Optional[str] = None,
    policy: Optional[bad_input.BadInputPolicy] = None,
) -> Tuple[Iterator[prepared.UserRecord],
           Optional[Dict[str, prepared.ItemMeta]], dict]:
  """Reads a sequence file and optional item metadata JSONL.

  Args:
    path: the sequence file (gzip ok).
    item_metadata_path: JSONL with one object per item keyed by `item_id`.
    policy: bad-input policy (default: raise on the first problem).

  Returns:
    (users, items, source): users stream lazily (errors surface while they
    are consumed); items is None without metadata. Items that appear in the
    sequences but not in the metadata are reported by `write_prepared`.
  """
  policy = policy or bad_input.BadInputPolicy("error")
  item_metadata.check_file(path, "sequence file")
  items = None
  if item_metadata_path:
    items = item_metadata.read_item_metadata(item_metadata_path, policy,
                                             id_key="item_id")
  source = {"format": "sequence_file", "input": path,
            "item_metadata": item_metadata_path}
  return iter_sequence_users(path, policy), items, source
