"""SeqIO preprocessors turning leave-one-out examples into model features.

Order in a Bert4Rec task (see docs/TASKS.md):
  truncate_or_window -> bert4rec_inputs -> pad_or_pack

Train examples (no `target`) are truncated to the most recent `max_len` items
(or cut into sliding windows), masked for the cloze objective and padded (or
packed). Evaluation examples (with `target`) keep the most recent
`max_len - 1` items and get [MASK] appended at the position to predict.

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


def _aligned(ex) -> List[str]:
  return [ITEM_IDS] + sources.aligned_keys(ex.keys())


def _slice(ex: Mapping[str, tf.Tensor], start, end) -> Dict[str, tf.Tensor]:
  out = dict(ex)
  for k in _aligned(ex):
    out[k] = ex[k][start:end]
  return out


def truncate_example(ex: Mapping[str, tf.Tensor], keep) -> Dict[str, tf.Tensor]:
  """Keeps the most recent `keep` items (and aligned features)."""
  n = tf.shape(ex[ITEM_IDS])[0]
  return _slice(ex, tf.maximum(n - keep, 0), n)


def window_starts(n, max_len: int, stride: int) -> tf.Tensor:
  """Start offsets of sliding windows over a history of length `n`.

  Windows end at n, n - stride, n - 2 * stride, ... while they are full; the
  last one starts at 0 so the oldest items are covered too. A history of at
  most `max_len` items gives one window. Count: 1 + ceil(max(n - L, 0) / s).
  """
  extra = tf.maximum(n - max_len, 0)
  count = 1 + (extra + stride - 1) // stride
  return tf.maximum(n - max_len - tf.range(count) * stride, 0)


def truncate_or_window(ds: tf.data.Dataset,
                       sequence_length: Optional[Mapping[str, int]] = None,
                       *,
                       max_len: Optional[int] = None,
                       sliding_window_stride: Optional[int] = None,
                       train_prefixes: bool = False
                       ) -> tf.data.Dataset:
  """Bounds history length: train to `max_len`, evaluation to `max_len - 1`.

  Args:
    ds: leave-one-out examples from `sources.PreparedSequenceSource`.
    sequence_length: SeqIO lengths; `item_ids` overrides `max_len`.
    max_len: row length L.
    sliding_window_stride: train only; when set, a history longer than L
      yields several examples (windows of L items, see `window_starts`),
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
    return ds.map(lambda ex: truncate_example(ex, length - 1),
                  num_parallel_calls=tf.data.AUTOTUNE)
  if train_prefixes:
    if sliding_window_stride:
      raise ValueError("train_prefixes and sliding_window_stride exclude "
                       "each other; set one")

    def prefixes(ex):
      ends = tf.range(2, tf.shape(ex[ITEM_IDS])[0] + 1)
      return tf.data.Dataset.from_tensor_slices(ends).map(
          lambda e: truncate_example(_slice(ex, 0, e), length))
    return ds.flat_map(prefixes)
  if not sliding_window_stride:
    return ds.map(lambda ex: truncate_example(ex, length),
                  num_parallel_calls=tf.data.AUTOTUNE)
  stride = int(sliding_window_stride)
  if stride < 1:
    raise ValueError(f"sliding_window_stride must be >= 1; got {stride}")

  def windows(ex):
    starts = window_starts(tf.shape(ex[ITEM_IDS])[0], length, stride)
    return tf.data.Dataset.from_tensor_slices(starts).map(
        lambda s: _slice(ex, s, s + length))
  return ds.flat_map(windows)


def mask_example(ex: Mapping[str, tf.Tensor], seed, *, mask_prob: float,
                 max_predictions: Optional[int], last_item_mask_prob: float,
                 mask_id: int, num_items: int, random_replace: bool = False
                 ) -> Dict[str, tf.Tensor]:
  """Bert4Rec cloze masking of one unpadded history.

  With probability `last_item_mask_prob` only the last item is masked (the
  evaluation situation). Otherwise each item is masked with probability
  `mask_prob`; more than `max_predictions` chosen positions are cut to a
  uniformly random subset of that size, and a row with none gets one random
  position. Masked inputs become [MASK] (`random_replace`: BERT's 80% [MASK],
  10% random item, 10% unchanged).

  Args:
    ex: example with unpadded int32 `item_ids` [n], n >= 1.
    seed: stateless seed, shape [2].

  Returns:
    `ex` with masked `item_ids`, `targets` (true item at masked positions,
    else 0) and float32 `loss_weights`.
  """
  items = ex[ITEM_IDS]
  n = tf.shape(items)[0]
  seed = tf.cast(tf.stack(seed), tf.int64) if isinstance(
      seed, (tuple, list)) else tf.cast(seed, tf.int64)
  seeds = tf.random.experimental.stateless_split(seed, 5)
  u = tf.random.stateless_uniform([n], seeds[0])
  chosen = tf.reduce_sum(tf.cast(u < mask_prob, tf.int32))
  cap = n if max_predictions is None else tf.minimum(n, max_predictions)
  count = tf.maximum(tf.minimum(chosen, cap), 1)
  # Positions with u < mask_prob are exactly the `chosen` smallest u, so
  # keeping the `count` smallest u applies the cap (uniform subset) and the
  # at-least-one rule (the smallest u, a uniform position) at once.
  rank = tf.argsort(tf.argsort(u, stable=True), stable=True)
  masked = rank < count
  last_only = tf.random.stateless_uniform([], seeds[1]) < last_item_mask_prob
  masked = tf.where(last_only, tf.range(n) == n - 1, masked)

  replacement = tf.fill([n], tf.constant(mask_id, tf.int32))
  if random_replace:
    r = tf.random.stateless_uniform([n], seeds[2])
    random_items = tf.random.stateless_uniform(
        [n], seeds[3], minval=1, maxval=num_items + 1, dtype=tf.int32)
    replacement = tf.where(r < 0.8, replacement,
                           tf.where(r < 0.9, random_items, items))
  out = dict(ex)
  out[ITEM_IDS] = tf.where(masked, replacement, items)
  out[TARGETS] = tf.where(masked, items, tf.zeros_like(items))
  out[LOSS_WEIGHTS] = tf.cast(masked, tf.float32)
  return out


@seqio.map_over_dataset(num_seeds=1)
def _mask_dataset(ex, seed, **kwargs):
  return mask_example(ex, seed, **kwargs)


def eval_example(ex: Mapping[str, tf.Tensor], mask_id: int
                 ) -> Dict[str, tf.Tensor]:
  """Appends [MASK] to the (already truncated) history; target there only.

  Aligned features get their pad value at the [MASK] position, except
  `critiques`, which gets `target_critique` (it is shown before the
  interaction, so it is an input).
  """
  items = ex[ITEM_IDS]
  n = tf.shape(items)[0]
  out = dict(ex)
  out[ITEM_IDS] = tf.concat([items, [mask_id]], 0)
  out[TARGETS] = tf.concat([tf.zeros([n], tf.int32), [ex[sources.TARGET]]], 0)
  out[LOSS_WEIGHTS] = tf.concat([tf.zeros([n], tf.float32), [1.0]], 0)
  for k in sources.aligned_keys(ex.keys()):
    if k == prepared.CRITIQUES:
      extra = tf.reshape(ex[sources.TARGET_CRITIQUE], [1])
    else:
      extra = tf.zeros([1], ex[k].dtype)
    out[k] = tf.concat([ex[k], extra], 0)
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
  """Train: cloze masking (`mask_example`); evaluation: `eval_example`.

  Args:
    ds: output of `truncate_or_window` (unpadded).
    sequence_length, output_features: passed by SeqIO; the item vocabulary
      size gives N when `num_items` is None.
    mask_prob, max_predictions, last_item_mask_prob, random_replace: see
      `mask_example`; max_predictions None means no cap.
    num_items: catalogue size N ([MASK] = N + 1).
  """
  del sequence_length
  n_items = resolve_num_items(num_items, output_features)
  if sources.is_eval_dataset(ds):
    return ds.map(lambda ex: eval_example(ex, n_items + 1),
                  num_parallel_calls=tf.data.AUTOTUNE)
  if not 0.0 < mask_prob <= 1.0:
    raise ValueError(f"mask_prob must be in (0, 1]; got {mask_prob}")
  if not 0.0 <= last_item_mask_prob <= 1.0:
    raise ValueError(f"last_item_mask_prob must be in [0, 1]; got "
                     f"{last_item_mask_prob}")
  if max_predictions is not None and max_predictions < 1:
    raise ValueError(f"max_predictions must be >= 1; got {max_predictions}")
  return _mask_dataset(
      ds, mask_prob=mask_prob, max_predictions=max_predictions,
      last_item_mask_prob=last_item_mask_prob, mask_id=n_items + 1,
      num_items=n_items, random_replace=random_replace)


def _pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
  x = x[:length]
  pad_value = "" if x.dtype == tf.string else tf.zeros([], x.dtype)
  padded = tf.pad(x, [[0, length - tf.shape(x)[0]]],
                  constant_values=pad_value)
  padded.set_shape([length])
  return padded


def pad_example(ex: Mapping[str, tf.Tensor], length: int
                ) -> Dict[str, tf.Tensor]:
  """Right-pads sequence features to `length` (0, 0.0 or "")."""
  out = dict(ex)
  for k in list(MODEL_FEATURES) + sources.aligned_keys(ex.keys()):
    if k in ex:
      out[k] = _pad_to(ex[k], length)
  return out


def pack_examples(ds: tf.data.Dataset, length: int,
                  max_predictions: Optional[int] = None) -> tf.data.Dataset:
  """Greedily packs masked examples into rows of `length` (first fit, in order).

  Each example is appended to the current row while it fits (in `length`
  positions and, when given, in `max_predictions` masked positions per row,
  the number the loss gathers per row, so no target is ever cut);
  otherwise the row is emitted and a new one started (no look-ahead, as
  SeqIO's packer). Examples must each have at most `max_predictions` masks
  (`mask_example` caps them).
  Rows carry `item_ids`, `targets`, `loss_weights`, `segment_ids` (1, 2, ...
  per example, 0 padding) and `positions` (0.. inside each example); other
  features are dropped. A finite dataset's last row is flushed at its end.
  """
  feats = {ITEM_IDS: tf.int32, TARGETS: tf.int32, LOSS_WEIGHTS: tf.float32}
  ds = ds.map(lambda ex: {k: ex[k][:length] for k in feats})
  # An empty example flushes the last partial row at the end of the data.
  sentinel = tf.data.Dataset.from_tensors(
      {k: tf.zeros([0], d) for k, d in feats.items()})
  ds = ds.concatenate(sentinel)
  row_dtypes = dict(feats, **{SEGMENT_IDS: tf.int32, POSITIONS: tf.int32})
  init = {k: tf.zeros([length], d) for k, d in row_dtypes.items()}
  init["fill"] = tf.constant(0)
  init["num_segments"] = tf.constant(0)
  init["num_masks"] = tf.constant(0)
  mask_cap = length if max_predictions is None else int(max_predictions)

  def step(state, ex):
    n = tf.shape(ex[ITEM_IDS])[0]
    m = tf.reduce_sum(tf.cast(ex[LOSS_WEIGHTS] > 0, tf.int32))
    flush = tf.logical_or(tf.equal(n, 0), state["fill"] + n > length)
    flush = tf.logical_or(flush, state["num_masks"] + m > mask_cap)
    emit = tf.logical_and(flush, state["fill"] > 0)
    row = {k: state[k] for k in row_dtypes}
    base = {k: tf.where(flush, tf.zeros_like(v), v) for k, v in state.items()}
    fill = base["fill"]
    segment = base["num_segments"] + 1

    def place(x):
      # Padded x has zeros after n <= length - fill, so rolling by `fill`
      # moves it to [fill, fill + n) and only zeros wrap around.
      return tf.roll(tf.pad(x, [[0, length - n]]), shift=fill, axis=0)
    new = {k: base[k] + place(ex[k]) for k in feats}
    new[SEGMENT_IDS] = base[SEGMENT_IDS] + place(tf.fill([n], segment))
    new[POSITIONS] = base[POSITIONS] + place(tf.range(n))
    new["fill"] = fill + n
    new["num_segments"] = tf.where(n > 0, segment, base["num_segments"])
    new["num_masks"] = base["num_masks"] + m
    return new, (emit, row)

  def is_emitted(emit, unused_row):
    return emit

  def emitted_row(unused_emit, row):
    for v in row.values():
      v.set_shape([length])
    return row
  return ds.scan(init, step).filter(is_emitted).map(emitted_row)


def pad_or_pack(ds: tf.data.Dataset,
                sequence_length: Optional[Mapping[str, int]] = None,
                *,
                max_len: Optional[int] = None,
                packing: bool = False,
                max_predictions: Optional[int] = None) -> tf.data.Dataset:
  """Dense rows of length L: right padding, or packing for train.

  Packed rows hold at most `max_predictions` masked positions each.
  """
  length = resolve_length(sequence_length, max_len)
  if packing and not sources.is_eval_dataset(ds):
    return pack_examples(ds, length, max_predictions)
  return ds.map(lambda ex: pad_example(ex, length),
                num_parallel_calls=tf.data.AUTOTUNE)


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
  """Item texts (`prepared.item_text`) indexed by vocabulary id 0..N+1.

  Entries 0 (padding) and N + 1 ([MASK]) are empty strings.
  """
  items = prepared.read_items(data_dir)
  texts = [""] * (len(items) + 2)
  for line, item in enumerate(items, start=1):
    index = item.get("index", line)
    if index != line:
      raise ValueError(
          f"{data_dir}/{prepared.ITEMS_FILE} line {line}: index {index}; "
          f"expected {line} (rows are in vocabulary order)")
    texts[line] = prepared.item_text(item)
  return texts


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
