"""Frozen per-item embedding tables for REGEN's item soft tokens.

REGEN (Sayana et al., 2024) gives an LM a user's history as soft tokens made
from two frozen embeddings of each item:

  collaborative (CF)  `fit_als`: implicit-feedback ALS (Hu, Koren & Volinsky
                      2008; the WALS of the paper) on every user's
                      leave-one-out train part, or `cf_from_export`: the
                      item table of an exported ranking run (Bert4Rec,
                      SASRec, FLARE: item_embeddings.npy);
  semantic            `semantic_from_cache`: the pooled vectors of an
                      `embed_items` item-text cache.

`load_item_tables` builds both into an `ItemTables`: `[V, d]` float32 rows
indexed by item vocabulary id (V = N + 1; row 0 is padding), with a `[V]`
bool `missing` flag per table. A missing row (no CF vector: never in the
train split, or an all-zero exported row; no semantic vector: empty text or
all-zero pooled row) is zero; the soft-token module replaces it by a learned
vector. How many items each table misses is always logged.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from recsys_jax.data import prepared
from recsys_jax.text import item_text_cache as text_cache_lib

EXPORT_EMBEDDINGS = "item_embeddings.npy"
# Elements of one padded neighbour block `[rows, width, dim]` of the ALS
# solve (float64: 32 MiB), and rows per block at most.
_ALS_BLOCK_ELEMENTS = 1 << 22
_ALS_MAX_CHUNK_ROWS = 1024


@dataclasses.dataclass(eq=False)
class ItemTables:
  """Frozen item tables, row = item vocabulary id (row 0 = padding).

  `eq=False`: compared and hashed by identity, so a Flax module can hold it
  as an attribute.

  Attributes:
    cf: `[V, dc]` float32 collaborative embeddings (dc may be 0: absent).
    semantic: `[V, ds]` float32 text embeddings (ds may be 0: absent).
    cf_missing: `[V]` bool, True where an item has no CF vector (row 0).
    semantic_missing: `[V]` bool, likewise for the semantic table.
    cf_source: what built `cf` ('als(dim=64, ...)', an export path, '').
    semantic_source: what built `semantic` (the cache and its encoder, '').
  """
  cf: Any
  semantic: Any
  cf_missing: Any
  semantic_missing: Any
  cf_source: str = ""
  semantic_source: str = ""

  def __post_init__(self):
    shapes = {name: np.shape(getattr(self, name)) for name in (
        "cf", "semantic", "cf_missing", "semantic_missing")}
    v = shapes["cf"][0] if shapes["cf"] else None
    expect = {"cf": 2, "semantic": 2, "cf_missing": 1, "semantic_missing": 1}
    for name, shape in shapes.items():
      if len(shape) != expect[name] or shape[0] != v:
        raise ValueError(
            f"ItemTables.{name} has shape {shape}; expected "
            f"{'[V, d]' if expect[name] == 2 else '[V]'} with the same V "
            f"rows as every table (shapes: {shapes})")

  @property
  def num_rows(self) -> int:
    """V = N + 1 (items 1..N and the padding row 0)."""
    return int(np.shape(self.cf)[0])

  @property
  def cf_dim(self) -> int:
    return int(np.shape(self.cf)[1])

  @property
  def semantic_dim(self) -> int:
    return int(np.shape(self.semantic)[1])

  def identity(self) -> Dict[str, Any]:
    """JSON facts for the architecture record: sources, sizes, missing."""
    return {"cf_source": self.cf_source,
            "semantic_source": self.semantic_source,
            "num_items": self.num_rows - 1, "cf_dim": self.cf_dim,
            "semantic_dim": self.semantic_dim,
            "cf_missing": int(np.sum(np.asarray(self.cf_missing)[1:])),
            "semantic_missing": int(np.sum(
                np.asarray(self.semantic_missing)[1:]))}

  def device(self) -> "ItemTables":
    """The same tables as (uncommitted) device arrays."""
    return dataclasses.replace(
        self, cf=jnp.asarray(self.cf, jnp.float32),
        semantic=jnp.asarray(self.semantic, jnp.float32),
        cf_missing=jnp.asarray(self.cf_missing, bool),
        semantic_missing=jnp.asarray(self.semantic_missing, bool))


# -- the train split -----------------------------------------------------------


def read_train_interactions(data_dir: str
                            ) -> Tuple[np.ndarray, np.ndarray, int]:
  """Every user's leave-one-out train part as flat interaction arrays.

  The train part of a sequence is all but its last two items (the
  validation and test targets), as `seqio_ext.sources.split_batch` cuts it;
  users with fewer than three items contribute nothing.

  Returns:
    (users `[M]` int64 (dense user index 0..U-1 in file order, users with a
    train part only), items `[M]` int64 vocabulary ids 1..N, N).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = prepared.PreparedDataset(data_dir)
  files = ds.sequence_files
  if not files:
    raise FileNotFoundError(f"{data_dir}: no {prepared.SEQUENCES_PREFIX}-* "
                            "files")
  spec = {prepared.ITEM_IDS: tf.io.VarLenFeature(tf.int64)}
  users, items = [], []
  offset = 0
  # Batched parsing: ~20x faster than one example at a time.
  def parse(records):
    ids = tf.RaggedTensor.from_sparse(
        tf.io.parse_example(records, spec)[prepared.ITEM_IDS])
    return ids.flat_values, ids.row_lengths()

  batches = tf.data.TFRecordDataset(files).batch(4096).map(parse)
  for values, lengths in batches.as_numpy_iterator():
    lengths = np.asarray(lengths, np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    col = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths,
                                          lengths)
    keep = col < lengths[row] - 2
    has_train = lengths > 2
    dense_user = np.cumsum(has_train) - 1 + offset
    users.append(dense_user[row[keep]])
    items.append(np.asarray(values, np.int64)[keep])
    offset += int(np.sum(has_train))
  users = np.concatenate(users) if users else np.zeros(0, np.int64)
  items = np.concatenate(items) if items else np.zeros(0, np.int64)
  n_items = ds.num_items
  bad = (items < 1) | (items > n_items)
  if np.any(bad):
    raise ValueError(f"{data_dir}: item ids {np.unique(items[bad])[:5]} "
                     f"outside 1..{n_items} (stats.json items)")
  return users, items, n_items


# -- implicit ALS --------------------------------------------------------------


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
         num_rows: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(indptr `[R + 1]`, indices, data) of a sparse matrix, by hand."""
  order = np.argsort(rows, kind="stable")
  indptr = np.zeros(num_rows + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
  return indptr, cols[order], values[order]


def _chunks(degree: np.ndarray, dim: int):
  """Runs of rows (sorted by ascending degree) whose padded neighbour block
  `[rows, max degree, dim]` stays under `_ALS_BLOCK_ELEMENTS`."""
  n = len(degree)
  start = 0
  while start < n:
    end = min(n, start + _ALS_MAX_CHUNK_ROWS)
    while end - start > 1 and (end - start) * max(degree[end - 1], 1) * dim > (
        _ALS_BLOCK_ELEMENTS):
      end = start + max(1, _ALS_BLOCK_ELEMENTS // (
          max(degree[end - 1], 1) * dim))
    yield start, end
    start = end


def _solve_side(csr, other: np.ndarray, regularization: float
                ) -> np.ndarray:
  """One ALS half-step: the least-squares rows given the other side.

  Row u solves A_u x_u = F^T C_u p_u with A_u = B + G_u^T W_u G_u, where
  B = F^T F + reg I is shared by all rows (the YtY trick), G_u `[L, d]` holds
  the rows of F that u interacted with, W_u = diag(c_u - 1) and
  F^T C_u p_u = G_u^T c_u. Rows with L >= d solve the d x d system; rows
  with fewer interactions (most users) use the Woodbury identity, which
  gives the same solution from an L x L system:

    x_u = H_u^T s_u,  H_u = G_u B^-1,  (I + W_u G_u H_u^T) s_u = c_u.

  Rows without interactions get 0.
  """
  indptr, indices, conf = csr
  num_rows = len(indptr) - 1
  dim = other.shape[1]
  out = np.zeros((num_rows, dim), other.dtype)
  degree = np.diff(indptr)
  active = np.nonzero(degree)[0]
  active = active[np.argsort(degree[active], kind="stable")]
  base = other.T @ other + regularization * np.eye(dim, dtype=other.dtype)
  base_inv = np.linalg.inv(base)
  for start, end in _chunks(degree[active], dim):
    rows = active[start:end]
    lengths = degree[rows]
    width = int(lengths.max())
    pos = np.arange(width)
    valid = pos[None, :] < lengths[:, None]
    flat = np.where(valid, indptr[rows][:, None] + pos[None, :], 0)
    g = other[np.where(valid, indices[flat], 0)]        # [n, L, d]
    c = np.where(valid, conf[flat], 0.0)                # [n, L], 0 at padding
    w = c - valid                                        # c - 1, 0 at padding
    # NumPy's stacked matmul of small matrices is ~20x slower than einsum
    # or a loop of 2-D matmuls here; both are used instead.
    if width < dim:
      h = (g.reshape(-1, dim) @ base_inv).reshape(g.shape)     # [n, L, d]
      k = np.einsum("nld,nmd->nlm", h, g)                       # [n, L, L]
      lhs = np.eye(width) + w[:, :, None] * k
      s = np.linalg.solve(lhs, c[..., None])[..., 0]            # [n, L]
      out[rows] = np.einsum("nld,nl->nd", h, s)
    else:
      gw = g * w[..., None]
      a = np.stack([base + gw[j].T @ g[j] for j in range(len(rows))])
      b = np.einsum("nl,nld->nd", c, g)
      out[rows] = np.linalg.solve(a, b[..., None])[..., 0]
  return out


def als_factors(users: np.ndarray, items: np.ndarray, num_users: int,
                num_items: int, *, dim: int = 64,
                regularization: float = 0.1, alpha: float = 10.0,
                iterations: int = 10, seed: int = 0,
                item_init: Optional[np.ndarray] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
  """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) on interaction pairs.

  Minimises sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2) over
  all user-item pairs, with p_ui = 1 where u interacted with i (count
  n_ui > 0), else 0, and confidence c_ui = 1 + alpha n_ui. Each iteration
  solves every user row, then every item row, in closed form (float64).

  Args:
    users: `[M]` user index per interaction (0..num_users-1); repeats count.
    items: `[M]` item index per interaction (0..num_items-1).
    num_users, num_items: row counts of the two factor tables.
    dim, regularization, alpha, iterations: as above.
    seed: seeds the item factors' N(0, 1/dim) initialisation.
    item_init: `[num_items, dim]` initial item factors instead.

  Returns:
    (user factors `[num_users, dim]`, item factors `[num_items, dim]`),
    float64; rows without interactions are 0 (after one iteration).
  """
  if dim < 1 or iterations < 0 or regularization <= 0 or alpha < 0:
    raise ValueError(f"ALS needs dim >= 1, iterations >= 0, regularization "
                     f"> 0, alpha >= 0; got dim={dim}, iterations="
                     f"{iterations}, regularization={regularization}, "
                     f"alpha={alpha}")
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  key, counts = np.unique(users * num_items + items, return_counts=True)
  u, i = key // num_items, key % num_items
  conf = 1.0 + alpha * counts.astype(np.float64)
  by_user = _csr(u, i, conf, num_users)
  by_item = _csr(i, u, conf, num_items)
  if item_init is None:
    rng = np.random.default_rng(seed)
    y = rng.normal(scale=1.0 / np.sqrt(dim), size=(num_items, dim))
  else:
    y = np.array(item_init, np.float64)
    if y.shape != (num_items, dim):
      raise ValueError(f"item_init shape {y.shape}; expected "
                       f"{(num_items, dim)}")
  x = np.zeros((num_users, dim))
  for _ in range(iterations):
    x = _solve_side(by_user, y, regularization)
    y = _solve_side(by_item, x, regularization)
  return x, y


def fit_als(data_dir: str, *, dim: int = 64, regularization: float = 0.1,
            alpha: float = 10.0, iterations: int = 10, seed: int = 0
            ) -> Tuple[np.ndarray, np.ndarray]:
  """CF item embeddings by implicit ALS on the leave-one-out train split.

  Validation and test targets (each sequence's last two items) are never
  fit; an item that occurs only there (or nowhere) is missing.

  Args:
    data_dir: a prepared dataset directory.
    dim, regularization, alpha, iterations, seed: see `als_factors`.

  Returns:
    (table `[N + 1, dim]` float32, row = item vocabulary id, missing rows
    and row 0 zero; missing `[N + 1]` bool, row 0 True).
  """
  users, items, num_items = read_train_interactions(data_dir)
  num_users = int(users.max()) + 1 if len(users) else 0
  start = time.time()
  _, y = als_factors(users, items, num_users, num_items + 1, dim=dim,
                     regularization=regularization, alpha=alpha,
                     iterations=iterations, seed=seed)
  missing = np.bincount(items, minlength=num_items + 1) == 0
  table = np.where(missing[:, None], 0.0, y).astype(np.float32)
  logging.info("ALS: %d users x %d items, %d interactions, dim %d, %d "
               "iterations: %.1fs", num_users, num_items, len(items), dim,
               iterations, time.time() - start)
  return table, missing


# -- tables from files ---------------------------------------------------------


def cf_from_export(path: str, num_items: int
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """CF item embeddings of an exported ranking run.

  Args:
    path: an export directory holding item_embeddings.npy, or a .npy file
      of `[N, E]` rows for items 1..N.
    num_items: N, the dataset's items.

  Returns:
    (table `[N + 1, E]` float32 with a zero row 0, missing `[N + 1]` bool:
    row 0 and all-zero rows).
  """
  file = path
  if os.path.isdir(path):
    file = os.path.join(path, EXPORT_EMBEDDINGS)
  if not os.path.exists(file):
    raise FileNotFoundError(
        f"{file}: no item embeddings here; pass an export directory "
        f"(python -m recsys_jax.export writes {EXPORT_EMBEDDINGS}) or a .npy "
        "file")
  emb = np.load(file, allow_pickle=False)
  if emb.ndim != 2 or emb.shape[0] != num_items:
    raise ValueError(f"{file}: shape {emb.shape}; expected [{num_items}, E] "
                     f"(one row per item 1..{num_items} of the dataset)")
  if not np.all(np.isfinite(emb)):
    raise ValueError(f"{file}: {int(np.sum(~np.isfinite(emb)))} non-finite "
                     "values")
  table = np.zeros((num_items + 1, emb.shape[1]), np.float32)
  table[1:] = emb
  missing = ~np.any(table != 0, axis=1)
  return table, missing


def semantic_from_cache(cache_dir: str, num_items: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
  """Semantic item embeddings: the pooled vectors of an item-text cache.

  Args:
    cache_dir: an `embed_items --texts=items` cache of this dataset.
    num_items: N, the dataset's items (the cache must have N rows).

  Returns:
    (table `[N + 1, D]` float32 with a zero row 0, missing `[N + 1]` bool:
    row 0, items whose text is empty (texts.json, when present) and items
    whose pooled vector is all zero; their rows are zero).
  """
  cache = text_cache_lib.ItemTextCache(cache_dir)
  manifest = os.path.join(cache_dir, text_cache_lib.MANIFEST)
  if cache.texts_kind != text_cache_lib.ITEMS:
    raise text_cache_lib.CacheMismatchError(
        f"{manifest}: texts_kind {cache.texts_kind!r}; the "
        "semantic table needs an item cache (embed_items --texts=items)")
  if cache.num_items != num_items:
    raise text_cache_lib.CacheMismatchError(
        f"{manifest}: the cache has {cache.num_items} item rows, the dataset "
        f"has {num_items} items; build the cache for this dataset "
        "(python -m recsys_jax.embed_items --data_dir=...)")
  table = np.zeros((num_items + 1, cache.d_model), np.float32)
  table[1:] = np.asarray(cache.pooled, np.float32)
  if not np.all(np.isfinite(table)):
    raise ValueError(f"{os.path.join(cache_dir, 'pooled.npy')}: non-finite "
                     "values")
  missing = ~np.any(table != 0, axis=1)
  texts = cache.texts
  if texts is not None:
    missing[1:] |= np.array([not t.strip() for t in texts], bool)
  table[missing] = 0.0
  return table, missing


def _describe_cache(cache_dir: str) -> str:
  try:
    return (f"{cache_dir} [" + text_cache_lib.describe_identity(
        text_cache_lib.read_manifest(cache_dir)) + "]")
  except (OSError, ValueError, json.JSONDecodeError):
    return cache_dir


def load_item_tables(data_dir: str, *, cf: Optional[str] = "als",
                     item_text_cache: Optional[str] = None,
                     cf_dim: int = 64, als_iterations: int = 10,
                     als_regularization: float = 0.1, als_alpha: float = 10.0,
                     seed: int = 0, export_untrained_missing: bool = True
                     ) -> ItemTables:
  """Builds the CF and semantic tables of REGEN's item soft tokens.

  Args:
    data_dir: the prepared dataset (its N items and train split).
    cf: 'als' (fit here, `fit_als`), an export directory or .npy file
      (`cf_from_export`), or None (no CF table: `[V, 0]`).
    item_text_cache: an item-text cache directory for the semantic table,
      or None (no semantic table: `[V, 0]`).
    cf_dim, als_iterations, als_regularization, als_alpha, seed: the ALS
      fit ('als' only).
    export_untrained_missing: with an exported CF table, also mark items
      that never occur in the train split as missing (their rows are still
      their initialisation).

  Returns:
    The `ItemTables`; how many items each table misses is logged.
  """
  num_items = prepared.PreparedDataset(data_dir).num_items
  v = num_items + 1
  if cf is None:
    cf_table, cf_missing, cf_source = (np.zeros((v, 0), np.float32),
                                       np.ones(v, bool), "")
  elif cf == "als":
    cf_table, cf_missing = fit_als(
        data_dir, dim=cf_dim, regularization=als_regularization,
        alpha=als_alpha, iterations=als_iterations, seed=seed)
    cf_source = (f"als(dim={cf_dim}, iterations={als_iterations}, "
                 f"regularization={als_regularization}, alpha={als_alpha}, "
                 f"seed={seed})")
  else:
    cf_table, cf_missing = cf_from_export(cf, num_items)
    cf_source = os.path.abspath(cf)
    if export_untrained_missing:
      _, items, _ = read_train_interactions(data_dir)
      untrained = np.bincount(items, minlength=v) == 0
      logging.info("CF table %s: %d items never in the train split marked "
                   "missing", cf, int(np.sum(untrained[1:] & ~cf_missing[1:])))
      cf_missing = cf_missing | untrained
      cf_table[cf_missing] = 0.0
  if item_text_cache is None:
    sem_table, sem_missing, sem_source = (np.zeros((v, 0), np.float32),
                                          np.ones(v, bool), "")
  else:
    sem_table, sem_missing = semantic_from_cache(item_text_cache, num_items)
    sem_source = _describe_cache(item_text_cache)
  tables = ItemTables(cf=cf_table, semantic=sem_table, cf_missing=cf_missing,
                      semantic_missing=sem_missing, cf_source=cf_source,
                      semantic_source=sem_source)
  for name, table, missing, source in (
      ("CF", cf_table, cf_missing, cf_source),
      ("semantic", sem_table, sem_missing, sem_source)):
    if table.shape[1]:
      logging.info("item tables: %s %s from %s: %d of %d items missing "
                   "(learned missing vector)", name, table.shape, source,
                   int(np.sum(missing[1:])), num_items)
      # Also on stderr: a run's log should show it without absl verbosity.
      print(f"item tables: {name} {table.shape[1]}-d from {source}: "
            f"{int(np.sum(missing[1:]))} of {num_items} items missing",
            file=sys.stderr, flush=True)
  return tables
