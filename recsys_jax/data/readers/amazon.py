"""Reader of raw Amazon review dumps (McAuley lab, 2014 and 2018 releases).

Reviews: one record per line with `reviewerID`, `asin`, `unixReviewTime`
(JSON; Python-literal lines are also accepted). Metadata: one record per item
keyed by `asin` with `title`, `categories` (2014, nested list) or `category`
(2018, list), `brand`, `description`, `price`; 2014 metadata lines are Python
literal dicts, parsed with `ast.literal_eval` only. Either file may be gzip.

Each user's reviews are ordered by unixReviewTime (ties in file order), exact
duplicate records (same user, item and time; common in the 2018 dumps) are
removed, then the k-core filter drops users and items with fewer than k
interactions until none is left. Every removal is counted in stats.json.
"""

import collections
from typing import Dict, List, Optional, Tuple

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.data.readers import item_metadata

_REQUIRED = ("reviewerID", "asin", "unixReviewTime")


def kcore_filter(
    by_user: Dict[str, List[str]], k: int
) -> Tuple[Dict[str, List[int]], dict]:
  """Iteratively drops users and items with fewer than k interactions.

  Args:
    by_user: user -> item ids of their interactions (repeats count).
    k: the core size; k <= 1 keeps everything.

  Returns:
    (kept, counts): kept maps each surviving user to the positions (into its
    original list) of the surviving interactions; counts holds
    users_removed, items_removed, interactions_removed and rounds.
  """
  kept = {u: list(range(len(items))) for u, items in by_user.items()}
  n_items_before = len({i for items in by_user.values() for i in items})
  n_inter_before = sum(len(v) for v in by_user.values())
  rounds = 0
  while k > 1:
    degree = collections.Counter(
        by_user[u][p] for u, ps in kept.items() for p in ps)
    rare = {i for i, d in degree.items() if d < k}
    short = {u for u, ps in kept.items() if len(ps) < k}
    if not rare and not short:
      break
    rounds += 1
    new = {}
    for u, ps in kept.items():
      if u in short:
        continue
      ps = [p for p in ps if by_user[u][p] not in rare]
      if ps:
        new[u] = ps
    kept = new
  n_items_after = len({by_user[u][p] for u, ps in kept.items() for p in ps})
  counts = {
      "k": k,
      "users_removed": len(by_user) - len(kept),
      "items_removed": n_items_before - n_items_after,
      "interactions_removed":
          n_inter_before - sum(len(ps) for ps in kept.values()),
      "rounds": rounds,
  }
  return kept, counts


def _read_reviews(path: str, policy: bad_input.BadInputPolicy):
  """Returns user -> [(time, asin, lineno)] in file order, and dup count."""
  by_user: Dict[str, list] = collections.OrderedDict()
  seen = set()
  duplicates = 0
  records = 0
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               progress="reviews read"):
    if not text.strip():
      continue
    records += 1
    try:
      rec = item_metadata.parse_record(text, allow_python_literal=True)
    except ValueError as e:
      policy.report("review_not_json", path, lineno,
                    f"{e}; expected one JSON review object per line")
      continue
    if not isinstance(rec, dict):
      policy.report("review_not_json", path, lineno,
                    f"a {type(rec).__name__}; expected one JSON review "
                    "object per line")
      continue
    missing = [k for k in _REQUIRED if rec.get(k) in (None, "")]
    if missing:
      policy.report("review_missing_field", path, lineno,
                    f"no {', '.join(missing)}; expected every review to "
                    f"have {', '.join(_REQUIRED)}")
      continue
    try:
      ts = int(rec["unixReviewTime"])
    except (TypeError, ValueError):
      policy.report("bad_review_time", path, lineno,
                    f"unixReviewTime {rec['unixReviewTime']!r}; expected "
                    "integer seconds")
      continue
    user, asin = str(rec["reviewerID"]), str(rec["asin"])
    if (user, asin, ts) in seen:
      duplicates += 1
      continue
    seen.add((user, asin, ts))
    by_user.setdefault(user, []).append((ts, asin, lineno))
  if records == 0:
    raise bad_input.BadInputError(
        path, None, "file is empty; expected one review per line")
  return by_user, duplicates


def read_amazon(
    reviews_path: str,
    *,
    metadata_path: Optional[str] = None,
    kcore: int = 5,
    policy: Optional[bad_input.BadInputPolicy] = None,
) -> Tuple[List[prepared.UserRecord],
           Optional[Dict[str, prepared.ItemMeta]], dict]:
  """Reads Amazon reviews (+ metadata), orders by time, applies the k-core.

  Args:
    reviews_path: reviews file (JSON lines, gzip ok).
    metadata_path: item metadata file keyed by asin (JSON or Python-literal
      lines, gzip ok), or None.
    kcore: drop users and items with fewer interactions, iteratively.
    policy: bad-input policy (default: raise on the first problem).

  Returns:
    (users, items, source); users in first-seen order. source["extra_stats"]
    holds the k-core and duplicate-removal counts for stats.json.
  """
  policy = policy or bad_input.BadInputPolicy("error")
  item_metadata.check_file(reviews_path, "Amazon reviews file")
  if metadata_path:
    item_metadata.check_file(metadata_path, "Amazon metadata file")
  raw, duplicates = _read_reviews(reviews_path, policy)
  ordered = {}
  for user, events in raw.items():
    # sorted() is stable: equal times keep their file order.
    ordered[user] = sorted(events, key=lambda e: e[0])
  kept, counts = kcore_filter(
      {u: [asin for _, asin, _ in ev] for u, ev in ordered.items()}, kcore)
  users = []
  for user, positions in kept.items():
    events = [ordered[user][p] for p in positions]
    users.append(prepared.UserRecord(
        user_id=user, item_ids=[asin for _, asin, _ in events],
        timestamps=[ts for ts, _, _ in events],
        source=(reviews_path, min(line for _, _, line in events))))
  items = None
  if metadata_path:
    needed = {asin for u in users for asin in u.item_ids}
    items = item_metadata.read_item_metadata(
        metadata_path, policy, id_key="asin", allow_python_literal=True,
        keep=needed)
  source = {
      "format": "amazon", "input": reviews_path, "metadata": metadata_path,
      "extra_stats": {"kcore": counts,
                      "duplicate_reviews_removed": duplicates},
  }
  return users, items, source
