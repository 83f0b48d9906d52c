"""The one prepared form every raw source is turned into, and its reader.

A prepared dataset directory holds:
  items.jsonl          one item per line in vocabulary order: {"index": 1..N,
                       "item_id", "title", "categories", "brand", "description",
                       "price", ...extra fields}
  sequences.tfrecord-SSSSS-of-NNNNN
                       one tf.train.Example per user (see SEQUENCE_FEATURES)
  stats.json           counts, length percentiles, skips, fields present
  spm.model/spm.vocab  SentencePiece model trained on item texts (optional)

Item vocabulary: index 0 is padding, 1..N are items in the saved order, N+1 is
[MASK]. Sequences store vocabulary indices, never raw ids.
"""

import dataclasses
import glob
import json
import logging
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from recsys_jax.data import bad_input

PAD_ID = 0
MIN_INTERACTIONS = 3  # leave-one-out needs >= 1 train item + validation + test
ITEMS_FILE = "items.jsonl"
STATS_FILE = "stats.json"
SEQUENCES_PREFIX = "sequences.tfrecord"
SPM_PREFIX = "spm"

# Feature keys of each per-user tf.train.Example.
USER_ID = "user_id"              # bytes
ITEM_IDS = "item_ids"            # int64 list, vocabulary indices 1..N
TIMESTAMPS = "timestamps"        # int64 list, same length (0.. if unknown)
CRITIQUES = "critiques"          # bytes list, same length; critique shown
                                 # before buying item i ("" where none)
NARRATIVE_PREFIX = "narrative/"  # bytes scalars, e.g. narrative/long_summary
PER_ITEM_PREFIX = "per_item/"    # bytes lists aligned with item_ids, e.g.
                                 # per_item/review_summary (REGEN)


@dataclasses.dataclass
class ItemMeta:
  """Metadata of one item as read from a raw source."""
  item_id: str
  title: str = ""
  categories: List[str] = dataclasses.field(default_factory=list)
  brand: str = ""
  description: str = ""
  price: Optional[float] = None
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self, index: int) -> dict:
    out = {"index": index, "item_id": self.item_id, "title": self.title,
           "categories": list(self.categories), "brand": self.brand,
           "description": self.description, "price": self.price}
    for k, v in self.extra.items():
      out.setdefault(k, v)
    return out


@dataclasses.dataclass
class UserRecord:
  """One user's time-ordered interactions as read from a raw source.

  Attributes:
    user_id: raw user id.
    item_ids: raw item ids in time order.
    timestamps: optional, same length as item_ids.
    critiques: optional, same length; the critique text before item i.
    narratives: user-level texts (REGEN summaries, reasons, endorsements).
    per_item: name -> list of texts aligned with item_ids (e.g. reviews).
    source: (path, line) where the user was read, for error messages.
  """
  user_id: str
  item_ids: List[str]
  timestamps: Optional[List[int]] = None
  critiques: Optional[List[str]] = None
  narratives: Dict[str, str] = dataclasses.field(default_factory=dict)
  per_item: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
  source: Optional[tuple] = None


def item_text(item: Mapping[str, Any]) -> str:
  """Renders an item's metadata (items.jsonl row) to one string for the LM."""
  parts = []
  if item.get("title"):
    parts.append(str(item["title"]))
  cats = item.get("categories") or []
  if cats:
    parts.append("category: " + " > ".join(str(c) for c in cats))
  if item.get("brand"):
    parts.append("brand: " + str(item["brand"]))
  if item.get("description"):
    parts.append(str(item["description"]))
  return ". ".join(parts)


def _length_stats(lengths: Sequence[int]) -> dict:
  if not len(lengths):
    return {}
  arr = np.asarray(lengths)
  out = {"min": int(arr.min()), "max": int(arr.max()),
         "mean": round(float(arr.mean()), 3)}
  for p in (25, 50, 75, 90, 95, 99):
    out[f"p{p}"] = float(np.percentile(arr, p))
  return out


def _numeric_or_first_seen(ids_first_seen: List[str]) -> List[str]:
  """Integer-looking ids keep their numeric order; others first-seen order."""
  if all(i.isdigit() for i in ids_first_seen):
    return sorted(ids_first_seen, key=int)
  return ids_first_seen


class _Progress:
  """Prints a progress line every few seconds on large inputs."""

  def __init__(self, what: str, every_s: float = 5.0):
    self.what, self.every_s = what, every_s
    self.start = self.last = time.time()
    self.n = 0

  def tick(self, n: int = 1):
    self.n += n
    now = time.time()
    if now - self.last > self.every_s:
      self.last = now
      rate = self.n / max(now - self.start, 1e-9)
      print(f"  {self.what}: {self.n:,} ({rate:,.0f}/s)", flush=True)


def _bytes_feature(values):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.Feature(bytes_list=tf.train.BytesList(
      value=[v.encode("utf-8") for v in values]))


def _int_feature(values):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def write_prepared(
    output_dir: str,
    users: Iterable[UserRecord],
    items: Optional[Mapping[str, ItemMeta]] = None,
    *,
    policy: Optional[bad_input.BadInputPolicy] = None,
    source: Optional[dict] = None,
    vocab: Optional[Sequence[str]] = None,
    min_interactions: int = MIN_INTERACTIONS,
    num_shards: int = 1,
    text_vocab_size: Optional[int] = 8000,
    extra_stats: Optional[dict] = None,
) -> dict:
  """Validates users and items and writes a prepared dataset directory.

  Args:
    output_dir: directory to write (created).
    users: the user records, any order; each sequence already time-ordered.
    items: raw item id -> metadata, or None when the source has none. When
      given, an interaction with an item missing here is reported to `policy`
      as "item_without_metadata" (skip keeps the item with empty metadata).
    policy: bad-input policy; users with fewer than `min_interactions` and
      unknown items are reported to it.
    source: description of the raw inputs, recorded in stats.json.
    vocab: fixed item order (raw ids) for index 1..N. When given, users are
      streamed (nothing held in memory) and an item outside it is reported as
      "unknown_item". When None, the vocabulary is every item of a kept user,
      in numeric order for integer ids, else first-seen order.
    min_interactions: users with fewer interactions are reported.
    num_shards: number of TFRecord shards of sequences.
    text_vocab_size: train a SentencePiece model of this size on item texts;
      None to skip.
    extra_stats: merged into stats.json (e.g. generator parameters).

  Returns:
    The stats dict written to stats.json.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  policy = policy or bad_input.BadInputPolicy("error")
  os.makedirs(output_dir, exist_ok=True)
  for old in glob.glob(os.path.join(output_dir, SEQUENCES_PREFIX + "*")):
    os.remove(old)

  def check_user(u: UserRecord) -> Optional[UserRecord]:
    path, line = u.source if u.source else ("<input>", None)
    if len(u.item_ids) < min_interactions:
      policy.report(
          "user_too_short", path, line,
          f"user {u.user_id!r} has {len(u.item_ids)} interactions; expected "
          f"at least {min_interactions} for a leave-one-out split")
      return None
    return u

  if vocab is None:
    kept, first_seen, seen = [], [], set()
    progress = _Progress("users read")
    for u in users:
      progress.tick()
      if check_user(u) is None:
        continue
      if items is not None:
        for it in u.item_ids:
          if it not in items and it not in seen:
            path, line = u.source if u.source else ("<input>", None)
            policy.report("item_without_metadata", path, line,
                          f"item {it!r} has no entry in the item metadata")
      for it in u.item_ids:
        if it not in seen:
          seen.add(it)
          first_seen.append(it)
      kept.append(u)
    vocab = _numeric_or_first_seen(first_seen)
    users = kept
    check = False
  else:
    check = True
  index = {raw: i + 1 for i, raw in enumerate(vocab)}
  num_items = len(index)
  if num_items == 0:
    raise bad_input.BadInputError(
        (source or {}).get("input", "<input>"), None,
        "no items left after reading; expected at least one user with "
        f">= {min_interactions} interactions")

  writers = [tf.io.TFRecordWriter(os.path.join(
      output_dir, f"{SEQUENCES_PREFIX}-{s:05d}-of-{num_shards:05d}"))
             for s in range(num_shards)]
  lengths, n_users, n_inter = [], 0, 0
  narrative_fields, per_item_fields, has_critiques = set(), set(), False
  progress = _Progress("users written")
  for u in users:
    if check:
      if check_user(u) is None:
        continue
      unknown = [it for it in u.item_ids if it not in index]
      if unknown:
        path, line = u.source if u.source else ("<input>", None)
        policy.report("unknown_item", path, line,
                      f"user {u.user_id!r}: item {unknown[0]!r} is not in the "
                      "item vocabulary")
        continue
    ids = [index[it] for it in u.item_ids]
    feats = {USER_ID: _bytes_feature([u.user_id]), ITEM_IDS: _int_feature(ids),
             TIMESTAMPS: _int_feature(u.timestamps if u.timestamps is not None
                                      else range(len(ids)))}
    if u.critiques is not None:
      has_critiques = True
      feats[CRITIQUES] = _bytes_feature(u.critiques)
    for name, text in u.narratives.items():
      narrative_fields.add(name)
      feats[NARRATIVE_PREFIX + name] = _bytes_feature([text])
    for name, texts in u.per_item.items():
      per_item_fields.add(name)
      feats[PER_ITEM_PREFIX + name] = _bytes_feature(texts)
    example = tf.train.Example(features=tf.train.Features(feature=feats))
    writers[n_users % num_shards].write(example.SerializeToString())
    n_users += 1
    n_inter += len(ids)
    lengths.append(len(ids))
    progress.tick()
  for w in writers:
    w.close()

  with open(os.path.join(output_dir, ITEMS_FILE), "w", encoding="utf-8") as f:
    for i, raw in enumerate(vocab):
      meta = (items or {}).get(raw) or ItemMeta(item_id=raw)
      f.write(json.dumps(meta.to_json(i + 1), ensure_ascii=False) + "\n")

  text_vocab = None
  if text_vocab_size:
    text_vocab = train_text_vocab(output_dir, text_vocab_size)

  stats = {
      "source": source or {},
      "users": n_users,
      "items": num_items,
      "interactions": n_inter,
      "vocab": {"pad": PAD_ID, "first_item": 1, "last_item": num_items,
                "mask": num_items + 1, "size": num_items + 2},
      "sequence_length": _length_stats(lengths),
      "skipped": policy.summary(),
      "num_shards": num_shards,
      "has_critiques": has_critiques,
      "narrative_fields": sorted(narrative_fields),
      "per_item_fields": sorted(per_item_fields),
      "text_vocab": text_vocab,
  }
  stats.update(extra_stats or {})
  with open(os.path.join(output_dir, STATS_FILE), "w") as f:
    json.dump(stats, f, indent=2)
  return stats


def train_text_vocab(output_dir: str, vocab_size: int) -> Optional[str]:
  """Trains a SentencePiece unigram model on item texts; returns file name."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = [item_text(it) for it in read_items(output_dir)]
  texts = [t for t in texts if t.strip()]
  if not texts:
    logging.warning("no item text in %s; no SentencePiece model trained",
                    output_dir)
    return None
  prefix = os.path.join(output_dir, SPM_PREFIX)
  # T5 conventions: pad=0, eos=1, unk=2, no bos, so seqio's vocabulary works.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=prefix,
      vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
      character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      input_sentence_size=1_000_000, shuffle_input_sentence=True,
      minloglevel=2)
  return SPM_PREFIX + ".model"


def read_items(data_dir: str) -> List[dict]:
  """Reads items.jsonl; row i has index i + 1."""
  path = os.path.join(data_dir, ITEMS_FILE)
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """Read access to a prepared dataset directory."""
  data_dir: str

  def __post_init__(self):
    if not os.path.exists(os.path.join(self.data_dir, STATS_FILE)):
      raise FileNotFoundError(
          f"{self.data_dir}: not a prepared dataset (no {STATS_FILE}); run "
          "python -m recsys_jax.data.prepare first")

  @property
  def stats(self) -> dict:
    with open(os.path.join(self.data_dir, STATS_FILE)) as f:
      return json.load(f)

  @property
  def num_items(self) -> int:
    return self.stats["items"]

  @property
  def mask_id(self) -> int:
    return self.num_items + 1

  @property
  def sequence_files(self) -> List[str]:
    return sorted(glob.glob(
        os.path.join(self.data_dir, SEQUENCES_PREFIX + "-*")))

  @property
  def text_vocab_path(self) -> Optional[str]:
    name = self.stats.get("text_vocab")
    return os.path.join(self.data_dir, name) if name else None

  def items(self) -> List[dict]:
    return read_items(self.data_dir)

  def feature_spec(self) -> dict:
    """tf.io parsing spec for the sequence Examples of this dataset."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    stats = self.stats
    spec = {USER_ID: tf.io.FixedLenFeature([], tf.string),
            ITEM_IDS: tf.io.VarLenFeature(tf.int64),
            TIMESTAMPS: tf.io.VarLenFeature(tf.int64)}
    if stats.get("has_critiques"):
      spec[CRITIQUES] = tf.io.VarLenFeature(tf.string)
    for name in stats.get("narrative_fields", []):
      spec[NARRATIVE_PREFIX + name] = tf.io.FixedLenFeature(
          [], tf.string, default_value="")
    for name in stats.get("per_item_fields", []):
      spec[PER_ITEM_PREFIX + name] = tf.io.VarLenFeature(tf.string)
    return spec

  def iter_sequences(self) -> Iterator[Dict[str, Any]]:
    """Yields each user's parsed features as numpy (for tools and tests)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = self.feature_spec()

    def parse(rec):
      parsed = tf.io.parse_single_example(rec, spec)
      return {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
              for k, v in parsed.items()}
    ds = tf.data.TFRecordDataset(self.sequence_files).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    yield from ds.as_numpy_iterator()
