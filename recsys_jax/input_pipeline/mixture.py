"""Training on several tasks at once: each step's batch is one task's, by rate.

`MixtureData` serves the train stream of a list of (source, rate) entries.
At every step it draws one entry with probability rate / sum(rates) and
yields that entry's next batch, with a `task_index` feature [B] int32 (the
entry's position, 0..T-1) so a model's `loss_fn` can route the rows to the
entry's loss head (e.g. `jnp.where(batch["task_index"] == t, ...)`).

Design: batch-level mixing, not seqio.Mixture's example-level mixing.
  * Features: each task keeps its own features and shapes (a Bert4Rec cloze
    task [B, L] beside a text task's inputs/targets of other lengths).
    `seqio.Mixture` requires every task to have the same output features and
    would need all of them padded to one union; here a model simply gets one
    compiled train step per distinct batch shape.
  * Exact resume with no iterator state: which entry step s draws is a pure
    function of (seed, rates, s) (`task_schedule`), and every entry's stream
    already resumes at a batch index. Resuming at step k starts entry t at
    the number of steps before k that drew t (`task_counts`, O(k) cheap
    draws, no data read). Example-level mixing with tf.data's
    `sample_from_datasets` could only resume by replaying the pipeline or
    checkpointing tf.data iterator state.
  * Multi-host: the schedule does not depend on the process, so every host
    draws the same entry at the same step (their rows form one global batch
    of one task), and each entry's stream shards across hosts exactly as it
    does alone (SequenceData's `host_input`; TaskStream's `shard_info`).
Costs: a step's gradient comes from one task (noisier than a mixed batch;
Adam's moments average over steps), a head not drawn at a step gets no
gradient that step (weight decay still applies), and gradient accumulation's
micro-batches are all of the step's task. Rates mean relative numbers of
batches, i.e. of rows: seqio's "relative numbers of examples" when every
entry yields the same batch size (packed rows count as rows).

A registered `seqio.Mixture` (t5x-style `seqio.MixtureRegistry.add(name,
[(task, rate), ...])`) can be given instead of a list: its tasks, in
`Mixture.tasks` order (sorted by name), with `Mixture.get_rate` rates, are
the entries; rate functions and sub-mixtures are resolved by seqio.

A source must be deterministic and resumable like SequenceData: its
`train_batches(k, B)` yields exactly the batches k, k + 1, ... of its stream
from 0, endlessly. A source's pipeline starts when it is first drawn (a
one-time pause of its start-up then; rate-0 entries never start).

Evaluation (`eval_batches`, `train_item_counts`, `data_dir`, `num_items`) is
that of one entry, `eval_entry`, whose batches also carry its task_index.
"""

import itertools
import numbers
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import seqio

from recsys_jax.input_pipeline import sequence_data
from recsys_jax.seqio_ext import batching

TASK_INDEX = "task_index"
# Steps per block of schedule draws: block b of a schedule is drawn from
# SeedSequence([seed, b]), so any step range is computed without the steps
# before it (resume at step k costs k / SCHEDULE_BLOCK small draws).
SCHEDULE_BLOCK = 4096

Source = Any  # an object with train_batches(start_step, local_batch_size)
Entries = Union[str, seqio.Mixture, Sequence[Tuple[Any, float]]]


def mixing_probabilities(rates: Sequence[float],
                         names: Optional[Sequence[str]] = None) -> np.ndarray:
  """[T] float64 probabilities rate / sum(rates); ValueError on bad rates."""
  names = list(names) if names is not None else [
      f"entry {i}" for i in range(len(rates))]
  if not len(rates):
    raise ValueError("a mixture needs at least one (source, rate) entry")
  for name, rate in zip(names, rates):
    if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
        or not np.isfinite(rate) or rate < 0):
      raise ValueError(f"mixture rate of {name}: {rate!r}; expected a finite "
                       "number >= 0")
  total = float(np.sum(np.asarray(rates, np.float64)))
  if total <= 0:
    raise ValueError(f"mixture rates {dict(zip(names, rates))} are all 0; at "
                     "least one entry needs a rate > 0")
  return np.asarray(rates, np.float64) / total


def _check_seed(seed) -> int:
  if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
      or seed < 0):
    raise ValueError(f"mixture seed={seed!r}: expected an integer >= 0")
  return int(seed)


def draw_entries(probabilities: np.ndarray, u: np.ndarray) -> np.ndarray:
  """int32 entries for uniforms `u` in [0, 1): inverse CDF of the rates."""
  cdf = np.cumsum(probabilities)
  # The last entry with a positive rate ends the CDF at exactly 1, so float
  # rounding can neither pick a trailing zero-rate entry nor run past T - 1.
  cdf[np.flatnonzero(probabilities > 0)[-1]:] = 1.0
  return np.searchsorted(cdf, u, side="right").astype(np.int32)


def _draw_block(probabilities: np.ndarray, seed: int, block: int
                ) -> np.ndarray:
  """[SCHEDULE_BLOCK] int32 entries drawn for the steps of block `block`."""
  u = np.random.default_rng([seed, block]).random(SCHEDULE_BLOCK)
  return draw_entries(probabilities, u)


def task_schedule(probabilities: np.ndarray, seed: int, start: int,
                  stop: int) -> np.ndarray:
  """[stop - start] int32: the entry drawn at each step of [start, stop).

  Step s's draw depends only on (probabilities, seed, s): the same on every
  process and for any start.
  """
  seed = _check_seed(seed)
  if not 0 <= start <= stop:
    raise ValueError(f"task_schedule: need 0 <= start <= stop, got {start}, "
                     f"{stop}")
  parts = []
  for block in range(start // SCHEDULE_BLOCK, -(-stop // SCHEDULE_BLOCK)):
    lo = block * SCHEDULE_BLOCK
    draws = _draw_block(probabilities, seed, block)
    parts.append(draws[max(start - lo, 0):stop - lo])
  return (np.concatenate(parts) if parts else np.zeros((0,), np.int32))


def task_counts(probabilities: np.ndarray, seed: int, stop: int
                ) -> np.ndarray:
  """[T] int64: how many of the steps 0..stop-1 drew each entry."""
  counts = np.zeros(len(probabilities), np.int64)
  for lo in range(0, stop, SCHEDULE_BLOCK):
    hi = min(lo + SCHEDULE_BLOCK, stop)
    counts += np.bincount(task_schedule(probabilities, seed, lo, hi),
                          minlength=len(probabilities))
  return counts


class TaskStream:
  """The resumable train stream of a registered SeqIO task (no evaluation).

  For tasks without a data object of their own (e.g. the tasks of a
  registered seqio.Mixture). Each process reads its shard of the examples
  (`shard_info`, default this process's); see SequenceData for the
  process-count-independent 'slice' input.

  Args:
    task: registered task name or seqio.Task.
    seed: the stream's seed (default: the task's `default_seed`, else 0).
    features: keys kept (default: the model features the task has).
    sequence_length: SeqIO lengths (default: the task's own).
    shard_info: this process's shard; default from jax.process_index/count.
  """

  def __init__(self, task: Union[str, seqio.Task], *,
               seed: Optional[int] = None,
               features: Optional[Sequence[str]] = None,
               sequence_length: Optional[Dict[str, int]] = None,
               shard_info: Optional[seqio.ShardInfo] = None):
    if isinstance(task, str):
      if task not in seqio.TaskRegistry.names():
        raise ValueError(f"no registered SeqIO task {task!r}; registered: "
                         f"{sorted(seqio.TaskRegistry.names())}")
      task = seqio.TaskRegistry.get(task)
    self.task = task
    self.name = task.name
    self.seed = int(getattr(task, "default_seed", 0) if seed is None
                    else seed)
    self.features = list(features) if features is not None else None
    self.sequence_length = sequence_length
    self._shard_info = shard_info

  @property
  def data_dir(self) -> Optional[str]:
    """The prepared dataset of a SequenceTask (None for other tasks)."""
    return getattr(self.task, "config", {}).get("data_dir")

  def shard_info(self) -> Optional[seqio.ShardInfo]:
    if self._shard_info is not None:
      return self._shard_info
    return sequence_data.SequenceData.shard_info()

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's train batches for steps start_step, start_step+1, ..."""
    return sequence_data.prefetch_in_thread(batching.train_batches(
        self.task, local_batch_size, seed=self.seed,
        sequence_length=self.sequence_length, shard_info=self.shard_info(),
        start_step=start_step, features=self.features))


def _as_source(source) -> Source:
  if isinstance(source, (str, seqio.Task)):
    if isinstance(source, str) and source in seqio.MixtureRegistry.names():
      raise ValueError(
          f"mixture entry {source!r} is a seqio.Mixture: pass it as "
          "MixtureData's `entries` (nested mixtures are not entries)")
    return TaskStream(source)
  if not callable(getattr(source, "train_batches", None)):
    raise TypeError(f"mixture entry source {source!r}: expected a registered "
                    "task name, a seqio.Task or an object with "
                    "train_batches(start_step, local_batch_size)")
  return source


def _seqio_mixture_entries(mixture: Union[str, seqio.Mixture]
                           ) -> List[Tuple[Source, float]]:
  if isinstance(mixture, str):
    if mixture not in seqio.MixtureRegistry.names():
      raise ValueError(f"no registered seqio.Mixture {mixture!r}; registered:"
                       f" {sorted(seqio.MixtureRegistry.names())}")
    mixture = seqio.MixtureRegistry.get(mixture)
  return [(TaskStream(task), mixture.get_rate(task))
          for task in mixture.tasks]


def _check_distinct(names: Sequence[str]) -> None:
  """ValueError if two entries read the same task.

  A SequenceData registers its task under its name, replacing any task of
  that name, so two entries of one name would both read the later one.
  """
  first: Dict[str, int] = {}
  for i, name in enumerate(names):
    if name in first:
      raise ValueError(
          f"mixture entries {first[name]} and {i} are both task {name!r}: "
          "a SequenceData registers its task by name, replacing an earlier "
          "one, so give each entry its own task name")
    first[name] = i


class MixtureData:
  """Train batches drawn from several sources by rate (see module doc).

  Args:
    entries: (source, rate) pairs, where a source is a data object with
      `train_batches(start_step, local_batch_size)` (e.g. SequenceData), a
      registered task name or a seqio.Task (read through `TaskStream`);
      rates are numbers >= 0, not all 0. Or a registered seqio.Mixture (its
      name or the object), whose tasks and rates become the entries.
    seed: seed of the schedule of draws (each source keeps its own seed).
    eval_entry: index of the entry serving evaluation and `data_dir`; None
      for a train-only mixture.
    name: the mixture's name in messages (default: its sources' names).
  """

  def __init__(self, entries: Entries, *, seed: int = 0,
               eval_entry: Optional[int] = 0, name: Optional[str] = None):
    if isinstance(entries, (str, seqio.Mixture)):
      name = name or (entries if isinstance(entries, str) else entries.name)
      entries = _seqio_mixture_entries(entries)
    pairs = []
    for i, entry in enumerate(entries):
      if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise TypeError(f"mixture entry {i}: {entry!r}; expected a (source, "
                        "rate) pair")
      pairs.append((_as_source(entry[0]), entry[1]))
    self.sources: List[Source] = [source for source, _ in pairs]
    self.rates = [rate for _, rate in pairs]
    self.task_names = [str(getattr(s, "name", f"entry{i}"))
                       for i, s in enumerate(self.sources)]
    _check_distinct(self.task_names)
    self.probabilities = mixing_probabilities(
        self.rates, [f"entry {i} ({n!r})"
                     for i, n in enumerate(self.task_names)])
    self.seed = _check_seed(seed)
    if eval_entry is not None and not 0 <= eval_entry < len(self.sources):
      raise ValueError(f"MixtureData.eval_entry={eval_entry!r}: expected "
                       f"None or an entry index in [0, {len(self.sources)})")
    self.eval_entry = eval_entry
    self.name = name or "+".join(self.task_names)

  @property
  def num_tasks(self) -> int:
    return len(self.sources)

  def task_schedule(self, start: int, stop: int) -> np.ndarray:
    """[stop - start] int32 entries drawn at steps start..stop-1."""
    return task_schedule(self.probabilities, self.seed, start, stop)

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's batches for steps start_step, start_step + 1, ...

    Each is the next batch of the entry drawn at that step plus
    `task_index` [local_batch_size] int32. Equal, from step k on, to the
    batches of an uninterrupted stream started at 0.
    """
    start = int(start_step)
    if start < 0:
      raise ValueError(f"start_step={start_step}: expected >= 0")
    return self._train_batches(start, int(local_batch_size))

  def _train_batches(self, start: int, local_batch_size: int
                     ) -> Iterator[Dict[str, np.ndarray]]:
    position = task_counts(self.probabilities, self.seed, start)
    streams: Dict[int, Iterator] = {}
    try:
      for block in itertools.count(start // SCHEDULE_BLOCK):
        lo = block * SCHEDULE_BLOCK
        draws = task_schedule(self.probabilities, self.seed,
                              max(lo, start), lo + SCHEDULE_BLOCK)
        for t in draws:
          t = int(t)
          if t not in streams:  # a source's pipeline starts when first drawn
            streams[t] = iter(self.sources[t].train_batches(
                int(position[t]), local_batch_size))
          batch = next(streams[t], None)
          if batch is None:
            raise RuntimeError(
                f"mixture {self.name!r}: the train stream of entry {t} "
                f"({self.task_names[t]!r}) ended after its batch "
                f"{position[t]}; mixture sources must be endless")
          position[t] += 1
          yield self._with_task_index(batch, t, local_batch_size)
    finally:
      for stream in streams.values():
        close = getattr(stream, "close", None)
        if close is not None:
          close()

  def _with_task_index(self, batch: Dict[str, np.ndarray], t: int,
                       rows: int) -> Dict[str, np.ndarray]:
    if TASK_INDEX in batch:
      raise ValueError(f"mixture {self.name!r}: entry {t} "
                       f"({self.task_names[t]!r}) already has a "
                       f"{TASK_INDEX!r} feature")
    got = len(next(iter(batch.values())))
    if got != rows:
      raise ValueError(f"mixture {self.name!r}: entry {t} "
                       f"({self.task_names[t]!r}) gave {got} rows; expected "
                       f"the per-process batch {rows}")
    out = dict(batch)
    out[TASK_INDEX] = np.full((rows,), t, np.int32)
    return out

  # -- evaluation: that of `eval_entry` -------------------------------------

  @property
  def eval_data(self) -> Source:
    """The entry serving evaluation (`eval_entry`)."""
    if self.eval_entry is None:
      raise ValueError(f"mixture {self.name!r} has no evaluation: set "
                       "MixtureData.eval_entry to the index of an entry")
    return self.sources[self.eval_entry]

  def _eval_attr(self, attr: str):
    data = self.eval_data
    if not hasattr(data, attr):
      raise AttributeError(
          f"mixture {self.name!r}: its eval_entry {self.eval_entry} "
          f"({self.task_names[self.eval_entry]!r}, a "
          f"{type(data).__name__}) has no {attr!r}; make a data object "
          "such as SequenceData the eval entry")
    return getattr(data, attr)

  @property
  def data_dir(self) -> str:
    return self._eval_attr("data_dir")

  @property
  def num_items(self) -> int:
    return self._eval_attr("num_items")

  def train_item_counts(self) -> np.ndarray:
    return self._eval_attr("train_item_counts")()

  def eval_batches(self, split: str, global_batch_size: int
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """The eval entry's batches of `split`, with its `task_index`."""
    batches = self._eval_attr("eval_batches")(split, global_batch_size)
    t = self.eval_entry
    return (self._with_task_index(b, t, len(next(iter(b.values()))))
            for b in batches)
