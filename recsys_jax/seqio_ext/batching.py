"""Task datasets -> numpy model batches, with a resumable train position.

Our tasks already emit the model's features (docs/FEATURES.md), so no SeqIO
FeatureConverter is needed: this module selects the features, batches them,
pads the last evaluation batch and makes the train stream resumable.

Resuming (the choice made here): no iterator state is checkpointed, only
the step. The train stream is a deterministic sequence of chunks of K epochs;
chunk c is `task.get_dataset(split, shuffle=True, seed=chunk_seed(seed, c,
shard), num_epochs=K, try_in_mem_cache=False)` batched with
`drop_remainder=True`, so its order (the source reshuffles every epoch) and
its masks are fixed by (seed, c, shard). K defaults to enough epochs for
~100k examples, so small datasets do not rebuild the pipeline every few
steps. `batches(..., start_step=S)` skips whole chunks by arithmetic (their
batch count is K * examples_per_epoch // batch_size, counted once on the
source; packed tasks count each skipped chunk by running it) and then
`ds.skip`s the rest inside the chunk, so it yields exactly batches S, S + 1,
... of an uninterrupted iterator. The trainer passes the restored step.
"""

import itertools
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.seqio_ext import preprocessors
from recsys_jax.seqio_ext import sources

VALID = "valid"

MIN_CHUNK_EXAMPLES = 100_000

_MEMO: Dict[tuple, int] = {}


def _memo(key: tuple, fn) -> int:
  if key not in _MEMO:
    _MEMO[key] = fn()
  return _MEMO[key]


def _shard_key(shard_info: Optional[seqio.ShardInfo]):
  return (shard_info.index, shard_info.num_shards) if shard_info else None


def chunk_seed(seed: int, chunk: int,
               shard_info: Optional[seqio.ShardInfo] = None) -> int:
  """Well-separated 31-bit seed of one (seed, chunk, shard).

  SeqIO derives map seeds as seed, seed + 1, ...; hashing keeps chunks (and
  hosts) from sharing random streams.
  """
  shard = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
  state = np.random.SeedSequence([int(seed), int(chunk), *shard])
  return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def _default_features(element_spec, split: str) -> Sequence[str]:
  return [k for k in preprocessors.PACKED_FEATURES if k in element_spec]


def _select(ds: tf.data.Dataset, keys: Sequence[str]) -> tf.data.Dataset:
  missing = [k for k in keys if k not in ds.element_spec]
  if missing:
    raise KeyError(f"features {missing} not in the dataset; it has "
                   f"{sorted(ds.element_spec)}")
  return ds.map(lambda ex: {k: ex[k] for k in keys},
                num_parallel_calls=tf.data.AUTOTUNE)


def _pad_batch(batch: Dict[str, np.ndarray], batch_size: int
               ) -> Dict[str, np.ndarray]:
  """Pads a partial batch with zero rows; adds float32 `valid`."""
  rows = len(next(iter(batch.values())))
  out = {}
  for k, v in batch.items():
    pad = np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)
    if v.dtype == object:
      pad[...] = b""
    out[k] = np.concatenate([v, pad], 0)
  out[VALID] = (np.arange(batch_size) < rows).astype(np.float32)
  return out


def _empty_batch(spec, batch_size: int) -> Dict[str, np.ndarray]:
  out = {}
  for k, s in spec.items():
    shape = (batch_size,) + tuple(s.shape)
    if s.dtype == tf.string:
      out[k] = np.full(shape, b"", object)
    else:
      out[k] = np.zeros(shape, s.dtype.as_numpy_dtype)
  out[VALID] = np.zeros((batch_size,), np.float32)
  return out


def _get_task(task_or_name) -> Union[seqio.Task, seqio.Mixture]:
  if isinstance(task_or_name, str):
    return seqio.get_mixture_or_task(task_or_name)
  return task_or_name


def _count_batches(ds: tf.data.Dataset) -> int:
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())


def examples_per_epoch(task, split: str = "train", sequence_length=None,
                       shard_info: Optional[seqio.ShardInfo] = None) -> int:
  """Examples (rows, for packed tasks) one epoch of this shard yields.

  For our SequenceTasks without packing it is counted on the source (plus
  the window count), which is much cheaper than running the masking.
  """
  config = getattr(task, "config", None)
  source = getattr(task, "source", None)
  # Cold items shrink (or drop) train rows: count by running the task.
  if (config and not config.get("packing")
      and not config.get("num_cold_items")
      and isinstance(source, sources.PreparedSequenceSource)):
    ds = source.get_dataset(split, shuffle=False, shard_info=shard_info)
    length = preprocessors.resolve_length(sequence_length, config["max_len"])
    stride = config.get("sliding_window_stride")
    batched = preprocessors.is_batched(ds)

    def count(ex):
      ids = ex[preprocessors.ITEM_IDS]
      n = (tf.cast(ids.row_lengths(), tf.int64) if batched
           else tf.shape(ids, out_type=tf.int64)[:1])
      if split == "train" and config.get("train_prefixes"):
        per_example = tf.maximum(n - 1, 0)
      elif split == "train" and stride:
        per_example = preprocessors.window_count(n, length, stride)
      else:
        per_example = tf.ones_like(n)
      return tf.reduce_sum(per_example)
    ds = ds.map(count)
    return int(ds.reduce(np.int64(0), lambda a, b: a + b).numpy())
  ds = task.get_dataset(sequence_length=sequence_length, split=split,
                        shuffle=False, shard_info=shard_info, num_epochs=1,
                        try_in_mem_cache=False)
  return _count_batches(ds)


def train_batches(task, batch_size: int, *, split: str = "train",
                  sequence_length=None, seed: int = 0,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  start_step: int = 0, num_epochs: Optional[int] = None,
                  shuffle: bool = True, drop_remainder: bool = True,
                  features: Optional[Sequence[str]] = None,
                  epochs_per_chunk: Optional[int] = None,
                  min_chunk_examples: int = MIN_CHUNK_EXAMPLES
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """Deterministic, resumable train batches of a task (see module doc).

  Args:
    task: task name or seqio Task.
    batch_size: rows per batch of this shard.
    sequence_length: SeqIO lengths (None: the task's max_len).
    seed: the stream's seed; chunk c uses `chunk_seed(seed, c, shard_info)`.
    shard_info: this host's shard.
    start_step: index of the first batch yielded.
    num_epochs: None for an endless stream.
    shuffle, drop_remainder: as in tf.data.
    features: keys kept (default: the model features present).
    epochs_per_chunk: K epochs per `get_dataset` call; default
      ceil(min_chunk_examples / examples per epoch) so small datasets do not
      rebuild the pipeline every few steps. Must not change between a run
      and its resumption.
  """
  task = _get_task(task)
  if epochs_per_chunk is None:
    per_epoch = _memo(("examples", task.name, split, str(sequence_length),
                       _shard_key(shard_info)),
                      lambda: examples_per_epoch(task, split, sequence_length,
                                                 shard_info))
    epochs_per_chunk = max(1, -(-min_chunk_examples // max(per_epoch, 1)))
  k = int(epochs_per_chunk)
  num_chunks = None if num_epochs is None else -(-num_epochs // k)

  def chunk_epochs(c):
    return k if num_epochs is None else min(k, num_epochs - c * k)

  def chunk_ds(c):
    ds = task.get_dataset(sequence_length=sequence_length, split=split,
                          shuffle=shuffle,
                          seed=chunk_seed(seed, c, shard_info),
                          shard_info=shard_info, num_epochs=chunk_epochs(c),
                          try_in_mem_cache=False)
    keys = features or _default_features(ds.element_spec, split)
    return _select(ds, keys).batch(batch_size, drop_remainder=drop_remainder)

  first = chunk_ds(0)
  packed = preprocessors.SEGMENT_IDS in first.element_spec

  def count(c):
    """Batches of chunk c."""
    if packed:  # rows depend on the chunk's order: count them
      return _count_batches(chunk_ds(c))
    per_epoch = _memo(("examples", task.name, split, str(sequence_length),
                       _shard_key(shard_info)),
                      lambda: examples_per_epoch(task, split, sequence_length,
                                                 shard_info))
    n = chunk_epochs(c) * per_epoch
    return n // batch_size if drop_remainder else -(-n // batch_size)

  chunk, skip = 0, int(start_step)
  while skip > 0:
    if num_chunks is not None and chunk >= num_chunks:
      return
    n = count(chunk)
    if n == 0:
      raise ValueError(
          f"task {task.name!r} split {split!r} gives no batch of "
          f"{batch_size} per chunk on this shard (drop_remainder="
          f"{drop_remainder}); lower the batch size")
    if skip < n:
      break
    skip -= n
    chunk += 1
  chunks = (itertools.count(chunk) if num_chunks is None
            else range(chunk, num_chunks))
  for c in chunks:
    ds = first if c == 0 else chunk_ds(c)
    if skip:
      ds, skip = ds.skip(skip), 0
    empty = True
    for batch in ds.as_numpy_iterator():
      empty = False
      yield batch
    if empty and num_chunks is None:
      raise ValueError(
          f"task {task.name!r} split {split!r} gives no batch of "
          f"{batch_size} per chunk on this shard; lower the batch size")


def eval_batches(task_or_dataset, split: str, batch_size: int, *,
                 sequence_length=None,
                 shard_info: Optional[seqio.ShardInfo] = None,
                 features: Optional[Sequence[str]] = None,
                 equalize_shards: bool = True
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Every user once, in file order, padded to full batches with `valid`.

  The last partial batch is padded with zero rows (no target, `valid` 0).
  With `shard_info` and `equalize_shards`, every shard yields the same
  number of batches, ceil(ceil(users / num_shards) / batch_size), adding
  all-padding batches, so hosts run the same number of global steps.
  """
  num_batches = None
  if isinstance(task_or_dataset, tf.data.Dataset):
    ds = task_or_dataset
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
  else:
    task = _get_task(task_or_dataset)
    ds = task.get_dataset(sequence_length=sequence_length, split=split,
                          shuffle=False, shard_info=shard_info, num_epochs=1)
    if shard_info is not None and equalize_shards:
      users = task.num_input_examples(split)
      per_shard = -(-users // shard_info.num_shards)
      num_batches = -(-per_shard // batch_size)
  keys = features or _default_features(ds.element_spec, split)
  ds = _select(ds, keys)
  spec = ds.element_spec
  n = 0
  for batch in ds.batch(batch_size).as_numpy_iterator():
    n += 1
    yield _pad_batch(batch, batch_size)
  while num_batches is not None and n < num_batches:
    n += 1
    yield _empty_batch(spec, batch_size)


def batches(task_or_dataset: Any, split: str, batch_size: int, *,
            sequence_length=None, seed: Optional[int] = None,
            shuffle: Optional[bool] = None,
            shard_info: Optional[seqio.ShardInfo] = None,
            start_step: int = 0, num_epochs: Optional[int] = None,
            drop_remainder: Optional[bool] = None,
            features: Optional[Sequence[str]] = None,
            extra_features: Sequence[str] = (),
            epochs_per_chunk: Optional[int] = None
            ) -> Iterator[Dict[str, np.ndarray]]:
  """Numpy batch dicts of a task (name or object) or a tf.data.Dataset.

  Args:
    task_or_dataset: registered task/mixture name, a seqio Task, or a
      tf.data.Dataset of examples.
    split: 'train' -> `train_batches` semantics (infinite unless num_epochs,
      shuffled, drop_remainder, resumable at `start_step`); 'validation' /
      'test' -> `eval_batches` (one pass, padded, with `valid`).
    batch_size: rows per batch (per host).
    sequence_length: SeqIO lengths, e.g. {'item_ids': 50}; None uses the
      task's registered max_len.
    seed: train seed; None uses the task's `default_seed` (or 0).
    shuffle: train only (default True).
    shard_info: this host's shard of the users.
    start_step: first batch index to yield (train).
    num_epochs: train epochs, None = infinite.
    drop_remainder: train batches (default True); evaluation batches are
      always padded instead.
    features: keys to keep; default the model features present
      (item_ids, targets, loss_weights, segment_ids, positions).
    extra_features: further keys to keep (e.g. 'user_id').
    epochs_per_chunk: see `train_batches`.
  """
  is_train = split == "train"
  keys = None
  if features is not None or extra_features:
    keys = list(features) if features is not None else None
  if isinstance(task_or_dataset, tf.data.Dataset):
    ds = task_or_dataset
    keys = (keys or _default_features(ds.element_spec, split)) + list(
        extra_features)
    if not is_train:
      yield from eval_batches(ds, split, batch_size, shard_info=shard_info,
                              features=keys)
      return
    if shard_info is not None:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    ds = _select(ds, keys)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder
                  if drop_remainder is not None else True)
    yield from ds.skip(start_step).as_numpy_iterator()
    return
  task = _get_task(task_or_dataset)
  if extra_features:
    probe = task.get_dataset(sequence_length=sequence_length, split=split,
                             shuffle=False, num_epochs=1)
    keys = (keys or _default_features(probe.element_spec, split)) + list(
        extra_features)
  if not is_train:
    yield from eval_batches(task, split, batch_size,
                            sequence_length=sequence_length,
                            shard_info=shard_info, features=keys)
    return
  if seed is None:
    seed = getattr(task, "default_seed", 0)
  yield from train_batches(
      task, batch_size, split=split, sequence_length=sequence_length,
      seed=seed, shard_info=shard_info, start_step=start_step,
      num_epochs=num_epochs, shuffle=True if shuffle is None else shuffle,
      drop_remainder=True if drop_remainder is None else drop_remainder,
      features=keys, epochs_per_chunk=epochs_per_chunk)
