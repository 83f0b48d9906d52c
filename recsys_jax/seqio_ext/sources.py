"""SeqIO data source over a prepared dataset: leave-one-out splits per user.

Splits (the leave-one-out protocol of the sequential-recommendation
literature, e.g. SASRec/Bert4Rec), for a user with items x_1..x_n:
  'train':       item_ids = x_1..x_{n-2}
  'validation':  item_ids = x_1..x_{n-2}, target = x_{n-1}
  'test':        item_ids = x_1..x_{n-1}, target = x_n

Every split has one example per user (users too short for a split are
dropped; prepared datasets keep users with >= 3 interactions, so none is).
Features aligned with `item_ids` (`timestamps`, `critiques`, `per_item/*`)
are sliced the same way; in the evaluation splits `target_critique` is the
critique shown before the held-out item ("" when the dataset has none).
`user_id` and `narrative/*` pass through unchanged.
"""

import os
from typing import Dict, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from recsys_jax.data import prepared

# The input pipeline runs on the host CPU; TensorFlow must never reserve GPU
# memory that JAX needs. This module is the first pipeline module to import TF.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialized / none
  pass

SPLITS = ("train", "validation", "test")
TARGET = "target"
TARGET_CRITIQUE = "target_critique"
# Records parsed and split per `tf.io.parse_example` call (order is
# unchanged); with `emit_batches`, the examples per emitted batch.
BATCH_SIZE = 1024
DEFAULT_PREPARE_HINT = ("python -m recsys_jax.data.prepare --format=synthetic "
                        "--output_dir={data_dir}")


def aligned_keys(keys) -> List[str]:
  """Features of a source example that are aligned with `item_ids`."""
  return [k for k in keys
          if k in (prepared.TIMESTAMPS, prepared.CRITIQUES)
          or k.startswith(prepared.PER_ITEM_PREFIX)]


def is_eval_dataset(ds: tf.data.Dataset) -> bool:
  """True for validation/test examples (they carry a held-out `target`)."""
  return TARGET in ds.element_spec


def split_batch(ex: Mapping[str, tf.Tensor], split: str
                ) -> Dict[str, tf.Tensor]:
  """Applies the leave-one-out split to a batch of parsed examples.

  `ex` holds `[B]` scalars and `[B, (n)]` ragged sequences (`item_ids` and
  the aligned features). Users too short for the split (fewer than 3 items
  for 'train', 2 otherwise) are dropped. Returns the same structure.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  ids = ex[prepared.ITEM_IDS]
  keep = ids.row_lengths() >= (3 if split == "train" else 2)
  ex = {k: (tf.ragged.boolean_mask(v, keep) if isinstance(v, tf.RaggedTensor)
            else tf.boolean_mask(v, keep)) for k, v in ex.items()}
  ids = ex[prepared.ITEM_IDS]
  end = ids.row_lengths() - (1 if split == "test" else 2)
  before_end = tf.ragged.range(ids.row_lengths()) < tf.expand_dims(end, 1)
  at_end = ids.row_starts() + end  # flat index of each row's item `end`
  out = {}
  for k, v in ex.items():
    if k == prepared.ITEM_IDS or k in aligned_keys([k]):
      out[k] = tf.ragged.boolean_mask(v, before_end)
    else:
      out[k] = v
  if split != "train":
    out[TARGET] = tf.gather(ids.values, at_end)
    if prepared.CRITIQUES in ex:
      out[TARGET_CRITIQUE] = tf.gather(ex[prepared.CRITIQUES].values, at_end)
    else:
      out[TARGET_CRITIQUE] = tf.fill(tf.shape(end), "")
  return out


class PreparedSequenceSource(seqio.DataSource):
  """Per-user leave-one-out examples read from a prepared dataset directory.

  The directory is only read at `get_dataset` / `num_input_examples` time, so
  a task can be registered before its data is prepared.
  """

  def __init__(self, data_dir: str, *, prepare_hint: Optional[str] = None,
               shuffle_buffer_size: int = 10_000, emit_batches: bool = False):
    """Creates the source.

    Args:
      data_dir: prepared dataset directory (see recsys_jax/data/prepared.py).
      prepare_hint: command shown when the directory does not exist;
        `{data_dir}` is substituted.
      shuffle_buffer_size: records shuffled at the source (per shard).
      emit_batches: yield batches of up to `BATCH_SIZE` examples (`[B]` scalars,
        `[B, (n)]` ragged sequences; the preprocessors of
        `seqio_ext.preprocessors` take them) instead of single examples.
        Same examples in the same order.
    """
    super().__init__(splits=SPLITS, num_input_examples=None,
                     caching_permitted=True)
    self._data_dir = data_dir
    self._prepare_hint = prepare_hint or DEFAULT_PREPARE_HINT
    self._shuffle_buffer_size = shuffle_buffer_size
    self._emit_batches = bool(emit_batches)

  def __str__(self):
    return f"PreparedSequenceSource({self._data_dir})"

  @property
  def data_dir(self) -> str:
    return self._data_dir

  @property
  def prepared(self) -> prepared.PreparedDataset:
    """The dataset, with a clear error when it has not been prepared yet."""
    if not os.path.exists(os.path.join(self._data_dir, prepared.STATS_FILE)):
      raise FileNotFoundError(
          f"{self._data_dir}: no prepared dataset here (missing "
          f"{prepared.STATS_FILE}). Create it first with:\n  "
          + self._prepare_hint.format(data_dir=self._data_dir))
    ds = prepared.PreparedDataset(self._data_dir)
    if not ds.sequence_files:
      raise FileNotFoundError(
          f"{self._data_dir}: {prepared.STATS_FILE} exists but no "
          f"{prepared.SEQUENCES_PREFIX}-* files; re-run the prepare step")
    return ds

  @property
  def num_items(self) -> int:
    return self.prepared.num_items

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # ds.shard over records, whatever the number of files

  def list_shards(self, split: str) -> Sequence[str]:
    return self.prepared.sequence_files

  def num_input_examples(self, split: str) -> int:
    """Users in the dataset (one example per user in every split)."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return int(self.prepared.stats["users"])

  def get_dataset(
      self,
      split: str = "train",
      shuffle: bool = True,
      seed: Optional[int] = None,
      shard_info: Optional[seqio.ShardInfo] = None,
      *,
      sequence_length: Optional[Mapping[str, int]] = None,  # unused
      use_cached: bool = False,  # unused
      num_epochs: Optional[int] = 1,  # unused
  ) -> tf.data.Dataset:
    """Leave-one-out examples of `split` (one per user of this shard).

    Single examples, or batches of them with `emit_batches`.

    Args:
      split: 'train', 'validation' or 'test'.
      shuffle: shuffle records (deterministically when `seed` is given).
      seed: shuffle seed.
      shard_info: read only users `index, index + num_shards, ...` (in file
        order); the shards are disjoint and together cover every user.
    """
    del sequence_length, use_cached, num_epochs
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data = self.prepared
    spec = data.feature_spec()
    num_items = data.num_items
    data_dir = self._data_dir
    ds = tf.data.TFRecordDataset(data.sequence_files)
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    if shuffle:
      ds = ds.shuffle(self._shuffle_buffer_size, seed=seed,
                      reshuffle_each_iteration=True)

    # Records are parsed and split a batch at a time, one op per feature for
    # the batch: tf.data's per-element cost (~25 us of CPU per stage and
    # user here) made the per-record parse, filter and split maps ~20 % of
    # the packed training pipeline's CPU (benchmarks/README.md). Order and
    # values are those of a per-record pipeline.
    def parse(records):
      ex = tf.io.parse_example(records, spec)
      out = {}
      for k, v in ex.items():
        if isinstance(v, tf.SparseTensor):
          v = tf.RaggedTensor.from_sparse(v)
        if v.dtype == tf.int64:
          v = tf.cast(v, tf.int32)
        out[k] = v
      ids = out[prepared.ITEM_IDS]

      def no_bad_user(bad, what):
        """Fails naming `what` and the first user whose `bad` is True."""
        return tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(bad)),
            [f"{data_dir}: {what}; bad user",
             tf.boolean_mask(out[prepared.USER_ID], bad)[:1]])

      checks = [no_bad_user(
          tf.reduce_any(tf.logical_or(ids < 1, ids > num_items), axis=1),
          f"item_ids must lie in 1..{num_items}")]
      checks += [no_bad_user(
          tf.not_equal(out[k].row_lengths(), ids.row_lengths()),
          f"{k} must have one entry per item of item_ids")
                 for k in aligned_keys(out)]
      with tf.control_dependencies(checks):
        out[prepared.ITEM_IDS] = tf.identity(ids)
      return out

    ds = ds.batch(BATCH_SIZE).map(
        lambda records: split_batch(parse(records), split),
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds if self._emit_batches else ds.unbatch()


class ItemVocabulary(seqio.PassThroughVocabulary):
  """Item-id vocabulary of a prepared dataset: size N + 2 (pad, items, [MASK]).

  The size is read from the dataset on first use, so tasks can be registered
  before the dataset exists.
  """

  def __init__(self, source: PreparedSequenceSource):
    seqio.Vocabulary.__init__(self)  # pylint: disable=non-parent-init-called
    self._source = source
    self._eos_id = None
    self._cached_size = None

  @property
  def _size(self) -> int:
    if self._cached_size is None:
      self._cached_size = self._source.num_items + 2
    return self._cached_size

  def __eq__(self, other):
    return (isinstance(other, ItemVocabulary)
            and other._source.data_dir == self._source.data_dir)  # pylint: disable=protected-access

  def __hash__(self):
    return hash(self._source.data_dir)

  def __str__(self) -> str:
    return f"ItemVocabulary({self._source.data_dir})"
