"""Sequence-recommender wrappers (model_lib.base.BaseModel): Bert4Rec, SASRec.

The trainer calls `get_initial_variables`, `loss_fn` and the metric
declarations of `base.BaseModel`; the evaluator calls `score_fn` (or
`hidden_at_mask` + `item_scores_from_hidden` to score shard-wise); export
calls `item_embeddings` / `item_bias`. Params passed in are the unboxed tree
(`nn.meta.unbox`).
"""

import abc
import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.model_lib import base
from recsys_jax.model_lib import losses
from recsys_jax.models import bert4rec as bert4rec_lib
from recsys_jax.models import item_vocab

Array = jax.Array
Batch = Mapping[str, Array]

LOSSES = ("full", "sampled_uniform", "sampled_popularity", "in_batch")
# Rows of a full-softmax loss chunk: 256 x a 12,160-item vocabulary is 12 MB
# of float32 logits, inside a CPU's last-level cache (benchmarks/README.md).
DEFAULT_LOSS_CHUNK_ROWS = 256


def gather_predictions(hidden: Array, targets: Array, weights: Array,
                       num: int) -> Tuple[Array, Array, Array]:
  """Keeps the `num` highest-weight positions of each row.

  Args:
    hidden: `[B, L, E]`.
    targets: `[B, L]`.
    weights: `[B, L]` loss weights (masked positions > 0).
    num: P, predictions kept per row; rows with more weighted positions lose
      the extra ones (the input pipeline caps masks so this does not happen).

  Returns:
    hidden `[B, P, E]`, targets `[B, P]`, weights `[B, P]`.
  """
  if num >= weights.shape[1]:
    return hidden, targets, weights
  _, idx = jax.lax.top_k(weights, num)  # [B, P]
  return (jnp.take_along_axis(hidden, idx[:, :, None], axis=1),
          jnp.take_along_axis(targets, idx, axis=1),
          jnp.take_along_axis(weights, idx, axis=1))


def next_item_batch(batch: Batch) -> Tuple[Batch, Array, Array]:
  """Causal (next-item) training view of a masked batch.

  The cloze-masked inputs are restored (`targets` hold the true item at every
  weighted position), and every item gets the next item of the same sequence
  (segment) as its target: a row of n items gives n - 1 predictions. An
  evaluation row (history + [MASK], target at the [MASK]) gives the history
  with the target appended, so its last prediction is the evaluation one.

  Returns:
    (batch with restored `item_ids`, targets `[B, L]`, weights `[B, L]`).
  """
  ids = batch["item_ids"]
  items = jnp.where(batch["loss_weights"] > 0,
                    batch["targets"].astype(ids.dtype), ids)
  segments = batch.get("segment_ids")
  if segments is None:
    segments = (items != 0).astype(jnp.int32)

  def shift(x):
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
  following, following_segment = shift(items), shift(segments)
  valid = (items != 0) & (following != 0) & (following_segment == segments)
  targets = jnp.where(valid, following, 0).astype(jnp.int32)
  return dict(batch, item_ids=items), targets, valid.astype(jnp.float32)


class SequenceRecModel(base.BaseModel):
  """Shared wrapper of masked-item sequence recommenders with a tied output.

  Items use the vocabulary of `models.item_vocab` (0 padding, 1..N items,
  N + 1 [MASK], `padded_vocab` table rows). Subclasses pass their module and
  its sizes to `__init__` and implement `_table_and_bias(params)`.

  Args:
    module: the Flax module, with `__call__` (ids -> `[B, L, E]` hidden),
      `output_query`, `logits` and `all_logits` methods.
    num_items: N, the catalogue size.
    max_len: L, the sequence length the module is built for.
    padded_vocab: rows of the item table (>= N + 2).
    causal: the module is unidirectional: the loss predicts the next item
      at every position and scoring reads the hidden state of the last
      history item.
    loss, num_negatives, item_log_popularity, max_predictions, z_loss,
      loss_chunk_rows: see `Bert4RecModel`.
  """

  def __init__(self, module: nn.Module, *, num_items: int, max_len: int,
               padded_vocab: int, causal: bool = False, loss: str = "full",
               num_negatives: int = 0,
               item_log_popularity: Optional[np.ndarray] = None,
               max_predictions: Optional[int] = None, z_loss: float = 0.0,
               loss_chunk_rows: Optional[int] = DEFAULT_LOSS_CHUNK_ROWS):
    if padded_vocab < num_items + 2:
      raise ValueError(f"padded_vocab={padded_vocab}: expected at least "
                       f"num_items + 2 = {num_items + 2} (padding, items, "
                       "[MASK])")
    self.module = module
    self.num_items = int(num_items)
    self.max_len = int(max_len)
    self.padded_vocab = int(padded_vocab)
    self.mask_id = self.num_items + 1
    self.causal = bool(causal)
    if loss not in LOSSES:
      raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    if loss in ("sampled_uniform", "sampled_popularity") and num_negatives < 1:
      raise ValueError(f"loss={loss!r} needs num_negatives >= 1; got "
                       f"{num_negatives}")
    if loss == "sampled_popularity" and item_log_popularity is None:
      raise ValueError("loss='sampled_popularity' needs item_log_popularity "
                       f"([{self.num_items}] log-probabilities of items 1..N)")
    if max_predictions is not None and not 1 <= max_predictions <= self.max_len:
      raise ValueError(f"max_predictions={max_predictions}: expected 1.."
                       f"{self.max_len} (max_len)")
    self.loss = loss
    self.num_negatives = int(num_negatives)
    self.max_predictions = max_predictions
    self.z_loss = float(z_loss)
    if loss_chunk_rows is not None and int(loss_chunk_rows) < 1:
      raise ValueError(f"loss_chunk_rows={loss_chunk_rows}: expected a "
                       "positive integer or None (one chunk)")
    self.loss_chunk_rows = loss_chunk_rows
    self.item_log_popularity = None
    self._log_q_table = None  # [padded_vocab] log q by item id
    self._alias = None  # losses.alias_table of the popularity sampler
    if item_log_popularity is not None:
      log_pop = np.asarray(item_log_popularity, np.float64)
      if log_pop.shape != (self.num_items,) or not np.all(np.isfinite(log_pop)):
        raise ValueError(
            f"item_log_popularity has shape {log_pop.shape}; expected finite "
            f"values of shape ({self.num_items},) for items 1..N")
      log_pop = log_pop - np.logaddexp.reduce(log_pop)  # normalise
      self.item_log_popularity = log_pop.astype(np.float32)
      table = np.zeros(self.padded_vocab, np.float32)
      table[1:self.num_items + 1] = self.item_log_popularity
      self._log_q_table = table
      self._alias = (losses.alias_table(self.item_log_popularity)
                     if loss == "sampled_popularity" else None)

  # -- what the trainer and the runs record ----------------------------------

  def metric_sums(self) -> Tuple[str, ...]:
    """`loss_fn`'s sums: loss, weight (masked targets), correct targets."""
    return (base.LOSS_SUM, base.WEIGHT_SUM, "correct_sum")

  def summarize_metrics(self, sums: Mapping[str, float]) -> Dict[str, float]:
    """Mean loss and masked accuracy (targets ranked first) per target."""
    weight = max(sums[base.WEIGHT_SUM], 1.0)
    return {"loss": sums[base.LOSS_SUM] / weight,
            "masked_accuracy": sums["correct_sum"] / weight}

  def checkpoint_meta(self) -> Dict[str, Any]:
    """The catalogue size (item tables are sized by it)."""
    return {"num_items": self.num_items}

  # -- module plumbing -------------------------------------------------------

  def _apply(self, params, *args, method: str = "__call__", rngs=None,
             **kwargs):
    fn = getattr(type(self.module), method)
    return self.module.apply({"params": params}, *args, method=fn, rngs=rngs,
                             **kwargs)

  @abc.abstractmethod
  def _table_and_bias(self, params) -> Tuple[Array, Array]:
    """(`[padded_vocab, E]` item table, `[padded_vocab]` output bias)."""

  def get_initial_variables(self, rng: Array,
                            batch_size: int = 2) -> Dict[str, Any]:
    """{'params': ...} with `nn.LogicallyPartitioned` boxes on every leaf."""
    ids = jnp.ones((batch_size, self.max_len), jnp.int32)
    variables = self.module.init({"params": rng}, ids,
                                 method=type(self.module).all_logits)
    return {"params": variables["params"]}

  def hidden_states(self, params, batch: Batch,
                    dropout_rng: Optional[Array] = None) -> Array:
    """`[B, L, E]`; dropout applies iff `dropout_rng` is given."""
    return self._apply(
        params, batch["item_ids"], segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"), deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  # -- training --------------------------------------------------------------

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Array]]:
    """Masked-item loss: (loss, {'loss_sum', 'weight_sum', 'correct_sum'}).

    Logits are computed only at the (at most `max_predictions`) weighted
    positions of each row; a `causal` model predicts the next item at every
    position instead (`next_item_batch`; `max_predictions` does not apply).
    For the sampled losses `correct_sum` counts targets that beat every
    sampled candidate, not the full catalogue.
    """
    sample_rng = jax.random.PRNGKey(0)
    if dropout_rng is not None:
      dropout_rng, sample_rng = jax.random.split(dropout_rng)
    if self.causal:
      batch, targets, weights = next_item_batch(batch)
      num = targets.shape[1]
    else:
      targets = batch["targets"].astype(jnp.int32)
      weights = batch["loss_weights"].astype(jnp.float32)
      num = self.max_predictions or targets.shape[1]
    hidden = self.hidden_states(params, batch, dropout_rng)
    hidden, targets, weights = gather_predictions(hidden, targets, weights, num)
    if self.loss == "full":
      query = self._apply(params, hidden, method="output_query")
      table, bias = self._table_and_bias(params)
      loss_sum, weight_sum, correct_sum = losses.tied_softmax_cross_entropy(
          query.reshape(-1, query.shape[-1]), table, bias,
          item_vocab.item_id_mask(self.padded_vocab, self.num_items),
          targets.reshape(-1),
          weights.reshape(-1), z_loss=self.z_loss,
          constrain=nn.with_logical_constraint,
          chunk_rows=self.loss_chunk_rows)
    else:
      logits = self._sampled_logits(params, hidden, targets, weights,
                                    sample_rng)  # [B*P, 1 + K]
      flat_w = weights.reshape(-1)
      loss_sum, weight_sum = losses.masked_softmax_cross_entropy(
          logits, jnp.zeros(flat_w.shape, jnp.int32), flat_w,
          z_loss=self.z_loss)
      correct = jnp.argmax(logits, axis=-1) == 0
      correct_sum = jnp.sum(correct.astype(jnp.float32) * flat_w)
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    return loss, {"loss_sum": loss_sum, "weight_sum": weight_sum,
                  "correct_sum": correct_sum}

  def _sampled_logits(self, params, hidden, targets, weights, rng) -> Array:
    """Candidate logits (target first) for the sampled / in-batch losses."""
    query = self._apply(params, hidden, method="output_query")
    query = query.reshape(-1, query.shape[-1])  # [M, E]
    targets = targets.reshape(-1)
    table, bias = self._table_and_bias(params)
    log_q_table = (None if self._log_q_table is None
                   else jnp.asarray(self._log_q_table))
    if self.loss == "in_batch":
      target_log_q = (None if log_q_table is None
                      else jnp.take(log_q_table, targets))
      return losses.sampled_softmax_logits(
          query, targets, table, bias, targets, negative_log_q=target_log_q,
          target_log_q=target_log_q,
          negative_mask=weights.reshape(-1) > 0)
    if self.loss == "sampled_uniform":
      negatives, neg_log_q = losses.sample_negatives(
          rng, self.num_negatives, self.num_items)
      target_log_q = jnp.full(targets.shape, -math.log(self.num_items))
    else:  # sampled_popularity
      negatives, neg_log_q = losses.sample_negatives(
          rng, self.num_negatives, self.num_items,
          jnp.asarray(self.item_log_popularity), alias=self._alias)
      target_log_q = jnp.take(log_q_table, targets)
    return losses.sampled_softmax_logits(
        query, targets, table, bias, negatives, negative_log_q=neg_log_q,
        target_log_q=target_log_q)

  # -- scoring and export ----------------------------------------------------

  def hidden_at_mask(self, params, batch: Batch) -> Array:
    """`[B, E]` hidden state that scores each row's (first) [MASK].

    The [MASK] position itself; for a `causal` model the position before it
    (the last history item, as SASRec scores), or the [MASK] when the
    history is empty.
    """
    hidden = self.hidden_states(params, batch)
    idx = jnp.argmax(batch["item_ids"] == self.mask_id, axis=1)  # [B]
    if self.causal:
      idx = jnp.maximum(idx - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]

  def item_scores_from_hidden(self, params, hidden: Array) -> Array:
    """`[B, E] -> [B, padded_vocab]` float32; non-item columns are -1e9."""
    logits = self._apply(params, hidden, method="logits").astype(jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "vocab"))

  def score_fn(self, params, batch: Batch) -> Array:
    """`[B, N]` float32 scores at the [MASK]; column j is item j + 1."""
    scores = self.item_scores_from_hidden(params,
                                          self.hidden_at_mask(params, batch))
    return scores[:, 1:self.num_items + 1]

  def query_at_mask(self, params, batch: Batch) -> Array:
    """`[B, E]` query q with scores = q @ item_embeddings.T + item_bias."""
    return self._apply(params, self.hidden_at_mask(params, batch),
                       method="output_query")

  def item_embeddings(self, params) -> Array:
    """`[N, E]` output (= input) embeddings of items 1..N."""
    return self._table_and_bias(params)[0][1:self.num_items + 1]

  def item_bias(self, params) -> Array:
    """`[N]` output bias of items 1..N."""
    return self._table_and_bias(params)[1][1:self.num_items + 1]


class Bert4RecModel(SequenceRecModel):
  """BERT4Rec trained with a masked-item (cloze) loss.

  Args:
    config: the module's hyperparameters.
    loss: 'full' softmax over all items; 'sampled_uniform' /
      'sampled_popularity' (num_negatives shared negatives per batch, logQ
      corrected); 'in_batch' (the other masked targets of the batch, logQ
      corrected by item_log_popularity when given).
    num_negatives: K for the sampled losses.
    item_log_popularity: `[N]` log-probabilities of items 1..N.
    max_predictions: positions per row that get logits (default: all L).
    z_loss: coefficient of the logsumexp**2 regulariser.
    loss_chunk_rows: the full softmax runs over chunks of at most this many
      prediction rows (`losses.tied_softmax_cross_entropy`): memory of the
      logits is chunk x vocab whatever the batch; None = one chunk.
  """

  def __init__(self, config: bert4rec_lib.Bert4RecConfig, *,
               loss: str = "full", num_negatives: int = 0,
               item_log_popularity: Optional[np.ndarray] = None,
               max_predictions: Optional[int] = None, z_loss: float = 0.0,
               loss_chunk_rows: Optional[int] = DEFAULT_LOSS_CHUNK_ROWS):
    self.config = config
    super().__init__(bert4rec_lib.Bert4Rec(config),
                     num_items=config.num_items, max_len=config.max_len,
                     padded_vocab=config.padded_vocab, causal=config.causal,
                     loss=loss, num_negatives=num_negatives,
                     item_log_popularity=item_log_popularity,
                     max_predictions=max_predictions, z_loss=z_loss,
                     loss_chunk_rows=loss_chunk_rows)

  def architecture(self) -> Dict[str, Any]:
    """The config fields that define the function the parameters compute.

    Stored with every checkpoint and export and compared when they are
    restored: a flag such as `positions_from_end` changes no parameter
    shape, so a mismatch would otherwise evaluate silently wrong.
    Training-only fields (dropout rates, initialisation) and the compute
    dtype are left out.
    """
    record = dataclasses.asdict(self.config)
    for k in bert4rec_lib.TRAINING_ONLY_FIELDS:
      record.pop(k, None)
    return {"module": type(self.module).__name__, **record}

  def _table_and_bias(self, params) -> Tuple[Array, Array]:
    params = nn.meta.unbox(params)
    return params["item_embed"]["embedding"], params["output_bias"]
