"""SeqIO text-to-text tasks over a prepared dataset's own texts (T5 format).

`register_text_tasks(name, data_dir)` registers (replacing), for a prepared
dataset with a SentencePiece model (`spm.model`, see data/prepared.py):

  <name>_description_to_title   an item's text without its title ->
      its title. Item-level split: a seeded fraction of the items is held out
      for validation and another for test (`split_items`), so evaluation
      titles are never trained on.
  <name>_history_to_next_title  the titles of a user's last `max_history`
      items, oldest first, joined by ". " -> the next item's title.
      Leave-one-out per user (seqio_ext/sources.py): train predicts the last
      train item from the ones before it (or every prefix with
      `train_prefixes`), validation and test the held-out items.
  <name>_span_corruption        T5 span corruption (noise density 0.15, mean
      span 3) of item texts, for pretraining a small T5 on the dataset's own
      language; same item split as description_to_title, so pretraining never
      reads a held-out item's text.

Examples carry `inputs` and `targets` (int32 tokens ending in EOS, trimmed to
the `sequence_length` given to `get_dataset`; `TextData` passes
`max_input_len` / `max_target_len`), their `*_pretokenized` strings (span
corruption: none for the targets) and `item_index` (the target item). `input_pipeline/text_data.py` turns them into model features
with seqio's `EncDecFeatureConverter`.

The vocabulary is the dataset's SentencePiece model with `extra_ids`
sentinels on top (`dataset_vocabulary`): ids 0 pad, 1 EOS, 2 unk, then the
pieces, then `<extra_id_{extra_ids-1}>` .. `<extra_id_0>` (the top id).

Registration reads nothing; a missing dataset or SentencePiece model fails at
`get_dataset` time with the command that makes it.
"""

import functools
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.data import prepared
from recsys_jax.seqio_ext import sources
from recsys_jax.seqio_ext import span_corruption
from recsys_jax.text import item_texts
from tasks import sequence_tasks

DESCRIPTION_TO_TITLE = "description_to_title"
HISTORY_TO_NEXT_TITLE = "history_to_next_title"
SPAN_CORRUPTION = "span_corruption"
TASKS = (DESCRIPTION_TO_TITLE, HISTORY_TO_NEXT_TITLE, SPAN_CORRUPTION)

INPUTS = "inputs"
TARGETS = "targets"
ITEM_INDEX = "item_index"
DEFAULT_EXTRA_IDS = 100
# The item text without its title: what description_to_title reads.
DESCRIPTION_FIELDS = (item_texts.CATEGORIES, item_texts.BRAND,
                      item_texts.DESCRIPTION)
HISTORY_SEPARATOR = ". "
# Streams of np.random.default_rng([seed, stream]) used here.
_ITEM_SPLIT_STREAM = 17
PREPARE_HINT = ("python -m recsys_jax.data.prepare --format=synthetic "
                "--output_dir={data_dir}  (a SentencePiece model is trained "
                "unless --text_vocab_size=0; see docs/DATASETS.md)")


def task_name(name: str, task: str) -> str:
  """The registered name of text task `task` ('description_to_title', ...)."""
  if task not in TASKS:
    raise ValueError(f"text task {task!r}: expected one of {TASKS}")
  return f"{name}_{task}"


def default_vocab_path(data_dir: str) -> str:
  return os.path.join(data_dir, prepared.SPM_PREFIX + ".model")


def _check_vocab_file(path: str, data_dir: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no SentencePiece model; the text tasks of {data_dir} need "
        "the dataset's text vocabulary. Prepare it with:\n  "
        + PREPARE_HINT.format(data_dir=data_dir))


def dataset_vocabulary(data_dir: str, *, extra_ids: int = DEFAULT_EXTRA_IDS,
                       vocab_path: Optional[str] = None,
                       check: bool = True) -> seqio.SentencePieceVocabulary:
  """The dataset's SentencePiece vocabulary with `extra_ids` sentinels.

  Args:
    data_dir: prepared dataset.
    extra_ids: sentinel ids on top of the pieces (span corruption needs as
      many as a text has noise spans; T5 uses 100).
    vocab_path: another SentencePiece model (default `<data_dir>/spm.model`).
    check: fail now, naming the prepare command, if the model is missing
      (False: at first use, as registration must not read the directory).
  """
  path = vocab_path or default_vocab_path(data_dir)
  if check:
    _check_vocab_file(path, data_dir)
  if int(extra_ids) < 0:
    raise ValueError(f"extra_ids={extra_ids}: expected >= 0")
  return seqio.SentencePieceVocabulary(path, extra_ids=int(extra_ids))


def check_fractions(validation_fraction: float, test_fraction: float, *,
                    unit: str = "item", prefix: str = "") -> None:
  """Fails unless both fractions are in [0, 1) and leave training `unit`s.

  Args:
    validation_fraction, test_fraction: held-out shares.
    unit: what is split ('item', 'user'), named in the error.
    prefix: the error's opening ('narrative '), naming the caller.
  """
  for what, f in (("validation_fraction", validation_fraction),
                  ("test_fraction", test_fraction)):
    if not 0.0 <= f < 1.0:
      raise ValueError(f"{prefix}{what}={f}: expected [0, 1)")
  if validation_fraction + test_fraction >= 1.0:
    raise ValueError(f"{prefix}validation_fraction={validation_fraction} + "
                     f"test_fraction={test_fraction} >= 1 leaves no {unit} "
                     "for training")


def split_indices(n: int, *, seed: int, stream: int,
                  validation_fraction: float, test_fraction: float,
                  unit: str = "item", prefix: str = ""
                  ) -> Dict[str, np.ndarray]:
  """Disjoint positions 0..n-1 (sorted) per split, a seeded permutation.

  round(fraction * n) positions each go to test and validation (at least one
  each when the fraction is > 0), the rest to train; the permutation is
  `np.random.default_rng([seed, stream])`'s.

  Args:
    n: how many positions are split.
    seed: the split's seed.
    stream: the caller's stream (one per kind of split, so that an item split
      and a user split of the same seed are independent).
    validation_fraction, test_fraction: held-out shares (`check_fractions`).
    unit, prefix: name what is split and the caller in errors.

  Returns:
    {'test', 'validation', 'train'}: sorted int64 positions.
  """
  check_fractions(validation_fraction, test_fraction, unit=unit,
                  prefix=prefix)

  def count(f):
    return max(1, int(round(f * n))) if f > 0 else 0
  n_test, n_val = count(test_fraction), count(validation_fraction)
  if n_test + n_val >= n:
    raise ValueError(
        f"{prefix}validation_fraction={validation_fraction} and "
        f"test_fraction={test_fraction} leave no training {unit} out of {n}")
  perm = np.random.default_rng([int(seed), int(stream)]).permutation(n)
  return {"test": np.sort(perm[:n_test]),
          "validation": np.sort(perm[n_test:n_test + n_val]),
          "train": np.sort(perm[n_test + n_val:])}


def split_items(num_items: int, *, seed: int, validation_fraction: float,
                test_fraction: float) -> Dict[str, np.ndarray]:
  """Disjoint item indices (1..N, sorted) per split, a seeded permutation.

  round(fraction * N) items each go to test and validation (at least one
  each when the fraction is > 0), the rest to train (`split_indices`).
  """
  split = split_indices(num_items, seed=seed, stream=_ITEM_SPLIT_STREAM,
                        validation_fraction=validation_fraction,
                        test_fraction=test_fraction)
  return {k: v + 1 for k, v in split.items()}


def check_prepared(data_dir: str, prepare_hint: Optional[str] = None) -> None:
  """Fails naming the command that makes it when `data_dir` has no
  prepared dataset (no stats.json)."""
  if not os.path.exists(os.path.join(data_dir, prepared.STATS_FILE)):
    raise FileNotFoundError(
        f"{data_dir}: no prepared dataset here (missing "
        f"{prepared.STATS_FILE}). Create it first with:\n  "
        + (prepare_hint or PREPARE_HINT).format(data_dir=data_dir))


def columns_dataset(cols: Mapping[str, np.ndarray], *, shuffle: bool,
                    seed: Optional[int],
                    shard_info: Optional[seqio.ShardInfo]
                    ) -> tf.data.Dataset:
  """Examples of equal-length numpy columns (object columns as strings), in
  row order (shuffled when asked, over the whole shard)."""
  ds = tf.data.Dataset.from_tensor_slices(
      {k: (tf.constant(v.astype(str).tolist(), tf.string, shape=[len(v)])
           if v.dtype == object else v) for k, v in cols.items()})
  if shard_info is not None:
    ds = ds.shard(shard_info.num_shards, shard_info.index)
  if shuffle:
    n = max(1, len(next(iter(cols.values()))))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
  return ds


class ColumnsSource(seqio.DataSource):
  """A source of in-memory numpy columns per split, built on first use.

  Subclasses fill `self._columns[split]` in `_build(split)` (that split or
  all at once) and name in `COUNT_COLUMN` a column with one entry per
  example. The directory is read at `get_dataset` / `num_input_examples` /
  `columns` time, never at construction.

  Args:
    data_dir: the prepared dataset.
    split_fn: row count -> {split: rows} (`split_indices` and its callers).
    vocab_path: SentencePiece model of the dataset.
    prepare_hint: command printed when the dataset is missing.
  """

  COUNT_COLUMN = ""

  def __init__(self, data_dir: str, *, split_fn: Callable[[int], Mapping[
      str, np.ndarray]], vocab_path: str, prepare_hint: Optional[str] = None):
    super().__init__(splits=sources.SPLITS, num_input_examples=None,
                     caching_permitted=True)
    self._data_dir = data_dir
    self._split_fn = split_fn
    self._vocab_path = vocab_path
    self._prepare_hint = prepare_hint or PREPARE_HINT
    self._columns: Dict[str, Mapping[str, np.ndarray]] = {}

  @property
  def data_dir(self) -> str:
    return self._data_dir

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [self._data_dir]

  def _build(self, split: str) -> None:
    raise NotImplementedError

  def columns(self, split: str) -> Mapping[str, np.ndarray]:
    """The split's examples as numpy columns (built once)."""
    if split not in sources.SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of "
                       f"{sources.SPLITS}")
    if split not in self._columns:
      self._build(split)
    return self._columns[split]

  def num_input_examples(self, split: str) -> int:
    return len(self.columns(split)[self.COUNT_COLUMN])

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length: Optional[Mapping[str, int]] = None,
                  use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    """The split's examples in row order (shuffled when asked)."""
    del sequence_length, use_cached, num_epochs
    return columns_dataset(self.columns(split), shuffle=shuffle, seed=seed,
                           shard_info=shard_info)


class ItemTextSource(ColumnsSource):
  """One example per item of a split, built from items.jsonl on first use.

  `make_examples(data_dir, items)` returns columns (equal-length lists, one
  of them `item_index`) for the given item indices, leaving out items
  without text. The directory is read at `get_dataset` /
  `num_input_examples` time; examples come in item order.
  """

  COUNT_COLUMN = ITEM_INDEX

  def __init__(self, data_dir: str, *, split_fn: Callable[[int], Mapping[
      str, np.ndarray]], make_examples: Callable[[str, np.ndarray], Mapping[
          str, list]], vocab_path: str, prepare_hint: Optional[str] = None,
               description: str = "item texts"):
    super().__init__(data_dir, split_fn=split_fn, vocab_path=vocab_path,
                     prepare_hint=prepare_hint)
    self._make_examples = make_examples
    self._description = description

  def __str__(self):
    return f"ItemTextSource({self._description}, {self._data_dir})"

  def _build(self, split: str) -> None:
    check_prepared(self._data_dir, self._prepare_hint)
    _check_vocab_file(self._vocab_path, self._data_dir)
    num_items = prepared.PreparedDataset(self._data_dir).num_items
    items = self._split_fn(num_items)[split]
    cols = self._make_examples(self._data_dir, items)
    self._columns[split] = {
        k: np.asarray(v, object if k != ITEM_INDEX else np.int32)
        for k, v in cols.items()}


def _description_to_title_examples(data_dir: str, items: np.ndarray, *,
                                   input_fields: Sequence[str]
                                   ) -> Dict[str, list]:
  rows = item_texts.read_rows(data_dir)
  out = {ITEM_INDEX: [], INPUTS: [], TARGETS: []}
  for i in items:
    row = rows[int(i) - 1]
    source = item_texts.render(row, input_fields)
    title = item_texts.render(row, (item_texts.TITLE,))
    if source and title:
      out[ITEM_INDEX].append(int(i))
      out[INPUTS].append(source)
      out[TARGETS].append(title)
  return out


def _item_text_examples(data_dir: str, items: np.ndarray) -> Dict[str, list]:
  rows = item_texts.read_rows(data_dir)
  out = {ITEM_INDEX: [], TARGETS: []}
  for i in items:
    text = item_texts.render(rows[int(i) - 1])
    if text:
      out[ITEM_INDEX].append(int(i))
      out[TARGETS].append(text)
  return out


def history_examples(ex: Mapping[str, tf.Tensor], titles: tf.Tensor, *,
                     max_history: int, train_prefixes: bool = False
                     ) -> Dict[str, tf.Tensor]:
  """One leave-one-out example -> `[E]` (history titles, next title) pairs.

  Args:
    ex: a `sources.PreparedSequenceSource` example: `item_ids` `[n]` and,
      in the evaluation splits, `target`.
    titles: `[N + 2]` strings, entry j the title of item j.
    max_history: titles kept before each target (the most recent).
    train_prefixes: train only; every item after the first is a target
      (E = n - 1) instead of only the last one (E = 1).

  Returns:
    `inputs`, `targets` (strings) and `item_index` (the target item), `[E]`.
  """
  ids = ex[prepared.ITEM_IDS]
  if sources.TARGET in ex:  # validation / test: predict the held-out item
    ids = tf.concat([ids, tf.reshape(ex[sources.TARGET], [1])], 0)
    ends = tf.reshape(tf.size(ids) - 1, [1])
  elif train_prefixes:
    ends = tf.range(1, tf.size(ids))
  else:
    ends = tf.reshape(tf.size(ids) - 1, [1])
  ends = ends[ends > 0]  # a target needs at least one item before it
  starts = tf.maximum(ends - max_history, 0)
  history = tf.gather(ids, tf.ragged.range(starts, ends))  # [E, (h)]
  target = tf.gather(ids, ends)
  return {
      INPUTS: tf.strings.reduce_join(tf.gather(titles, history), axis=1,
                                     separator=HISTORY_SEPARATOR),
      TARGETS: tf.gather(titles, target),
      ITEM_INDEX: tf.cast(target, tf.int32),
  }


def history_to_next_title(ds: tf.data.Dataset, *, data_dir: str,
                          max_history: int, train_prefixes: bool
                          ) -> tf.data.Dataset:
  """SeqIO preprocessor: leave-one-out examples -> title pairs (strings)."""
  if max_history < 1:
    raise ValueError(f"max_history={max_history}: expected >= 1")
  titles = tf.constant(item_texts.texts_by_index(data_dir,
                                                 (item_texts.TITLE,)))
  fn = functools.partial(history_examples, titles=titles,
                         max_history=max_history,
                         train_prefixes=train_prefixes)
  ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensor_slices(fn(ex)))
  return ds.filter(lambda ex: tf.strings.length(ex[TARGETS]) > 0)


def output_features(vocabulary: seqio.Vocabulary
                    ) -> Dict[str, seqio.Feature]:
  return {INPUTS: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
          TARGETS: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)}


def register_text_tasks(
    name: str,
    data_dir: str,
    *,
    tasks: Sequence[str] = TASKS,
    max_input_len: int = 64,
    max_target_len: int = 32,
    extra_ids: int = DEFAULT_EXTRA_IDS,
    vocab_path: Optional[str] = None,
    seed: int = 0,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    input_fields: Sequence[str] = DESCRIPTION_FIELDS,
    max_history: int = 10,
    train_prefixes: bool = False,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    span_max_tokens: Optional[int] = None,
    shuffle_buffer_size: int = sequence_tasks.DEFAULT_SHUFFLE_BUFFER,
    prepare_hint: Optional[str] = None,
) -> List[str]:
  """Registers (replacing) `<name>_<task>` for each of `tasks`.

  Args:
    name: prefix of the task names.
    data_dir: prepared dataset with a SentencePiece model (read lazily).
    tasks: which of TASKS to register.
    max_input_len, max_target_len: default `sequence_length` of the
      `inputs` / `targets` (EOS included), recorded in `task.config`.
    extra_ids: sentinels on top of the SentencePiece pieces.
    vocab_path: SentencePiece model (default `<data_dir>/spm.model`).
    seed: the item split's seed and `get_dataset`'s default seed.
    validation_fraction, test_fraction: held-out items (item-level tasks).
    input_fields: item fields description_to_title reads (not the title).
    max_history: titles before the target (history_to_next_title).
    train_prefixes: history_to_next_title trains on every prefix.
    noise_density, mean_noise_span_length: span corruption.
    span_max_tokens: tokens of a text kept before corruption; default
      `max_input_len - 1` (so the corrupted inputs fit with their EOS).
    shuffle_buffer_size: post-preprocessing shuffle buffer.
    prepare_hint: command printed when the dataset is missing.

  Returns:
    The registered task names.
  """
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown text tasks {unknown}; expected some of {TASKS}")
  if max_input_len < 2 or max_target_len < 2:
    raise ValueError(f"max_input_len={max_input_len}, max_target_len="
                     f"{max_target_len}: expected >= 2 (a token and EOS)")
  bad_fields = [f for f in input_fields if f not in item_texts.FIELDS]
  if not input_fields or bad_fields or item_texts.TITLE in input_fields:
    raise ValueError(f"input_fields={list(input_fields)}: expected a subset "
                     f"of {list(DESCRIPTION_FIELDS)} (the title is the target)")
  check_fractions(validation_fraction, test_fraction)
  vocab_file = vocab_path or default_vocab_path(data_dir)
  vocabulary = dataset_vocabulary(data_dir, extra_ids=extra_ids,
                                  vocab_path=vocab_file, check=False)
  features = output_features(vocabulary)
  split_fn = functools.partial(split_items, seed=seed,
                               validation_fraction=validation_fraction,
                               test_fraction=test_fraction)
  config = dict(data_dir=data_dir, max_input_len=max_input_len,
                max_target_len=max_target_len, extra_ids=extra_ids,
                vocab_path=vocab_file, seed=seed,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction)
  tokenize = seqio.preprocessors.tokenize
  append_eos = seqio.preprocessors.append_eos_after_trim
  registered = []
  for task in tasks:
    if task == DESCRIPTION_TO_TITLE:
      source = ItemTextSource(
          data_dir, split_fn=split_fn, vocab_path=vocab_file,
          prepare_hint=prepare_hint, description=task,
          make_examples=functools.partial(_description_to_title_examples,
                                          input_fields=tuple(input_fields)))
      steps = [tokenize, append_eos]
      task_config = dict(config, input_fields=list(input_fields))
    elif task == HISTORY_TO_NEXT_TITLE:
      source = sources.PreparedSequenceSource(
          data_dir, prepare_hint=prepare_hint or PREPARE_HINT)
      steps = [seqio.utils.add_kwargs_to_transform(
          history_to_next_title, data_dir=data_dir, max_history=max_history,
          train_prefixes=train_prefixes), tokenize, append_eos]
      task_config = dict(config, max_history=max_history,
                         train_prefixes=train_prefixes)
    else:
      source = ItemTextSource(
          data_dir, split_fn=split_fn, vocab_path=vocab_file,
          prepare_hint=prepare_hint, description=task,
          make_examples=_item_text_examples)
      max_tokens = (max_input_len - 1 if span_max_tokens is None
                    else int(span_max_tokens))
      steps = [tokenize, seqio.utils.add_kwargs_to_transform(
          span_corruption.span_corruption, noise_density=noise_density,
          mean_noise_span_length=mean_noise_span_length,
          max_tokens=max_tokens), append_eos]
      task_config = dict(config, noise_density=noise_density,
                         mean_noise_span_length=mean_noise_span_length,
                         span_max_tokens=max_tokens)
    full_name = task_name(name, task)
    seqio.TaskRegistry.remove(full_name)
    seqio.TaskRegistry.add(
        full_name, source=source, output_features=features,
        preprocessors=steps, shuffle_buffer_size=shuffle_buffer_size,
        task_cls=sequence_tasks.SequenceTask, default_seed=seed,
        config=dict(task_config, task=task))
    registered.append(full_name)
  return registered
