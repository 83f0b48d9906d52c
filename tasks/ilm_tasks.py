"""SeqIO tasks of ILM (issue 20) and LANCER (issue 21): Q-Former pretraining
pairs, item slots, history titles and the knowledge task.

ILM (Yang et al. 2024) trains a Q-Former item encoder in two phases. Every
task here reads a prepared dataset once, on first use, into numpy columns
(`ILMSource`, a `text_tasks.ColumnsSource`) and is registered (replacing) as
`<name>_ilm_<task>`; registration reads at most stats.json.

Phase 1 (Q-Former pretraining; `input_pipeline/ilm_data.py` serves them to
`mixture.MixtureData`), all features int32:

  item_text   one example per item with a text: `item` [] (1..N) and
              `text_tokens` [max_text_len] = CLS (`<extra_id_0>`'s id), the
              item's text in the dataset's SentencePiece pieces, EOS (1),
              0-padded (the pieces are cut so that CLS and EOS fit).
              The text is the title (`text_fields`, e.g. title + categories
              + brand, rendered by `text/item_texts.py`). Item split of
              `text_tasks.split_items` (the split of the text tasks with
              the same seed and fractions): train holds the training items,
              validation / test the held-out ones (for retrieval checks).
              Evaluation examples also carry `text` (the string).
  item_item   (`item`, `pair_item`): two different items at most `window`
              positions apart in a user's leave-one-out TRAINING part
              (x_1..x_{n-2}), the earlier one as `item`, one example per
              co-occurrence (pairs that co-occur often come often). The
              held-out items x_{n-1}, x_n are never in a train pair.
              Validation: the pairs of x_{n-1} with the items up to `window`
              before it; test: those of x_n (for checks only).
  user_item   (`user_items` [max_history], `item` []): a user's training
              prefix (most recent `max_history` items, oldest first,
              0-padded at the end) and the next training item; every prefix
              with `train_prefixes` (default), else the last one.
              Validation: the training part -> x_{n-1}; test: x_1..x_{n-1}
              -> x_n.

Phase 2 (item tokens in the slots of a frozen T5; `ilm_data.ILMData`):
T5 text-to-text examples (`inputs`, `targets`, tokenised, EOS appended, and
their `*_pretokenized` strings) whose inputs write every item as
`tokens_per_item` space-separated copies of the slot token `<extra_id_99>`
(the dataset vocabulary with 100 extra ids encodes each to its single id,
`slot_token_id`; the preprocessor `write_slot_inputs` writes them from
`slot_items`) -- or, with `items_as='titles'`, as their titles (below) --
plus int32 passthrough features:

  slot_items     [max_slot_items] the items in the order of their slots,
                 oldest first, 0-padded at the end (1 for item_to_title
                 and item_to_text, max_history otherwise)
  target_item    [1] the item whose title (item_to_text: text) is the
                 target
  history_items  [max_history] the user's visible history (= the slot
                 items of the history tasks; 0 for the item tasks), for
                 excluding the history from rankings
  item_index     [] the target item again (as the text tasks')

Tasks:
  item_to_title          'item: <slots>' -> the item's title; the item split
                         above (held-out items' titles are validation/test).
  history_to_next_title  'history: <slots> <slots> ...' (the most recent
                         `max_history` items, oldest first) -> the next
                         item's title. Leave-one-out per user: train has
                         every prefix of the training part x_1..x_{n-2}
                         with at least one item before its target
                         (`train_prefixes`, default; False: only the last,
                         x_1..x_{n-3} -> x_{n-2}); validation x_1..x_{n-2}
                         -> x_{n-1}; test x_1..x_{n-1} -> x_n. Examples also
                         carry `user_id`.
  critique_next_title    'history: <slots> ... critique: <text>' -> the next
                         item's title, where <text> is the dataset's
                         critique shown before the target (prepared
                         `critiques`, as FLARE reads them); the examples of
                         history_to_next_title whose target has a non-empty
                         critique (the others are skipped and counted).
                         A dataset without critiques (stats.json
                         has_critiques false) is refused at registration.
                         Examples also carry `critique`.

  item_to_text           'item: <slots>' -> the item's text without its title
                         (categories, brand and description, rendered by
                         `text/item_texts.py`): LANCER's knowledge task. The
                         item split of item_to_title; items without a title
                         or without that text are skipped and counted.

Targets without a title are skipped and counted (`ILMSource.stats`).

Items as titles (`items_as='titles'`, LANCER, Li et al. 2023): no slot
tokens; `write_title_inputs` writes the non-zero `slot_items` as their
titles in plain text joined by ' ; ', NEWEST FIRST:
'history: <title of x_{t-1}> ; <title of x_{t-2}> ; ... ; <oldest title>'
(item_to_text: 'item: <title>'). `slot_items` / `history_items` keep their
meaning and order (oldest first, 0-padded at the end); only the text is
reversed, so that when the tokenised input is cut at max_input_len (seqio's
trim, before EOS) it is the OLDEST titles that are lost: a history longer
than the window uses its last items, and `max_history` is the window in
items, max_input_len in tokens. `ilm_data.ILMData` checks that the prompt,
the longest title and EOS fit, so the newest title is always whole. An item
without a title is left out of the text. The titles are looked up in TF (a
string table by item id, read from items.jsonl once per registration on
first use, and `tf.gather`), not stored per example. The critique of
critique_next_title is still written after the history (' critique:
<text>'), so a history that fills max_input_len cuts the critique first.
item_to_title is refused with titles (its input would be its target).
"""

import functools
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.seqio_ext import sources
from recsys_jax.text import item_texts
from tasks import sequence_tasks
from tasks import text_tasks

# Phase 1.
ITEM_TEXT = "item_text"
ITEM_ITEM = "item_item"
USER_ITEM = "user_item"
PHASE1_TASKS = (ITEM_TEXT, ITEM_ITEM, USER_ITEM)
# Phase 2.
ITEM_TO_TITLE = "item_to_title"
HISTORY_TO_NEXT_TITLE = "history_to_next_title"
CRITIQUE_NEXT_TITLE = "critique_next_title"
ITEM_TO_TEXT = "item_to_text"  # LANCER's knowledge task
PHASE2_TASKS = (ITEM_TO_TITLE, HISTORY_TO_NEXT_TITLE, CRITIQUE_NEXT_TITLE,
                ITEM_TO_TEXT)
# Phase-2 tasks of one item (its slots / title), on the item split.
ITEM_TASKS = (ITEM_TO_TITLE, ITEM_TO_TEXT)
# How phase-2 inputs write an item (module docstring).
SLOTS = "slots"
TITLES = "titles"
ITEMS_AS = (SLOTS, TITLES)

# Features.
ITEM = "item"
TEXT_TOKENS = "text_tokens"
TEXT = "text"
PAIR_ITEM = "pair_item"
USER_ITEMS = "user_items"
SLOT_ITEMS = "slot_items"
TARGET_ITEM = "target_item"
HISTORY_ITEMS = "history_items"
CRITIQUE = "critique"
USER_ID = prepared.USER_ID
INPUTS = text_tasks.INPUTS
TARGETS = text_tasks.TARGETS
ITEM_INDEX = text_tasks.ITEM_INDEX

# Special tokens (sentinels of the dataset vocabulary).
CLS_TOKEN = "<extra_id_0>"
DEC_TOKEN = "<extra_id_1>"
SLOT_TOKEN = "<extra_id_99>"
MIN_EXTRA_IDS = 100  # SLOT_TOKEN needs <extra_id_99>
EOS_ID = 1
ITEM_PROMPT = "item:"
HISTORY_PROMPT = "history:"
CRITIQUE_PROMPT = "critique:"
TITLE_SEPARATOR = " ; "
# The fields of item_to_text's target: an item's text without its title.
KNOWLEDGE_FIELDS = (item_texts.CATEGORIES, item_texts.BRAND,
                    item_texts.DESCRIPTION)
PREPARE_HINT = text_tasks.PREPARE_HINT


def task_name(name: str, task: str) -> str:
  """The registered name of ILM task `task` (phase 1 or 2)."""
  if task not in PHASE1_TASKS + PHASE2_TASKS:
    raise ValueError(f"ILM task {task!r}: expected one of "
                     f"{list(PHASE1_TASKS + PHASE2_TASKS)}")
  return f"{name}_ilm_{task}"


def special_id(vocabulary: seqio.Vocabulary, token: str) -> int:
  """The single id `vocabulary` encodes `token` ('<extra_id_k>') to.

  Raises:
    ValueError: `token` is not one piece (too few extra ids).
  """
  ids = list(vocabulary.encode(token))
  if len(ids) != 1:
    raise ValueError(
        f"{token!r} encodes to {len(ids)} ids {ids[:8]} in the vocabulary "
        f"(extra_ids={getattr(vocabulary, 'extra_ids', '?')}); ILM needs "
        f"extra_ids >= {MIN_EXTRA_IDS} so that it is one sentinel")
  return int(ids[0])


def slot_token_id(vocabulary: seqio.Vocabulary) -> int:
  """The id of the slot token `<extra_id_99>`."""
  return special_id(vocabulary, SLOT_TOKEN)


def slot_text(num_items: int, tokens_per_item: int) -> str:
  """`num_items` x `tokens_per_item` slot tokens, space-separated."""
  return " ".join([SLOT_TOKEN] * (int(num_items) * int(tokens_per_item)))


def check_extra_ids(extra_ids: int, what: str = "ILM") -> None:
  if int(extra_ids) < MIN_EXTRA_IDS:
    raise ValueError(f"{what} extra_ids={extra_ids}: expected >= "
                     f"{MIN_EXTRA_IDS} (the slot token is {SLOT_TOKEN})")


# -- reading the dataset ------------------------------------------------------


def _stats(data_dir: str) -> Optional[dict]:
  path = os.path.join(data_dir, prepared.STATS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_critiques(data_dir: str, task: str = CRITIQUE_NEXT_TITLE) -> None:
  """Fails (one line) when the dataset has no critiques; a dataset not
  prepared yet passes (its build fails later naming the command)."""
  stats = _stats(data_dir)
  if stats is not None and not stats.get("has_critiques"):
    raise bad_input.BadInputError(
        os.path.join(data_dir, prepared.STATS_FILE), None,
        f"dataset {data_dir} has no critiques (has_critiques false); ILM task "
        f"{task!r} needs the critique shown before each item (the synthetic "
        f"store has them); use {HISTORY_TO_NEXT_TITLE!r} instead")


def read_users(data_dir: str, *, critiques: bool = False
               ) -> Tuple[List[str], List[np.ndarray], Optional[List[list]]]:
  """(user ids, item ids per user, critiques per user) in file order.

  Item ids are int64 arrays (1..N, checked); critiques (with `critiques`)
  are lists of str aligned with the items ("" where none).
  """
  text_tasks.check_prepared(data_dir)
  data = prepared.PreparedDataset(data_dir)
  if not data.sequence_files:
    raise FileNotFoundError(
        f"{data_dir}: {prepared.STATS_FILE} exists but no "
        f"{prepared.SEQUENCES_PREFIX}-* files; re-run the prepare step")
  if critiques:
    check_critiques(data_dir)
  full = data.feature_spec()
  keys = [prepared.USER_ID, prepared.ITEM_IDS] + (
      [prepared.CRITIQUES] if critiques else [])
  spec = {k: full[k] for k in keys}

  def parse(records):
    ex = tf.io.parse_example(records, spec)
    out = [ex[prepared.USER_ID]]
    for k in keys[1:]:
      r = tf.RaggedTensor.from_sparse(ex[k])
      out += [r.values, r.row_lengths()]
    return tuple(out)
  ds = tf.data.TFRecordDataset(data.sequence_files).batch(
      sources.BATCH_SIZE).map(parse)
  num_items = data.num_items
  users, items, crits = [], [], ([] if critiques else None)
  for batch in ds.as_numpy_iterator():
    uid, values, lengths = batch[:3]
    users.extend(u.decode("utf-8") for u in uid)
    items.extend(np.split(values.astype(np.int64), np.cumsum(lengths)[:-1]))
    if critiques:
      c_values, c_lengths = batch[3:]
      if not np.array_equal(c_lengths, lengths):
        raise ValueError(f"{data_dir}: a user has critiques not aligned with "
                         "its items; re-run the prepare step")
      texts = [t.decode("utf-8") for t in c_values]
      ends = np.cumsum(c_lengths)
      crits.extend(texts[e - n:e] for e, n in zip(ends, c_lengths))
  for u, ids in zip(users, items):
    if len(ids) and (ids.min() < 1 or ids.max() > num_items):
      raise ValueError(f"{data_dir}: user {u!r} has item ids outside "
                       f"1..{num_items}")
  return users, items, crits


def padded(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  """int32 [len(rows), width], each row left-aligned and 0-padded."""
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def history_targets(ids: np.ndarray, split: str, *, train_prefixes: bool
                    ) -> List[int]:
  """Positions in `ids` (one user, x_1..x_n) of the split's targets.

  Leave-one-out: train targets lie in the training part x_1..x_{n-2}, each
  with at least one item before it (every one with `train_prefixes`, else
  the last); validation's is x_{n-1}, test's x_n. The history of target
  position t is ids[:t].
  """
  n = len(ids)
  if split == "validation":
    return [n - 2] if n >= 2 else []
  if split == "test":
    return [n - 1] if n >= 2 else []
  last = n - 3  # position of x_{n-2}
  if last < 1:
    return []
  return list(range(1, last + 1)) if train_prefixes else [last]


# -- the source ----------------------------------------------------------------


class ILMSource(text_tasks.ColumnsSource):
  """Numpy columns of every split, built at once on first use.

  Args:
    data_dir: the prepared dataset.
    build: data_dir -> ({split: columns}, {split: counts}).
    count_column: a column with one entry per example.
    vocab_path: the SentencePiece model (checked to exist at build time).
    description: named in `str` and the build's log line.
    prepare_hint: command printed when the dataset is missing.
  """

  def __init__(self, data_dir: str, *, build: Callable[[str], Tuple[
      Dict[str, Dict[str, np.ndarray]], Dict[str, Dict[str, int]]]],
               count_column: str, vocab_path: str, description: str,
               prepare_hint: Optional[str] = None):
    # `build` splits (items or leave-one-out), not ColumnsSource's split_fn.
    super().__init__(data_dir, split_fn=lambda n: {}, vocab_path=vocab_path,
                     prepare_hint=prepare_hint)
    self.COUNT_COLUMN = count_column  # pylint: disable=invalid-name
    self._build_fn = build
    self._description = description
    self._stats: Dict[str, Dict[str, int]] = {}

  def __str__(self):
    return f"ILMSource({self._description}, {self._data_dir})"

  def _build(self, split: str) -> None:
    del split  # every split at once
    text_tasks.check_prepared(self._data_dir, self._prepare_hint)
    text_tasks.dataset_vocabulary(self._data_dir, vocab_path=self._vocab_path)
    columns, stats = self._build_fn(self._data_dir)
    for split in sources.SPLITS:
      counts = ", ".join(f"{k} {v}" for k, v in stats[split].items())
      print(f"ILM {self._description} {split}: {counts}; {self._data_dir}",
            file=sys.stderr, flush=True)
    self._columns, self._stats = columns, stats

  def stats(self, split: str) -> Dict[str, int]:
    """The split's counts (examples and skips; see the build)."""
    self.columns(split)
    return dict(self._stats[split])


# -- phase 1 -------------------------------------------------------------------


def _item_text_columns(data_dir: str, *, split_fn, text_fields: Sequence[str],
                       extra_ids: int, vocab_path: str, max_text_len: int):
  vocabulary = text_tasks.dataset_vocabulary(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_path)
  cls = special_id(vocabulary, CLS_TOKEN)
  rows = item_texts.read_rows(data_dir)
  columns, stats = {}, {}
  for split, items in split_fn(len(rows)).items():
    kept, texts, tokens = [], [], []
    for i in items:
      text = item_texts.render(rows[int(i) - 1], text_fields)
      if not text:
        continue
      pieces = list(vocabulary.encode(text))[:max_text_len - 2]
      kept.append(int(i))
      texts.append(text)
      tokens.append([cls] + pieces + [EOS_ID])
    columns[split] = {ITEM: np.asarray(kept, np.int32),
                      TEXT_TOKENS: padded(tokens, max_text_len),
                      TEXT: np.asarray(texts, object)}
    stats[split] = {"items": len(items), "examples": len(kept),
                    "skipped_no_text": len(items) - len(kept)}
  return columns, stats


def item_item_pairs(ids: np.ndarray, split: str, window: int
                    ) -> List[Tuple[int, int]]:
  """(earlier, later) pairs of one user's items for `split` (module doc).

  Pairs of equal items are left out.
  """
  n = len(ids)
  if split == "train":
    part = ids[:max(n - 2, 0)]
    pairs = [(int(part[i]), int(part[j])) for i in range(len(part))
             for j in range(i + 1, min(i + window, len(part) - 1) + 1)]
  else:
    p = n - 2 if split == "validation" else n - 1
    if p < 1:
      return []
    pairs = [(int(ids[j]), int(ids[p])) for j in range(max(0, p - window), p)]
  return [(a, b) for a, b in pairs if a != b]


def _item_item_columns(data_dir: str, *, window: int):
  users, histories, _ = read_users(data_dir)
  columns, stats = {}, {}
  for split in sources.SPLITS:
    pairs = [p for ids in histories for p in item_item_pairs(ids, split,
                                                             window)]
    arr = np.asarray(pairs, np.int32).reshape(-1, 2)
    columns[split] = {ITEM: arr[:, 0], PAIR_ITEM: arr[:, 1]}
    stats[split] = {"users": len(users), "examples": len(pairs)}
  return columns, stats


def _user_item_columns(data_dir: str, *, max_history: int,
                       train_prefixes: bool):
  users, histories, _ = read_users(data_dir)
  columns, stats = {}, {}
  for split in sources.SPLITS:
    prefixes, nexts = [], []
    for ids in histories:
      for t in history_targets(ids, split, train_prefixes=train_prefixes):
        prefixes.append(ids[max(0, t - max_history):t])
        nexts.append(int(ids[t]))
    columns[split] = {USER_ITEMS: padded(prefixes, max_history),
                      ITEM: np.asarray(nexts, np.int32)}
    stats[split] = {"users": len(users), "examples": len(nexts)}
  return columns, stats


def _int_feature(rank: int) -> seqio.Feature:
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                       dtype=tf.int32, rank=rank)


def register_ilm_pretrain_task(
    name: str,
    data_dir: str,
    *,
    task: str,
    max_text_len: int = 32,
    text_fields: Sequence[str] = (item_texts.TITLE,),
    window: int = 1,
    max_history: int = 20,
    train_prefixes: bool = True,
    extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
    vocab_path: Optional[str] = None,
    seed: int = 0,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shuffle_buffer_size: int = sequence_tasks.DEFAULT_SHUFFLE_BUFFER,
    prepare_hint: Optional[str] = None,
) -> str:
  """Registers (replacing) phase-1 task `<name>_ilm_<task>`; returns it.

  Args:
    name: prefix of the task name.
    data_dir: prepared dataset with a SentencePiece model (read lazily).
    task: 'item_text', 'item_item' or 'user_item' (module docstring).
    max_text_len: item_text: `text_tokens` width (CLS and EOS included).
    text_fields: item_text: item fields rendered as the text (default the
      title; e.g. ('title', 'categories', 'brand')).
    window: item_item: largest position gap of a pair (1: adjacent).
    max_history: user_item: `user_items` width.
    train_prefixes: user_item: every training prefix (else the last).
    extra_ids: sentinels of the vocabulary (CLS = `<extra_id_0>`).
    vocab_path: SentencePiece model (default `<data_dir>/spm.model`).
    seed: the item split's seed (as text_tasks') and `get_dataset`'s.
    validation_fraction, test_fraction: item_text's held-out items
      (`text_tasks.split_items`).
    shuffle_buffer_size: post-preprocessing shuffle buffer.
    prepare_hint: command printed when the dataset is missing.
  """
  if task not in PHASE1_TASKS:
    raise ValueError(f"ILM pretraining task {task!r}: expected one of "
                     f"{list(PHASE1_TASKS)}")
  if int(extra_ids) < 2:
    raise ValueError(f"ILM extra_ids={extra_ids}: expected >= 2 (CLS "
                     f"{CLS_TOKEN} and DEC {DEC_TOKEN})")
  text_tasks.check_fractions(validation_fraction, test_fraction)
  vocab_file = vocab_path or text_tasks.default_vocab_path(data_dir)
  vocabulary = text_tasks.dataset_vocabulary(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_file, check=False)
  config = dict(task=task, data_dir=data_dir, extra_ids=extra_ids,
                vocab_path=vocab_file, seed=seed)
  if task == ITEM_TEXT:
    fields = tuple(text_fields)
    bad = [f for f in fields if f not in item_texts.FIELDS]
    if not fields or bad or isinstance(text_fields, str):
      raise ValueError(f"ILM text_fields={text_fields!r}: expected a "
                       f"non-empty subset of {list(item_texts.FIELDS)}")
    if int(max_text_len) < 3:
      raise ValueError(f"ILM max_text_len={max_text_len}: expected >= 3 "
                       "(CLS, a piece, EOS)")
    split_fn = functools.partial(
        text_tasks.split_items, seed=seed,
        validation_fraction=validation_fraction, test_fraction=test_fraction)
    build = functools.partial(
        _item_text_columns, split_fn=split_fn, text_fields=fields,
        extra_ids=extra_ids, vocab_path=vocab_file,
        max_text_len=int(max_text_len))
    features = {ITEM: _int_feature(0),
                TEXT_TOKENS: seqio.Feature(vocabulary, add_eos=False,
                                           dtype=tf.int32, rank=1)}
    count = ITEM
    config.update(max_text_len=int(max_text_len), text_fields=list(fields),
                  validation_fraction=validation_fraction,
                  test_fraction=test_fraction)
  elif task == ITEM_ITEM:
    if int(window) < 1:
      raise ValueError(f"ILM item-item window={window}: expected >= 1")
    build = functools.partial(_item_item_columns, window=int(window))
    features = {ITEM: _int_feature(0), PAIR_ITEM: _int_feature(0)}
    count = ITEM
    config.update(window=int(window))
  else:
    if int(max_history) < 1:
      raise ValueError(f"ILM max_history={max_history}: expected >= 1")
    build = functools.partial(_user_item_columns,
                              max_history=int(max_history),
                              train_prefixes=bool(train_prefixes))
    features = {USER_ITEMS: _int_feature(1), ITEM: _int_feature(0)}
    count = ITEM
    config.update(max_history=int(max_history),
                  train_prefixes=bool(train_prefixes))
  source = ILMSource(data_dir, build=build, count_column=count,
                     vocab_path=vocab_file, description=task,
                     prepare_hint=prepare_hint)
  full_name = task_name(name, task)
  seqio.TaskRegistry.remove(full_name)
  seqio.TaskRegistry.add(
      full_name, source=source, output_features=features, preprocessors=[],
      shuffle_buffer_size=shuffle_buffer_size,
      task_cls=sequence_tasks.SequenceTask, default_seed=seed, config=config)
  return full_name


# -- phase 2 -------------------------------------------------------------------


def max_slot_items(task: str, max_history: int) -> int:
  """`slot_items` width of phase-2 task `task`."""
  return 1 if task in ITEM_TASKS else int(max_history)


def check_items_as(items_as: str, task: str, what: str = "ILM") -> None:
  """Fails (one line) on an unknown `items_as` or item_to_title with titles.
  """
  if items_as not in ITEMS_AS:
    raise ValueError(f"{what} items_as={items_as!r}: expected one of "
                     f"{list(ITEMS_AS)}")
  if items_as == TITLES and task == ITEM_TO_TITLE:
    raise ValueError(
        f"{what} task {ITEM_TO_TITLE!r} with items_as={TITLES!r}: its input "
        f"would be its target (the item's title), a copy task; use "
        f"{ITEM_TO_TEXT!r} (title -> the item's text) or items_as={SLOTS!r}")


def title_table(data_dir: str) -> Callable[[], List[str]]:
  """A callable returning the titles by item id (`[N + 2]`, 0 and N + 1
  empty), read from items.jsonl on its first call and kept."""
  return functools.lru_cache(maxsize=1)(functools.partial(
      item_texts.texts_by_index, data_dir, (item_texts.TITLE,)))


def _item_columns(items: Sequence[int], targets: Sequence[str],
                  max_history: int) -> Dict[str, np.ndarray]:
  """Columns of the one-item tasks: the item is slot, target and index."""
  n = len(items)
  kept = np.asarray(items, np.int32).reshape(n)
  return {
      ITEM_INDEX: kept,
      TARGETS: np.asarray(list(targets), object).reshape(n),
      SLOT_ITEMS: kept.reshape(n, 1),
      TARGET_ITEM: kept.reshape(n, 1).copy(),
      HISTORY_ITEMS: np.zeros((n, max_history), np.int32),
  }


def _item_to_title_columns(data_dir: str, *, split_fn, max_history: int):
  titles = item_texts.texts_by_index(data_dir, (item_texts.TITLE,))
  columns, stats = {}, {}
  for split, items in split_fn(len(titles) - 2).items():
    kept = [int(i) for i in items if titles[int(i)]]
    columns[split] = _item_columns(kept, [titles[i] for i in kept],
                                   max_history)
    stats[split] = {"items": len(items), "examples": len(kept),
                    "skipped_no_title": len(items) - len(kept)}
  return columns, stats


def _item_to_text_columns(data_dir: str, *, split_fn, max_history: int):
  titles = item_texts.texts_by_index(data_dir, (item_texts.TITLE,))
  texts = item_texts.texts_by_index(data_dir, KNOWLEDGE_FIELDS)
  columns, stats = {}, {}
  for split, items in split_fn(len(titles) - 2).items():
    items = [int(i) for i in items]
    no_title = sum(1 for i in items if not titles[i])
    kept = [i for i in items if titles[i] and texts[i]]
    columns[split] = _item_columns(kept, [texts[i] for i in kept],
                                   max_history)
    stats[split] = {"items": len(items), "examples": len(kept),
                    "skipped_no_title": no_title,
                    "skipped_no_text": len(items) - len(kept) - no_title}
  return columns, stats


def history_inputs(num_items: int, tokens_per_item: int,
                   critique: Optional[str] = None) -> str:
  """'history: <slots>' (and ' critique: <critique>')."""
  text = f"{HISTORY_PROMPT} {slot_text(num_items, tokens_per_item)}"
  if critique is not None:
    text += f" {CRITIQUE_PROMPT} {critique}"
  return text


def _inputs(ex: Dict[str, tf.Tensor], prompt: str, items: tf.Tensor
            ) -> tf.Tensor:
  """'<prompt> <items>' (+ ' critique: <critique>' where `ex` has one)."""
  parts = [f"{prompt} ", items]
  if CRITIQUE in ex:
    parts += [f" {CRITIQUE_PROMPT} ", ex[CRITIQUE]]
  return tf.strings.join(parts)


def write_slot_inputs(ds: tf.data.Dataset, *, prompt: str,
                      tokens_per_item: int) -> tf.data.Dataset:
  """SeqIO preprocessor: `inputs` = '<prompt> <slots>' (+ ' critique: ...').

  The slots are tokens_per_item slot tokens per non-zero `slot_items`
  entry; the critique part is written when the example has `critique`.
  Built here rather than stored in the source's columns: a row of
  max_history x tokens_per_item slot tokens is kilobytes of text.
  """

  def fn(ex):
    count = tf.math.count_nonzero(ex[SLOT_ITEMS], dtype=tf.int32)
    slots = tf.strings.reduce_join(
        tf.fill([count * tokens_per_item], SLOT_TOKEN), separator=" ")
    return {**ex, INPUTS: _inputs(ex, prompt, slots)}
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def write_title_inputs(ds: tf.data.Dataset, *, prompt: str,
                       titles: Callable[[], Sequence[str]]
                       ) -> tf.data.Dataset:
  """SeqIO preprocessor: `inputs` = '<prompt> <newest title> ; ... ;
  <oldest title>' (+ ' critique: ...').

  The non-zero `slot_items` (oldest first) are written newest first, so
  that seqio's trim at max_input_len drops the oldest titles (module
  docstring); items without a title are left out of the text.

  Args:
    ds: examples with `slot_items` (and `critique`, written after them).
    prompt: 'history:' or 'item:'.
    titles: returns the titles by item id (`title_table`); gathered in TF.
  """
  table = tf.constant(list(titles()), tf.string)

  def fn(ex):
    items = ex[SLOT_ITEMS]
    newest_first = tf.reverse(tf.boolean_mask(items, items != 0), [0])
    names = tf.gather(table, newest_first)
    names = tf.boolean_mask(names, tf.strings.length(names) > 0)
    text = tf.strings.reduce_join(names, separator=TITLE_SEPARATOR)
    return {**ex, INPUTS: _inputs(ex, prompt, text)}
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _history_columns(data_dir: str, *, with_critique: bool,
                     max_history: int, train_prefixes: bool):
  users, histories, crits = read_users(data_dir, critiques=with_critique)
  titles = item_texts.texts_by_index(data_dir, (item_texts.TITLE,))
  columns, stats = {}, {}
  for split in sources.SPLITS:
    rows = []
    counts = {"users": len(users), "examples": 0, "skipped_no_title": 0}
    if with_critique:
      counts["skipped_no_critique"] = 0
    for u, ids in enumerate(histories):
      for t in history_targets(ids, split, train_prefixes=train_prefixes):
        target = int(ids[t])
        if not titles[target]:
          counts["skipped_no_title"] += 1
          continue
        critique = crits[u][t] if with_critique else None
        if with_critique and not critique:
          counts["skipped_no_critique"] += 1
          continue
        history = ids[max(0, t - max_history):t]
        rows.append((users[u], history, target, critique))
    counts["examples"] = n = len(rows)
    hist = padded([r[1] for r in rows], max_history)
    cols = {
        USER_ID: np.asarray([r[0] for r in rows], object),
        ITEM_INDEX: np.asarray([r[2] for r in rows], np.int32),
        TARGETS: np.asarray([titles[r[2]] for r in rows], object),
        SLOT_ITEMS: hist,
        TARGET_ITEM: np.asarray([r[2] for r in rows], np.int32).reshape(n, 1),
        HISTORY_ITEMS: hist.copy(),
    }
    if with_critique:
      cols[CRITIQUE] = np.asarray([r[3] for r in rows], object)
    columns[split], stats[split] = cols, counts
  return columns, stats


def register_ilm_task(
    name: str,
    data_dir: str,
    *,
    task: str,
    items_as: str = SLOTS,
    tokens_per_item: Optional[int] = 8,
    max_history: int = 10,
    max_input_len: int = 128,
    max_target_len: int = 32,
    train_prefixes: bool = True,
    extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
    vocab_path: Optional[str] = None,
    seed: int = 0,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shuffle_buffer_size: int = sequence_tasks.DEFAULT_SHUFFLE_BUFFER,
    prepare_hint: Optional[str] = None,
) -> str:
  """Registers (replacing) phase-2 task `<name>_ilm_<task>`; returns it.

  Args:
    name: prefix of the task name.
    data_dir: prepared dataset with a SentencePiece model (read lazily;
      critique_next_title reads stats.json now).
    task: 'item_to_title', 'history_to_next_title',
      'critique_next_title' or 'item_to_text' (module docstring).
    items_as: 'slots' (slot tokens, ILM) or 'titles' (the items' titles in
      plain text, newest first, LANCER; not with item_to_title).
    tokens_per_item: slot tokens per item (unused with titles).
    max_history: most recent history items written as slots or titles
      (`history_items` width, and `slot_items`' for the history tasks).
    max_input_len, max_target_len: default lengths of `inputs` / `targets`
      (EOS included), recorded in `task.config`.
    train_prefixes: history tasks: train on every prefix of the training
      part (else only the last).
    extra_ids: sentinels of the vocabulary (with slots >= 100: the slot
      token is `<extra_id_99>`).
    vocab_path: SentencePiece model (default `<data_dir>/spm.model`).
    seed: the item tasks' item split seed (as text_tasks') and
      `get_dataset`'s.
    validation_fraction, test_fraction: the item tasks' held-out items.
    shuffle_buffer_size: post-preprocessing shuffle buffer.
    prepare_hint: command printed when the dataset is missing.

  Raises:
    BadInputError: critique_next_title over a dataset without critiques.
    ValueError: a bad argument.
  """
  if task not in PHASE2_TASKS:
    raise ValueError(f"ILM task {task!r}: expected one of "
                     f"{list(PHASE2_TASKS)}")
  check_items_as(items_as, task)
  if items_as == SLOTS:
    check_extra_ids(extra_ids)
    if tokens_per_item is None or int(tokens_per_item) < 1:
      raise ValueError(f"ILM tokens_per_item={tokens_per_item}: expected >= "
                       "1 (slot tokens per item)")
  if int(max_history) < 1:
    raise ValueError(f"ILM max_history={max_history}: expected >= 1")
  if max_input_len < 2 or max_target_len < 2:
    raise ValueError(f"max_input_len={max_input_len}, max_target_len="
                     f"{max_target_len}: expected >= 2 (a token and EOS)")
  text_tasks.check_fractions(validation_fraction, test_fraction)
  if task == CRITIQUE_NEXT_TITLE:
    check_critiques(data_dir, task)
  vocab_file = vocab_path or text_tasks.default_vocab_path(data_dir)
  vocabulary = text_tasks.dataset_vocabulary(
      data_dir, extra_ids=extra_ids, vocab_path=vocab_file, check=False)
  if task in ITEM_TASKS:
    split_fn = functools.partial(
        text_tasks.split_items, seed=seed,
        validation_fraction=validation_fraction, test_fraction=test_fraction)
    columns_fn = (_item_to_title_columns if task == ITEM_TO_TITLE
                  else _item_to_text_columns)
    build = functools.partial(columns_fn, split_fn=split_fn,
                              max_history=int(max_history))
    prompt = ITEM_PROMPT
  else:
    build = functools.partial(
        _history_columns, with_critique=task == CRITIQUE_NEXT_TITLE,
        max_history=int(max_history), train_prefixes=bool(train_prefixes))
    prompt = HISTORY_PROMPT
  source = ILMSource(data_dir, build=build, count_column=ITEM_INDEX,
                     vocab_path=vocab_file, description=task,
                     prepare_hint=prepare_hint)
  if items_as == SLOTS:
    tokens_per_item = int(tokens_per_item)
    write_inputs = seqio.utils.add_kwargs_to_transform(
        write_slot_inputs, prompt=prompt, tokens_per_item=tokens_per_item)
  else:
    tokens_per_item = None
    write_inputs = seqio.utils.add_kwargs_to_transform(
        write_title_inputs, prompt=prompt, titles=title_table(data_dir))
  config = dict(task=task, data_dir=data_dir, items_as=items_as,
                tokens_per_item=tokens_per_item,
                max_history=int(max_history),
                max_slot_items=max_slot_items(task, max_history),
                max_input_len=max_input_len, max_target_len=max_target_len,
                train_prefixes=bool(train_prefixes), extra_ids=extra_ids,
                vocab_path=vocab_file, seed=seed,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction)
  full_name = task_name(name, task)
  seqio.TaskRegistry.remove(full_name)
  seqio.TaskRegistry.add(
      full_name, source=source,
      output_features=text_tasks.output_features(vocabulary),
      preprocessors=[
          write_inputs,
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim],
      shuffle_buffer_size=shuffle_buffer_size,
      task_cls=sequence_tasks.SequenceTask, default_seed=seed, config=config)
  return full_name

