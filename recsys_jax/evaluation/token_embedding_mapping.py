"""Generated titles -> items by pooled token embeddings (LANCER's mapping).

LANCER (Li et al. 2023) maps each generated beam to the catalogue item whose
title is nearest in the LM's own input token-embedding space: a text is the
max (or mean) over its tokens of the rows of the token embedding `[V, E]`,
and a beam goes to the item of highest cosine. Here that space is the
nearest-item index of an `item_mapping.ItemMapper`, so an exact normalised
title still comes first and `rank` dedupes, excludes and fills as for any
other encoder.

Tokens are the vocabulary's ids of the text with padding (0) and EOS (1)
dropped; a text with no tokens pools to the zero vector, which the mapper
treats as near nothing (item 0, a miss). The catalogue is tokenised once
(`TitleTokens`, cached per dataset and vocabulary by `title_tokens`); the
pooling is cheap NumPy and redone for every embedding, since the embedding
changes while the LM trains.
"""

import collections
import json
import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np

from recsys_jax.data import prepared
from recsys_jax.evaluation import item_mapping
from recsys_jax.evaluation import text_metrics
from recsys_jax.text import item_texts

MAX, MEAN = "max", "mean"
POOLINGS = (MAX, MEAN)
# Ids never pooled: T5 / seqio padding and EOS.
DROPPED_IDS = (0, 1)
# Where an encoder-decoder's params keep the input token embedding [V, E].
EMBEDDING_PATH = ("token_embedder", "embedding")
# Rows gathered at once when pooling (bounds the [c, L, E] temporary).
_CHUNK_TOKENS = 1 << 14
_CACHE_SIZE = 4


def check_pooling(pooling: str) -> str:
  if pooling not in POOLINGS:
    raise ValueError(f"token pooling {pooling!r}: expected one of {POOLINGS}")
  return pooling


def tokenize(vocabulary, texts: Sequence[str]
             ) -> Tuple[np.ndarray, np.ndarray]:
  """Every text's token ids, padding and EOS dropped, concatenated.

  Returns:
    (ids `[T]` int64, offsets `[n + 1]` int64): text i is
    `ids[offsets[i]:offsets[i + 1]]` (possibly empty).
  """
  rows = []
  for text in texts:
    ids = np.asarray(vocabulary.encode(str(text)), np.int64).reshape(-1)
    rows.append(ids[~np.isin(ids, DROPPED_IDS)])
  offsets = np.zeros((len(rows) + 1,), np.int64)
  np.cumsum([len(r) for r in rows], out=offsets[1:])
  ids = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
  return ids, offsets


def as_embedding(embedding) -> np.ndarray:
  """`embedding` as a `[V, E]` float32 NumPy array."""
  embedding = np.asarray(embedding, np.float32)
  if embedding.ndim != 2 or embedding.shape[0] < 1:
    raise ValueError(f"token embedding has shape {embedding.shape}, expected "
                     "[V, E] (one row per token id)")
  return embedding


def pool(embedding: np.ndarray, ids: np.ndarray, offsets: np.ndarray,
         pooling: str = MAX, *, vocab_size: Optional[int] = None
         ) -> np.ndarray:
  """`[n, E]` float32: each text's rows of `embedding` pooled (`tokenize`'s
  layout); zero for a text without tokens.

  Raises:
    ValueError: naming both sizes, when an id has no row in `embedding`.
  """
  check_pooling(pooling)
  embedding = as_embedding(embedding)
  num_rows = embedding.shape[0]
  if ids.size and int(ids.max()) >= num_rows:
    vocab = (f" (vocabulary of {vocab_size} ids)" if vocab_size is not None
             else "")
    raise ValueError(
        f"token id {int(ids.max())}{vocab} has no row in the token embedding "
        f"of {num_rows} rows (shape {embedding.shape}); the embedding must "
        "be that of the model whose vocabulary tokenised the texts")
  n = len(offsets) - 1
  out = np.zeros((n, embedding.shape[1]), np.float32)
  lengths = np.diff(offsets)
  # Non-empty texts, shortest first, gathered as [c, L, E] blocks of about
  # _CHUNK_TOKENS rows: a padded reduction over axis 1 is several times
  # faster than a reduceat over the ragged rows.
  texts = np.flatnonzero(lengths > 0)
  texts = texts[np.argsort(lengths[texts], kind="stable")]
  i = 0
  while i < len(texts):
    j = min(len(texts), i + max(1, _CHUNK_TOKENS // int(lengths[texts[i]])))
    j = min(j, i + max(1, _CHUNK_TOKENS // int(lengths[texts[j - 1]])))
    chunk = texts[i:j]
    size = lengths[chunk]  # [c]
    steps = np.arange(int(size.max()))[None]  # [1, L]
    # Past its end a text repeats its last token (neutral for max).
    rows = embedding[ids[offsets[chunk, None] + np.minimum(
        steps, size[:, None] - 1)]]  # [c, L, E]
    if pooling == MAX:
      out[chunk] = rows.max(axis=1)
    else:
      weights = (steps < size[:, None]).astype(np.float32)  # [c, L]
      out[chunk] = np.einsum("cl,cle->ce", weights, rows) / size[:, None]
    i = j
  return out


def token_embedding_encoder(vocabulary, embedding, pooling: str = MAX
                            ) -> text_metrics.EncodeFn:
  """`encode_fn(texts) -> [n, E]` float32: each text's token-embedding rows
  (`vocabulary`'s ids, padding and EOS dropped) pooled by `pooling` ('max'
  or 'mean'); zero for a text without tokens."""
  check_pooling(pooling)
  embedding = as_embedding(embedding)
  vocab_size = getattr(vocabulary, "vocab_size", None)

  def encode(texts: Sequence[str]) -> np.ndarray:
    ids, offsets = tokenize(vocabulary, texts)
    return pool(embedding, ids, offsets, pooling, vocab_size=vocab_size)

  return encode


class TitleTokens:
  """A catalogue's titles, tokenised once, pooled for any embedding.

  Args:
    titles: `[N + 1]` titles by item id (entry 0, padding, is not pooled).
    vocabulary: the seqio vocabulary of the LM whose embedding is pooled.
  """

  def __init__(self, titles: Sequence[str], vocabulary):
    self.titles = [str(t) for t in titles]
    if not self.titles:
      raise ValueError("TitleTokens: titles must hold entry 0 (padding) and "
                       "one title per item")
    self.vocab_size = getattr(vocabulary, "vocab_size", None)
    self.ids, self.offsets = tokenize(vocabulary, [""] + self.titles[1:])

  def item_vectors(self, embedding, pooling: str = MAX) -> np.ndarray:
    """`[N + 1, E]` float32 pooled titles (row 0 and untokenised titles:
    zeros)."""
    return pool(embedding, self.ids, self.offsets, pooling,
                vocab_size=self.vocab_size)


# (items file, its mtime and size, vocabulary key) -> (vocabulary, tokens).
_TITLE_TOKENS: "collections.OrderedDict[tuple, Tuple[Any, TitleTokens]]" = (
    collections.OrderedDict())


def _vocab_key(vocabulary) -> Any:
  """What identifies the tokenisation: the vocabulary's file fingerprint,
  else the object itself (kept alive by the cache, so its id stays
  unique)."""
  # pylint: disable-next=g-import-not-at-top
  from recsys_jax.text import vocab as text_vocab
  try:
    return json.dumps(text_vocab.vocab_fingerprint(vocabulary),
                      sort_keys=True)
  except TypeError:  # a vocabulary type without a fingerprint
    return ("object", id(vocabulary))


def title_tokens(data_dir: str, vocabulary) -> TitleTokens:
  """The tokenised titles of a prepared dataset (items.jsonl), made once
  per (dataset, vocabulary) in this process (the last few are kept)."""
  items = os.path.join(data_dir, prepared.ITEMS_FILE)
  stat = os.stat(items)  # a re-prepared dataset is tokenised again
  key = (os.path.realpath(items), stat.st_mtime_ns, stat.st_size,
         _vocab_key(vocabulary))
  if key in _TITLE_TOKENS:
    _TITLE_TOKENS.move_to_end(key)
    return _TITLE_TOKENS[key][1]
  titles = item_texts.texts_by_index(data_dir, (item_texts.TITLE,))[:-1]
  tokens = TitleTokens(titles, vocabulary)
  _TITLE_TOKENS[key] = (vocabulary, tokens)
  while len(_TITLE_TOKENS) > _CACHE_SIZE:
    _TITLE_TOKENS.popitem(last=False)
  return tokens


def token_embedding_mapper(
    source: Union[str, Sequence[str], TitleTokens], vocabulary, embedding,
    pooling: str = MAX, *,
    exact: Optional[item_mapping.ItemMapper] = None
) -> item_mapping.ItemMapper:
  """An `ItemMapper` whose nearest-item search is LANCER's.

  Args:
    source: a prepared dataset's directory (its titles, tokenised once per
      vocabulary: `title_tokens`), `[N + 1]` titles by item id, or their
      `TitleTokens`.
    vocabulary: the seqio vocabulary of the LM whose embedding this is.
    embedding: `[V, E]` its input token embedding (V >= every id the
      vocabulary gives).
    pooling: 'max' (LANCER) or 'mean' over a text's tokens.
    exact: a mapper of the same titles to reuse for the exact-title index
      (saves normalising the catalogue again).

  Returns:
    A mapper with item vectors `[N + 1, E]` = each title pooled (row 0 and
    untitled items zero: never chosen) and `encode_fn` =
    `token_embedding_encoder(vocabulary, embedding, pooling)`.
  """
  check_pooling(pooling)
  if isinstance(source, str):
    tokens = title_tokens(source, vocabulary)
  elif isinstance(source, TitleTokens):
    tokens = source
  else:
    tokens = TitleTokens(source, vocabulary)
  embedding = as_embedding(embedding)
  vectors = tokens.item_vectors(embedding, pooling)
  encode = token_embedding_encoder(vocabulary, embedding, pooling)
  if exact is None:
    exact = item_mapping.ItemMapper(tokens.titles)
  elif len(exact.titles) != len(tokens.titles):
    raise ValueError(
        f"token_embedding_mapper: the exact mapper has {len(exact.titles)} "
        f"titles, the tokenised catalogue {len(tokens.titles)}")
  return exact.with_search(vectors, encode)


def model_token_embedding(params: Mapping[str, Any]) -> np.ndarray:
  """The `[V, E]` float32 input token embedding of an encoder-decoder's
  `params` (`params['token_embedder']['embedding']`; boxed or not, sharded
  or not: gathered to every process, so all processes must call this)."""
  tree = params
  if isinstance(tree, Mapping) and EMBEDDING_PATH[0] not in tree and (
      "params" in tree):
    tree = tree["params"]  # a {'params': ...} variables dict
  where = "params"
  for key in EMBEDDING_PATH:
    if not isinstance(tree, Mapping) or key not in tree:
      keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
      raise ValueError(
          "item_vectors='token_embeddings' needs the model's input token "
          f"embedding at params['token_embedder']['embedding']; {where} has "
          f"{keys}")
    tree = tree[key]
    where += f"[{key!r}]"
  leaf = nn.meta.unbox(tree)
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    leaf = multihost_utils.process_allgather(leaf, tiled=True)
  return as_embedding(jax.device_get(leaf))
