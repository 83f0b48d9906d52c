"""SeqIO preprocessors turning leave-one-out examples into model features.

Order in a Bert4Rec task (see docs/TASKS.md):
  [remove_train_items ->] truncate_or_window -> bert4rec_inputs -> pad_or_pack
(`remove_train_items` only under the cold-item protocol.)

Train examples (no `target`) are truncated to the most recent `max_len` items
(or cut into sliding windows), masked for the cloze objective and padded (or
packed). Evaluation examples (with `target`) keep the most recent
`max_len - 1` items and get [MASK] appended at the position to predict.

The registered tasks feed them batches of examples from the source (see
"Examples travel in batches" below); each also takes single examples.

Every preprocessor takes `sequence_length`; when SeqIO passes one,
`sequence_length['item_ids']` overrides the `max_len` bound at registration.
Random choices use seeds from `seqio.map_over_dataset(num_seeds=1)`, which
`Task.get_dataset(seed=...)` makes deterministic.
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from recsys_jax.data import prepared
from recsys_jax.seqio_ext import sources
from recsys_jax.text import item_texts as item_texts_lib

ITEM_IDS = prepared.ITEM_IDS
TARGETS = "targets"
LOSS_WEIGHTS = "loss_weights"
SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
MODEL_FEATURES = (ITEM_IDS, TARGETS, LOSS_WEIGHTS)
PACKED_FEATURES = MODEL_FEATURES + (SEGMENT_IDS, POSITIONS)


def default_max_predictions(mask_prob: float, max_len: int) -> int:
  """The masked-position cap the Bert4Rec wrapper gathers by default."""
  return min(max_len, math.ceil(mask_prob * max_len) + 1)


def resolve_length(sequence_length: Optional[Mapping[str, int]],
                   max_len: Optional[int]) -> int:
  """Row length: `sequence_length['item_ids']` if given, else `max_len`."""
  length = None
  if sequence_length and sequence_length.get(ITEM_IDS) is not None:
    length = int(sequence_length[ITEM_IDS])
    for k in PACKED_FEATURES[1:]:
      other = sequence_length.get(k)
      if other is not None and int(other) != length:
        raise ValueError(
            f"sequence_length[{k!r}] = {other} but sequence_length['item_ids']"
            f" = {length}; all sequence features share one length")
  elif max_len is not None:
    length = int(max_len)
  if length is None:
    raise ValueError("no row length: pass sequence_length={'item_ids': L} or "
                     "bind max_len")
  if length < 2:
    raise ValueError(f"row length must be >= 2 (history + [MASK]); got "
                     f"{length}")
  return length


def resolve_num_items(num_items: Optional[int],
                      output_features: Optional[Mapping[str, seqio.Feature]]
                      ) -> int:
  """Catalogue size N: explicit, else item vocabulary size minus pad/[MASK]."""
  if num_items is not None:
    return int(num_items)
  if output_features and ITEM_IDS in output_features:
    return int(output_features[ITEM_IDS].vocabulary.vocab_size) - 2
  raise ValueError("num_items unknown: pass num_items= or output_features "
                   "with an 'item_ids' vocabulary of size N + 2")


# Examples travel in batches. `sources.PreparedSequenceSource(emit_batches=
# True)` (what the registered tasks use) yields batches of examples: `[B]`
# scalars and `[B, (n)]` ragged sequences. Every step below works on such a
# batch with one op per feature for the whole batch, and `pad_or_pack`, the
# last step, emits the dense rows one by one: tf.data's per-element cost (~25
# us of CPU per stage and example here) made per-example steps most of the
# input pipeline's CPU (benchmarks/README.md). Given one example per element
# instead (tests, other sources), a step batches `BLOCK` examples (as many as
# the source's batches hold), applies the same batch code and unbatches again,
# so both forms give the same values.
BLOCK = sources.BATCH_SIZE
# Binary-lifting levels of `pack_batch`: batches of < 2^24 examples.
_PACK_LEVELS = 24


def is_batched(ds: tf.data.Dataset) -> bool:
  """True when elements are batches (`item_ids` is `[B, (n)]`)."""
  return ds.element_spec[ITEM_IDS].shape.rank == 2


def _blockwise(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  """Applies batch function `fn` to `ds` in the form it comes in."""
  if is_batched(ds):
    return fn(ds)
  return fn(ds.ragged_batch(BLOCK)).unbatch()


def _ragged(v) -> tf.RaggedTensor:
  return v if isinstance(v, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(v)


def _aligned(ex) -> List[str]:
  return [ITEM_IDS] + sources.aligned_keys(ex.keys())


def _int64(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(x, tf.int64)


def take_slices(ex: Mapping[str, tf.Tensor], rows, starts, ends
                ) -> Dict[str, tf.Tensor]:
  """Example e of the result is items [starts[e], ends[e]) of row rows[e].

  Aligned features are sliced like `item_ids`; other features are copied
  from their row. `rows`, `starts`, `ends`: int64 `[E]`, 0 <= start < end <=
  the row's length.
  """
  ids = ex[ITEM_IDS]
  base = tf.gather(_int64(ids.row_starts()), rows)
  flat = tf.ragged.range(base + starts, base + ends)  # [E, (end - start)]
  aligned = _aligned(ex)
  out = {}
  for k, v in ex.items():
    if k in aligned:
      out[k] = tf.RaggedTensor.from_row_splits(
          tf.gather(v.values, flat.values), flat.row_splits, validate=False)
    else:
      out[k] = tf.gather(v, rows)
  return out


def truncate_batch(ex: Mapping[str, tf.Tensor], keep: int
                   ) -> Dict[str, tf.Tensor]:
  """Keeps each example's most recent `keep` items (and aligned features)."""
  n = _int64(ex[ITEM_IDS].row_lengths())
  return take_slices(ex, tf.range(tf.size(n, out_type=tf.int64)),
                     tf.maximum(n - keep, 0), n)


def window_count(n, max_len: int, stride: int):
  """Sliding windows of a history of `n` items: 1 + ceil(max(n - L, 0) / s)."""
  return 1 + (tf.maximum(n - max_len, 0) + stride - 1) // stride


def window_batch(ex: Mapping[str, tf.Tensor], max_len: int, stride: int
                 ) -> Dict[str, tf.Tensor]:
  """Each example's sliding windows of `max_len` items, most recent first.

  Windows end at n, n - stride, n - 2 * stride, ... while they are full; the
  last one starts at 0 so the oldest items are covered too. A history of at
  most `max_len` items gives one window (`window_count`).
  """
  n = _int64(ex[ITEM_IDS].row_lengths())
  count = window_count(n, max_len, stride)
  rows = tf.repeat(tf.range(tf.size(n, out_type=tf.int64)), count)
  k = tf.ragged.range(count).values
  n_rows = tf.gather(n, rows)
  starts = tf.maximum(n_rows - max_len - k * stride, 0)
  return take_slices(ex, rows, starts, tf.minimum(starts + max_len, n_rows))


def prefix_batch(ex: Mapping[str, tf.Tensor], max_len: int
                 ) -> Dict[str, tf.Tensor]:
  """Each example's prefixes of 2..n items, each cut to its last max_len."""
  n = _int64(ex[ITEM_IDS].row_lengths())
  count = tf.maximum(n - 1, 0)
  rows = tf.repeat(tf.range(tf.size(n, out_type=tf.int64)), count)
  ends = 2 + tf.ragged.range(count).values
  return take_slices(ex, rows, tf.maximum(ends - max_len, 0), ends)


def remove_items_batch(ex: Mapping[str, tf.Tensor], items: Sequence[int]
                       ) -> Dict[str, tf.Tensor]:
  """Removes `items` (and aligned features) from each history of a batch.

  Examples left with no item are dropped (every feature alike).

  Args:
    ex: batch with ragged int32 `item_ids` [B, (n)].
    items: item ids to remove.
  """
  ids = ex[ITEM_IDS]
  removed = np.unique(np.asarray(items, np.int64))
  if not removed.size:
    return dict(ex)
  removed = tf.constant(removed, tf.int64)
  values = _int64(ids.values)
  # Membership by binary search in the sorted ids.
  at = tf.minimum(tf.searchsorted(removed, values, out_type=tf.int64),
                  tf.size(removed, out_type=tf.int64) - 1)
  hit = tf.equal(tf.gather(removed, at), values)
  keep = ids.with_values(tf.logical_not(hit))
  aligned = _aligned(ex)
  out = {k: (tf.ragged.boolean_mask(v, keep) if k in aligned else v)
         for k, v in ex.items()}
  nonempty = out[ITEM_IDS].row_lengths() > 0
  return {k: (tf.ragged.boolean_mask(v, nonempty)
              if isinstance(v, tf.RaggedTensor)
              else tf.boolean_mask(v, nonempty))
          for k, v in out.items()}


def remove_train_items(ds: tf.data.Dataset,
                       sequence_length: Optional[Mapping[str, int]] = None,
                       *,
                       items: Sequence[int] = ()) -> tf.data.Dataset:
  """Train only: removes `items` from every history (`remove_items_batch`).

  Goes before `truncate_or_window`, so rows are cut from what is left.
  Evaluation examples (validation / test) pass unchanged, histories and
  targets alike: the cold-item protocol (`input_pipeline/cold_items.py`).
  """
  del sequence_length
  if sources.is_eval_dataset(ds) or not len(items):
    return ds
  items = [int(i) for i in items]
  return _blockwise(ds, lambda d: d.map(
      lambda ex: remove_items_batch(ex, items),
      num_parallel_calls=tf.data.AUTOTUNE))


def truncate_or_window(ds: tf.data.Dataset,
                       sequence_length: Optional[Mapping[str, int]] = None,
                       *,
                       max_len: Optional[int] = None,
                       sliding_window_stride: Optional[int] = None,
                       train_prefixes: bool = False
                       ) -> tf.data.Dataset:
  """Bounds history length: train to `max_len`, evaluation to `max_len - 1`.

  Args:
    ds: leave-one-out examples (or batches of them) from
      `sources.PreparedSequenceSource`.
    sequence_length: SeqIO lengths; `item_ids` overrides `max_len`.
    max_len: row length L.
    sliding_window_stride: train only; when set, a history longer than L
      yields several examples (windows of L items, see `window_batch`),
      most recent first, instead of only its last L items.
    train_prefixes: train only; each history of n items yields its n - 1
      prefixes of 2..n items (each truncated to its last L), so every item
      but the first is once the last item of an example: with
      `last_item_mask_prob=1` every item is predicted from its past only,
      the evaluation situation (SASRec-style prefix augmentation).
      Excludes `sliding_window_stride`.
  """
  length = resolve_length(sequence_length, max_len)
  if sources.is_eval_dataset(ds):
    # Room for the [MASK] appended at the position to predict.
    fn = lambda ex: truncate_batch(ex, length - 1)
  elif train_prefixes:
    if sliding_window_stride:
      raise ValueError("train_prefixes and sliding_window_stride exclude "
                       "each other; set one")
    fn = lambda ex: prefix_batch(ex, length)
  elif sliding_window_stride:
    stride = int(sliding_window_stride)
    if stride < 1:
      raise ValueError(f"sliding_window_stride must be >= 1; got {stride}")
    fn = lambda ex: window_batch(ex, length, stride)
  else:
    fn = lambda ex: truncate_batch(ex, length)
  return _blockwise(
      ds, lambda d: d.map(fn, num_parallel_calls=tf.data.AUTOTUNE))


def _positions_in_row(rt: tf.RaggedTensor) -> tf.Tensor:
  """Index of each flat value of `rt` inside its row (int64)."""
  total = tf.size(rt.values, out_type=tf.int64)
  return tf.range(total) - tf.gather(_int64(rt.row_starts()),
                                     rt.value_rowids())


def mask_batch(ex: Mapping[str, tf.Tensor], seed, *, mask_prob: float,
               max_predictions: Optional[int], last_item_mask_prob: float,
               mask_id: int, num_items: int, random_replace: bool = False
               ) -> Dict[str, tf.Tensor]:
  """Bert4Rec cloze masking of a batch of unpadded histories.

  Per example: with probability `last_item_mask_prob` only the last item is
  masked (the evaluation situation). Otherwise each item is masked with
  probability `mask_prob`; more than `max_predictions` chosen positions are
  cut to a uniformly random subset of that size, and an example with none
  gets one random position. Masked inputs become [MASK] (`random_replace`:
  BERT's 80% [MASK], 10% random item, 10% unchanged).

  Args:
    ex: batch with ragged int32 `item_ids` [B, (n)], every n >= 1.
    seed: stateless seed, shape [2].

  Returns:
    `ex` with masked `item_ids`, `targets` (true item at masked positions,
    else 0) and float32 `loss_weights`, ragged like `item_ids`.
  """
  items = ex[ITEM_IDS]
  values = items.values
  row = items.value_rowids()
  n = _int64(items.row_lengths())
  num_rows = tf.size(n)
  total = tf.size(values)
  seed = tf.cast(tf.stack(seed), tf.int64) if isinstance(
      seed, (tuple, list)) else tf.cast(seed, tf.int64)
  seeds = tf.random.experimental.stateless_split(seed, 5)
  u = tf.random.stateless_uniform([total], seeds[0])
  chosen = tf.math.unsorted_segment_sum(
      tf.cast(u < mask_prob, tf.int64), row, num_rows)
  cap = n if max_predictions is None else tf.minimum(n, max_predictions)
  count = tf.maximum(tf.minimum(chosen, cap), 1)
  # Positions with u < mask_prob are exactly the `chosen` smallest u of their
  # row, so keeping the `count` smallest applies the cap (a uniform subset)
  # and the at-least-one rule (the smallest u: a uniform position) at once.
  # Rank within the row: sort by (row, u), ties in position order. Rows
  # stay in place, so the k-th sorted value of a row has rank k there.
  order = tf.argsort(tf.cast(row, tf.float64) * 2.0 + tf.cast(u, tf.float64),
                     stable=True)
  pos = _positions_in_row(items)
  rank = tf.gather(pos, tf.math.invert_permutation(order))
  masked = rank < tf.gather(count, row)
  last_only = tf.random.stateless_uniform([num_rows], seeds[1]) < (
      last_item_mask_prob)
  is_last = pos == tf.gather(n, row) - 1
  masked = tf.where(tf.gather(last_only, row), is_last, masked)

  replacement = tf.fill([total], tf.constant(mask_id, tf.int32))
  if random_replace:
    r = tf.random.stateless_uniform([total], seeds[2])
    random_items = tf.random.stateless_uniform(
        [total], seeds[3], minval=1, maxval=num_items + 1, dtype=tf.int32)
    replacement = tf.where(r < 0.8, replacement,
                           tf.where(r < 0.9, random_items, values))
  out = dict(ex)
  out[ITEM_IDS] = items.with_values(tf.where(masked, replacement, values))
  out[TARGETS] = items.with_values(
      tf.where(masked, values, tf.zeros_like(values)))
  out[LOSS_WEIGHTS] = items.with_values(tf.cast(masked, tf.float32))
  return out


@seqio.map_over_dataset(num_seeds=1)
def _mask_dataset(ex, seed, **kwargs):
  return mask_batch(ex, seed, **kwargs)


def eval_batch(ex: Mapping[str, tf.Tensor], mask_id: int
               ) -> Dict[str, tf.Tensor]:
  """Appends [MASK] to each (already truncated) history; target there only.

  Aligned features get their pad value at the [MASK] position, except
  `critiques`, which gets `target_critique` (it is shown before the
  interaction, so it is an input).
  """
  items = ex[ITEM_IDS]
  num_rows = items.nrows()

  def append(rt, last):
    last = tf.RaggedTensor.from_tensor(tf.reshape(last, [-1, 1]))
    return tf.concat([rt, last], axis=1)

  def zeros(rt):
    return rt.with_values(tf.zeros_like(rt.values))
  out = dict(ex)
  out[ITEM_IDS] = append(items, tf.fill([num_rows], mask_id))
  out[TARGETS] = append(zeros(items), tf.cast(ex[sources.TARGET], items.dtype))
  out[LOSS_WEIGHTS] = append(tf.cast(zeros(items), tf.float32),
                             tf.ones([num_rows], tf.float32))
  for k in sources.aligned_keys(ex.keys()):
    if k == prepared.CRITIQUES:
      last = ex[sources.TARGET_CRITIQUE]
    elif ex[k].dtype == tf.string:
      last = tf.fill([num_rows], "")
    else:
      last = tf.zeros([num_rows], ex[k].dtype)
    out[k] = append(ex[k], last)
  return out


def bert4rec_inputs(ds: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]] = None,
                    output_features: Optional[Mapping[str, seqio.Feature]] = None,
                    *,
                    mask_prob: float = 0.2,
                    max_predictions: Optional[int] = None,
                    last_item_mask_prob: float = 0.0,
                    random_replace: bool = False,
                    num_items: Optional[int] = None) -> tf.data.Dataset:
  """Train: cloze masking (`mask_batch`); evaluation: `eval_batch`.

  Args:
    ds: output of `truncate_or_window` (unpadded).
    sequence_length, output_features: passed by SeqIO; the item vocabulary
      size gives N when `num_items` is None.
    mask_prob, max_predictions, last_item_mask_prob, random_replace: see
      `mask_batch`; max_predictions None means no cap.
    num_items: catalogue size N ([MASK] = N + 1).
  """
  del sequence_length
  n_items = resolve_num_items(num_items, output_features)
  if sources.is_eval_dataset(ds):
    return _blockwise(ds, lambda d: d.map(
        lambda ex: eval_batch(ex, n_items + 1),
        num_parallel_calls=tf.data.AUTOTUNE))
  if not 0.0 < mask_prob <= 1.0:
    raise ValueError(f"mask_prob must be in (0, 1]; got {mask_prob}")
  if not 0.0 <= last_item_mask_prob <= 1.0:
    raise ValueError(f"last_item_mask_prob must be in [0, 1]; got "
                     f"{last_item_mask_prob}")
  if max_predictions is not None and max_predictions < 1:
    raise ValueError(f"max_predictions must be >= 1; got {max_predictions}")
  return _blockwise(ds, lambda d: _mask_dataset(
      d, mask_prob=mask_prob, max_predictions=max_predictions,
      last_item_mask_prob=last_item_mask_prob, mask_id=n_items + 1,
      num_items=n_items, random_replace=random_replace))


def pad_batch(ex: Mapping[str, tf.Tensor], length: int
              ) -> Dict[str, tf.Tensor]:
  """Right-pads (or cuts) sequence features to `[B, length]` (0, 0.0, "")."""
  out = dict(ex)
  for k in list(MODEL_FEATURES) + sources.aligned_keys(ex.keys()):
    if k in ex:
      v = ex[k]
      pad_value = "" if v.dtype == tf.string else tf.zeros([], v.dtype)
      out[k] = _ragged(v)[:, :length].to_tensor(pad_value, shape=[None, length])
  return out


def pack_batch(ex: Mapping[str, tf.Tensor], length: int,
               max_predictions: Optional[int] = None) -> Dict[str, tf.Tensor]:
  """Packs a batch of masked examples into rows `[R, length]`, first fit.

  Examples (cut to `length`) are placed in order; each goes into the current
  row while it fits (in `length` positions and, when given, in
  `max_predictions` masked positions, the number the loss gathers per row,
  so no target is ever cut), otherwise it starts the next row (no look-ahead,
  as SeqIO's packer). Rows carry `item_ids`, `targets`, `loss_weights`,
  `segment_ids` (1, 2, ... per example, 0 padding) and `positions` (0..
  inside each example); other features are dropped.

  The greedy assignment is computed without a loop over examples: with
  prefix sums of lengths and masks, `next[i]` (the first example after a row
  that starts at i) is a binary search; the rows start at 0, next[0],
  next[next[0]], ..., and binary lifting over powers of `next` finds for
  every example the start of its row and the number of rows before it.
  """
  feats = {k: _ragged(ex[k])[:, :length] for k in MODEL_FEATURES}
  ids = feats[ITEM_IDS]
  n = _int64(ids.row_lengths())
  num = tf.size(n, out_type=tf.int64)
  m = tf.math.unsorted_segment_sum(
      tf.cast(feats[LOSS_WEIGHTS].values > 0, tf.int64), ids.value_rowids(),
      num)
  mask_cap = length if max_predictions is None else int(max_predictions)
  # Prefix sums with a leading 0: a row from i to j - 1 holds
  # len_sum[j] - len_sum[i] positions.
  len_sum = tf.concat([[0], tf.cumsum(n)], 0)
  mask_sum = tf.concat([[0], tf.cumsum(m)], 0)
  starts = tf.range(num + 1)
  fit = tf.minimum(
      tf.searchsorted(len_sum, len_sum + length, side="right"),
      tf.searchsorted(mask_sum, mask_sum + mask_cap, side="right")) - 1
  # next[i] for i < num: at least one example per row; next[num] = num.
  nxt = tf.minimum(tf.maximum(_int64(fit), starts + 1), num)
  # Binary lifting: jumps[k] = next applied 2^k times; _PACK_LEVELS levels
  # reach any row of a batch of fewer than 2^_PACK_LEVELS examples.
  check = tf.debugging.assert_less(
      num, tf.constant(2**_PACK_LEVELS, tf.int64),
      message="pack_batch: too many examples in one batch")
  with tf.control_dependencies([check]):
    nxt = tf.identity(nxt)
  jumps = [nxt]
  for _ in range(_PACK_LEVELS - 1):
    jumps.append(tf.gather(jumps[-1], jumps[-1]))
  examples = tf.range(num)
  row_start = tf.zeros([num], tf.int64)
  row_index = tf.zeros([num], tf.int64)
  for k in reversed(range(_PACK_LEVELS)):
    ahead = tf.gather(jumps[k], row_start)
    take = ahead <= examples
    row_start = tf.where(take, ahead, row_start)
    row_index = row_index + tf.where(take, tf.constant(2**k, tf.int64), 0)
  # Scatter every item to (row, offset in row + position in its example).
  item_example = ids.value_rowids()
  pos = _positions_in_row(ids)
  col = tf.gather(len_sum, item_example) - tf.gather(
      len_sum, tf.gather(row_start, item_example)) + pos
  where = tf.stack([tf.gather(row_index, item_example), col], axis=1)
  num_rows = tf.where(num > 0, tf.reduce_max(
      tf.concat([row_index, [-1]], 0)) + 1, 0)
  shape = tf.stack([num_rows, length])
  segment = tf.gather(examples - row_start + 1, item_example)
  out = {k: tf.scatter_nd(where, v.values, shape) for k, v in feats.items()}
  out[SEGMENT_IDS] = tf.scatter_nd(where, tf.cast(segment, tf.int32), shape)
  out[POSITIONS] = tf.scatter_nd(where, tf.cast(pos, tf.int32), shape)
  for v in out.values():
    v.set_shape([None, length])
  return out


def pack_examples(ds: tf.data.Dataset, length: int,
                  max_predictions: Optional[int] = None) -> tf.data.Dataset:
  """Packs masked examples into rows of `length` (`pack_batch`), one by one.

  Rows never span two batches: a batch's last row is emitted at its end
  (given single examples, every `BLOCK` of them is one batch), so at most
  one partial row per batch is added to what a packer over the whole stream
  would emit.
  """
  if not is_batched(ds):
    ds = ds.map(lambda ex: {k: ex[k] for k in MODEL_FEATURES}).ragged_batch(
        BLOCK)
  return ds.map(lambda ex: pack_batch(ex, length, max_predictions),
                num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def pad_or_pack(ds: tf.data.Dataset,
                sequence_length: Optional[Mapping[str, int]] = None,
                *,
                max_len: Optional[int] = None,
                packing: bool = False,
                max_predictions: Optional[int] = None) -> tf.data.Dataset:
  """Dense rows of length L, one per element: right padding, or packing for
  train. Packed rows hold at most `max_predictions` masked positions each.
  """
  length = resolve_length(sequence_length, max_len)
  if packing and not sources.is_eval_dataset(ds):
    return pack_examples(ds, length, max_predictions)
  if not is_batched(ds):
    ds = ds.ragged_batch(BLOCK)
  return ds.map(lambda ex: pad_batch(ex, length),
                num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# Text features.


def tokenize_texts(ds: tf.data.Dataset, *, vocabulary: seqio.Vocabulary,
                   features: Mapping[str, str], max_tokens: int,
                   add_eos: bool = True) -> tf.data.Dataset:
  """Tokenizes string features: scalar -> [T], list of n strings -> [n, T].

  Args:
    ds: examples.
    vocabulary: e.g. `seqio.SentencePieceVocabulary(spm_path)`.
    features: input key -> output key, e.g. {'critiques': 'critique_tokens',
      'target_critique': 'target_critique_tokens'}; missing keys are skipped.
    max_tokens: T; longer texts are cut (EOS kept when add_eos).
    add_eos: append EOS to non-empty texts (T5 convention); an empty text
      stays all padding so "no text" is visible to the model.
  """
  eos = vocabulary.eos_id

  def encode(texts: tf.Tensor) -> tf.Tensor:
    ids = vocabulary.encode_tf(texts)  # ragged [n, None]
    if add_eos and eos is not None:
      ids = ids[:, :max_tokens - 1]
      has_text = tf.cast(ids.row_lengths() > 0, tf.int64)
      eos_rt = tf.RaggedTensor.from_row_lengths(
          tf.fill([tf.reduce_sum(has_text)], tf.cast(eos, ids.dtype)),
          has_text)
      ids = tf.concat([ids, eos_rt], axis=1)
    return tf.cast(ids.to_tensor(0, shape=[None, max_tokens]), tf.int32)

  def fn(ex):
    out = dict(ex)
    for src, dst in features.items():
      if src not in ex:
        continue
      t = ex[src]
      out[dst] = encode(t[None])[0] if t.shape.rank == 0 else encode(t)
    return out
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def item_texts(data_dir: str) -> List[str]:
  """Item texts (`text.item_texts`) indexed by vocabulary id 0..N+1.

  Entries 0 (padding) and N + 1 ([MASK]) are empty strings.
  """
  return item_texts_lib.texts_by_index(data_dir)


def item_text_tokens(data_dir: str, *, max_tokens: int = 64,
                     vocab_path: Optional[str] = None,
                     add_eos: bool = True) -> np.ndarray:
  """Tokenized item texts, `[N + 2, max_tokens]` int32, row j = item j.

  Rows 0 (padding) and N + 1 ([MASK]) are all zeros, so the table can be
  gathered with `item_ids` directly.

  Args:
    data_dir: prepared dataset.
    max_tokens: tokens per item; longer texts are cut (EOS kept).
    vocab_path: SentencePiece model; default the dataset's `spm.model`.
    add_eos: append EOS (id 1) to non-empty texts.
  """
  if vocab_path is None:
    vocab_path = prepared.PreparedDataset(data_dir).text_vocab_path
    if vocab_path is None:
      raise FileNotFoundError(
          f"{data_dir}: no SentencePiece model (stats.json text_vocab is "
          "null); prepare with a text vocabulary or pass vocab_path")
  vocab = seqio.SentencePieceVocabulary(vocab_path)
  texts = item_texts(data_dir)
  out = np.zeros((len(texts), max_tokens), np.int32)
  body = max_tokens - 1 if add_eos else max_tokens
  for j, text in enumerate(texts[:-1]):
    if not text:
      continue
    ids = list(vocab.encode(text))[:body]
    if add_eos:
      ids.append(vocab.eos_id)
    out[j, :len(ids)] = ids
  return out


def decode_tokens(vocab: seqio.Vocabulary, tokens: Sequence[int]) -> str:
  """Text of one token row (stops at EOS, ignores padding)."""
  return vocab.decode([int(t) for t in tokens if int(t) != 0])
