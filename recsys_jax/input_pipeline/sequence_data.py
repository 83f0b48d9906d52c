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

Critiques (`critique_texts`): batches then carry `critique_ids` [B, L] int32,
the ids of a critique text cache (`critique_ids.py`) for the dataset's
`critiques` feature, mapped on the host before eval batches are cached. In
train rows a masked position keeps its critique; in eval rows the [MASK]
position holds the target's critique (`preprocessors.eval_batch`). Packing
drops aligned features, so it is refused with critiques.

Cold items (`cold_item_fraction`): the train split loses a fixed random set
of items (`cold_items.py`); validation and test are unchanged, so cold items
appear there as targets and in histories but were never trained on.
"""

import functools
import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import seqio

from recsys_jax.data import prepared
from recsys_jax.input_pipeline import cold_items as cold_items_lib
from recsys_jax.input_pipeline import critique_ids as critique_ids_lib
from recsys_jax.seqio_ext import batching
from tasks import sequence_tasks

TRAIN_FEATURES = ("item_ids", "targets", "loss_weights")
PACKED_EXTRA = ("segment_ids", "positions")
EVAL_FEATURES = ("item_ids", "targets")
HOST_INPUTS = ("shard", "slice")
CRITIQUES = prepared.CRITIQUES
CRITIQUE_IDS = "critique_ids"


class SequenceData:
  """Registers the task for a prepared dataset and serves its batches."""

  def __init__(self, name: str, data_dir: str, *, max_len: int = 50,
               mask_prob: float = 0.2, max_predictions: Optional[int] = None,
               last_item_mask_prob: float = 0.1,
               sliding_window_stride: Optional[int] = None,
               train_prefixes: bool = False,
               packing: bool = False, seed: int = 0,
               host_input: str = "shard",
               eval_cache_bytes: int = 1 << 30,
               critique_texts: Optional[str] = None,
               cold_item_fraction: float = 0.0,
               cold_item_seed: int = 0):
    """Registers task `name` over the prepared dataset `data_dir`.

    Args:
      name, data_dir, max_len, mask_prob, max_predictions,
        last_item_mask_prob, sliding_window_stride, train_prefixes, packing,
        seed: see `tasks.sequence_tasks.register_sequence_tasks`.
      host_input: 'shard' or 'slice' (module docstring).
      eval_cache_bytes: host memory budget of kept eval batches.
      critique_texts: a critique text cache directory (its `texts.json`);
        when set, every batch carries `critique_ids` [B, L] int32 (all 0
        for a dataset without critiques). Excludes `packing`.
      cold_item_fraction: share of items removed from every train sequence
        (0 <= fraction < 1; `cold_items.py`); evaluation is unchanged.
      cold_item_seed: seed of the cold-item draw.
    """
    if host_input not in HOST_INPUTS:
      raise ValueError(f"SequenceData.host_input={host_input!r}: expected one "
                       f"of {HOST_INPUTS} (see the module docstring)")
    if critique_texts and packing:
      raise ValueError(
          "SequenceData: packing=True with critique_texts set is not "
          "supported (packed rows keep only the model features, so critiques "
          "would be lost); set packing=False")
    try:
      self.cold_item_fraction = cold_items_lib.check_fraction(
          cold_item_fraction)
    except ValueError as e:
      raise ValueError(f"SequenceData.{e}") from None
    self.cold_item_seed = int(cold_item_seed)
    self.name, self.data_dir, self.max_len = name, data_dir, max_len
    self.packing, self.seed, self.host_input = packing, seed, host_input
    self.eval_cache_bytes = int(eval_cache_bytes)
    self._eval_cache = EvalBatchCache(eval_cache_bytes)
    self.critique_texts = critique_texts or None
    self._critiques: Optional[critique_ids_lib.CritiqueIndex] = None
    self._has_critiques = False
    if self.critique_texts:
      self._critiques = critique_ids_lib.load(self.critique_texts)
      self._has_critiques = bool(self.dataset.stats.get("has_critiques"))
      if not self._has_critiques:
        print(f"SequenceData {name}: {data_dir} has no critiques "
              f"(stats.json has_critiques false); critique_ids are all 0",
              flush=True)
    cold = ()
    if self.cold_item_fraction > 0:
      cold = self.cold_items()
      print(f"SequenceData {name}: cold-item protocol, {len(cold)} of "
            f"{self.num_items} items (fraction {self.cold_item_fraction}, "
            f"seed {self.cold_item_seed}) removed from the train split; "
            "validation/test unchanged", flush=True)
    sequence_tasks.register_sequence_tasks(
        name, data_dir, max_len=max_len, mask_prob=mask_prob,
        max_predictions=max_predictions,
        last_item_mask_prob=last_item_mask_prob,
        sliding_window_stride=sliding_window_stride,
        train_prefixes=train_prefixes, seed=seed, packing=packing,
        cold_items=cold)

  def cold_items(self) -> np.ndarray:
    """Sorted ids of the items removed from training (empty when none)."""
    if self.cold_item_fraction <= 0:
      return np.zeros([0], np.int64)
    return cold_items_lib.cold_items(self.num_items, self.cold_item_fraction,
                                     self.cold_item_seed)

  def _source_features(self, features: Sequence[str]) -> list:
    """`features` plus the source feature the batch mapping needs."""
    out = list(features)
    if self._critiques is not None and self._has_critiques and (
        CRITIQUES not in out):
      out.append(CRITIQUES)
    return out

  def _with_critique_ids(self, batches: Iterator[Dict[str, np.ndarray]],
                         keep_strings: bool = False
                         ) -> Iterator[Dict[str, np.ndarray]]:
    """Adds `critique_ids` [B, L] int32 (and drops the strings unless kept)."""
    if self._critiques is None:
      yield from batches
      return
    for batch in batches:
      if self._has_critiques:
        texts = batch[CRITIQUES] if keep_strings else batch.pop(CRITIQUES)
        batch[CRITIQUE_IDS] = self._critiques.ids(texts)
      else:
        batch[CRITIQUE_IDS] = np.zeros(batch["item_ids"].shape, np.int32)
      yield batch

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
    features = self._source_features(
        TRAIN_FEATURES + (PACKED_EXTRA if self.packing else ()))
    nproc = jax.process_count()
    if self.host_input == "shard" or nproc == 1:
      return prefetch_in_thread(self._with_critique_ids(
          batching.train_batches(
              self.name, local_batch_size, seed=self.seed,
              shard_info=self.shard_info(), start_step=start_step,
              features=features)))
    # 'slice': the one-process stream of global batches, this process's rows.
    stream = batching.train_batches(
        self.name, local_batch_size * nproc, seed=self.seed, shard_info=None,
        start_step=start_step, features=features)
    lo = jax.process_index() * local_batch_size
    return prefetch_in_thread(self._with_critique_ids(
        {k: v[lo:lo + local_batch_size] for k, v in batch.items()}
        for batch in stream))

  def eval_batches(self, split: str, global_batch_size: int,
                   extra_features: Sequence[str] = ()
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of every eval batch (padded, with `valid`).

    `extra_features` adds source features to the model's (e.g. `user_id`,
    bytes, for predictions written per user). With `critique_texts` the
    batches (kept ones too) hold `critique_ids`; the `critiques` strings
    only when asked for here.
    """
    local = global_batch_size // jax.process_count()
    if local * jax.process_count() != global_batch_size:
      raise ValueError(f"eval batch_size={global_batch_size} must be divisible"
                       f" by the number of processes ({jax.process_count()})")
    features = list(EVAL_FEATURES) + [
        f for f in extra_features if f not in EVAL_FEATURES]
    keep_strings = CRITIQUES in features
    features = self._source_features(features)
    key = (split, global_batch_size, jax.process_index(), jax.process_count(),
           tuple(features))
    # Mapped before the cache: kept batches hold the ids.
    return self._eval_cache.batches(key, lambda: self._with_critique_ids(
        batching.eval_batches(self.name, split, local,
                              shard_info=self.shard_info(),
                              features=features), keep_strings))

  def train_item_counts(self) -> np.ndarray:
    """[N] interaction counts in the train split (all but the last two);
    cold items (cold-item protocol) count 0."""
    return train_item_counts(self.data_dir, self.cold_item_fraction,
                             self.cold_item_seed)


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
def train_item_counts(data_dir: str, cold_item_fraction: float = 0.0,
                      cold_item_seed: int = 0) -> np.ndarray:
  """[N] interaction counts of the leave-one-out train split of a dataset.

  Under the cold-item protocol (`cold_item_fraction` > 0, see
  `cold_items.py`) the cold items are not in the train split: they count 0.
  The result is cached and shared: do not modify it.
  """
  ds = prepared.PreparedDataset(data_dir)
  counts = np.zeros(ds.num_items + 1, np.int64)
  for user in ds.iter_sequences():
    ids = np.asarray(user[prepared.ITEM_IDS][:-2], np.int64)
    counts += np.bincount(ids, minlength=ds.num_items + 1)
  counts = counts[1:]
  if cold_item_fraction > 0:
    cold = cold_items_lib.cold_items(ds.num_items, cold_item_fraction,
                                     cold_item_seed)
    counts[cold - 1] = 0
  return counts
