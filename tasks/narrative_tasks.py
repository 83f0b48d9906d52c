"""SeqIO tasks that write a user's narrative from their purchase history.

REGEN (Sayana et al. 2024) pairs each user's purchases with generated
narratives (`narrative/<field>` in the prepared TFRecords, listed in
stats.json `narrative_fields`): REGEN's `long_summary`, the synthetic
store's `user_summary`, `purchase_reason` and `endorsement`
(docs/SYNTHETIC.md). `register_narrative_task(name, data_dir, field=...)`
registers (replacing) `<name>_narrative_<field slug>`, one example per user:

  user_id         string
  history_items   int32 [max_history]: item vocabulary ids (1..N) of the
                  user's most recent history items, oldest first, 0-padded
                  at the end; the model turns them into soft tokens
  next_item       int32 [1]: the item the narrative is about (0 when the
                  history mode has none)
  inputs          a short prompt naming the field ("purchase reason:"),
                  with `titles_in_input` also the history titles and
                  "next: <title>"; tokenized, EOS appended
  targets         the narrative, tokenized, EOS appended
  inputs_pretokenized, targets_pretokenized   the strings

History modes (`history`; default by field, `DEFAULT_HISTORY`):
  'all'                    every item of the user (user_summary, REGEN's
                           long_summary and any other field)
  'before_last'            all but the last item: purchase_reason explains
                           the last purchase, which the model must not see
  'before_last_with_next'  all but the last as history, the last item as
                           `next_item` (endorsement quotes it)

Per-item fields (`per_item/<name>`, stats.json `per_item_fields`: REGEN's
`review_text`, `review_summary`, `review_rating`) are texts aligned with the
items. A `field` naming one (`resolve_field`) makes the target the text of
the user's LAST item (the purchase its review is about): default mode
'before_last_with_next' (the endorsement-like setting: the reviewed item is
`next_item`), or 'before_last' (purchase-reason-like: the model does not
see it); 'all' is refused (the history would show the reviewed item). A
name that is both a narrative and a per-item field means the narrative;
'per_item/<name>' always names the per-item one. An empty last-item text
counts as an empty narrative.

Splits are per USER (`split_users`: a seeded permutation, no user in two
splits), independent of the leave-one-out split of the ranking tasks.
Users whose narrative is empty (after strip) or whose history is empty in
the mode are skipped and counted (`NarrativeSource.stats(split)`, one log
line per split). `shuffle_histories=True` gives every user of a split
another user's history (a seeded derangement) with its own targets: how
much of a narrative a model writes without reading the history.

`register_narrative_span_corruption(name, data_dir)` registers (replacing)
`<name>_narrative_span_corruption`: T5 span corruption (as text_tasks'
`span_corruption` over item texts) of every narrative, one example per
(user, field) with a non-empty narrative, of the users of each split. The
user split is `split_users` with the narrative tasks' seed and fractions, so
its train split reads only the narrative tasks' training users: a T5
pretrained on it (REGEN's "LM frozen" arm) never reads a validation or test
user's narrative. Examples carry `user_id`, `field`, and the corrupted
`inputs` / `targets` tokens (no `targets_pretokenized`).

Registration reads at most stats.json (to resolve `field` and to name the
available fields when it is missing; span corruption: to list them when
`fields` is None); a missing dataset or SentencePiece model fails at
`get_dataset` time with the command that makes it.
"""

import functools
import json
import os
import re
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.seqio_ext import sources
from recsys_jax.seqio_ext import span_corruption
from recsys_jax.text import item_texts
from tasks import sequence_tasks
from tasks import text_tasks

HISTORY_ALL = "all"
HISTORY_BEFORE_LAST = "before_last"
HISTORY_BEFORE_LAST_WITH_NEXT = "before_last_with_next"
HISTORY_MODES = (HISTORY_ALL, HISTORY_BEFORE_LAST,
                 HISTORY_BEFORE_LAST_WITH_NEXT)
# Fields whose narrative is about the last purchase; any other: 'all'.
DEFAULT_HISTORY = {"user_summary": HISTORY_ALL,
                   "purchase_reason": HISTORY_BEFORE_LAST,
                   "endorsement": HISTORY_BEFORE_LAST_WITH_NEXT}

USER_ID = prepared.USER_ID
PER_ITEM_PREFIX = prepared.PER_ITEM_PREFIX  # field spelling and record key
HISTORY_ITEMS = "history_items"
NEXT_ITEM = "next_item"
INPUTS = text_tasks.INPUTS
TARGETS = text_tasks.TARGETS
NEXT_PREFIX = "next: "
FIELD = "field"  # the narrative field of a span-corruption example
SPAN_CORRUPTION = "narrative_span_corruption"
# Streams of np.random.default_rng([seed, stream, ...]) used here
# (text_tasks uses 17 for its item split).
_USER_SPLIT_STREAM = 23
_SHUFFLE_HISTORY_STREAM = 29
PREPARE_HINT = text_tasks.PREPARE_HINT


def field_slug(field: str) -> str:
  """`field` with every non-alphanumeric character replaced by '_'."""
  return re.sub(r"[^0-9A-Za-z]", "_", field)


def task_name(name: str, field: str) -> str:
  """The registered name of the narrative task of `field`."""
  return f"{name}_narrative_{field_slug(field)}"


def history_mode(field: str, history: Optional[str] = None, *,
                 per_item: Optional[bool] = None) -> str:
  """`history`, checked, or the default mode of `field`.

  Args:
    field: the narrative field as given.
    history: a mode of `HISTORY_MODES`, or None for the field's default.
    per_item: whether `field` is a per-item field (its target is the last
      item's text: default 'before_last_with_next', 'all' refused); None:
      when it is spelled 'per_item/<name>' (`resolve_field` decides for a
      dataset).
  """
  if per_item is None:
    per_item = field.startswith(PER_ITEM_PREFIX)
  if history is None:
    return (HISTORY_BEFORE_LAST_WITH_NEXT if per_item
            else DEFAULT_HISTORY.get(field, HISTORY_ALL))
  if history not in HISTORY_MODES:
    raise ValueError(f"narrative history={history!r} (field {field!r}): "
                     f"expected one of {list(HISTORY_MODES)}")
  if per_item and history == HISTORY_ALL:
    raise ValueError(
        f"narrative history='all' for per-item field {field!r}: its target "
        "is the last item's text, which 'all' would show in the history; "
        f"expected {HISTORY_BEFORE_LAST_WITH_NEXT!r} (the default) or "
        f"{HISTORY_BEFORE_LAST!r}")
  return history


def prompt(field: str) -> str:
  """The task prefix of `inputs`: 'purchase_reason' -> 'purchase reason:'."""
  words = re.sub(r"[^0-9A-Za-z]+", " ", field).strip()
  return f"{words or field}:"


def _check_fractions(validation_fraction: float, test_fraction: float):
  text_tasks.check_fractions(validation_fraction, test_fraction, unit="user",
                             prefix="narrative ")


def split_users(num_users: int, *, seed: int, validation_fraction: float,
                test_fraction: float) -> Dict[str, np.ndarray]:
  """Disjoint user positions (0..U-1 in file order, sorted) per split.

  The counting rules of `text_tasks.split_items` (`text_tasks.split_indices`
  with the user stream): round(fraction * U) users each go to test and
  validation (at least one each when the fraction is > 0), the rest to
  train; a seeded permutation picks them.
  """
  return text_tasks.split_indices(
      num_users, seed=seed, stream=_USER_SPLIT_STREAM,
      validation_fraction=validation_fraction, test_fraction=test_fraction,
      unit="user", prefix="narrative ")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
  """A random permutation of 0..n-1 without fixed points (n >= 2).

  One n-cycle through a random order: row order[i] gets order[i + 1].
  """
  if n < 2:
    raise ValueError(f"a derangement needs at least 2 elements, got {n}")
  order = rng.permutation(n)
  perm = np.empty(n, np.int64)
  perm[order] = np.roll(order, -1)
  return perm


def _stats_list(data_dir: str, key: str) -> Optional[List[str]]:
  """stats.json `key` (a list) of a prepared dataset (None: no stats)."""
  path = os.path.join(data_dir, prepared.STATS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return list(json.load(f).get(key, []))


def available_fields(data_dir: str) -> Optional[List[str]]:
  """stats.json `narrative_fields` of a prepared dataset (None: no stats)."""
  return _stats_list(data_dir, "narrative_fields")


def available_per_item_fields(data_dir: str) -> Optional[List[str]]:
  """stats.json `per_item_fields` of a prepared dataset (None: no stats)."""
  return _stats_list(data_dir, "per_item_fields")


def _missing_field(data_dir: str, field: str, note: str = ""):
  """The error naming the dataset's narrative and per-item fields."""
  return bad_input.BadInputError(
      os.path.join(data_dir, prepared.STATS_FILE), None,
      f"no narrative field {field!r}{note}; narrative fields available: "
      f"{available_fields(data_dir) or 'none'} (narrative_fields), "
      "per-item fields available: "
      f"{available_per_item_fields(data_dir) or 'none'} (per_item_fields, "
      "also as 'per_item/<name>') (NARRATIVE_FIELD / NarrativeData.field)")


def check_field(data_dir: str, field: str) -> None:
  """Fails naming the dataset and its fields when it lacks the narrative
  (user-level) field `field`."""
  fields = available_fields(data_dir)
  if fields is not None and field not in fields:
    per_item = field.startswith(PER_ITEM_PREFIX) or field in (
        available_per_item_fields(data_dir) or ())
    raise _missing_field(
        data_dir, field, " (a per-item field: narrative tasks only)"
        if per_item else "")


def resolve_field(data_dir: str, field: str) -> str:
  """The TFRecord key of narrative task field `field`.

  'narrative/<field>' for a narrative field; 'per_item/<name>' for a
  per-item field named `<name>` or 'per_item/<name>' (a name that is both
  means the narrative). Without a dataset yet (no stats.json) a bare name is
  taken as a narrative field.

  Raises:
    BadInputError: the dataset has no such field; names both kinds.
  """
  if not isinstance(field, str) or not field:
    raise ValueError(f"narrative field={field!r}: expected a non-empty name")
  if field.startswith(PER_ITEM_PREFIX):
    name = field[len(PER_ITEM_PREFIX):]
    per_item = available_per_item_fields(data_dir)
    if not name or (per_item is not None and name not in per_item):
      raise _missing_field(data_dir, field)
    return field
  fields = available_fields(data_dir)
  if fields is None or field in fields:
    return prepared.NARRATIVE_PREFIX + field
  if field in (available_per_item_fields(data_dir) or ()):
    return PER_ITEM_PREFIX + field
  raise _missing_field(data_dir, field)


def field_history_mode(data_dir: str, field: str,
                       history: Optional[str] = None) -> str:
  """`history_mode` of `field` as `resolve_field` resolves it in
  `data_dir` (a per-item field defaults to 'before_last_with_next')."""
  key = resolve_field(data_dir, field)
  return history_mode(field, history,
                      per_item=key.startswith(PER_ITEM_PREFIX))


def history_and_next(item_ids: np.ndarray, mode: str, max_history: int):
  """(history, next item) of one user's time-ordered `item_ids` in `mode`.

  The history is the most recent `max_history` items of the mode, oldest
  first; the next item is 0 unless mode is 'before_last_with_next'.
  """
  ids = np.asarray(item_ids)
  if mode == HISTORY_ALL:
    history, nxt = ids, 0
  elif mode == HISTORY_BEFORE_LAST:
    history, nxt = ids[:-1], 0
  else:
    history = ids[:-1]
    nxt = int(ids[-1]) if len(ids) else 0
  return history[max(0, len(history) - max_history):], nxt


def _open_prepared(data_dir: str, fields: Sequence[str], vocab_path: str,
                   prepare_hint: str) -> prepared.PreparedDataset:
  """The prepared dataset, checked to have `fields` and its vocabulary."""
  text_tasks.check_prepared(data_dir, prepare_hint)
  data = prepared.PreparedDataset(data_dir)
  if not data.sequence_files:
    raise FileNotFoundError(
        f"{data_dir}: {prepared.STATS_FILE} exists but no "
        f"{prepared.SEQUENCES_PREFIX}-* files; re-run the prepare step")
  for field in fields:
    check_field(data_dir, field)
  text_tasks.dataset_vocabulary(data_dir, vocab_path=vocab_path, check=True)
  return data


def _read_users(data: prepared.PreparedDataset, key: str):
  """(user_ids, item_ids per user, targets) of every user, file order.

  `key` (`resolve_field`): 'narrative/<field>' reads the narrative;
  'per_item/<name>' the text of the user's last item ('' for a user
  without the field).
  """
  full = data.feature_spec()
  per_item = key.startswith(PER_ITEM_PREFIX)
  spec = {k: full[k] for k in (prepared.USER_ID, prepared.ITEM_IDS, key)}

  def parse(records):
    ex = tf.io.parse_example(records, spec)
    ids = tf.RaggedTensor.from_sparse(ex[prepared.ITEM_IDS])
    if not per_item:
      return ex[prepared.USER_ID], ids.values, ids.row_lengths(), ex[key]
    texts = tf.RaggedTensor.from_sparse(ex[key])
    return (ex[prepared.USER_ID], ids.values, ids.row_lengths(),
            texts.values, texts.row_lengths())
  ds = tf.data.TFRecordDataset(data.sequence_files).batch(
      sources.BATCH_SIZE).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
  users, histories, texts = [], [], []
  for uid, values, lengths, *text in ds.as_numpy_iterator():
    batch_users = [u.decode("utf-8") for u in uid]
    users.extend(batch_users)
    histories.extend(np.split(values, np.cumsum(lengths)[:-1]))
    if not per_item:
      texts.extend(t.decode("utf-8") for t in text[0])
      continue
    text_values, text_lengths = text
    ends = np.cumsum(text_lengths)
    for u, n_items, n_texts, end in zip(batch_users, lengths, text_lengths,
                                        ends):
      if n_texts and n_texts != n_items:
        raise ValueError(
            f"{data.data_dir}: user {u!r} has {n_texts} {key} texts for "
            f"{n_items} items; expected one per item (re-run the prepare "
            "step)")
      texts.append(text_values[end - 1].decode("utf-8") if n_texts else "")
  return users, histories, texts


class NarrativeSource(text_tasks.ColumnsSource):
  """One example per user of a split with a non-empty narrative.

  Every user record is read once, at the first `get_dataset` /
  `num_input_examples` / `columns` / `stats`, into numpy columns (module
  docstring) for the three splits; examples come in user file order.
  """

  COUNT_COLUMN = USER_ID

  def __init__(self, data_dir: str, *, field: str, history: str,
               max_history: int, split_fn: Callable[[int], Mapping[
                   str, np.ndarray]], vocab_path: str, seed: int = 0,
               titles_in_input: bool = False, shuffle_histories: bool = False,
               prepare_hint: Optional[str] = None):
    super().__init__(data_dir, split_fn=split_fn, vocab_path=vocab_path,
                     prepare_hint=prepare_hint)
    self._field = field
    self._key = resolve_field(data_dir, field)
    self._history = history_mode(
        field, history, per_item=self._key.startswith(PER_ITEM_PREFIX))
    self._max_history = int(max_history)
    self._seed = int(seed)
    self._titles_in_input = bool(titles_in_input)
    self._shuffle_histories = bool(shuffle_histories)
    self._stats: Dict[str, Dict[str, int]] = {}

  def __str__(self):
    return (f"NarrativeSource({self._field}, history={self._history}, "
            f"{self._data_dir})")

  @property
  def field(self) -> str:
    return self._field

  @property
  def history(self) -> str:
    return self._history

  @property
  def target_key(self) -> str:
    """The record key of the targets: 'narrative/<field>' or
    'per_item/<name>' (the last item's text; `resolve_field`)."""
    return self._key

  def _dataset(self) -> prepared.PreparedDataset:
    data = _open_prepared(self._data_dir, (), self._vocab_path,
                          self._prepare_hint)
    key = resolve_field(self._data_dir, self._field)
    if key != self._key:  # registered before the dataset existed
      raise ValueError(
          f"{self._data_dir}: narrative field {self._field!r} is {key!r} in "
          f"the dataset but was registered as {self._key!r} before it "
          f"existed; register the task again (or name it "
          f"'{PER_ITEM_PREFIX}{self._field}')")
    return data

  def _build(self, split: str) -> None:
    del split  # every split at once
    data = self._dataset()
    num_items = data.num_items
    users, histories, texts = _read_users(data, self._key)
    for u, h in zip(users, histories):
      if len(h) and (h.min() < 1 or h.max() > num_items):
        raise ValueError(f"{self._data_dir}: user {u!r} has item ids outside "
                         f"1..{num_items}")
    titles = (item_texts.texts_by_index(self._data_dir, (item_texts.TITLE,))
              if self._titles_in_input else None)
    columns = {}
    for k, (split, positions) in enumerate(
        sorted(self._split_fn(len(users)).items(),
               key=lambda kv: sources.SPLITS.index(kv[0]))):
      counts = {"users": len(positions), "examples": 0, "skipped_empty": 0,
                "skipped_short_history": 0}
      rows = []
      for p in positions:
        if not texts[p].strip():
          counts["skipped_empty"] += 1
          continue
        history, nxt = history_and_next(histories[p], self._history,
                                        self._max_history)
        if not len(history):
          counts["skipped_short_history"] += 1
          continue
        rows.append((users[p], history, nxt, texts[p]))
      counts["examples"] = len(rows)
      hist = np.zeros((len(rows), self._max_history), np.int32)
      for i, (_, h, _, _) in enumerate(rows):
        hist[i, :len(h)] = h
      nxt = np.asarray([[r[2]] for r in rows], np.int32).reshape(-1, 1)
      if self._shuffle_histories and rows:
        if len(rows) < 2:
          raise ValueError(
              f"{self._data_dir}: shuffle_histories needs at least 2 "
              f"{split} examples of narrative {self._field!r}, got 1")
        rng = np.random.default_rng(
            [self._seed, _SHUFFLE_HISTORY_STREAM, k])
        perm = derangement(len(rows), rng)
        hist, nxt = hist[perm], nxt[perm]
      columns[split] = {
          USER_ID: np.asarray([r[0] for r in rows], object),
          HISTORY_ITEMS: hist,
          NEXT_ITEM: nxt,
          INPUTS: np.asarray([self._inputs(h, n, titles)
                              for h, n in zip(hist, nxt[:, 0])], object),
          TARGETS: np.asarray([r[3] for r in rows], object),
      }
      self._stats[split] = counts
      print(f"narrative {self._field!r} ({self._history}) {split}: "
            f"{counts['examples']} examples of {counts['users']} users, "
            f"{counts['skipped_empty']} skipped (empty narrative), "
            f"{counts['skipped_short_history']} skipped (empty history); "
            f"{self._data_dir}", file=sys.stderr, flush=True)
    self._columns = columns

  def _inputs(self, history: np.ndarray, nxt: int,
              titles: Optional[List[str]]) -> str:
    text = prompt(self._field)
    if titles is None:
      return text
    names = [titles[int(i)] for i in history if i and titles[int(i)]]
    if names:
      text += " " + text_tasks.HISTORY_SEPARATOR.join(names)
    if self._history == HISTORY_BEFORE_LAST_WITH_NEXT and titles[int(nxt)]:
      sep = text_tasks.HISTORY_SEPARATOR if names else " "
      text += sep + NEXT_PREFIX + titles[int(nxt)]
    return text

  def stats(self, split: str) -> Dict[str, int]:
    """{'users', 'examples', 'skipped_empty', 'skipped_short_history'}.

    `users`: users the split assigns; each of them is one example or is
    counted once as skipped (empty narrative first, then empty history).
    """
    self.columns(split)
    return dict(self._stats[split])


def _vocabulary_and_split(data_dir: str, *, extra_ids: int,
                          vocab_path: Optional[str], seed: int,
                          validation_fraction: float, test_fraction: float):
  """(vocabulary file, vocabulary, user split function) of a registration.

  Checks the fractions; reads nothing (the vocabulary loads at first use).
  """
  _check_fractions(validation_fraction, test_fraction)
  vocab_file = vocab_path or text_tasks.default_vocab_path(data_dir)
  vocabulary = text_tasks.dataset_vocabulary(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_file, check=False)
  split_fn = functools.partial(split_users, seed=seed,
                               validation_fraction=validation_fraction,
                               test_fraction=test_fraction)
  return vocab_file, vocabulary, split_fn


def _add_task(full_name: str, source: seqio.DataSource,
              vocabulary: seqio.Vocabulary, preprocessors: Sequence[Callable],
              *, shuffle_buffer_size: int, seed: int,
              config: Mapping[str, object]) -> str:
  """Registers (replacing) `full_name`, a SequenceTask; returns the name."""
  seqio.TaskRegistry.remove(full_name)
  seqio.TaskRegistry.add(
      full_name, source=source,
      output_features=text_tasks.output_features(vocabulary),
      preprocessors=preprocessors, shuffle_buffer_size=shuffle_buffer_size,
      task_cls=sequence_tasks.SequenceTask, default_seed=seed, config=config)
  return full_name


def register_narrative_task(
    name: str,
    data_dir: str,
    *,
    field: str,
    max_history: int = 20,
    history: Optional[str] = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_input_len: int = 32,
    max_target_len: int = 64,
    extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
    vocab_path: Optional[str] = None,
    titles_in_input: bool = False,
    shuffle_histories: bool = False,
    prepare_hint: Optional[str] = None,
    shuffle_buffer_size: int = sequence_tasks.DEFAULT_SHUFFLE_BUFFER,
) -> str:
  """Registers (replacing) `<name>_narrative_<field slug>`; returns the name.

  Args:
    name: prefix of the task name.
    data_dir: prepared dataset with narratives and a SentencePiece model.
    field: narrative field (stats.json `narrative_fields`), e.g.
      'user_summary', 'purchase_reason', 'endorsement', 'long_summary'; or
      a per-item field (`per_item_fields`, e.g. 'review_text', spelled
      bare or 'per_item/review_text'; `resolve_field`): the target is the
      text of the user's last item.
    max_history: most recent history items kept (`history_items` length).
    history: 'all', 'before_last' or 'before_last_with_next'; None: the
      default of `field` (`DEFAULT_HISTORY`, else 'all'; a per-item field:
      'before_last_with_next', and 'all' is refused).
    validation_fraction, test_fraction: users held out (`split_users`).
    seed: the user split's, the history shuffle's and `get_dataset`'s seed.
    max_input_len, max_target_len: default lengths of `inputs` / `targets`
      (EOS included), recorded in `task.config`.
    extra_ids: sentinels on top of the SentencePiece pieces.
    vocab_path: SentencePiece model (default `<data_dir>/spm.model`).
    titles_in_input: `inputs` also lists the history titles (and, with
      'before_last_with_next', "next: <title>").
    shuffle_histories: every user gets another user's history and next
      item (a seeded derangement within each split), keeping its targets.
    prepare_hint: command printed when the dataset is missing.
    shuffle_buffer_size: post-preprocessing shuffle buffer.

  Raises:
    ValueError: a bad argument ('all' for a per-item field included), or a
      `field` the dataset (when its stats.json exists) lacks, naming the
      available narrative and per-item fields.
  """
  if not isinstance(field, str) or not field:
    raise ValueError(f"narrative field={field!r}: expected a non-empty name")
  key = resolve_field(data_dir, field)
  mode = history_mode(field, history,
                      per_item=key.startswith(PER_ITEM_PREFIX))
  if int(max_history) < 1:
    raise ValueError(f"narrative max_history={max_history}: expected >= 1")
  if max_input_len < 2 or max_target_len < 2:
    raise ValueError(f"max_input_len={max_input_len}, max_target_len="
                     f"{max_target_len}: expected >= 2 (a token and EOS)")
  vocab_file, vocabulary, split_fn = _vocabulary_and_split(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_path, seed=seed,
      validation_fraction=validation_fraction, test_fraction=test_fraction)
  source = NarrativeSource(
      data_dir, field=field, history=mode, max_history=max_history,
      split_fn=split_fn, vocab_path=vocab_file, seed=seed,
      titles_in_input=titles_in_input, shuffle_histories=shuffle_histories,
      prepare_hint=prepare_hint)
  config = dict(task="narrative", data_dir=data_dir, field=field,
                target_key=key, history=mode, max_history=int(max_history),
                max_input_len=max_input_len, max_target_len=max_target_len,
                extra_ids=extra_ids, vocab_path=vocab_file, seed=seed,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction, titles_in_input=titles_in_input,
                shuffle_histories=shuffle_histories)
  return _add_task(task_name(name, field), source, vocabulary,
                   [seqio.preprocessors.tokenize,
                    seqio.preprocessors.append_eos_after_trim],
                   shuffle_buffer_size=shuffle_buffer_size, seed=seed,
                   config=config)


# -- span corruption over the narratives (LM pretraining) ---------------------


def span_corruption_task_name(name: str) -> str:
  """The registered name of the narrative span-corruption task."""
  return f"{name}_{SPAN_CORRUPTION}"


def _read_narratives(data: prepared.PreparedDataset, fields: Sequence[str]):
  """(user_ids, {field: narratives}) of every user, file order."""
  full = data.feature_spec()
  keys = [prepared.NARRATIVE_PREFIX + f for f in fields]
  spec = {k: full[k] for k in [prepared.USER_ID] + keys}

  def parse(records):
    ex = tf.io.parse_example(records, spec)
    return ex[prepared.USER_ID], tuple(ex[k] for k in keys)
  ds = tf.data.TFRecordDataset(data.sequence_files).batch(
      sources.BATCH_SIZE).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
  users, texts = [], {f: [] for f in fields}
  for uid, batch_texts in ds.as_numpy_iterator():
    users.extend(u.decode("utf-8") for u in uid)
    for f, column in zip(fields, batch_texts):
      texts[f].extend(t.decode("utf-8") for t in column)
  return users, texts


class NarrativeCorpusSource(text_tasks.ColumnsSource):
  """One example per (user, field) non-empty narrative of a split's users.

  Columns `user_id`, `field` and `targets` (the narrative), users in file
  order and, per user, `fields` in order. Every user record is read once, at
  the first `get_dataset` / `num_input_examples` / `columns` / `stats`.
  `get_dataset` gives the examples in that order (shuffled when asked).

  Args:
    data_dir: prepared dataset with narratives and a SentencePiece model.
    fields: narrative fields read; None: all of the dataset's (stats.json
      `narrative_fields`, read at first use).
    split_fn: user count -> {split: user positions} (`split_users`).
    vocab_path: SentencePiece model (checked to exist at first use).
    prepare_hint: command printed when the dataset is missing.
  """

  COUNT_COLUMN = USER_ID

  def __init__(self, data_dir: str, *, fields: Optional[Sequence[str]],
               split_fn: Callable[[int], Mapping[str, np.ndarray]],
               vocab_path: str, prepare_hint: Optional[str] = None):
    super().__init__(data_dir, split_fn=split_fn, vocab_path=vocab_path,
                     prepare_hint=prepare_hint)
    self._fields = tuple(fields) if fields is not None else None
    self._stats: Dict[str, Dict[str, int]] = {}

  def __str__(self):
    return (f"NarrativeCorpusSource({', '.join(self._fields or ('all',))}, "
            f"{self._data_dir})")

  @property
  def fields(self) -> Tuple[str, ...]:
    """The fields read (resolved from stats.json when not given)."""
    if self._fields is None:
      fields = available_fields(self._data_dir)
      if fields is None:  # no dataset: _open_prepared names the command
        _open_prepared(self._data_dir, (), self._vocab_path,
                       self._prepare_hint)
      if not fields:
        raise ValueError(f"{self._data_dir}: the dataset has no narratives "
                         "(stats.json narrative_fields is empty)")
      self._fields = tuple(fields)
    return self._fields

  def _build(self, split: str) -> None:
    del split  # every split at once
    fields = self.fields
    data = _open_prepared(self._data_dir, fields, self._vocab_path,
                          self._prepare_hint)
    users, texts = _read_narratives(data, fields)
    columns = {}
    for split, positions in self._split_fn(len(users)).items():
      counts = {"users": len(positions), "examples": 0, "skipped_empty": 0}
      rows = []
      for p in positions:
        for f in fields:
          if texts[f][p].strip():
            rows.append((users[p], f, texts[f][p]))
          else:
            counts["skipped_empty"] += 1
      counts["examples"] = len(rows)
      columns[split] = {
          USER_ID: np.asarray([r[0] for r in rows], object),
          FIELD: np.asarray([r[1] for r in rows], object),
          TARGETS: np.asarray([r[2] for r in rows], object),
      }
      self._stats[split] = counts
      print(f"narrative span corruption {split}: {counts['examples']} "
            f"narratives of {counts['users']} users ({', '.join(fields)}), "
            f"{counts['skipped_empty']} skipped (empty); {self._data_dir}",
            file=sys.stderr, flush=True)
    self._columns = columns

  def stats(self, split: str) -> Dict[str, int]:
    """{'users', 'examples', 'skipped_empty'}: examples + skipped_empty is
    users x fields (one count per (user, field) pair)."""
    self.columns(split)
    return dict(self._stats[split])


def register_narrative_span_corruption(
    name: str,
    data_dir: str,
    *,
    fields: Optional[Sequence[str]] = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_input_len: int = 64,
    max_target_len: int = 32,
    extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
    vocab_path: Optional[str] = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    span_max_tokens: Optional[int] = None,
    prepare_hint: Optional[str] = None,
    shuffle_buffer_size: int = sequence_tasks.DEFAULT_SHUFFLE_BUFFER,
) -> str:
  """Registers (replacing) `<name>_narrative_span_corruption`; returns it.

  T5 span corruption of the users' narratives, one example per (user, field)
  non-empty narrative of each split's users (module docstring). Give the
  seed and fractions of the narrative tasks so that train is their training
  users.

  Args:
    name: prefix of the task name.
    data_dir: prepared dataset with narratives and a SentencePiece model.
    fields: narrative fields; None: every field of the dataset
      (stats.json `narrative_fields`, read now when it exists).
    seed: the user split's seed (as `register_narrative_task`'s) and
      `get_dataset`'s (the corruption's).
    validation_fraction, test_fraction: users held out (`split_users`).
    max_input_len, max_target_len: default lengths of `inputs` / `targets`
      (EOS included), recorded in `task.config`.
    extra_ids: sentinels on top of the SentencePiece pieces.
    vocab_path: SentencePiece model (default `<data_dir>/spm.model`).
    noise_density, mean_noise_span_length: span corruption.
    span_max_tokens: tokens of a narrative kept before corruption; default
      `max_input_len - 1` (so the corrupted inputs fit with their EOS).
    prepare_hint: command printed when the dataset is missing.
    shuffle_buffer_size: post-preprocessing shuffle buffer.

  Raises:
    ValueError: a bad argument, or a field the dataset (when its stats.json
      exists) lacks, naming the available fields.
  """
  if fields is not None:
    if isinstance(fields, str) or not all(
        isinstance(f, str) and f for f in fields) or not fields:
      raise ValueError(f"narrative span corruption fields={fields!r}: "
                       "expected None (all) or a non-empty sequence of "
                       "field names")
    if len(set(fields)) != len(fields):
      raise ValueError(f"narrative span corruption fields={list(fields)}: "
                       "a field is listed twice")
    for field in fields:
      check_field(data_dir, field)
    fields = tuple(fields)
  else:  # the dataset's fields; None: no dataset yet, resolved at first use
    fields = available_fields(data_dir)
    if fields is not None and not fields:
      raise ValueError(f"{data_dir}: the dataset has no narratives "
                       "(stats.json narrative_fields is empty)")
    fields = tuple(fields) if fields is not None else None
  if max_input_len < 2 or max_target_len < 2:
    raise ValueError(f"max_input_len={max_input_len}, max_target_len="
                     f"{max_target_len}: expected >= 2 (a token and EOS)")
  max_tokens = (max_input_len - 1 if span_max_tokens is None
                else int(span_max_tokens))
  if max_tokens < 1:
    raise ValueError(f"span_max_tokens={span_max_tokens}: expected >= 1")
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density={noise_density}: expected (0, 1)")
  if mean_noise_span_length < 1.0:
    raise ValueError(f"mean_noise_span_length={mean_noise_span_length}: "
                     "expected >= 1")
  vocab_file, vocabulary, split_fn = _vocabulary_and_split(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_path, seed=seed,
      validation_fraction=validation_fraction, test_fraction=test_fraction)
  source = NarrativeCorpusSource(data_dir, fields=fields, split_fn=split_fn,
                                 vocab_path=vocab_file,
                                 prepare_hint=prepare_hint)
  config = dict(task=SPAN_CORRUPTION, data_dir=data_dir,
                fields=list(fields) if fields else None,
                max_input_len=max_input_len, max_target_len=max_target_len,
                extra_ids=extra_ids, vocab_path=vocab_file, seed=seed,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction, noise_density=noise_density,
                mean_noise_span_length=mean_noise_span_length,
                span_max_tokens=max_tokens)
  steps = [seqio.preprocessors.tokenize,
           seqio.utils.add_kwargs_to_transform(
               span_corruption.span_corruption, noise_density=noise_density,
               mean_noise_span_length=mean_noise_span_length,
               max_tokens=max_tokens),
           seqio.preprocessors.append_eos_after_trim]
  return _add_task(span_corruption_task_name(name), source, vocabulary,
                   steps, shuffle_buffer_size=shuffle_buffer_size, seed=seed,
                   config=config)
