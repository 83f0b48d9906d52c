"""ILM phase 1: BLIP-2-style Q-Former pretraining on CF item embeddings.

Yang et al. (2024), "Item-Language Model for Conversational
Recommendation", phase 1: a Q-Former (models/qformer.py) whose N queries
cross-attend to an item's collaborative-filtering embedding (a constant
table cut into M chunks, `qformer.cf_memory`) learns item representations
aligned with the item's text, with BLIP-2's three losses plus two
item-level contrastive losses. `ILMPretrainModel.loss_fn` routes each batch
(one task per step, `input_pipeline/mixture.py`) by its features:

* item-text (`text_tokens` [B, T], CLS at 0, 0 = padding; `item` [B]):
  - ITC: normalised item features `[B, N, E]` (queries only) against the
    text's CLS feature `[B, E]` (text only); similarity = max over queries /
    temperature (a parameter clamped to [0.001, 0.5]); symmetric
    cross-entropy with label smoothing (BLIP-2: 0.1), where every column of
    the same item is a positive (soft targets, ALBEF's `idx` targets).
  - ITM: a 2-way head on the mean of the query outputs under the
    bidirectional mask, on B positive pairs, B (negative item, text) and B
    (item, negative text) pairs; negatives are drawn from the softmax of
    the (stop-gradient) ITC similarities over the batch rows of other
    items, so never the row itself nor any row of the same item (a row
    with no such candidate has no negative that step).
  - ITG: next-token prediction of the text with its CLS replaced by the
    DEC id, queries visible (multimodal-causal mask), label smoothing 0.1.
* item-item (`pair_item` [B], `item` [B]): symmetric InfoNCE between the two
  items' pooled features (mean over queries of the ITC item projection,
  normalised), temperature shared with ITC.
* user-item (`user_items` [B, H], 0-padded; `item` [B], the next item): the
  same, with the user's memory = chunks of the mean CF embedding of the
  history items.

Every loss is a sum over rows so that micro-batches and shards add up
(`base.BaseModel`): weight_sum counts the batch's valid rows and
loss_sum = sum of w_k x (sum over rows of loss k), so loss = the weighted
sum of the per-row mean losses. Two departures from BLIP-2's means follow:
ITG is each row's mean over its target tokens (BLIP-2: the mean over all
the batch's tokens), and ITM's three pairs per row count as one row (their
mean: BLIP-2's mean over 3B pairs when every row has its negatives).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.model_lib import base
from recsys_jax.model_lib import losses
from recsys_jax.models import layers
from recsys_jax.models import qformer as qformer_lib

Array = jax.Array
Batch = Mapping[str, Array]

# Batch features (docs/FEATURES.md).
ITEM = "item"
TEXT_TOKENS = "text_tokens"
PAIR_ITEM = "pair_item"
USER_ITEMS = "user_items"

# BLIP / ALBEF clamp the learnable temperature to this range.
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.001, 0.5
# Logit of an excluded candidate: finite, so a row without candidates stays
# NaN-free (as losses._EXCLUDED).
_EXCLUDED = -1e9

# Metric sums (`ILMPretrainModel.metric_sums`).
TEXT_ROWS = "text_rows"              # valid rows of item-text batches
ITC_SUM, ITC_CORRECT = "itc_sum", "itc_correct_sum"
ITG_SUM = "itg_sum"
ITM_SUM, ITM_CORRECT, ITM_PAIRS = "itm_sum", "itm_correct_sum", "itm_pairs"
ITEM_ITEM_SUM, ITEM_ITEM_ROWS = "item_item_sum", "item_item_rows"
USER_ITEM_SUM, USER_ITEM_ROWS = "user_item_sum", "user_item_rows"
SUMS = (TEXT_ROWS, ITC_SUM, ITC_CORRECT, ITG_SUM, ITM_SUM, ITM_CORRECT,
        ITM_PAIRS, ITEM_ITEM_SUM, ITEM_ITEM_ROWS, USER_ITEM_SUM,
        USER_ITEM_ROWS)


# -- losses (pure functions) --------------------------------------------------


def clamp_temperature(temperature: Array) -> Array:
  """The temperature in use: the parameter clipped to [0.001, 0.5]."""
  return jnp.clip(temperature, TEMPERATURE_MIN, TEMPERATURE_MAX)


def l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def itc_similarity(item_features: Array, text_features: Array,
                   temperature: Array) -> Array:
  """`[B, B]` item-to-text logits: max over queries of the cosine / t.

  Args:
    item_features: `[B, N, E]` normalised query features.
    text_features: `[B, E]` normalised text (CLS) features.
    temperature: scalar (already clamped).

  Returns:
    sim `[B, B]`, sim[i, j] = max_n item_i,n . text_j / t; the text-to-item
    logits are its transpose.
  """
  q2t = jnp.einsum("ine,je->ijn", item_features.astype(jnp.float32),
                   text_features.astype(jnp.float32))
  return jnp.max(q2t, axis=-1) / temperature


def _soft_cross_entropy(logits: Array, positive: Array, candidate: Array,
                        label_smoothing: float) -> Tuple[Array, Array]:
  """Per-row CE against uniform targets over `positive` columns.

  Targets: (1 - ls) x positive / |positive| + ls x candidate / |candidate|
  (PyTorch's label smoothing over the candidate columns). Returns (loss
  `[B]`, correct `[B]`: the row's argmax is a positive).
  """
  logits = jnp.where(candidate, logits, _EXCLUDED)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  pos = (positive & candidate).astype(jnp.float32)
  target = pos / jnp.maximum(jnp.sum(pos, axis=-1, keepdims=True), 1.0)
  if label_smoothing:
    cand = candidate.astype(jnp.float32)
    uniform = cand / jnp.maximum(jnp.sum(cand, axis=-1, keepdims=True), 1.0)
    target = (1.0 - label_smoothing) * target + label_smoothing * uniform
  # Excluded columns have target 0: skip their (finite, huge) log-probs.
  loss = -jnp.sum(jnp.where(candidate, target * log_p, 0.0), axis=-1)
  best = jnp.argmax(logits, axis=-1)
  correct = jnp.take_along_axis(pos, best[:, None], axis=-1)[:, 0]
  return loss, correct


def contrastive_loss(logits: Array, positive: Array, weights: Array, *,
                     label_smoothing: float = 0.0,
                     exclude: Optional[Array] = None
                     ) -> Tuple[Array, Array, Array]:
  """Symmetric contrastive CE of `[B, B]` logits with several positives.

  Row i (a -> b) and column i (b -> a) each have the target distribution
  uniform over their positives (the diagonal always counts; `positive`
  adds e.g. other rows of the same item), smoothed with `label_smoothing`
  over the candidates. Candidates are the weighted rows / columns minus
  `exclude` (never the diagonal). With only the diagonal positive, no
  exclusion and no smoothing this is `losses.info_nce` of logits.

  Args:
    logits: `[B, B]`, logits[i, j] = score(a_i, b_j).
    positive: `[B, B]` bool.
    weights: `[B]` row weights (0: padding, neither loss nor candidate).
    label_smoothing: PyTorch-style, over the candidates.
    exclude: `[B, B]` bool, pairs that are no candidates of each other.

  Returns:
    (sum over rows of w_i (CE_row_i + CE_col_i) / 2, sum over rows of
    w_i (correct_row_i + correct_col_i) / 2, sum of weights), float32.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  b = logits.shape[0]
  if logits.shape != (b, b) or positive.shape != (b, b) or weights.shape != (
      b,):
    raise ValueError(f"contrastive_loss: logits {logits.shape}, positive "
                     f"{positive.shape} and weights {weights.shape}; expected "
                     "[B, B], [B, B] and [B]")
  eye = jnp.eye(b, dtype=bool)
  valid = weights > 0
  candidate = valid[:, None] & valid[None, :]
  if exclude is not None:
    candidate = candidate & ~exclude
  candidate = candidate | eye
  positive = positive | eye
  row, row_ok = _soft_cross_entropy(logits, positive, candidate,
                                    label_smoothing)
  col, col_ok = _soft_cross_entropy(logits.T, positive.T, candidate.T,
                                    label_smoothing)
  return (jnp.sum(0.5 * (row + col) * weights),
          jnp.sum(0.5 * (row_ok + col_ok) * weights), jnp.sum(weights))


def itm_negatives(rng: Array, sim: Array, items: Array, weights: Array
                  ) -> Tuple[Array, Array, Array, Array]:
  """BLIP-2's hard negatives: rows drawn from the softmax of ITC logits.

  A candidate of row i is any weighted row j whose item differs from
  item i (so never i itself nor a duplicate of its item).

  Args:
    rng: PRNG key.
    sim: `[B, B]` item-to-text logits (`itc_similarity`; not
      differentiated).
    items: `[B]` item ids.
    weights: `[B]` row weights (0: padding, never drawn).

  Returns:
    (neg_item `[B]`: for the text of row i, the row whose item is its
     negative, drawn from softmax(sim[:, i]); has_neg_item `[B]` bool;
     neg_text `[B]`: for the item of row i, the row whose text is its
     negative, drawn from softmax(sim[i, :]); has_neg_text `[B]` bool).
    Rows without a candidate get themselves and False.
  """
  sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
  valid = weights > 0
  candidate = ((items[:, None] != items[None, :]) & valid[None, :]
               & valid[:, None])
  rng_item, rng_text = jax.random.split(rng)
  own = jnp.arange(sim.shape[0])

  def draw(key, logits):
    idx = jax.random.categorical(key, jnp.where(candidate, logits, -jnp.inf),
                                 axis=-1)
    has = jnp.any(candidate, axis=-1)
    return jnp.where(has, idx, own).astype(jnp.int32), has

  neg_item, has_item = draw(rng_item, sim.T)  # text i -> item rows
  neg_text, has_text = draw(rng_text, sim)    # item i -> text rows
  return neg_item, has_item, neg_text, has_text


def itm_loss(logits: Array, labels: Array, weights: Array
             ) -> Tuple[Array, Array, Array]:
  """2-way matching CE: (loss sum, correct sum, weight sum) over pairs.

  Args:
    logits: `[P, 2]`.
    labels: `[P]` 1 = matching pair, 0 = not.
    weights: `[P]`.
  """
  loss_sum, weight_sum = losses.masked_softmax_cross_entropy(
      logits, labels.astype(jnp.int32), weights)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return loss_sum, jnp.sum(correct * weights.astype(jnp.float32)), weight_sum


def itg_decoder_tokens(text_tokens: Array, dec_id: int) -> Array:
  """`text_tokens` with position 0 (the CLS) replaced by `dec_id` in every
  non-empty row (BLIP-2's `decoder_input_ids[:, 0] = bos_token_id`)."""
  first = jnp.where(text_tokens[:, 0] != 0, dec_id, 0)
  return text_tokens.at[:, 0].set(first.astype(text_tokens.dtype))


def itg_loss(logits: Array, text_tokens: Array, weights: Array, *,
             label_smoothing: float = 0.1) -> Tuple[Array, Array]:
  """Causal LM loss of the text, each row's mean over its target tokens.

  Position t predicts token t + 1 (targets `text_tokens[:, 1:]`, 0 =
  padding, no loss); the per-token loss is PyTorch's label-smoothed CE,
  (1 - ls) x (-log p_target) + ls x mean over the vocabulary of -log p.

  Args:
    logits: `[B, T, V]` (from the DEC-swapped tokens).
    text_tokens: `[B, T]` the original tokens.
    weights: `[B]` row weights.
    label_smoothing: ls.

  Returns:
    (sum over rows of w_i x mean token loss of row i, number of weighted
    rows with at least one target token), float32.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = text_tokens[:, 1:].astype(jnp.int32)
  mask = (targets != 0).astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  token = nll
  if label_smoothing:
    token = ((1.0 - label_smoothing) * nll
             - label_smoothing * jnp.mean(log_p, axis=-1))
  count = jnp.sum(mask, axis=-1)
  row = jnp.sum(token * mask, axis=-1) / jnp.maximum(count, 1.0)
  w = weights.astype(jnp.float32) * (count > 0)
  return jnp.sum(row * w), jnp.sum(w)


def mean_history_memory(table: Array, history: Array, num_chunks: int
                        ) -> Tuple[Array, Array]:
  """A user's memory: the mean CF embedding of its history, in chunks.

  Args:
    table: `[V, D]` CF table (row 0 = padding).
    history: `[B, H]` item ids, 0 = padding (excluded from the mean).
    num_chunks: M.

  Returns:
    (memory `[B, M, D // M]`, has_history `[B]` bool; users without history
    get zeros).
  """
  chunks = qformer_lib.cf_memory(table, history, num_chunks)  # [B, H, M, d]
  mask = (history > 0).astype(jnp.float32)
  count = jnp.sum(mask, axis=-1)
  total = jnp.einsum("bhmd,bh->bmd", chunks.astype(jnp.float32), mask)
  return total / jnp.maximum(count, 1.0)[:, None, None], count > 0


# -- the Flax module ----------------------------------------------------------


class ILMPretrain(nn.Module):
  """Q-Former + BLIP-2's heads: ITC projections, ITM head, temperature.

  Parameters: `qformer/...`, `itc_item_proj`, `itc_text_proj`, `itm_head`,
  `temperature` (scalar). Every entry point takes `deterministic`.
  """
  config: qformer_lib.QFormerConfig
  embed_dim: int = 64
  temperature_init: float = 0.07

  def setup(self):
    dtype = self.config.dtype
    self.qformer = qformer_lib.QFormer(self.config)
    self.itc_item_proj = layers.dense(self.embed_dim, ("embed", None),
                                      dtype=dtype)
    self.itc_text_proj = layers.dense(self.embed_dim, ("embed", None),
                                      dtype=dtype)
    self.itm_head = layers.dense(2, ("embed", None), dtype=dtype)
    self.temperature = self.param(
        "temperature", layers.logical(
            nn.initializers.constant(self.temperature_init), ()), ())

  def _project(self, dense, x: Array) -> Array:
    y = dense(x.reshape(-1, x.shape[-1]))
    return y.reshape(x.shape[:-1] + (y.shape[-1],))

  def item_features(self, memory: Array, *, deterministic: bool = True
                    ) -> Array:
    """`[B, M, d]` memory -> `[B, N, E]` normalised ITC query features."""
    q = self.qformer(memory, deterministic=deterministic)["queries"]
    return l2_normalize(self._project(self.itc_item_proj, q))

  def pooled_features(self, memory: Array, *, deterministic: bool = True
                      ) -> Array:
    """`[B, E]`: mean over queries of the ITC projection, normalised."""
    q = self.qformer(memory, deterministic=deterministic)["queries"]
    return l2_normalize(jnp.mean(
        self._project(self.itc_item_proj, q).astype(jnp.float32), axis=1))

  def text_features(self, text_tokens: Array, *, deterministic: bool = True
                    ) -> Array:
    """`[B, T]` tokens (CLS at 0) -> `[B, E]` normalised CLS feature."""
    t = self.qformer(None, text_tokens, mask_mode="unimodal",
                     deterministic=deterministic)["text"]
    return l2_normalize(self._project(self.itc_text_proj, t[:, 0]))

  def itm_logits(self, memory: Array, text_tokens: Array, *,
                 deterministic: bool = True) -> Array:
    """`[P, 2]`: the head on the mean query output, bidirectional mask."""
    q = self.qformer(memory, text_tokens, mask_mode="bidirectional",
                     deterministic=deterministic)["queries"]
    # The head is linear: on the mean = the mean of per-query logits
    # (BLIP-2).
    return self._project(self.itm_head, jnp.mean(q, axis=1)).astype(
        jnp.float32)

  def itg_logits(self, memory: Array, decoder_tokens: Array, *,
                 deterministic: bool = True) -> Array:
    """`[B, T, V]` next-token logits, queries visible (multimodal causal)."""
    return self.qformer(memory, decoder_tokens, mask_mode="multimodal_causal",
                        deterministic=deterministic, text_logits=True)["logits"]

  def temperature_value(self) -> Array:
    return clamp_temperature(self.temperature)

  def init_all(self, memory: Array, text_tokens: Array) -> Array:
    """Touches every parameter (initialisation)."""
    out = self.itg_logits(memory, text_tokens)
    return (jnp.sum(out) + jnp.sum(self.itm_logits(memory, text_tokens))
            + jnp.sum(self.item_features(memory))
            + jnp.sum(self.text_features(text_tokens))
            + self.temperature_value())


# -- the wrapper --------------------------------------------------------------


class ILMPretrainModel(base.BaseModel):
  """ILM's phase-1 Q-Former pretraining (module docstring).

  Args:
    qformer_config: the Q-Former (`memory_dim` = D / num_chunks).
    cf_table: `[num_items + 1, D]` CF item embeddings (row 0 = padding); a
      constant closed over by the jitted steps, never a parameter.
    num_chunks: M, chunks of a CF embedding (the cross-attention memory).
    embed_dim: width of the ITC features.
    itc_weight, itg_weight, itm_weight, item_item_weight, user_item_weight:
      the losses' weights (0: the loss is not computed).
    cls_id: the text's first token (the data prepends it; recorded).
    dec_id: the token replacing CLS for ITG.
    temperature_init: initial ITC temperature.
    label_smoothing: of ITG (BLIP-2: 0.1).
    itc_label_smoothing: of ITC (BLIP-2: 0.1).
  """

  def __init__(self, qformer_config: qformer_lib.QFormerConfig,
               cf_table: np.ndarray, *, num_chunks: int,
               embed_dim: int = 64, itc_weight: float = 1.0,
               itg_weight: float = 1.0, itm_weight: float = 1.0,
               item_item_weight: float = 1.0, user_item_weight: float = 1.0,
               cls_id: int, dec_id: int, temperature_init: float = 0.07,
               label_smoothing: float = 0.1,
               itc_label_smoothing: float = 0.1):
    shape = np.shape(cf_table)
    if len(shape) != 2 or shape[0] < 2:
      raise ValueError(f"ILMPretrainModel: cf_table has shape {shape}; "
                       "expected [num_items + 1, D]")
    if int(num_chunks) < 1 or shape[1] % int(num_chunks) or (
        shape[1] // int(num_chunks) != qformer_config.memory_dim):
      raise ValueError(
          f"ILMPretrainModel: CF width {shape[1]} / num_chunks={num_chunks} "
          f"must be an integer equal to QFormerConfig.memory_dim="
          f"{qformer_config.memory_dim}")
    self.weights = {"itc": float(itc_weight), "itg": float(itg_weight),
                    "itm": float(itm_weight),
                    "item_item": float(item_item_weight),
                    "user_item": float(user_item_weight)}
    bad = {k: v for k, v in self.weights.items() if not v >= 0}
    if bad or not any(self.weights.values()):
      raise ValueError(f"ILMPretrainModel loss weights {self.weights}: "
                       "expected numbers >= 0, at least one > 0")
    vocab = qformer_config.vocab_size
    for name, value in (("cls_id", cls_id), ("dec_id", dec_id)):
      if not 0 < int(value) < vocab:
        raise ValueError(f"ILMPretrainModel.{name}={value}: expected a token "
                         f"id in [1, {vocab}) (QFormerConfig.vocab_size)")
    if int(cls_id) == int(dec_id):
      raise ValueError(f"ILMPretrainModel: cls_id and dec_id are both "
                       f"{cls_id}; ITG needs its own DEC token")
    for name, value in (("label_smoothing", label_smoothing),
                        ("itc_label_smoothing", itc_label_smoothing)):
      if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"ILMPretrainModel.{name}={value}: expected [0, 1)")
    if not float(temperature_init) > 0:
      raise ValueError(f"ILMPretrainModel.temperature_init="
                       f"{temperature_init}: expected > 0")
    base.enable_array_constants()
    self.config = qformer_config
    self.num_items = shape[0] - 1
    self.cf_dim = shape[1]
    self.num_chunks = int(num_chunks)
    self.embed_dim = int(embed_dim)
    self.cls_id, self.dec_id = int(cls_id), int(dec_id)
    self.label_smoothing = float(label_smoothing)
    self.itc_label_smoothing = float(itc_label_smoothing)
    self.temperature_init = float(temperature_init)
    self.cf_table = jnp.asarray(cf_table, jnp.float32)
    self.module = ILMPretrain(qformer_config, embed_dim=self.embed_dim,
                              temperature_init=self.temperature_init)

  # -- what the trainer and the runs record ----------------------------------

  def metric_sums(self) -> Tuple[str, ...]:
    return (base.LOSS_SUM, base.WEIGHT_SUM) + SUMS

  def summarize_metrics(self, sums: Mapping[str, float]) -> Dict[str, float]:
    """`loss` and each switched-on loss (and accuracy) whose batches
    occurred in the window: `itc`, `itc_acc`, `itg`, `itm`, `itm_acc`,
    `item_item`, `user_item`."""
    out = super().summarize_metrics(sums)
    w = self.weights
    rows = sums[TEXT_ROWS]
    if rows > 0:
      if w["itc"] > 0:
        out["itc"] = sums[ITC_SUM] / rows
        out["itc_acc"] = sums[ITC_CORRECT] / rows
      if w["itg"] > 0:
        out["itg"] = sums[ITG_SUM] / rows
    if w["itm"] > 0 and sums[ITM_PAIRS] > 0:
      out["itm"] = sums[ITM_SUM] / sums[ITM_PAIRS]
      out["itm_acc"] = sums[ITM_CORRECT] / sums[ITM_PAIRS]
    for name, total, count in (("item_item", ITEM_ITEM_SUM, ITEM_ITEM_ROWS),
                               ("user_item", USER_ITEM_SUM, USER_ITEM_ROWS)):
      if w[name] > 0 and sums[count] > 0:
        out[name] = sums[total] / sums[count]
    return out

  def architecture(self) -> Dict[str, Any]:
    record = dataclasses.asdict(self.config)
    for k in ("dropout_rate", "attention_dropout_rate", "dtype"):
      record.pop(k, None)
    return {"module": "ILMPretrain", "qformer": record,
            "embed_dim": self.embed_dim, "num_chunks": self.num_chunks,
            "cf_dim": self.cf_dim, "num_items": self.num_items,
            "cls_id": self.cls_id, "dec_id": self.dec_id}

  def checkpoint_meta(self) -> Dict[str, Any]:
    return {"num_items": self.num_items, "cls_id": self.cls_id,
            "dec_id": self.dec_id}

  # -- parameters ------------------------------------------------------------

  def get_initial_variables(self, rng: Array,
                            batch_size: int = 2) -> Dict[str, Any]:
    memory = jnp.zeros((batch_size, self.num_chunks, self.config.memory_dim),
                       jnp.float32)
    tokens = jnp.full((batch_size, 2), self.cls_id, jnp.int32)
    variables = self.module.init({"params": rng}, memory, tokens,
                                 method=ILMPretrain.init_all)
    return {"params": variables["params"]}

  # -- features --------------------------------------------------------------

  def _apply(self, params, *args, method: str, rng=None, **kwargs):
    return self.module.apply(
        {"params": params}, *args, method=getattr(ILMPretrain, method),
        rngs=None if rng is None else {"dropout": rng},
        deterministic=rng is None, **kwargs)

  def memory(self, items: Array) -> Array:
    """`[...]` item ids -> `[..., M, D // M]` CF memory."""
    return qformer_lib.cf_memory(self.cf_table, items, self.num_chunks)

  def item_features(self, params, items: Array) -> Array:
    """`[B]` item ids -> `[B, N, E]` normalised ITC item features."""
    return self._apply(params, self.memory(items), method="item_features")

  def pooled_item_features(self, params, items: Array) -> Array:
    """`[B]` item ids -> `[B, E]` the item-item loss's features (mean over
    queries of the ITC item projection, normalised)."""
    return self._apply(params, self.memory(items), method="pooled_features")

  def text_features(self, params, text_tokens: Array) -> Array:
    """`[B, T]` tokens (CLS at 0) -> `[B, E]` normalised ITC text features."""
    return self._apply(params, text_tokens, method="text_features")

  def temperature(self, params) -> Array:
    """The clamped ITC temperature."""
    return clamp_temperature(nn.meta.unbox(params)["temperature"])

  # -- losses ----------------------------------------------------------------

  def _zero_sums(self) -> Dict[str, Array]:
    return {k: jnp.zeros((), jnp.float32) for k in SUMS}

  def _item_text_sums(self, params, batch: Batch, rng) -> Tuple[
      Array, Dict[str, Array]]:
    """(weighted loss sum, sums) of ITC + ITM + ITG on an item-text batch."""
    items = jnp.asarray(batch[ITEM], jnp.int32)
    tokens = jnp.asarray(batch[TEXT_TOKENS], jnp.int32)
    weights = ((items > 0) & (tokens[:, 0] != 0)).astype(jnp.float32)
    memory = self.memory(items)
    keys = (None,) * 5 if rng is None else tuple(jax.random.split(rng, 5))
    sample_rng = jax.random.PRNGKey(0) if rng is None else keys[4]
    w = self.weights
    sums = self._zero_sums()
    sums[TEXT_ROWS] = jnp.sum(weights)
    total = jnp.zeros((), jnp.float32)
    sim = None
    if w["itc"] > 0 or w["itm"] > 0:
      item_feats = self._apply(params, memory, method="item_features",
                               rng=keys[0])
      text_feats = self._apply(params, tokens, method="text_features",
                               rng=keys[1])
      sim = itc_similarity(item_feats, text_feats, self.temperature(params))
    if w["itc"] > 0:
      same = items[:, None] == items[None, :]
      itc_sum, itc_correct, _ = contrastive_loss(
          sim, same, weights, label_smoothing=self.itc_label_smoothing)
      sums[ITC_SUM], sums[ITC_CORRECT] = itc_sum, itc_correct
      total = total + w["itc"] * itc_sum
    if w["itm"] > 0:
      neg_item, has_item, neg_text, has_text = itm_negatives(
          sample_rng, sim, items, weights)
      mem_all = jnp.concatenate(
          [memory, jnp.take(memory, neg_item, axis=0), memory], axis=0)
      tok_all = jnp.concatenate(
          [tokens, tokens, jnp.take(tokens, neg_text, axis=0)], axis=0)
      logits = self._apply(params, mem_all, tok_all, method="itm_logits",
                           rng=keys[2])
      b = items.shape[0]
      labels = jnp.concatenate([jnp.ones((b,), jnp.int32),
                                jnp.zeros((2 * b,), jnp.int32)])
      pair_w = jnp.concatenate([weights, weights * has_item,
                                weights * has_text])
      itm_sum, itm_correct, pairs = itm_loss(logits, labels, pair_w)
      sums[ITM_SUM], sums[ITM_CORRECT], sums[ITM_PAIRS] = (
          itm_sum, itm_correct, pairs)
      total = total + w["itm"] * itm_sum / 3.0
    if w["itg"] > 0:
      logits = self._apply(params, memory,
                           itg_decoder_tokens(tokens, self.dec_id),
                           method="itg_logits", rng=keys[3])
      itg_sum, _ = itg_loss(logits, tokens, weights,
                            label_smoothing=self.label_smoothing)
      sums[ITG_SUM] = itg_sum
      total = total + w["itg"] * itg_sum
    return total, sums

  def _pair_sums(self, params, batch: Batch, rng, kind: str) -> Tuple[
      Array, Dict[str, Array]]:
    """(weighted loss sum, sums) of the item-item or user-item InfoNCE."""
    items = jnp.asarray(batch[ITEM], jnp.int32)
    sums = self._zero_sums()
    rows_key, sum_key = ((ITEM_ITEM_ROWS, ITEM_ITEM_SUM) if kind == "item_item"
                         else (USER_ITEM_ROWS, USER_ITEM_SUM))
    if kind == "item_item":
      other = jnp.asarray(batch[PAIR_ITEM], jnp.int32)
      weights = ((items > 0) & (other > 0)).astype(jnp.float32)
      a_memory = self.memory(items)
      # Rows sharing an item share their partners: (a_i, b_j) is a known
      # pair when a_i = a_j or b_i = b_j. An item is no candidate of
      # itself (its features match trivially).
      positive = ((items[:, None] == items[None, :])
                  | (other[:, None] == other[None, :]))
      exclude = (items[:, None] == other[None, :]) & ~positive
    else:
      history = jnp.asarray(batch[USER_ITEMS], jnp.int32)
      a_memory, has_history = mean_history_memory(self.cf_table, history,
                                                   self.num_chunks)
      other = items
      weights = ((items > 0) & has_history).astype(jnp.float32)
      positive = items[:, None] == items[None, :]
      exclude = None
    sums[rows_key] = jnp.sum(weights)
    if self.weights[kind] <= 0:
      return jnp.zeros((), jnp.float32), sums
    keys = (None, None) if rng is None else tuple(jax.random.split(rng))
    a = self._apply(params, a_memory, method="pooled_features", rng=keys[0])
    b = self._apply(params, self.memory(other), method="pooled_features",
                    rng=keys[1])
    logits = a @ b.T / self.temperature(params)
    loss_sum, _, _ = contrastive_loss(logits, positive, weights,
                                      exclude=exclude)
    sums[sum_key] = loss_sum
    return self.weights[kind] * loss_sum, sums

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Array]]:
    """Routes by feature: `text_tokens` (ITC + ITM + ITG), `pair_item`
    (item-item) or `user_items` (user-item); see the module docstring."""
    if ITEM not in batch:
      raise ValueError(f"ILMPretrainModel.loss_fn: batch features "
                       f"{sorted(batch)} lack {ITEM!r}")
    if TEXT_TOKENS in batch:
      total, sums = self._item_text_sums(params, batch, dropout_rng)
      rows = sums[TEXT_ROWS]
    elif PAIR_ITEM in batch:
      total, sums = self._pair_sums(params, batch, dropout_rng, "item_item")
      rows = sums[ITEM_ITEM_ROWS]
    elif USER_ITEMS in batch:
      total, sums = self._pair_sums(params, batch, dropout_rng, "user_item")
      rows = sums[USER_ITEM_ROWS]
    else:
      raise ValueError(
          f"ILMPretrainModel.loss_fn: batch features {sorted(batch)} name no "
          f"task: expected {TEXT_TOKENS!r} (item-text), {PAIR_ITEM!r} "
          f"(item-item) or {USER_ITEMS!r} (user-item)")
    loss = total / jnp.maximum(rows, 1.0)
    return loss, {base.LOSS_SUM: total, base.WEIGHT_SUM: rows, **sums}
