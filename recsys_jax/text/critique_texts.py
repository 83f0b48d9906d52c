"""The critique table of a prepared dataset: every text a critique can be.

Critiques reach the model as text encoded once by the frozen encoder
(`embed_items --texts=critiques`), so they need a fixed table: row r of
`critique_texts(data_dir)` is cache row r, and the input pipeline turns a
critique string into id r + 1 (`critique_index`), the empty string (no
critique) into 0. The table is the sorted union of

* every distinct non-empty critique string of the dataset's sequences
  (feature `critiques`, one per interaction, "" where none), and
* every item's most specific category name (`item_texts.item_categories`),
  so category critiques ("show me serums") can also be given by name.

Sorting makes the table a function of the set alone: the same dataset gives
the same rows whatever the order its users were written in.
"""

from typing import Dict, List, Sequence, Set

import numpy as np

from recsys_jax.data import prepared
from recsys_jax.text import item_texts

NO_CRITIQUE_ID = 0


def sequence_critiques(data_dir: str) -> Set[str]:
  """Distinct non-empty critique strings of the prepared sequences.

  An empty set for a dataset without critiques (stats.json has_critiques
  false). Only "" counts as empty: other strings, whitespace included, are
  kept as written so the pipeline's exact lookup finds them.
  """
  out = set()
  for seq in prepared.PreparedDataset(data_dir).iter_sequences():
    for raw in seq.get(prepared.CRITIQUES, ()):
      text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
      if text:
        out.add(text)
  return out


def critique_texts(data_dir: str) -> List[str]:
  """Sorted distinct critique strings and item category names (non-empty).

  Args:
    data_dir: a prepared dataset (stats.json, items.jsonl, sequences).

  Returns:
    `[R]` texts; row r is critique id r + 1 (see `critique_index`).
  """
  categories = {c for c in item_texts.item_categories(data_dir) if c}
  return sorted(sequence_critiques(data_dir) | categories)


def critique_index(texts: Sequence[str]) -> Dict[str, int]:
  """{critique text: id} for a table: row r -> id r + 1 ("" is id 0).

  Raises:
    ValueError: the table repeats a text or holds "" (ids would be
      ambiguous).
  """
  index = {"": NO_CRITIQUE_ID}
  for r, text in enumerate(texts):
    if text in index:
      raise ValueError(f"critique table row {r}: {text!r} is "
                       + ("empty" if not text else "repeated")
                       + "; expected distinct non-empty texts")
    index[text] = r + 1
  return index


def category_critique_ids(category_names: Sequence[str],
                          critique_texts: Sequence[str], *,
                          where: str = "the critique cache") -> np.ndarray:
  """`[N + 2]` critique id of each item id's category name (0: none).

  Args:
    category_names: `[N]`, row i = item i + 1's category ("" for none).
    critique_texts: the critique table, row r = id r + 1.
    where: named in the error.

  Raises:
    ValueError: a category name is not in the critique table (the cache
      was built from other data).
  """
  index = {}
  for r, text in enumerate(critique_texts):
    index.setdefault(text, r + 1)
  missing = sorted({c for c in category_names if c and c not in index})
  if missing:
    raise ValueError(
        f"{where}: category names {missing[:5]} ({len(missing)} in all) are "
        "not in its texts.json; build it over this dataset with python -m "
        "recsys_jax.embed_items --texts=critiques")
  out = np.zeros((len(category_names) + 2,), np.int32)
  out[1:-1] = [index.get(c, 0) for c in category_names]
  return out
