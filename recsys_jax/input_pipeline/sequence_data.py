"""A run's view of its data: registered SeqIO task -> host-local numpy batches.

Every process yields its rows of each global batch; the trainer assembles
global arrays. Two ways to get those rows for training (`host_input`):

  * 'shard' (default, scalable): each process reads only its shard of the
    users (`seqio.ShardInfo(jax.process_index(), jax.process_count())`) and
    batches it; I/O and preprocessing split across hosts, but the example
    order (and so the trained model) depends on the number of processes.
  * 'slice': every process builds the same global stream (no shard) and keeps
    rows [i * local, (i + 1) * local) of each global batch; the run is
    identical for any process count (and resumable on a different one), at
    the price of every host reading and preprocessing all the data.

Evaluation always reads shards (every user once across hosts, padded with
`valid`); its metric sums are merged across processes. Evaluation batches do
not change during a run (no randomness), so after the first full pass over a
split they are kept in host memory (up to `eval_cache_bytes`) and periodic
evaluations skip the input pipeline.
"""

import functools
import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import seqio

from recsys_jax.data import prepared
from recsys_jax.seqio_ext import batching
from tasks import sequence_tasks

TRAIN_FEATURES = ("item_ids", "targets", "loss_weights")
PACKED_EXTRA = ("segment_ids", "positions")
EVAL_FEATURES = ("item_ids", "targets")
HOST_INPUTS = ("shard", "slice")


class SequenceData:
  """Registers the task for a prepared dataset and serves its batches."""

  def __init__(self, name: str, data_dir: str, *, max_len: int = 50,
               mask_prob: float = 0.2, max_predictions: Optional[int] = None,
               last_item_mask_prob: float = 0.1,
               sliding_window_stride: Optional[int] = None,
               train_prefixes: bool = False,
               packing: bool = False, seed: int = 0,
               host_input: str = "shard",
               eval_cache_bytes: int = 1 << 30):
    if host_input not in HOST_INPUTS:
      raise ValueError(f"SequenceData.host_input={host_input!r}: expected one "
                       f"of {HOST_INPUTS} (see the module docstring)")
    self.name, self.data_dir, self.max_len = name, data_dir, max_len
    self.packing, self.seed, self.host_input = packing, seed, host_input
    self.eval_cache_bytes = int(eval_cache_bytes)
    self._eval_cache = EvalBatchCache(eval_cache_bytes)
    sequence_tasks.register_sequence_tasks(
        name, data_dir, max_len=max_len, mask_prob=mask_prob,
        max_predictions=max_predictions,
        last_item_mask_prob=last_item_mask_prob,
        sliding_window_stride=sliding_window_stride,
        train_prefixes=train_prefixes, seed=seed, packing=packing)

  @property
  def dataset(self) -> prepared.PreparedDataset:
    return prepared.PreparedDataset(self.data_dir)

  @property
  def num_items(self) -> int:
    return self.dataset.num_items

  @staticmethod
  def shard_info() -> Optional[seqio.ShardInfo]:
    if jax.process_count() == 1:
      return None
    return seqio.ShardInfo(index=jax.process_index(),
                           num_shards=jax.process_count())

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's train batches for steps start_step, start_step+1, ..."""
    features = list(TRAIN_FEATURES + (PACKED_EXTRA if self.packing else ()))
    nproc = jax.process_count()
    if self.host_input == "shard" or nproc == 1:
      return prefetch_in_thread(batching.train_batches(
          self.name, local_batch_size, seed=self.seed,
          shard_info=self.shard_info(), start_step=start_step,
          features=features))
    # 'slice': the one-process stream of global batches, this process's rows.
    stream = batching.train_batches(
        self.name, local_batch_size * nproc, seed=self.seed, shard_info=None,
        start_step=start_step, features=features)
    lo = jax.process_index() * local_batch_size
    return prefetch_in_thread(
        {k: v[lo:lo + local_batch_size] for k, v in batch.items()}
        for batch in stream)

  def eval_batches(self, split: str, global_batch_size: int,
                   extra_features: Sequence[str] = ()
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of every eval batch (padded, with `valid`).

    `extra_features` adds source features to the model's (e.g. `user_id`,
    bytes, for predictions written per user).
    """
    local = global_batch_size // jax.process_count()
    if local * jax.process_count() != global_batch_size:
      raise ValueError(f"eval batch_size={global_batch_size} must be divisible"
                       f" by the number of processes ({jax.process_count()})")
    features = list(EVAL_FEATURES) + [
        f for f in extra_features if f not in EVAL_FEATURES]
    key = (split, global_batch_size, jax.process_index(), jax.process_count(),
           tuple(features))
    return self._eval_cache.batches(key, lambda: batching.eval_batches(
        self.name, split, local, shard_info=self.shard_info(),
        features=features))

  def train_item_counts(self) -> np.ndarray:
    """[N] interaction counts in the train split (all but the last two)."""
    return train_item_counts(self.data_dir)


_END = object()


class EvalBatchCache:
  """Evaluation batches kept in host memory after a first complete pass.

  Evaluation batches do not change during a run, so periodic evaluations
  can skip the input pipeline; a pass is kept only if it completes within
  `budget_bytes` (all splits and batch sizes together count separately).
  """

  def __init__(self, budget_bytes: int):
    self.budget_bytes = int(budget_bytes)
    self._kept: Dict[tuple, list] = {}

  def batches(self, key: tuple, read: Callable[[], Iterator[Dict[str, Any]]]
              ) -> Iterator[Dict[str, Any]]:
    """The kept batches of `key`, else `read()`'s, kept if the pass fits."""
    if key in self._kept:
      return iter(self._kept[key])
    return self._read_and_keep(key, read())

  def _read_and_keep(self, key, batches) -> Iterator[Dict[str, Any]]:
    kept, size = [], 0
    for batch in batches:
      if kept is not None:
        size += sum(np.asarray(v).nbytes for v in batch.values())
        if size <= self.budget_bytes:
          kept.append(batch)
        else:
          kept = None
      yield batch
    if kept is not None:
      self._kept[key] = kept


def prefetch_in_thread(iterator: Iterator, size: int = 16) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead.

  The train stream rebuilds its tf.data pipeline at every epoch boundary
  (deterministic per-epoch order); doing that ahead of time keeps the
  accelerator busy. Exceptions are re-raised in the consumer.
  """
  q: "queue.Queue" = queue.Queue(maxsize=size)
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.5)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  thread = threading.Thread(target=produce, daemon=True,
                            name="train-batch-prefetch")
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


@functools.lru_cache(maxsize=8)
def train_item_counts(data_dir: str) -> np.ndarray:
  """[N] interaction counts of the leave-one-out train split of a dataset."""
  ds = prepared.PreparedDataset(data_dir)
  counts = np.zeros(ds.num_items + 1, np.int64)
  for user in ds.iter_sequences():
    ids = np.asarray(user[prepared.ITEM_IDS][:-2], np.int64)
    counts += np.bincount(ids, minlength=ds.num_items + 1)
  return counts[1:]
