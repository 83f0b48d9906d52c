"""Item texts of a prepared dataset: the one place that reads and renders them.

Every consumer (the item-text tables of `seqio_ext.preprocessors`, the
encoder cache of `embed_items`, the text tasks of `tasks/text_tasks.py`)
goes through `item_texts`, so an item's text and its index agree everywhere:
row i of `item_texts(data_dir)` is the item of vocabulary index i + 1.

`item_categories` gives each item's most specific category name (the
critique table of `critique_texts` includes them).

Rendering is `data.prepared.item_text` (also what the dataset's SentencePiece
model was trained on); `fields` renders a subset of the metadata the same way,
e.g. `fields=("categories", "brand", "description")` is an item's text
without its title.
"""

import os
from typing import Any, Dict, List, Mapping, Sequence

from recsys_jax.data import prepared

TITLE = "title"
CATEGORIES = "categories"
BRAND = "brand"
DESCRIPTION = "description"
# The metadata fields `prepared.item_text` renders, in its order.
FIELDS = (TITLE, CATEGORIES, BRAND, DESCRIPTION)


def _check_fields(fields: Sequence[str]) -> None:
  unknown = [f for f in fields if f not in FIELDS]
  if unknown or not fields:
    raise ValueError(f"item text fields {list(fields)}: expected a non-empty "
                     f"subset of {list(FIELDS)}")


def render(item: Mapping[str, Any], fields: Sequence[str] = FIELDS) -> str:
  """One item's text from its items.jsonl row, using only `fields`.

  With all fields this is exactly `prepared.item_text(item)`, e.g.
  "Acme Hub, Pack of 2. category: Electronics > Computers > Hubs. brand:
  Acme. A compact hub ..."; `fields=("title",)` gives the title alone.
  """
  _check_fields(fields)
  return prepared.item_text({k: item[k] for k in fields if k in item})


def read_rows(data_dir: str) -> List[Dict[str, Any]]:
  """items.jsonl rows, checked to be in vocabulary order (row i: index i+1).

  Raises:
    ValueError: naming the file and line of a row whose `index` is not its
      line number (missing included): every index-based table would be
      shifted.
  """
  rows = prepared.read_items(data_dir)
  for line, row in enumerate(rows, start=1):
    if row.get("index") != line:
      raise ValueError(
          f"{os.path.join(data_dir, prepared.ITEMS_FILE)}:{line}: index "
          f"{row.get('index')!r}, expected {line} (rows in vocabulary order)")
  return rows


def item_texts(data_dir: str, fields: Sequence[str] = FIELDS) -> List[str]:
  """Rendered text of every item: `[N]`, row i = vocabulary index i + 1."""
  _check_fields(fields)
  return [render(row, fields) for row in read_rows(data_dir)]


def texts_by_index(data_dir: str, fields: Sequence[str] = FIELDS
                   ) -> List[str]:
  """Item texts indexed by vocabulary id: `[N + 2]`, entry j = item j.

  Entries 0 (padding) and N + 1 ([MASK]) are empty strings, so the list can
  be indexed (or gathered) with `item_ids` directly.
  """
  return [""] + item_texts(data_dir, fields) + [""]


def item_categories(data_dir: str) -> List[str]:
  """Most specific category of every item: `[N]`, row i = index i + 1.

  The last element of the item's `categories` path in items.jsonl (e.g.
  "Hubs" for ["Electronics", "Computers", "Hubs"]); "" for an item without
  categories.
  """
  out = []
  for row in read_rows(data_dir):
    cats = row.get(CATEGORIES) or []
    out.append(str(cats[-1]) if cats else "")
  return out
