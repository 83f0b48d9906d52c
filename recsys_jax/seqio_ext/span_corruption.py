"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4) as a SeqIO preprocessor.

A token sequence of length n is split into alternating non-noise and noise
spans: round(n * noise_density) noise tokens (at least 1, at most n - 1) in
round(noise_tokens / mean_noise_span_length) spans (at least 1), both
segmentations uniformly random, starting with a non-noise span and ending
with a noise span (t5's `random_spans_noise_mask`). Every noise span becomes
one sentinel in `inputs`; `targets` lists the noise spans, each after its
sentinel:

  tokens   A B C D E F G      (noise: B C and F G)
  inputs   A <X> D E <Y>
  targets  <X> B C <Y> F G

Sentinels are the top ids of the vocabulary, first span first:
`vocab_size - 1`, `vocab_size - 2`, ... (seqio's `<extra_id_0>`,
`<extra_id_1>`, ... of a `SentencePieceVocabulary(extra_ids=...)`), as
t5.data.preprocessors does; the vocabulary needs at least as many extra ids
as a sequence can have spans. Random choices are stateless, from the seeds
SeqIO hands to `map_over_dataset`, so a task's output is a function of its
seed. EOS is appended afterwards by `seqio.preprocessors.append_eos_after_trim`.
"""

from typing import Mapping, Optional

import seqio
import tensorflow as tf

INPUTS = "inputs"
TARGETS = "targets"


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """Lengths `[num_segments]` (each >= 1, summing to num_items), uniform.

  num_segments - 1 of the num_items - 1 gaps between items start a new
  segment, chosen by a stateless shuffle.
  """
  boundaries = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  order = tf.argsort(tf.random.stateless_uniform(tf.shape(boundaries), seed))
  first_in_segment = tf.pad(tf.gather(boundaries, order), [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id,
                                      num_segments)


def random_spans_noise_mask(length: tf.Tensor, seeds: tf.Tensor, *,
                            noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0
                            ) -> tf.Tensor:
  """Bool `[length]`: True at noise tokens (module docstring).

  Args:
    length: int32 scalar, the sequence length (>= 1; a length-1 sequence
      is treated as length 2 and cut back, as t5 does).
    seeds: int `[2, 2]`, two stateless seeds (noise and non-noise spans).
    noise_density: fraction of tokens that are noise.
    mean_noise_span_length: average noise-span length.
  """
  orig_length = length
  length = tf.maximum(length, 2)
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density),
                      tf.int32)
  num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
  num_spans = tf.cast(
      tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
      tf.int32)
  # Every non-noise span holds at least one token.
  num_spans = tf.minimum(tf.maximum(num_spans, 1), length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans,
                                          seeds[1])
  interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], 1),
                           [num_spans * 2])
  span_starts = tf.cumsum(interleaved)[:-1]
  span_start_indicator = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length)
  span_num = tf.cumsum(span_start_indicator)
  return tf.equal(span_num % 2, 1)[:orig_length]


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor,
                       first_sentinel: int) -> tf.Tensor:
  """Replaces each span of True in `mask` by one sentinel id.

  Span k (0-based, in order) becomes `first_sentinel - k`.
  """
  prev = tf.pad(mask[:-1], [[1, 0]])
  first = tf.logical_and(mask, tf.logical_not(prev))
  subsequent = tf.logical_and(mask, prev)
  sentinel = first_sentinel + 1 - tf.cumsum(tf.cast(first, tokens.dtype))
  tokens = tf.where(first, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(subsequent))


@seqio.map_over_dataset(num_seeds=2)
def _corrupt(ex, seeds, *, noise_density, mean_noise_span_length,
             first_sentinel, num_sentinels, max_tokens):
  tokens = ex[TARGETS]
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  mask = random_spans_noise_mask(
      tf.size(tokens), tf.stack(seeds), noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length)
  num_spans = tf.reduce_sum(tf.cast(
      tf.logical_and(mask, tf.logical_not(tf.pad(mask[:-1], [[1, 0]]))),
      tf.int32))
  check = tf.debugging.assert_less_equal(
      num_spans, num_sentinels,
      message="span corruption: more noise spans than sentinel (extra) ids; "
      "lower max_tokens or add extra_ids")
  with tf.control_dependencies([check]):
    tokens = tf.identity(tokens)
  out = dict(ex)
  # The text no longer matches the corrupted targets: a reference read from
  # it would be wrong, so only the tokens remain.
  out.pop(TARGETS + "_pretokenized", None)
  out[INPUTS] = spans_to_sentinels(tokens, mask, first_sentinel)
  out[TARGETS] = spans_to_sentinels(tokens, tf.logical_not(mask),
                                    first_sentinel)
  return out


def span_corruption(ds: tf.data.Dataset,
                    output_features: Mapping[str, seqio.Feature],
                    sequence_length: Optional[Mapping[str, int]] = None, *,
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    max_tokens: Optional[int] = None) -> tf.data.Dataset:
  """Tokenised `targets` -> span-corrupted `inputs` and `targets`.

  Empty sequences are dropped (nothing to corrupt), and so is
  `targets_pretokenized` (the uncorrupted text is no reference for the new
  targets; decode the target tokens instead).

  Args:
    ds: examples with int32 `targets` `[n]` (the tokenised text, no EOS).
    output_features: passed by SeqIO; `targets`' vocabulary gives the
      sentinel ids (its `vocab_size - 1` downwards).
    sequence_length: unused (the task's lengths trim after corruption).
    noise_density: fraction of tokens masked (T5: 0.15).
    mean_noise_span_length: mean span length (T5: 3).
    max_tokens: cut each text to its first `max_tokens` tokens first, so
      the corrupted pair fits the task's lengths (None: no cut).
  """
  del sequence_length
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density={noise_density}: expected (0, 1)")
  if mean_noise_span_length < 1.0:
    raise ValueError(f"mean_noise_span_length={mean_noise_span_length}: "
                     "expected >= 1")
  vocab = output_features[TARGETS].vocabulary
  extra = getattr(vocab, "extra_ids", 0)
  if not extra:
    raise ValueError("span corruption needs sentinel ids: give the targets "
                     "vocabulary extra ids (seqio.SentencePieceVocabulary("
                     "path, extra_ids=100))")
  ds = ds.filter(lambda ex: tf.size(ex[TARGETS]) > 0)
  return _corrupt(ds, noise_density=noise_density,
                  mean_noise_span_length=mean_noise_span_length,
                  first_sentinel=vocab.vocab_size - 1, num_sentinels=extra,
                  max_tokens=max_tokens)
