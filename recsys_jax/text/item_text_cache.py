"""On-disk store of frozen-encoder text encodings that training memory-maps.

A cache directory holds the encodings of N texts, row r with id r + 1 (id 0,
padding, and anything above N have no row). Which texts is `texts_kind`:
'items' (row i is item vocabulary index i + 1; [MASK] N + 1 has no row) or
'critiques' (row r is `critique_texts.critique_texts(data_dir)[r]`; the
input pipeline maps a critique string to id r + 1, "" to 0):

  tokens.npy     [N, max_text_len, d_model]  float16/float32 (optional)
  mask.npy       [N, max_text_len]           bool, True at real tokens
  token_ids.npy  [N, max_text_len]           int32, the encoder's input ids
  pooled.npy     [N, d_model]                float16/float32
  texts.json     [N] the text of each row (JSON list of strings)
  manifest.json  what built it (encoder, checkpoint/vocab/text hashes, sizes,
                 texts_kind, num_truncated) and which chunks of `chunk_size`
                 rows are complete

`num_items` in the manifest is N, the number of rows, for either kind. Caches
written before `texts_kind` and texts.json existed read as 'items' with
`texts` None.

The .npy files are created full-size up front (sparse on disk) and filled
chunk by chunk through `np.lib.format.open_memmap`; a chunk counts as done
only once its rows are flushed and the manifest, rewritten atomically, lists
it. A killed build therefore resumes by recomputing just the unlisted chunks.
"""

import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

MANIFEST = "manifest.json"
TEXTS_FILE = "texts.json"
FORMAT_VERSION = 1
TOKENS, MASK, TOKEN_IDS, POOLED = "tokens", "mask", "token_ids", "pooled"
ITEMS, CRITIQUES = "items", "critiques"
TEXTS_KINDS = (ITEMS, CRITIQUES)

# Manifest keys that must agree for a cache to be reused or resumed.
IDENTITY_KEYS = (
    "format_version", "encoder", "checkpoint_fingerprint", "vocab",
    "texts_kind", "texts_sha256", "num_items", "max_text_len", "d_model",
    "dtype", "pooling", "store_tokens", "chunk_size",
)
# What an identity key means when a manifest predates it.
_IDENTITY_DEFAULTS = {"texts_kind": ITEMS}
# The keys that must agree between an item cache and a critique cache fed to
# one model: the same frozen encoder seeing the same token ids.
COMPATIBLE_KEYS = ("encoder", "checkpoint_fingerprint", "vocab", "d_model")
_DTYPES = ("float16", "float32")


class CacheMismatchError(ValueError):
  """An existing cache was built differently (encoder, checkpoint, vocab...)."""


def identity_value(manifest: Mapping[str, Any], key: str) -> Any:
  """`manifest[key]`, with the default of keys older manifests lack."""
  return manifest.get(key, _IDENTITY_DEFAULTS.get(key))


def texts_sha256(texts: Sequence[str]) -> str:
  """sha256 over the texts, each utf-8 and NUL-terminated (order matters)."""
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()


def describe_identity(manifest: Mapping[str, Any]) -> str:
  """One line naming what built a cache, for error messages and logs.

  E.g. "critiques x240 by bert_random (random init, not pretrained), weights
  3f2a9c01d4e5, sentencepiece tokens 9b1c03aa7e21, width 64, 64 tokens/text,
  float32". (Worded apart from the manifest's key names, so a message that
  names a differing key is not confused with this description.)
  """
  vocab = manifest.get("vocab") or {}
  if isinstance(vocab, Mapping):
    vocab = f"{vocab.get('type')} tokens {str(vocab.get('sha256'))[:12]}"
  encoder = str(manifest.get("encoder"))
  if manifest.get("pretrained") is False:
    encoder += " (random init, not pretrained)"
  return (f"{identity_value(manifest, 'texts_kind')} "
          f"x{manifest.get('num_items')} by {encoder}, weights "
          f"{str(manifest.get('checkpoint_fingerprint'))[:12]}, {vocab}, "
          f"width {manifest.get('d_model')}, {manifest.get('max_text_len')} "
          f"tokens/text, {manifest.get('dtype')}")


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


def _write_json_atomic(path: str, obj: Any, **dump_kwargs):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, **(dump_kwargs or dict(indent=2, sort_keys=True)))
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
    have, want = identity_value(existing, key), identity_value(wanted, key)
    if have != want:
      diffs.append(f"{key}: cache has {have!r}, requested {want!r}")
  if diffs:
    raise CacheMismatchError(
        f"{where}: refusing to reuse a text cache built differently ("
        + "; ".join(diffs) + f") [cache: {describe_identity(existing)}]; use "
        "another --output_dir or --overwrite")


def _read_texts(path: str) -> Optional[List[str]]:
  """texts.json of cache directory `path`, or None when there is none."""
  file = os.path.join(path, TEXTS_FILE)
  try:
    with open(file, encoding="utf-8") as f:
      texts = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from e
  if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
    raise ValueError(f"{file}: expected a JSON list of strings")
  return texts


def _as_manifest(cache: Union["ItemTextCache", Mapping[str, Any]]
                 ) -> Tuple[Mapping[str, Any], str]:
  if isinstance(cache, ItemTextCache):
    return cache.manifest, os.path.join(cache.path, MANIFEST)
  return cache, "<manifest>"


def check_compatible(item_cache: Union["ItemTextCache", Mapping[str, Any]],
                     critique_cache: Union["ItemTextCache", Mapping[str, Any]]
                     ) -> None:
  """Checks that an item cache and a critique cache can feed one model.

  Both must be encodings of the same frozen encoder over the same token ids:
  `COMPATIBLE_KEYS` (encoder, checkpoint_fingerprint, vocab, d_model) agree,
  and the kinds are 'items' and 'critiques' respectively. Lengths, dtypes
  and pooling may differ.

  Args:
    item_cache: an `ItemTextCache` or its manifest dict.
    critique_cache: likewise, for the critique table.

  Raises:
    CacheMismatchError: naming both caches, every key that differs and what
      built each.
  """
  (im, ipath), (cm, cpath) = _as_manifest(item_cache), _as_manifest(
      critique_cache)
  diffs = []
  for manifest, path, kind in ((im, ipath, ITEMS), (cm, cpath, CRITIQUES)):
    if identity_value(manifest, "texts_kind") != kind:
      diffs.append(f"{path}: texts_kind "
                   f"{identity_value(manifest, 'texts_kind')!r}, expected "
                   f"{kind!r}")
  for key in COMPATIBLE_KEYS:
    if im.get(key) != cm.get(key):
      diffs.append(f"{key}: item cache has {im.get(key)!r}, critique cache "
                   f"has {cm.get(key)!r}")
  if diffs:
    raise CacheMismatchError(
        f"{ipath} and {cpath}: the item and critique text caches were not "
        "built by the same encoder (" + "; ".join(diffs) + f") [items: "
        f"{describe_identity(im)}] [critiques: {describe_identity(cm)}]; "
        "rebuild one with the other's --encoder/--checkpoint/--vocab")


class CacheWriter:
  """Creates or resumes a cache and records completed chunks.

  Args:
    path: the cache directory.
    spec: the identity keys (see IDENTITY_KEYS except format_version) plus
      any informational keys (checkpoint path, vocab path, ...).
    overwrite: discard an existing cache instead of resuming it.
    texts: the text of every row, written to texts.json (must hash to
      spec['texts_sha256'] when that is given).
  """

  def __init__(self, path: str, spec: Mapping[str, Any], *,
               overwrite: bool = False,
               texts: Optional[Sequence[str]] = None):
    self.path = path
    wanted = dict(spec, format_version=FORMAT_VERSION)
    wanted.setdefault("texts_kind", ITEMS)
    if wanted["texts_kind"] not in TEXTS_KINDS:
      raise ValueError(f"texts_kind={wanted['texts_kind']!r}; expected one of "
                       f"{TEXTS_KINDS}")
    if wanted["dtype"] not in _DTYPES:
      raise ValueError(f"dtype={wanted['dtype']!r}; expected one of {_DTYPES}")
    if texts is not None:
      texts = list(texts)
      if len(texts) != wanted["num_items"]:
        raise ValueError(f"{len(texts)} texts for num_items="
                         f"{wanted['num_items']} rows")
      if wanted.setdefault("texts_sha256", texts_sha256(texts)) != (
          texts_sha256(texts)):
        raise ValueError("texts do not hash to spec['texts_sha256']")
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
                            if k not in IDENTITY_KEYS or k not in existing})
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
      for name in (MANIFEST, TEXTS_FILE, TOKENS + ".npy", MASK + ".npy",
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
    # Also on resume: a kill before texts.json was written, or a cache built
    # before texts.json existed (same texts_sha256, so the same rows).
    if texts is not None:
      try:
        stored = _read_texts(path)
      except ValueError:  # damaged: rewritten below
        stored = None
      if stored != texts:
        # ASCII-escaped: readable under any locale's default encoding.
        _write_json_atomic(os.path.join(path, TEXTS_FILE), texts, indent=0)

  def set_info(self, **info: Any):
    """Records informational manifest keys (never identity keys)."""
    clash = sorted(set(info) & set(IDENTITY_KEYS))
    if clash:
      raise ValueError(f"set_info: {clash} are identity keys")
    self.manifest.update(info)
    _write_json_atomic(os.path.join(self.path, MANIFEST), self.manifest)

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
  """Read-only, memory-mapped view of a cache directory (items or critiques).

  Attributes:
    manifest: the manifest dict.
    texts_kind: 'items' or 'critiques' ('items' for caches predating it).
    texts: the text of each row from texts.json (read on first use), None
      for caches built before texts.json existed.
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
      have = identity_value(self.manifest, key)
      if have != value:
        raise CacheMismatchError(
            f"{mpath}: {key} is {have!r}, expected {value!r} [cache: "
            f"{describe_identity(self.manifest)}]")
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
    self._texts = None

  @property
  def texts_kind(self) -> str:
    return identity_value(self.manifest, "texts_kind")

  @property
  def texts(self) -> Optional[List[str]]:
    """Row r's text (texts.json, checked against the manifest), or None."""
    if self._texts is None:
      texts = _read_texts(self.path)
      if texts is None:
        return None
      file = os.path.join(self.path, TEXTS_FILE)
      if len(texts) != self.num_items:
        raise ValueError(f"{file}: {len(texts)} texts, manifest says "
                         f"{self.num_items} rows")
      want = self.manifest.get("texts_sha256")
      if want is not None and texts_sha256(texts) != want:
        raise ValueError(f"{file}: texts differ from those the cache was "
                         "built from (texts_sha256); rebuild with --overwrite")
      self._texts = texts
    return self._texts

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
