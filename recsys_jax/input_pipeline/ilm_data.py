"""A run's ILM / LANCER data (issues 20, 21): phase-1 pairs and phase-2
batches of items as slots or as titles.

Phase 1 (Q-Former pretraining) serves the tasks of `tasks/ilm_tasks.py` as
entries of `mixture.MixtureData` (each step's batch is one task's); every
object registers its task and gives a deterministic, resumable, endless
`train_batches(start_step, local_batch_size)` (`seqio_ext.batching`'s, as
`SequenceData`), `eval_batches(split, global_batch_size)` (every example
once, padded, with `valid`), `num_examples`, `data_dir`, `num_items`. Its
`name` is the registered task name, so three objects of one prefix are
distinct mixture entries. Batches, int32:

  ILMItemTextData  item [B], text_tokens [B, max_text_len] (position 0 the
                   CLS id `<extra_id_0>`, then the text, EOS, 0-padding);
                   evaluation batches add `text` (bytes objects)
  ILMItemItemData  item [B], pair_item [B]
  ILMUserItemData  user_items [B, max_history], item [B]

Phase 2 (`ILMData`, a `text_data.TextData`): encoder-decoder batches whose
`encoder_input_tokens` hold every item as `tokens_per_item` slot tokens
(`slot_id`, the id of `<extra_id_99>`) plus the passthrough features
`slot_items` [B, max_slot_items], `target_item` [B, 1] and `history_items`
[B, max_history]; evaluation batches add `valid`, `inputs_pretokenized`,
`targets_pretokenized`, `item_index`, `user_id` and `critique` where the
task has them. Every batch is checked on the host (`check_slots`): a row
whose slot-token count is not tokens_per_item x its non-zero `slot_items`
fails naming the example.

With `items_as='titles'` (LANCER) the encoder reads the items' titles in
plain text, newest first ('history: <newest> ; ... ; <oldest>'; the item
tasks 'item: <title>'), and there are no slot tokens: `tokens_per_item`
and `slot_id` are unused, and the host check (`check_title_rows`) is that
every row has at least one item, 0-padding last. max_input_len must hold
the prompt, the longest title and EOS (checked at construction); a longer
history loses its OLDEST titles to the trim, never the newest.
"""

import functools
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.input_pipeline import sequence_data
from recsys_jax.input_pipeline import text_data
from recsys_jax.seqio_ext import batching
from recsys_jax.text import item_texts
from tasks import ilm_tasks
from tasks import text_tasks

ENCODER_INPUT_TOKENS = "encoder_input_tokens"


class _PretrainData:
  """Registers one phase-1 task and serves it (module docstring).

  Subclasses set `TASK`, `features` (model features) and `eval_features`
  (further features of evaluation batches), and pass their task options.
  """

  TASK = ""
  features: Sequence[str] = ()
  eval_features: Sequence[str] = ()

  def __init__(self, name: str, data_dir: str, *, seed: int = 0,
               host_input: str = "shard", eval_cache_bytes: int = 1 << 30,
               **task_options):
    if host_input not in sequence_data.HOST_INPUTS:
      raise ValueError(f"{type(self).__name__}.host_input={host_input!r}: "
                       f"expected one of {sequence_data.HOST_INPUTS}")
    self.prefix, self.data_dir, self.seed = name, data_dir, int(seed)
    self.host_input = host_input
    self._eval_cache = sequence_data.EvalBatchCache(eval_cache_bytes)
    self._num_examples: Dict[str, int] = {}
    self.name = self.task_name = ilm_tasks.register_ilm_pretrain_task(
        name, data_dir, task=self.TASK, seed=self.seed, **task_options)
    self._task = seqio.get_mixture_or_task(self.task_name)

  @property
  def task(self) -> seqio.Task:
    """The registered task (kept: a later registration does not change it)."""
    return self._task

  @property
  def source(self) -> ilm_tasks.ILMSource:
    """The task's source (`columns(split)`, `stats(split)`)."""
    return self.task.source

  @property
  def dataset(self) -> prepared.PreparedDataset:
    return prepared.PreparedDataset(self.data_dir)

  @property
  def num_items(self) -> int:
    return self.dataset.num_items

  @property
  def model_features(self) -> Sequence[str]:
    return tuple(self.features)

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's train batches for steps start_step, start_step+1, ..."""
    features = list(self.features)
    nproc = jax.process_count()
    if self.host_input == "shard" or nproc == 1:
      return sequence_data.prefetch_in_thread(batching.train_batches(
          self.task, local_batch_size, seed=self.seed,
          shard_info=sequence_data.SequenceData.shard_info(),
          start_step=start_step, features=features))
    stream = batching.train_batches(
        self.task, local_batch_size * nproc, seed=self.seed, shard_info=None,
        start_step=start_step, features=features)
    lo = jax.process_index() * local_batch_size
    return sequence_data.prefetch_in_thread(
        {k: v[lo:lo + local_batch_size] for k, v in batch.items()}
        for batch in stream)

  def num_examples(self, split: str) -> int:
    """Examples of `split` (all processes together)."""
    return self.task.num_input_examples(split)

  def eval_batches(self, split: str, global_batch_size: int,
                   extra_features: Sequence[str] = ()
                   ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of every eval batch (padded, with `valid`).

    The same number of batches on every process; `extra_features` must be
    among `eval_features` (which every eval batch already holds).
    """
    unknown = [k for k in extra_features if k not in self.eval_features]
    if unknown:
      raise KeyError(f"{self.task_name} eval batches have no features "
                     f"{unknown}; they hold {list(self.features)} + "
                     f"{list(self.eval_features)}")
    local = text_data.local_eval_batch_size(global_batch_size)
    key = (split, global_batch_size, jax.process_index(), jax.process_count())
    return self._eval_cache.batches(key, lambda: batching.eval_batches(
        self.task, split, local,
        shard_info=sequence_data.SequenceData.shard_info(),
        features=list(self.features) + list(self.eval_features)))


class ILMItemTextData(_PretrainData):
  """Item-text pairs of the item split's training items (phase 1, ITC /
  ITM / ITG).

  Args:
    name: prefix of the task name (`<name>_ilm_item_text`).
    data_dir: prepared dataset with a SentencePiece model.
    max_text_len: `text_tokens` width (CLS and EOS included).
    text_fields: item fields of the text (default the title; e.g.
      ('title', 'categories', 'brand')).
    extra_ids: sentinels of the vocabulary (CLS = `<extra_id_0>`, DEC =
      `<extra_id_1>`).
    seed, validation_fraction, test_fraction: the item split (give the text
      tasks' values, gin/datasets/synthetic_text.gin: 0, 0.05, 0.05) and
      the train stream's seed.
    host_input, eval_cache_bytes: as `SequenceData`.
    vocab_path, prepare_hint: as `ilm_tasks.register_ilm_pretrain_task`.
  """

  TASK = ilm_tasks.ITEM_TEXT
  features = (ilm_tasks.ITEM, ilm_tasks.TEXT_TOKENS)
  eval_features = (ilm_tasks.TEXT,)

  def __init__(self, name: str, data_dir: str, *, max_text_len: int = 32,
               text_fields: Sequence[str] = (item_texts.TITLE,),
               extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS, seed: int = 0,
               validation_fraction: float = 0.05,
               test_fraction: float = 0.05, host_input: str = "shard",
               eval_cache_bytes: int = 1 << 30,
               vocab_path: Optional[str] = None,
               prepare_hint: Optional[str] = None):
    self.max_text_len, self.extra_ids = int(max_text_len), int(extra_ids)
    super().__init__(
        name, data_dir, seed=seed, host_input=host_input,
        eval_cache_bytes=eval_cache_bytes, max_text_len=max_text_len,
        text_fields=tuple(text_fields), extra_ids=extra_ids,
        validation_fraction=validation_fraction, test_fraction=test_fraction,
        vocab_path=vocab_path, prepare_hint=prepare_hint)

  @functools.cached_property
  def vocabulary(self) -> seqio.SentencePieceVocabulary:
    """The text vocabulary (SentencePiece + extra ids), checked to exist."""
    return text_tasks.dataset_vocabulary(
        self.data_dir, extra_ids=self.extra_ids,
        vocab_path=self.task.config.get("vocab_path"))

  @property
  def cls_id(self) -> int:
    """Id of `<extra_id_0>`, position 0 of every `text_tokens` row."""
    return ilm_tasks.special_id(self.vocabulary, ilm_tasks.CLS_TOKEN)

  @property
  def dec_id(self) -> int:
    """Id of `<extra_id_1>` (ITG's decoder start, swapped in by the model)."""
    return ilm_tasks.special_id(self.vocabulary, ilm_tasks.DEC_TOKEN)


class ILMItemItemData(_PretrainData):
  """Pairs of items co-occurring in users' training parts (phase 1).

  Args:
    name: prefix of the task name (`<name>_ilm_item_item`).
    data_dir: prepared dataset.
    window: largest position gap of a pair (1: adjacent items).
    seed: the train stream's.
    host_input, eval_cache_bytes: as `SequenceData`.
    prepare_hint: command printed when the dataset is missing.
  """

  TASK = ilm_tasks.ITEM_ITEM
  features = (ilm_tasks.ITEM, ilm_tasks.PAIR_ITEM)

  def __init__(self, name: str, data_dir: str, *, window: int = 1,
               seed: int = 0, host_input: str = "shard",
               eval_cache_bytes: int = 1 << 30,
               prepare_hint: Optional[str] = None):
    self.window = int(window)
    super().__init__(name, data_dir, seed=seed, host_input=host_input,
                     eval_cache_bytes=eval_cache_bytes, window=window,
                     prepare_hint=prepare_hint)


class ILMUserItemData(_PretrainData):
  """(training prefix, next training item) pairs of users (phase 1).

  Args:
    name: prefix of the task name (`<name>_ilm_user_item`).
    data_dir: prepared dataset.
    max_history: `user_items` width (the most recent items, oldest first).
    train_prefixes: every prefix of the training part (else the last).
    seed: the train stream's.
    host_input, eval_cache_bytes: as `SequenceData`.
    prepare_hint: command printed when the dataset is missing.
  """

  TASK = ilm_tasks.USER_ITEM
  features = (ilm_tasks.USER_ITEMS, ilm_tasks.ITEM)

  def __init__(self, name: str, data_dir: str, *, max_history: int = 20,
               train_prefixes: bool = True, seed: int = 0,
               host_input: str = "shard", eval_cache_bytes: int = 1 << 30,
               prepare_hint: Optional[str] = None):
    self.max_history = int(max_history)
    super().__init__(name, data_dir, seed=seed, host_input=host_input,
                     eval_cache_bytes=eval_cache_bytes,
                     max_history=max_history, train_prefixes=train_prefixes,
                     prepare_hint=prepare_hint)


# -- phase 2 -------------------------------------------------------------------


def check_slots(batch: Mapping[str, np.ndarray], *, slot_id: int,
                tokens_per_item: int, where: str, first_example: int = 0
                ) -> None:
  """Fails unless every row has tokens_per_item slots per slot item.

  Per row: the count of `slot_id` in `encoder_input_tokens` must equal
  `tokens_per_item` x the non-zero entries of `slot_items`, and those
  entries must come first (0-padding only at the end).

  Args:
    batch: host batch with `encoder_input_tokens` [B, L], `slot_items`
      [B, S].
    slot_id: the slot token's id.
    tokens_per_item: slot tokens per item.
    where: the task and split, named in the error.
    first_example: index of row 0 in the stream (named in the error).

  Raises:
    BadInputError: naming the first bad example.
  """
  tokens = np.asarray(batch[ENCODER_INPUT_TOKENS])
  items = np.asarray(batch[ilm_tasks.SLOT_ITEMS])
  slots = np.sum(tokens == slot_id, axis=1)
  nonzero = items != 0
  expected = tokens_per_item * np.sum(nonzero, axis=1)
  gap = np.any(nonzero[:, 1:] & ~nonzero[:, :-1], axis=1)
  bad = np.flatnonzero((slots != expected) | gap)
  if not len(bad):
    return
  r = int(bad[0])
  if gap[r]:
    detail = (f"slot_items {items[r].tolist()} has an item after a 0 "
              "(padding must come last)")
  else:
    detail = (f"{int(slots[r])} slot tokens (id {slot_id}) in "
              f"{ENCODER_INPUT_TOKENS} but {int(np.sum(nonzero[r]))} items "
              f"in slot_items x tokens_per_item={tokens_per_item} = "
              f"{int(expected[r])}")
    if slots[r] < expected[r] and tokens[r, -1] != 0:
      detail += " (the input fills the row: raise max_input_len)"
    elif slots[r] > expected[r]:
      detail += " (a slot without an item id)"
  raise bad_input.BadInputError(
      where, None, f"example {first_example + r} (row {r} of its batch): "
      + detail)


def check_title_rows(batch: Mapping[str, np.ndarray], *, where: str,
                     first_example: int = 0) -> None:
  """Fails unless every row has an item in `slot_items`, padding last.

  The check of batches whose items are written as titles (no slot tokens
  to count): a row without an item would be a prompt alone. The padding
  rows of evaluation batches (`valid` 0) are not checked.

  Args:
    batch: host batch with `slot_items` [B, S] (and `valid` [B]).
    where: the task and split, named in the error.
    first_example: index of row 0 in the stream (named in the error).

  Raises:
    BadInputError: naming the first bad example.
  """
  items = np.asarray(batch[ilm_tasks.SLOT_ITEMS])
  nonzero = items != 0
  empty = ~np.any(nonzero, axis=1)
  if text_data.VALID in batch:
    empty &= np.asarray(batch[text_data.VALID]) > 0
  gap = np.any(nonzero[:, 1:] & ~nonzero[:, :-1], axis=1)
  bad = np.flatnonzero(empty | gap)
  if not len(bad):
    return
  r = int(bad[0])
  detail = (f"slot_items {items[r].tolist()} has an item after a 0 (padding "
            "must come last)" if gap[r] else
            f"slot_items {items[r].tolist()} has no item (at least one "
            "title is written per row)")
  raise bad_input.BadInputError(
      where, None, f"example {first_example + r} (row {r} of its batch): "
      + detail)


def _checked(batches: Iterator[Dict[str, np.ndarray]], *,
             check: Callable[..., None], where: Callable[[int], str],
             first_example: int, rows: int
             ) -> Iterator[Dict[str, np.ndarray]]:
  """`batches`, each passed through `check` (closing the source).

  `check(batch, where=, first_example=)` is `check_slots` (its slot
  arguments bound) or `check_title_rows`; `where(k)` names batch k of the
  stream; batch k's row 0 is example `first_example + k * rows`.
  """
  try:
    for k, batch in enumerate(batches):
      check(batch, where=where(k), first_example=first_example + k * rows)
      yield batch
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()


class ILMData(text_data.TextData):
  """Registers a phase-2 ILM task and serves it as T5 batches with slots.

  Args:
    name: prefix of the task name (`<name>_ilm_<task>`).
    data_dir: prepared dataset with a SentencePiece model (and critiques
      for critique_next_title).
    task: 'item_to_title', 'history_to_next_title',
      'critique_next_title' or 'item_to_text' (`tasks/ilm_tasks.py`).
    items_as: 'slots' (slot tokens, ILM; default) or 'titles' (the items'
      titles in plain text, newest first, LANCER; not with item_to_title).
    tokens_per_item: slot tokens per item (the item encoder's tokens);
      unused with titles (`self.tokens_per_item` is then None).
    max_history: most recent history items written as slots or titles.
    max_input_len, max_target_len: encoder / decoder lengths (EOS included;
      with slots the inputs of max_history items must fit, with titles the
      prompt and the longest title; checked here when the vocabulary
      exists).
    extra_ids: sentinels of the vocabulary (as the model builder's; >= 100
      with slots).
    seed: the item tasks' item split seed and the train stream's.
    validation_fraction, test_fraction: the item tasks' held-out items.
    train_prefixes: history tasks train on every prefix of a user's
      training part (else only the last).
    host_input, eval_cache_bytes: as `TextData`.
    vocab_path, prepare_hint: as `ilm_tasks.register_ilm_task`.
  """

  text_features = text_data.TEXT_FEATURES + (ilm_tasks.USER_ID,
                                             ilm_tasks.CRITIQUE)

  def __init__(self, name: str, data_dir: str, *,
               task: str = ilm_tasks.HISTORY_TO_NEXT_TITLE,
               items_as: str = ilm_tasks.SLOTS,
               tokens_per_item: Optional[int] = 8, max_history: int = 10,
               max_input_len: int = 128, max_target_len: int = 32,
               extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS, seed: int = 0,
               validation_fraction: float = 0.05, test_fraction: float = 0.05,
               train_prefixes: bool = True, host_input: str = "shard",
               eval_cache_bytes: int = 1 << 30,
               vocab_path: Optional[str] = None,
               prepare_hint: Optional[str] = None):
    if task not in ilm_tasks.PHASE2_TASKS:
      raise ValueError(f"ILMData.task={task!r}: expected one of "
                       f"{list(ilm_tasks.PHASE2_TASKS)}")
    ilm_tasks.check_items_as(items_as, task, "ILMData")
    self.items_as = items_as
    self.tokens_per_item = (None if items_as == ilm_tasks.TITLES
                            or tokens_per_item is None
                            else int(tokens_per_item))
    self.max_history = int(max_history)
    self.train_prefixes = bool(train_prefixes)
    super().__init__(
        name, data_dir, task=task, max_input_len=max_input_len,
        max_target_len=max_target_len, extra_ids=extra_ids, seed=seed,
        host_input=host_input, eval_cache_bytes=eval_cache_bytes,
        validation_fraction=validation_fraction, test_fraction=test_fraction,
        vocab_path=vocab_path, prepare_hint=prepare_hint)
    self._check_input_len()

  def _register(self, **task_options) -> str:
    return ilm_tasks.register_ilm_task(
        self.name, self.data_dir, task=self.task, items_as=self.items_as,
        tokens_per_item=self.tokens_per_item, max_history=self.max_history,
        max_input_len=self.max_input_len, max_target_len=self.max_target_len,
        train_prefixes=self.train_prefixes, extra_ids=self.extra_ids,
        seed=self.seed, **task_options)

  @property
  def max_slot_items(self) -> int:
    """`slot_items` width: 1 for the item tasks, else max_history."""
    return ilm_tasks.max_slot_items(self.task, self.max_history)

  def passthrough_lengths(self) -> Dict[str, int]:
    return {ilm_tasks.SLOT_ITEMS: self.max_slot_items,
            ilm_tasks.TARGET_ITEM: 1,
            ilm_tasks.HISTORY_ITEMS: self.max_history}

  @property
  def source(self) -> ilm_tasks.ILMSource:
    """The task's source (`columns(split)`, `stats(split)`)."""
    return self._converted.task.source

  @functools.cached_property
  def slot_id(self) -> int:
    """Id of the slot token `<extra_id_99>` in `encoder_input_tokens`."""
    if self.items_as == ilm_tasks.TITLES:
      raise ValueError(f"ILMData items_as={self.items_as!r} writes no slot "
                       "tokens: slot_id is undefined")
    return ilm_tasks.slot_token_id(self.vocabulary)

  @property
  def prompt(self) -> str:
    """'item:' for the item tasks, else 'history:'."""
    return (ilm_tasks.ITEM_PROMPT if self.task in ilm_tasks.ITEM_TASKS
            else ilm_tasks.HISTORY_PROMPT)

  def _longest_input(self) -> str:
    """The inputs of the most slot items, before any critique text."""
    if self.task in ilm_tasks.ITEM_TASKS:
      return f"{ilm_tasks.ITEM_PROMPT} " + ilm_tasks.slot_text(
          1, self.tokens_per_item)
    critique = "" if self.task == ilm_tasks.CRITIQUE_NEXT_TITLE else None
    return ilm_tasks.history_inputs(self.max_history, self.tokens_per_item,
                                    critique)

  def _check_title_len(self, vocabulary: seqio.Vocabulary) -> None:
    """Fails when the prompt + the longest title + EOS cannot fit."""
    titles = item_texts.texts_by_index(self.data_dir, (item_texts.TITLE,))
    ids = [i for i, t in enumerate(titles) if t]
    if not ids:
      return
    lengths = [len(vocabulary.encode(f"{self.prompt} {titles[i]}"))
               for i in ids]
    k = int(np.argmax(lengths))
    need = lengths[k] + 1
    if need > self.max_input_len:
      title_len = len(vocabulary.encode(titles[ids[k]]))
      raise ValueError(
          f"ILMData max_input_len={self.max_input_len}: items_as='titles' "
          f"writes whole titles; the longest (item {ids[k]}) is {title_len} "
          f"tokens, {need} with the prompt {self.prompt!r} and EOS; raise "
          "max_input_len (older titles past it are cut, never the newest)")

  def _check_input_len(self) -> None:
    """Fails when the longest input's slots (and prompt) + EOS cannot fit
    in max_input_len (with titles: the prompt and the longest title);
    skipped while the vocabulary does not exist yet."""
    try:
      vocabulary = self.vocabulary
    except FileNotFoundError:
      return
    if self.items_as == ilm_tasks.TITLES:
      self._check_title_len(vocabulary)
      return
    need = len(vocabulary.encode(self._longest_input())) + 1
    if need > self.max_input_len:
      raise ValueError(
          f"ILMData max_input_len={self.max_input_len}: task {self.task!r} "
          f"writes up to {self.max_slot_items} items x tokens_per_item="
          f"{self.tokens_per_item} slot tokens, {need} tokens with its "
          "prompt and EOS; raise max_input_len or lower max_history / "
          "tokens_per_item")

  def _where(self, split: str) -> str:
    return f"{self.data_dir} (ILM task {self.task_name}, {split})"

  def _batch_check(self) -> Callable[..., None]:
    """The host check of every batch: `check_slots` or `check_title_rows`.
    """
    if self.items_as == ilm_tasks.TITLES:
      return check_title_rows
    return functools.partial(check_slots, slot_id=self.slot_id,
                             tokens_per_item=self.tokens_per_item)

  def train_batches(self, start_step: int, local_batch_size: int
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's train batches for steps start_step, ... (checked).

    Example k of the error is row k of this process's train stream (step
    k // local_batch_size).
    """
    start, rows = int(start_step), int(local_batch_size)
    return _checked(
        super().train_batches(start_step, local_batch_size),
        check=self._batch_check(),
        where=lambda k: self._where(f"train, step {start + k}"),
        first_example=start * rows, rows=rows)

  def _eval_stream(self, split: str, local: int
                   ) -> Iterator[Dict[str, np.ndarray]]:
    return _checked(super()._eval_stream(split, local),
                    check=self._batch_check(),
                    where=lambda k: self._where(f"{split}, batch {k}"),
                    first_example=0, rows=local)
