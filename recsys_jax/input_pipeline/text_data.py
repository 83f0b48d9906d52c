"""A run's text data: a registered text task -> host-local T5 batches.

The text-to-text counterpart of `sequence_data.SequenceData`, with the same
interface for the runs: `train_batches(start_step, local_batch_size)` (a
deterministic, resumable stream: `seqio_ext.batching.train_batches`
over the task seen through seqio's `EncDecFeatureConverter`, pack=False) and
`eval_batches(split, global_batch_size)` (every example once, in order, padded
with `valid`, the same number of batches on every process).

Batches hold the converter's features, `[B, L]` / `[B, T]`:
  encoder_input_tokens, decoder_input_tokens (targets shifted right, start
  id 0), decoder_target_tokens, decoder_loss_weights (int32, 1 = target);
evaluation batches add `valid` `[B]` float32 and, for references and
predict outputs, `inputs_pretokenized` / `targets_pretokenized` (bytes
objects) and `item_index` (int32, the target item). `model_inputs(batch)`
keeps the numeric features a jitted model function takes.

A task may carry further int32 features that pass through to the model
(`ConvertedTask(passthrough={name: length})`, seqio's own
`passthrough_features`: padded with 0 to `length`; a longer feature fails
seqio's length check), e.g. the `history_items` `[B, H]` and `next_item`
`[B, 1]` of the narrative tasks (`narrative_data.NarrativeData`, a subclass
through `_register`, `passthrough_lengths` and `text_features`).
"""

import functools
from typing import Dict, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.data import prepared
from recsys_jax.input_pipeline import sequence_data
from recsys_jax.seqio_ext import batching
from tasks import text_tasks

MODEL_FEATURES = tuple(seqio.EncDecFeatureConverter.MODEL_FEATURES)
TEXT_FEATURES = ("inputs_pretokenized", "targets_pretokenized",
                 text_tasks.ITEM_INDEX)
VALID = batching.VALID


def model_inputs(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The numeric model features of a batch (no strings, no `valid`)."""
  return {k: v for k, v in batch.items()
          if k != VALID and np.asarray(v).dtype != object}


class ConvertedTask:
  """A text task seen through `seqio.EncDecFeatureConverter(pack=False)`.

  Duck-types the part of `seqio.Task` that `batching.train_batches`
  uses (`name`, `config`, `get_dataset`), so the text stream gets the same
  chunked, resumable order as the sequence tasks.

  Args:
    task: the registered text task.
    lengths: `{'inputs': L, 'targets': T}`.
    passthrough: int32 rank-1 task features kept as model features under
      their own name, with their length (padded with 0; longer fails
      seqio's length check): seqio's `passthrough_features`.
    text_features: string (and other) features `eval_dataset` keeps beside
      the model features, where the task has them.
  """

  def __init__(self, task: seqio.Task, lengths: Mapping[str, int],
               passthrough: Optional[Mapping[str, int]] = None,
               text_features: Sequence[str] = TEXT_FEATURES):
    self.task = task
    self.passthrough = {k: int(v) for k, v in (passthrough or {}).items()}
    clash = [k for k in self.passthrough if k in ("inputs", "targets")]
    if clash:
      raise ValueError(f"passthrough features {clash} clash with the "
                       "encoder-decoder task features inputs / targets")
    self.lengths = dict(lengths)
    self.lengths.update(self.passthrough)
    self.text_features = tuple(text_features)
    self.config = dict(getattr(task, "config", {}) or {})
    self.default_seed = getattr(task, "default_seed", 0)
    extra = "".join(f",{k}={v}" for k, v in sorted(self.passthrough.items()))
    self.name = (f"{task.name}@encdec({self.lengths['inputs']},"
                 f"{self.lengths['targets']}{extra})")
    self.converter = seqio.EncDecFeatureConverter(
        pack=False, passthrough_features={
            k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
            for k in self.passthrough} or None)

  @property
  def model_features(self) -> Sequence[str]:
    """The converter's output features: MODEL_FEATURES, then passthrough."""
    return MODEL_FEATURES + tuple(self.passthrough)

  def raw_dataset(self, split: str, *, shuffle: bool, seed: Optional[int],
                  shard_info: Optional[seqio.ShardInfo],
                  num_epochs: Optional[int] = 1,
                  try_in_mem_cache: bool = False) -> tf.data.Dataset:
    """The task's examples (inputs/targets tokens, strings), trimmed."""
    return self.task.get_dataset(
        sequence_length=self.lengths, split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info, num_epochs=num_epochs,
        try_in_mem_cache=try_in_mem_cache)

  def get_dataset(self, sequence_length=None, split: str = "train",
                  shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  num_epochs: Optional[int] = 1,
                  try_in_mem_cache: bool = False, **unused
                  ) -> tf.data.Dataset:
    """Model features of the task (sequence_length: the constructor's)."""
    del sequence_length, unused
    ds = self.raw_dataset(split, shuffle=shuffle, seed=seed,
                          shard_info=shard_info, num_epochs=num_epochs,
                          try_in_mem_cache=try_in_mem_cache)
    return self.converter(ds, self.lengths)

  def eval_dataset(self, split: str,
                   shard_info: Optional[seqio.ShardInfo]) -> tf.data.Dataset:
    """Model features plus `text_features`, in the task's order.

    The converter keeps only model features, so the strings come from a
    second pass over the same (deterministic, unshuffled) examples, zipped.
    """
    raw = self.raw_dataset(split, shuffle=False, seed=None,
                           shard_info=shard_info)
    keep = [k for k in self.text_features if k in raw.element_spec]
    extra = raw.map(lambda ex: {k: ex[k] for k in keep})
    converted = self.converter(raw, self.lengths)
    return tf.data.Dataset.zip((converted, extra)).map(
        lambda a, b: {**a, **b})


def _empty_like(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  out = {}
  for k, v in batch.items():
    out[k] = (np.full(v.shape, b"", object) if v.dtype == object
              else np.zeros_like(v))
  return out


def local_eval_batch_size(global_batch_size: int) -> int:
  """This process's rows of an eval batch of `global_batch_size` rows."""
  nproc = jax.process_count()
  local = global_batch_size // nproc
  if local * nproc != global_batch_size or local < 1:
    raise ValueError(f"eval batch_size={global_batch_size} must be a "
                     f"positive multiple of the number of processes "
                     f"({nproc})")
  return local


class TextData:
  """Registers a dataset's text tasks and serves one of them as batches.

  Args:
    name: prefix of the registered task names (`text_tasks.task_name`).
    data_dir: prepared dataset with a SentencePiece model.
    task: which text task ('description_to_title', 'history_to_next_title',
      'span_corruption').
    max_input_len, max_target_len: encoder / decoder lengths L and T (EOS
      included; longer texts are cut).
    extra_ids: sentinel ids of the vocabulary (must match the model's
      builder: `builders.t5(extra_ids=...)`).
    seed: the item split's seed and the train stream's.
    host_input: 'shard' or 'slice', as `SequenceData`.
    eval_cache_bytes: evaluation batches kept in host memory after a first
      full pass (they do not change during a run).
    **task_options: further `text_tasks.register_text_tasks` arguments
      (validation_fraction, test_fraction, max_history, train_prefixes,
      noise_density, mean_noise_span_length, ...).

  A subclass serving another task overrides `_register` (registers it,
  returns its name), `passthrough_lengths` (int32 features beside the
  encoder-decoder ones) and `text_features` (strings kept in eval batches).
  """

  # Features evaluation batches keep beside the model's (where present).
  text_features: Sequence[str] = TEXT_FEATURES

  def __init__(self, name: str, data_dir: str, *,
               task: str = text_tasks.DESCRIPTION_TO_TITLE,
               max_input_len: int = 64, max_target_len: int = 32,
               extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS, seed: int = 0,
               host_input: str = "shard", eval_cache_bytes: int = 1 << 30,
               **task_options):
    if host_input not in sequence_data.HOST_INPUTS:
      raise ValueError(f"TextData.host_input={host_input!r}: expected one of "
                       f"{sequence_data.HOST_INPUTS}")
    self.name, self.data_dir, self.task = name, data_dir, task
    self.max_input_len, self.max_target_len = max_input_len, max_target_len
    self.extra_ids, self.seed, self.host_input = extra_ids, seed, host_input
    self.eval_cache_bytes = int(eval_cache_bytes)
    self._eval_cache = sequence_data.EvalBatchCache(eval_cache_bytes)
    self._num_examples: Dict[str, int] = {}
    self.task_name = self._register(**task_options)
    self._converted = ConvertedTask(
        seqio.get_mixture_or_task(self.task_name),
        {"inputs": max_input_len, "targets": max_target_len},
        passthrough=self.passthrough_lengths(),
        text_features=self.text_features)

  def _register(self, **task_options) -> str:
    """Registers (replacing) the served task; returns its name."""
    task_name = text_tasks.task_name(self.name, self.task)
    text_tasks.register_text_tasks(
        self.name, self.data_dir, tasks=(self.task,),
        max_input_len=self.max_input_len, max_target_len=self.max_target_len,
        extra_ids=self.extra_ids, seed=self.seed, **task_options)
    return task_name

  def passthrough_lengths(self) -> Dict[str, int]:
    """int32 task features passed to the model, with their lengths."""
    return {}

  @property
  def model_features(self) -> Sequence[str]:
    """Features of every batch: MODEL_FEATURES, then the passthrough ones."""
    return self._converted.model_features

  @property
  def dataset(self) -> prepared.PreparedDataset:
    return prepared.PreparedDataset(self.data_dir)

  @functools.cached_property
  def vocabulary(self) -> seqio.SentencePieceVocabulary:
    """The tasks' vocabulary (SentencePiece + extra ids), checked to exist."""
    return text_tasks.dataset_vocabulary(
        self.data_dir, extra_ids=self.extra_ids,
        vocab_path=self._converted.config.get("vocab_path"))

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's train batches for steps start_step, start_step+1, ..."""
    features = list(self.model_features)
    nproc = jax.process_count()
    if self.host_input == "shard" or nproc == 1:
      return sequence_data.prefetch_in_thread(
          batching.train_batches(
              self._converted, local_batch_size, seed=self.seed,
              shard_info=sequence_data.SequenceData.shard_info(),
              start_step=start_step, features=features))
    stream = batching.train_batches(
        self._converted, local_batch_size * nproc, seed=self.seed,
        shard_info=None, start_step=start_step, features=features)
    lo = jax.process_index() * local_batch_size
    return sequence_data.prefetch_in_thread(
        {k: v[lo:lo + local_batch_size] for k, v in batch.items()}
        for batch in stream)

  def num_examples(self, split: str) -> int:
    """Examples of `split` (all processes together; counted once)."""
    if split not in self._num_examples:
      ds = self._converted.raw_dataset(split, shuffle=False, seed=None,
                                       shard_info=None)
      self._num_examples[split] = int(
          ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
    return self._num_examples[split]

  def eval_batches(self, split: str, global_batch_size: int,
                   extra_features: Sequence[str] = ()
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of every eval batch (padded, with `valid`).

    Args:
      split: 'validation' or 'test' (or 'train').
      global_batch_size: rows per global batch (divisible by the process
        count).
      extra_features: must be among `text_features`, which every eval
        batch already holds (accepted for the runs' common call).
    """
    unknown = [k for k in extra_features if k not in self.text_features]
    if unknown:
      raise KeyError(f"text eval batches have no features {unknown}; they "
                     f"hold {list(self.model_features)} + "
                     f"{list(self.text_features)}")
    local = local_eval_batch_size(global_batch_size)
    key = (split, global_batch_size, jax.process_index(), jax.process_count())
    return self._eval_cache.batches(
        key, lambda: self._eval_stream(split, local))

  def _eval_stream(self, split: str, local: int
                   ) -> Iterator[Dict[str, np.ndarray]]:
    shard_info = sequence_data.SequenceData.shard_info()
    ds = self._converted.eval_dataset(split, shard_info)
    num_batches = None
    if shard_info is not None:  # every process runs as many global steps
      per_shard = -(-self.num_examples(split) // shard_info.num_shards)
      num_batches = -(-per_shard // local)
    n, last = 0, None
    for batch in batching.eval_batches(
        ds, split, local, features=list(ds.element_spec)):
      n, last = n + 1, batch
      yield batch
    if num_batches is not None and n < num_batches:
      if last is None:
        raise ValueError(f"text task {self.task_name!r} split {split!r} has "
                         f"no example on process {jax.process_index()}")
      for _ in range(num_batches - n):
        yield _empty_like(last)
