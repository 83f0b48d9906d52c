"""On-disk store of item-text encodings that training memory-maps.

A cache directory holds, for the N items of a prepared dataset (row i is item
vocabulary index i + 1; padding 0 and [MASK] N + 1 have no row):

  tokens.npy     [N, max_text_len, d_model]  float16/float32 (optional)
  mask.npy       [N, max_text_len]           bool, True at real tokens
  token_ids.npy  [N, max_text_len]           int32, the encoder's input ids
  pooled.npy     [N, d_model]                float16/float32
  manifest.json  what built it (encoder, checkpoint/vocab/text hashes, sizes)
                 and which chunks of `chunk_size` rows are complete

The .npy files are created full-size up front (sparse on disk) and filled
chunk by chunk through `np.lib.format.open_memmap`; a chunk counts as done
only once its rows are flushed and the manifest, rewritten atomically, lists
it. A killed build therefore resumes by recomputing just the unlisted chunks.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENS, MASK, TOKEN_IDS, POOLED = "tokens", "mask", "token_ids", "pooled"

# Manifest keys that must agree for a cache to be reused or resumed.
IDENTITY_KEYS = (
    "format_version", "encoder", "checkpoint_fingerprint", "vocab",
    "texts_sha256", "num_items", "max_text_len", "d_model", "dtype",
    "pooling", "store_tokens", "chunk_size",
)
_DTYPES = ("float16", "float32")


class CacheMismatchError(ValueError):
  """An existing cache was built differently (encoder, checkpoint, vocab...)."""


def _array_specs(m: Mapping[str, Any]) -> Dict[str, Tuple[tuple, str]]:
  n, l, d = m["num_items"], m["max_text_len"], m["d_model"]
  specs = {MASK: ((n, l), "bool"), TOKEN_IDS: ((n, l), "int32"),
           POOLED: ((n, d), m["dtype"])}
  if m["store_tokens"]:
    specs[TOKENS] = ((n, l, d), m["dtype"])
  return specs


def bytes_per_item(max_text_len: int, d_model: int, dtype: str,
                   store_tokens: bool = True) -> int:
  """Disk bytes one item takes in the cache (all arrays)."""
  size = np.dtype(dtype).itemsize
  out = max_text_len * 1 + max_text_len * 4 + d_model * size
  if store_tokens:
    out += max_text_len * d_model * size
  return out


def _write_json_atomic(path: str, obj: Any):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(path: str) -> dict:
  """The manifest of cache directory `path`; errors name the file."""
  mpath = os.path.join(path, MANIFEST)
  try:
    with open(mpath) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{mpath}: no item-text cache here; build one with "
        "python -m recsys_jax.embed_items") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{mpath}:{e.lineno}: invalid JSON ({e.msg})") from e


def check_identity(existing: Mapping[str, Any], wanted: Mapping[str, Any],
                   where: str):
  """Raises CacheMismatchError naming every identity key that differs."""
  diffs = []
  for key in IDENTITY_KEYS:
    if existing.get(key) != wanted.get(key):
      diffs.append(f"{key}: cache has {existing.get(key)!r}, requested "
                   f"{wanted.get(key)!r}")
  if diffs:
    raise CacheMismatchError(
        f"{where}: refusing to reuse an item-text cache built differently ("
        + "; ".join(diffs) + "); use another --output_dir or --overwrite")


class CacheWriter:
  """Creates or resumes a cache and records completed chunks.

  Args:
    path: the cache directory.
    spec: the identity keys (see IDENTITY_KEYS except format_version) plus
      any informational keys (checkpoint path, vocab path, ...).
    overwrite: discard an existing cache instead of resuming it.
  """

  def __init__(self, path: str, spec: Mapping[str, Any], *,
               overwrite: bool = False):
    self.path = path
    wanted = dict(spec, format_version=FORMAT_VERSION)
    if wanted["dtype"] not in _DTYPES:
      raise ValueError(f"dtype={wanted['dtype']!r}; expected one of {_DTYPES}")
    if wanted["chunk_size"] < 1 or wanted["num_items"] < 1:
      raise ValueError("chunk_size and num_items must be positive; got "
                       f"{wanted['chunk_size']}, {wanted['num_items']}")
    os.makedirs(path, exist_ok=True)
    mpath = os.path.join(path, MANIFEST)
    specs = _array_specs(wanted)
    if os.path.exists(mpath) and not overwrite:
      existing = read_manifest(path)
      check_identity(existing, wanted, mpath)
      self.manifest = existing
      self.manifest.update({k: v for k, v in wanted.items()
                            if k not in IDENTITY_KEYS})
      self.arrays = {}
      for name, (shape, dtype) in specs.items():
        file = os.path.join(path, name + ".npy")
        try:
          arr = np.load(file, mmap_mode="r+")
        except FileNotFoundError as e:
          raise CacheMismatchError(
              f"{mpath}: lists {name}.npy but {file} is missing; rebuild with "
              "--overwrite") from e
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
          raise CacheMismatchError(
              f"{file}: shape {arr.shape} {arr.dtype}, expected {shape} "
              f"{dtype}; rebuild with --overwrite")
        self.arrays[name] = arr
    else:
      # The manifest goes first: a crash while the arrays are recreated
      # then leaves no manifest claiming stale chunks.
      for name in (MANIFEST, TOKENS + ".npy", MASK + ".npy",
                   TOKEN_IDS + ".npy", POOLED + ".npy"):
        if os.path.exists(os.path.join(path, name)):
          os.remove(os.path.join(path, name))
      self.manifest = dict(wanted, completed_chunks=[], complete=False)
      self.arrays = {
          name: np.lib.format.open_memmap(
              os.path.join(path, name + ".npy"), mode="w+",
              dtype=np.dtype(dtype), shape=shape)
          for name, (shape, dtype) in specs.items()}
      _write_json_atomic(mpath, self.manifest)

  @property
  def num_chunks(self) -> int:
    m = self.manifest
    return -(-m["num_items"] // m["chunk_size"])

  def chunk_rows(self, chunk: int) -> Tuple[int, int]:
    size = self.manifest["chunk_size"]
    return chunk * size, min((chunk + 1) * size, self.manifest["num_items"])

  def pending_chunks(self) -> List[int]:
    done = set(self.manifest["completed_chunks"])
    return [c for c in range(self.num_chunks) if c not in done]

  def write_chunk(self, chunk: int, arrays: Mapping[str, np.ndarray]):
    """Stores one chunk's rows, flushes them, then marks the chunk done."""
    start, stop = self.chunk_rows(chunk)
    for name, arr in self.arrays.items():
      value = arrays[name]
      if value.shape[0] != stop - start:
        raise ValueError(f"chunk {chunk} {name}: {value.shape[0]} rows, "
                         f"expected {stop - start}")
      arr[start:stop] = value
      arr.flush()
    done = set(self.manifest["completed_chunks"]) | {chunk}
    self.manifest["completed_chunks"] = sorted(done)
    self.manifest["complete"] = len(done) == self.num_chunks
    _write_json_atomic(os.path.join(self.path, MANIFEST), self.manifest)


class ItemTextCache:
  """Read-only, memory-mapped view of a cache directory.

  Attributes:
    manifest: the manifest dict.
    tokens: `[N, L, D]` memmap, or None when built without token encodings.
    mask: `[N, L]` bool memmap.
    token_ids: `[N, L]` int32 memmap.
    pooled: `[N, D]` memmap.
  """

  def __init__(self, path: str, *, require_complete: bool = True,
               expect: Optional[Mapping[str, Any]] = None):
    """Opens `path`.

    Args:
      path: the cache directory.
      require_complete: raise if some chunks were never written.
      expect: identity values the caller relies on (e.g. {'encoder': 'bert',
        'num_items': 12101}); any difference raises CacheMismatchError.
    """
    self.path = path
    self.manifest = read_manifest(path)
    mpath = os.path.join(path, MANIFEST)
    if require_complete and not self.manifest.get("complete"):
      n = -(-self.manifest["num_items"] // self.manifest["chunk_size"])
      missing = sorted(set(range(n)) - set(self.manifest["completed_chunks"]))
      raise ValueError(f"{mpath}: cache incomplete, chunks {missing[:10]} "
                       "not written; rerun embed_items to resume")
    for key, value in (expect or {}).items():
      if self.manifest.get(key) != value:
        raise CacheMismatchError(f"{mpath}: {key} is "
                                 f"{self.manifest.get(key)!r}, expected "
                                 f"{value!r}")
    specs = _array_specs(self.manifest)
    loaded = {}
    for name, (shape, dtype) in specs.items():
      file = os.path.join(path, name + ".npy")
      arr = np.load(file, mmap_mode="r")
      if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{file}: shape {arr.shape} {arr.dtype}, manifest "
                         f"says {shape} {dtype}")
      loaded[name] = arr
    self.tokens = loaded.get(TOKENS)
    self.mask = loaded[MASK]
    self.token_ids = loaded[TOKEN_IDS]
    self.pooled = loaded[POOLED]

  @property
  def num_items(self) -> int:
    return self.manifest["num_items"]

  @property
  def d_model(self) -> int:
    return self.manifest["d_model"]

  @property
  def max_text_len(self) -> int:
    return self.manifest["max_text_len"]

  def rows(self, item_ids: Sequence[int]) -> np.ndarray:
    """Vocabulary indices -> cache rows (index - 1); pad/[MASK] -> -1."""
    ids = np.asarray(item_ids)
    return np.where((ids >= 1) & (ids <= self.num_items), ids - 1, -1)

  def lookup(self, item_ids: Sequence[int], name: str = POOLED) -> np.ndarray:
    """Gathers array `name` for vocabulary indices; pad/[MASK] give zeros."""
    arr = getattr(self, name)
    if arr is None:
      raise ValueError(f"{self.path}: built without {name}")
    rows = self.rows(item_ids)
    out = np.asarray(arr[np.maximum(rows, 0).reshape(-1)])
    out = out.reshape(rows.shape + arr.shape[1:])
    out[rows < 0] = 0
    return out
