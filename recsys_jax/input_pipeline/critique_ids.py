"""Critique strings of a batch -> integer ids of a critique text cache.

A critique text cache directory (written by `python -m recsys_jax.embed_items
--texts=critiques`) holds `texts.json`, a JSON list of strings: entry r is
critique id r + 1, and id 0 means "no critique" (the empty string). Batches
carry those ids (`critique_ids`, int32) instead of strings, so the model
gathers the cached critique embeddings like item embeddings.
"""

import json
import os
from typing import Dict, Sequence, Union

import numpy as np

TEXTS_FILE = "texts.json"
REBUILD_HINT = "python -m recsys_jax.embed_items --texts=critiques"


def _as_bytes(text: Union[str, bytes]) -> bytes:
  return text if isinstance(text, bytes) else str(text).encode("utf-8")


class CritiqueIndex:
  """Maps critique strings to the ids of a critique text cache.

  Attributes:
    where: where the table came from (named in errors).
    num_texts: number of critiques in the table (ids 1..num_texts).
  """

  def __init__(self, texts: Sequence[str], where: str):
    """Builds the index.

    Args:
      texts: the cache's texts; texts[r] gets id r + 1. A repeated text keeps
        its first id; the empty string is always id 0.
      where: the cache path (or another description), named in errors.
    """
    self.where = str(where)
    self.num_texts = len(texts)
    self._ids: Dict[bytes, int] = {b"": 0}
    for r, text in enumerate(texts):
      self._ids.setdefault(_as_bytes(text), r + 1)

  def ids(self, texts: np.ndarray) -> np.ndarray:
    """int32 ids, same shape as `texts` (bytes or str; "" -> 0).

    Raises:
      ValueError: a non-empty string is not in the table (the cache was built
        from other data); names the cache and the string.
    """
    arr = np.asarray(texts, dtype=object)
    if arr.size == 0:
      return np.zeros(arr.shape, np.int32)
    # Look up each distinct string once: batches repeat "" and few critiques.
    uniques, inverse = np.unique(arr.reshape(-1), return_inverse=True)
    table = np.empty(len(uniques), np.int32)
    for u, text in enumerate(uniques):
      key = _as_bytes(text)
      found = self._ids.get(key)
      if found is None:
        raise ValueError(
            f"critique {key.decode('utf-8', 'replace')!r} is not in the "
            f"critique text cache {self.where} ({self.num_texts} texts); the "
            f"cache was built from other data. Rebuild it with `{REBUILD_HINT}`"
            " over this dataset")
      table[u] = found
    return table[inverse].reshape(arr.shape)


def load(cache_dir: str) -> CritiqueIndex:
  """The `CritiqueIndex` of a critique text cache directory (its texts.json)."""
  path = os.path.join(cache_dir, TEXTS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"SequenceData.critique_texts={cache_dir!r}: no {TEXTS_FILE} there; "
        f"build the critique text cache with `{REBUILD_HINT}`")
  with open(path) as f:
    texts = json.load(f)
  if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
    raise ValueError(f"{path}: expected a JSON list of strings (entry r = "
                     f"critique id r + 1); rebuild it with `{REBUILD_HINT}`")
  return CritiqueIndex(texts, cache_dir)
