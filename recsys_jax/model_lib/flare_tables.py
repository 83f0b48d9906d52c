"""Reads a FLARE model's frozen text tables from `embed_items` caches.

  item cache      (embed_items --texts=items):      [N, T, D] tokens, row i =
                                                    item i + 1
  critique cache  (embed_items --texts=critiques):  [C, Tc, D] tokens, row r =
                                                    critique id r + 1, and
                                                    texts.json (the strings)

Both must come from the same encoder, checkpoint and vocabulary (refused
otherwise). The critique table holds every category name, so each item's
category critique (the proxy critique and the critiquing evaluation's) is a
row of it.
"""

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from recsys_jax.data import prepared
from recsys_jax.model_lib import flare as flare_model
from recsys_jax.text import critique_texts as critique_texts_lib
from recsys_jax.text import item_text_cache
from recsys_jax.text import item_texts as item_texts_lib

def _open(path: str, kind: str, expect: Dict[str, Any]
          ) -> item_text_cache.ItemTextCache:
  cache = item_text_cache.ItemTextCache(path, expect=expect)
  if cache.tokens is None:
    raise ValueError(f"{path}: the {kind} cache was built without token "
                     "encodings (--no_tokens); FLARE's Perceiver reads "
                     "them: rebuild it without --no_tokens")
  if cache.texts_kind != kind:
    raise item_text_cache.CacheMismatchError(
        f"{os.path.join(path, item_text_cache.MANIFEST)}: texts_kind "
        f"{cache.texts_kind!r}, expected {kind!r} (embed_items --texts="
        f"{kind})")
  return cache


def critique_texts(path: str) -> List[str]:
  """The strings of a critique cache (`texts.json`): id r + 1 = row r."""
  texts = item_text_cache.ItemTextCache(path).texts
  if texts is None:
    raise FileNotFoundError(
        f"{os.path.join(path, item_text_cache.TEXTS_FILE)}: missing; build "
        "the critique cache with python -m recsys_jax.embed_items "
        "--texts=critiques")
  return texts


# Row i = item i + 1's most specific category ('' when it has none).
item_category_names = item_texts_lib.item_categories


def load_text_tables(data_dir: str, item_cache: str,
                     critique_cache: Optional[str], padded_vocab: int,
                     ood_categories: Sequence[str] = ()):
  """`(FlareTextTables, ood critique ids)` for the dataset at `data_dir`.

  Args:
    data_dir: the prepared dataset (its N items and categories).
    item_cache: the item-text cache directory.
    critique_cache: the critique cache directory, or None (no critiques:
      a one-row empty critique table).
    padded_vocab: rows of the model's item table.
    ood_categories: category names kept out of training critiques.
  """
  num_items = prepared.PreparedDataset(data_dir).num_items
  items = _open(item_cache, "items", {"num_items": num_items})
  _, t, d = items.tokens.shape
  dtype = items.tokens.dtype
  item_tokens = np.zeros((padded_vocab, t, d), dtype)
  item_mask = np.zeros((padded_vocab, t), bool)
  item_tokens[1:num_items + 1] = items.tokens
  item_mask[1:num_items + 1] = items.mask
  identity = {"encoder": items.manifest.get("encoder"),
              "checkpoint_fingerprint":
                  items.manifest.get("checkpoint_fingerprint"),
              "vocab": items.manifest.get("vocab"),
              "dtype": items.manifest.get("dtype"),
              "item_texts_sha256": items.manifest.get("texts_sha256"),
              "max_text_len": t, "text_dim": d}
  item_category = np.zeros((padded_vocab,), np.int32)
  ood_ids: List[int] = []
  if critique_cache is None:
    if ood_categories:
      raise ValueError("ood_categories given without a critique cache")
    crit_tokens = np.zeros((1, 1, d), dtype)
    crit_mask = np.zeros((1, 1), bool)
  else:
    crit = _open(critique_cache, "critiques", {})
    item_text_cache.check_compatible(items, crit)
    texts = crit.texts
    _, tc, _ = crit.tokens.shape
    crit_tokens = np.zeros((len(texts) + 1, tc, d), dtype)
    crit_mask = np.zeros((len(texts) + 1, tc), bool)
    crit_tokens[1:] = crit.tokens
    crit_mask[1:] = crit.mask
    index = critique_texts_lib.critique_index(texts)
    names = item_category_names(data_dir)
    item_category[:num_items + 2] = critique_texts_lib.category_critique_ids(
        names, texts, where=critique_cache)
    unknown = [c for c in ood_categories if c not in index or c not in names]
    if unknown:
      raise ValueError(f"ood_categories {unknown}: not category names of "
                       f"{data_dir} (e.g. {sorted(set(names))[:5]})")
    ood_ids = [index[c] for c in ood_categories]
    identity.update(critique_texts_sha256=crit.manifest.get("texts_sha256"),
                    max_critique_len=tc)
  tables = flare_model.FlareTextTables(
      item_tokens=item_tokens, item_mask=item_mask,
      critique_tokens=crit_tokens, critique_mask=crit_mask,
      item_category=item_category, identity=identity)
  return tables, ood_ids
