"""FLARE wrapper: text tables, distinct-item Perceiver, critiques, InfoNCE.

`FlareModel` is a `SequenceRecModel` (same training views, scoring and
export contract as Bert4Rec / SASRec) whose module (models/flare.py) adds
each item's text to its input. What the wrapper owns:

* **Text tables** (`FlareTextTables`): the frozen encoder's token encodings
  of every item (`[V, T, D]`, row = item id; rows without an item are
  empty) and of every critique text (`[C + 1, Tc, D]`, row = critique id,
  row 0 empty), read once from the item-text caches of `embed_items`, plus
  each item's category-name critique id (the proxy critique). They are
  device arrays closed over by the jitted steps (JAX passes them as
  arguments, see `base.enable_array_constants`), never parameters: nothing of
  them is trained or checkpointed.
* **One Perceiver pass per distinct item of a batch**: the batch's item ids
  are deduplicated inside the jitted step (`distinct`, static size
  `max_distinct_items`, default min(V, B x L): exact); each distinct item's
  tokens are resampled once and the vectors gathered back to positions.
  With a smaller cap, items beyond it lose their text for that step and
  are counted (`text_dropped` in the training log).
* **Critiques**: `critique_ids` `[B, L]` (input_pipeline: id of the critique
  shown before each item, 0 none). Training gives a predicted slot its data
  critique with probability `data_critique_rate` and otherwise, with
  probability `proxy_critique_rate`, its target's category name (FLARE's
  proxy critique); targets whose category is in `ood_critique_ids` get none
  (the out-of-domain categories of the critiquing evaluation). A slot's
  Perceiver reads [its item tokens; critique tokens]. Scoring reads
  `input_critique_ids` only (set by evaluation/critiquing.py), so ordinary
  evaluation never sees the held-out item's critique.
* **InfoNCE** between each distinct item's ID embedding and its text vector
  (in-batch negatives), added to the loss sum with `infonce_weight`:
  loss_sum = cloze_sum + w * infonce_sum, both sums over rows, so
  micro-batch accumulation stays exact.
* **Output table**: 'id' (tied to the ID table, as Bert4Rec) or 'fused'
  (fuse(ID, text) of all items, recomputed every step); `eval_table`
  chooses the scoring table separately (cold items can only be ranked by
  the fused one).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.model_lib import base
from recsys_jax.model_lib import losses
from recsys_jax.model_lib import sequence
from recsys_jax.models import bert4rec as bert4rec_lib
from recsys_jax.models import flare as flare_lib
from recsys_jax.models import item_vocab
from recsys_jax.models import layers
from recsys_jax.models import perceiver as perceiver_lib

Array = jax.Array
Batch = Mapping[str, Array]

CRITIQUE_IDS = "critique_ids"            # data: critique before each item
INPUT_CRITIQUE_IDS = "input_critique_ids"  # scoring: critiques to apply
TABLES = ("id", "fused")
INFONCE_SUM, INFONCE_WEIGHT = "infonce_sum", "infonce_weight"
TEXT_DROPPED = "text_dropped_sum"


@dataclasses.dataclass
class FlareTextTables:
  """Frozen text inputs of a FLARE model (host arrays until `device()`).

  Attributes:
    item_tokens: `[V, T, D]` token encodings, row = item id.
    item_mask: `[V, T]` bool, True at real tokens (rows without an item or
      with an empty text are all False).
    critique_tokens: `[C + 1, Tc, D]`, row = critique id (row 0 empty).
    critique_mask: `[C + 1, Tc]` bool.
    item_category: `[V]` int32, the critique id of each item's category name
      (0: none).
    identity: what built the tables (encoder fingerprint, texts hashes,
      lengths), recorded in the model's architecture.
  """
  item_tokens: Any
  item_mask: Any
  critique_tokens: Any
  critique_mask: Any
  item_category: Any
  identity: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    v, t, d = np.shape(self.item_tokens)
    if np.shape(self.item_mask) != (v, t):
      raise ValueError(f"item_mask shape {np.shape(self.item_mask)}; "
                       f"expected {(v, t)}")
    c, tc, dc = np.shape(self.critique_tokens)
    if dc != d or np.shape(self.critique_mask) != (c, tc):
      raise ValueError(
          f"critique tables {np.shape(self.critique_tokens)} / "
          f"{np.shape(self.critique_mask)} do not match the item tables' "
          f"width {d}")
    if np.shape(self.item_category) != (v,):
      raise ValueError(f"item_category shape {np.shape(self.item_category)};"
                       f" expected ({v},)")

  @property
  def text_dim(self) -> int:
    return int(np.shape(self.item_tokens)[-1])

  @property
  def num_critiques(self) -> int:
    """C, the critique texts (ids 1..C)."""
    return int(np.shape(self.critique_tokens)[0]) - 1

  def device(self) -> "FlareTextTables":
    """The same tables as (uncommitted) device arrays."""
    return dataclasses.replace(
        self, item_tokens=jnp.asarray(self.item_tokens),
        item_mask=jnp.asarray(self.item_mask, bool),
        critique_tokens=jnp.asarray(self.critique_tokens),
        critique_mask=jnp.asarray(self.critique_mask, bool),
        item_category=jnp.asarray(self.item_category, jnp.int32))


def distinct(keys: Array, size: int) -> Tuple[Array, Array, Array, Array]:
  """Deduplicates `keys` `[M]` into a static `size`.

  Returns:
    (values `[size]` (the distinct keys in increasing order, then 0s),
     index `[M]` (each key's slot in values), found `[M]` (False for keys
     beyond the first `size` distinct ones), count (distinct keys)).
  """
  keys = keys.astype(jnp.int32)
  order = jnp.argsort(keys, stable=True)
  s = keys[order]
  new = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
  rank = jnp.cumsum(new.astype(jnp.int32)) - 1  # slot of each sorted key
  values = jnp.zeros((size,), jnp.int32).at[
      jnp.where(new, rank, size)].set(s, mode="drop")
  slot = jnp.zeros_like(rank).at[order].set(rank)
  found = slot < size
  return values, jnp.minimum(slot, size - 1), found, rank[-1] + 1


def shift_left(x: Array) -> Array:
  """`x[:, p + 1]` at p (0 at the end)."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


class FlareModel(sequence.SequenceRecModel):
  """FLARE on a Bert4Rec / SASRec-mode backbone (module docstring).

  Args:
    config: the module's hyperparameters.
    tables: the frozen text tables (`FlareTextTables`).
    output_table: 'id' or 'fused', the training softmax's item table.
    eval_table: the scoring (and export) table; default `output_table`.
    infonce_weight: weight of the ID-text InfoNCE (0: off).
    infonce_temperature: its temperature.
    data_critique_rate: probability a predicted slot with a data critique
      gets it (training).
    proxy_critique_rate: probability a predicted slot without one gets its
      target's category name (training).
    ood_critique_ids: critique ids of categories never used in training.
    max_distinct_items: static cap of distinct items per Perceiver pass
      (None: exact, min(V, B x L)); unused when `output_table='fused'`
      (every item is encoded each step then).
    max_critiques_per_row: critiqued slots per row (default: the predicted
      positions per row, `max_predictions`, or L).
    new_items: item ids without training interactions. Their ID embedding
      and output bias never saw a positive (a full softmax only pushes them
      down), so scoring treats them as new items: the mean ID embedding and
      bias of the other items, plus their own text in the fused table.
    max_predictions, z_loss, loss_chunk_rows: see `Bert4RecModel`.
  """

  def __init__(self, config: flare_lib.FlareConfig, tables: FlareTextTables,
               *, output_table: str = "id", eval_table: Optional[str] = None,
               infonce_weight: float = 0.1, infonce_temperature: float = 0.1,
               data_critique_rate: float = 0.5,
               proxy_critique_rate: float = 0.25,
               ood_critique_ids: Sequence[int] = (),
               max_distinct_items: Optional[int] = None,
               max_critiques_per_row: Optional[int] = None,
               new_items: Optional[np.ndarray] = None,
               max_predictions: Optional[int] = None, z_loss: float = 0.0,
               loss_chunk_rows: Optional[int] = (
                   sequence.DEFAULT_LOSS_CHUNK_ROWS)):
    bcfg = config.backbone
    if tables.text_dim != config.text_dim:
      raise ValueError(f"text tables have width {tables.text_dim}; "
                       f"FlareConfig.text_dim is {config.text_dim}")
    if np.shape(tables.item_tokens)[0] != bcfg.padded_vocab:
      raise ValueError(f"item text table has {np.shape(tables.item_tokens)[0]}"
                       f" rows; expected padded_vocab={bcfg.padded_vocab}")
    eval_table = eval_table or output_table
    for name, value in (("output_table", output_table),
                        ("eval_table", eval_table)):
      if value not in TABLES:
        raise ValueError(f"{name}={value!r}: expected one of {TABLES}")
    for name, value in (("data_critique_rate", data_critique_rate),
                        ("proxy_critique_rate", proxy_critique_rate)):
      if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a probability in [0, 1]")
    if float(infonce_weight) < 0 or float(infonce_temperature) <= 0:
      raise ValueError(f"infonce_weight={infonce_weight} must be >= 0 and "
                       f"infonce_temperature={infonce_temperature} > 0")
    if max_distinct_items is not None and int(max_distinct_items) < 1:
      raise ValueError(f"max_distinct_items={max_distinct_items}: expected a "
                       "positive integer or None (exact)")
    bad = [c for c in ood_critique_ids
           if not 1 <= int(c) <= tables.num_critiques]
    if bad:
      raise ValueError(f"ood_critique_ids {bad} outside 1..{tables.num_critiques}")
    base.enable_array_constants()
    self.config = config
    super().__init__(flare_lib.Flare(config), num_items=bcfg.num_items,
                     max_len=bcfg.max_len, padded_vocab=bcfg.padded_vocab,
                     causal=bcfg.causal, loss="full",
                     max_predictions=max_predictions, z_loss=z_loss,
                     loss_chunk_rows=loss_chunk_rows)
    self.host_tables = tables
    self.tables = tables.device()
    self.output_table = output_table
    self.eval_table = eval_table
    self.infonce_weight = float(infonce_weight)
    self.infonce_temperature = float(infonce_temperature)
    self.data_critique_rate = float(data_critique_rate)
    self.proxy_critique_rate = float(proxy_critique_rate)
    self.ood_critique_ids = tuple(sorted(int(c) for c in ood_critique_ids))
    self.max_distinct_items = max_distinct_items
    self.max_critiques_per_row = max_critiques_per_row
    new = np.zeros((self.padded_vocab,), bool)
    if new_items is not None and len(new_items):
      ids = np.asarray(new_items, np.int64)
      if ids.min() < 1 or ids.max() > self.num_items:
        raise ValueError(f"new_items must lie in 1..{self.num_items}")
      new[ids] = True
    self.num_new_items = int(new.sum())
    self._new_items = jnp.asarray(new)

  # -- what the trainer and the runs record ----------------------------------

  def metric_sums(self) -> Tuple[str, ...]:
    return super().metric_sums() + (INFONCE_SUM, INFONCE_WEIGHT, TEXT_DROPPED)

  def summarize_metrics(self, sums: Mapping[str, float]) -> Dict[str, float]:
    out = super().summarize_metrics(sums)
    if self.infonce_weight > 0:
      out["infonce"] = sums[INFONCE_SUM] / max(sums[INFONCE_WEIGHT], 1.0)
    if sums.get(TEXT_DROPPED, 0.0) > 0:
      out["text_dropped"] = sums[TEXT_DROPPED]
    return out

  def architecture(self) -> Dict[str, Any]:
    record = dataclasses.asdict(self.config)
    for part in (record["backbone"], record["perceiver"]):
      for k in bert4rec_lib.TRAINING_ONLY_FIELDS:
        part.pop(k, None)
    identity = dict(self.host_tables.identity)
    # Top-level keys: a record that lacks them (an older checkpoint) is not
    # checked on them (checkpoints.check_architecture).
    extra = {f"text_tables_{k}": identity.pop(k) for k in ("vocab", "dtype")
             if k in identity}
    return {"module": "Flare", **record, "output_table": self.output_table,
            "text_tables": identity, **extra}

  # -- parameters ------------------------------------------------------------

  def get_initial_variables(self, rng: Array,
                            batch_size: int = 2) -> Dict[str, Any]:
    ids = jnp.ones((batch_size, self.max_len), jnp.int32)
    t = np.shape(self.host_tables.item_tokens)[1] + np.shape(
        self.host_tables.critique_tokens)[1]
    rows = batch_size * self.max_len
    tokens = jnp.zeros((rows, t, self.config.text_dim), jnp.float32)
    mask = jnp.ones((rows, t), bool)
    types = jnp.zeros((rows, t), jnp.int32)
    variables = self.module.init({"params": rng}, ids, tokens, mask, types,
                                 method=flare_lib.Flare.init_all)
    return {"params": variables["params"]}

  # -- text vectors ----------------------------------------------------------

  def _rngs(self, rng):
    return None if rng is None else {"dropout": rng}

  def _text_vectors(self, params, tokens, mask, types, rng) -> Array:
    return self._apply(params, tokens, mask, types, method="text_vectors",
                       deterministic=rng is None, rngs=self._rngs(rng))

  def _item_vectors(self, params, rows: Array, rng) -> Array:
    """`[U]` item ids -> `[U, E]` text vectors (zeros for non-items)."""
    t = self.tables
    tokens = jnp.take(t.item_tokens, rows, axis=0)
    mask = jnp.take(t.item_mask, rows, axis=0)
    vec = self._text_vectors(params, tokens, mask,
                             jnp.zeros(mask.shape, jnp.int32), rng)
    is_item = (rows >= 1) & (rows <= self.num_items)
    return jnp.where(is_item[:, None], vec, jnp.zeros_like(vec))

  def all_item_vectors(self, params, rng=None) -> Array:
    """`[V, E]` text vectors of every table row (zeros for non-items)."""
    rows = jnp.arange(self.padded_vocab, dtype=jnp.int32)
    return self._item_vectors(params, rows, rng)

  def _critique_vectors(self, params, item_rows: Array, crit: Array, rng,
                        per_row: int) -> Tuple[Array, Array]:
    """Causal critiqued slots' text vectors: (`[B, L, E]`, has `[B, L]`).

    Up to `per_row` slots per row with a critique id > 0 (the first ones);
    each reads [its item's tokens; the critique's tokens].
    """
    b, length = crit.shape
    per_row = min(per_row, length)
    t = self.tables
    priority = jnp.where(crit > 0, length - jnp.arange(length)[None, :], 0)
    _, idx = jax.lax.top_k(priority, per_row)  # [B, P]
    sel_crit = jnp.take_along_axis(crit, idx, axis=1)
    sel_item = jnp.take_along_axis(item_rows, idx, axis=1)
    valid = sel_crit > 0
    flat_item, flat_crit = sel_item.reshape(-1), sel_crit.reshape(-1)
    crit_mask = jnp.take(t.critique_mask, flat_crit, axis=0)
    tokens = jnp.concatenate(
        [jnp.take(t.item_tokens, flat_item, axis=0),
         jnp.take(t.critique_tokens, flat_crit, axis=0).astype(
             t.item_tokens.dtype)], axis=1)
    mask = jnp.concatenate([jnp.take(t.item_mask, flat_item, axis=0),
                            crit_mask], axis=1)
    types = jnp.concatenate(
        [jnp.full(mask.shape[:1] + t.item_mask.shape[1:],
                  perceiver_lib.ITEM_TEXT, jnp.int32),
         jnp.full(crit_mask.shape, perceiver_lib.CRITIQUE_TEXT, jnp.int32)],
        axis=1)
    vec = self._text_vectors(params, tokens, mask, types, rng)
    vec = vec.reshape(b, per_row, -1)
    onehot = ((idx[:, :, None] == jnp.arange(length)[None, None, :])
              & valid[:, :, None])  # [B, P, L]
    scattered = jnp.einsum("bpl,bpe->ble", onehot.astype(vec.dtype), vec)
    return scattered, jnp.any(onehot, axis=1)

  def _distinct_critique_vectors(self, params, crit: Array, rng
                                 ) -> Tuple[Array, Array]:
    """Critique-only vectors of every critiqued position (`[B, L, E]`, has)."""
    t = self.tables
    size = min(t.critique_mask.shape[0], crit.size)
    values, slot, _, _ = distinct(crit.reshape(-1), size)
    mask = jnp.take(t.critique_mask, values, axis=0)
    vec = self._text_vectors(
        params, jnp.take(t.critique_tokens, values, axis=0), mask,
        jnp.full(mask.shape, perceiver_lib.CRITIQUE_TEXT, jnp.int32), rng)
    out = jnp.take(vec, slot, axis=0).reshape(crit.shape + vec.shape[-1:])
    return out, crit > 0

  def _position_text(self, params, item_ids: Array, crit: Array, rng, *,
                     all_vectors: Optional[Array] = None,
                     critiques_per_row: Optional[int] = None
                     ) -> Tuple[Array, Dict[str, Array]]:
    """Per-position text vectors `[B, L, E]` and the distinct-item info."""
    b, length = item_ids.shape
    is_item = (item_ids >= 1) & (item_ids <= self.num_items)
    rows = jnp.where(is_item, item_ids, 0).astype(jnp.int32)
    size = min(self.padded_vocab, b * length)
    if self.max_distinct_items is not None:
      size = min(size, int(self.max_distinct_items))
    values, slot, found, _ = distinct(rows.reshape(-1), size)
    if all_vectors is not None:
      vecs = jnp.take(all_vectors, values, axis=0)
      text = jnp.take(all_vectors, rows, axis=0)
      dropped = jnp.zeros((), jnp.float32)
    else:
      vecs = self._item_vectors(params, values, rng)
      keep = (found & is_item.reshape(-1))[:, None]
      text = jnp.where(keep, jnp.take(vecs, slot, axis=0), 0.0)
      text = text.reshape(b, length, -1)
      dropped = jnp.sum((is_item.reshape(-1) & ~found).astype(jnp.float32))
    if self.causal:
      # A critiqued slot is an item: one Perceiver pass per slot over
      # [item tokens; critique tokens], at most `per_row` slots per row
      # (training: `max_critiques_per_row`, default the predicted positions
      # per row; scoring passes 1).
      per_row = critiques_per_row or self.max_critiques_per_row or (
          self.max_predictions or length)
      crit_vec, has = self._critique_vectors(params, rows, crit, rng,
                                             per_row)
    else:
      # Bidirectional: critiques go to [MASK] slots, which have no item
      # text, so a slot's vector depends on the critique alone: one pass
      # per distinct critique of the batch (exact: at most C + 1 of them).
      crit = jnp.where(item_ids == self.mask_id, crit, 0)
      crit_vec, has = self._distinct_critique_vectors(params, crit, rng)
    text = jnp.where(has[..., None], crit_vec.astype(text.dtype), text)
    return text, {"values": values, "vectors": vecs, "dropped": dropped}

  # -- forward ---------------------------------------------------------------

  def _forward(self, params, batch: Batch, crit: Optional[Array], rng, *,
               all_vectors=None, critiques_per_row=None
               ) -> Tuple[Array, Dict[str, Array]]:
    ids = batch["item_ids"]
    if crit is None:
      crit = jnp.zeros(ids.shape, jnp.int32)
    crit = crit.astype(jnp.int32)
    if self.causal:
      # A critique precedes the item it is about; the causal model predicts
      # item p + 1 from slot p, which therefore reads it.
      crit = shift_left(crit)
    text, info = self._position_text(params, ids, crit, rng,
                                     all_vectors=all_vectors,
                                     critiques_per_row=critiques_per_row)
    hidden = self._apply(
        params, ids, text, segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"), deterministic=rng is None,
        rngs=self._rngs(rng))
    return hidden, info

  def hidden_states(self, params, batch: Batch,
                    dropout_rng: Optional[Array] = None) -> Array:
    """`[B, L, E]`; critiques from `input_critique_ids` (scoring) only."""
    crit = batch.get(INPUT_CRITIQUE_IDS)
    per_row = None if crit is None else 1
    return self._forward(params, batch, crit, dropout_rng,
                         critiques_per_row=per_row)[0]

  # -- tables ----------------------------------------------------------------

  def _fused_table(self, params, all_vectors: Array) -> Array:
    ids = jnp.arange(self.padded_vocab, dtype=jnp.int32)
    id_vecs = self._apply(params, ids, method="id_vectors")
    return self._apply(params, id_vecs, all_vectors, method="fuse")

  def _table(self, params, which: str) -> Tuple[Array, Array]:
    p = nn.meta.unbox(params)
    bias = p["backbone"]["output_bias"]
    if which == "id":
      return p["backbone"]["item_embed"]["embedding"], bias
    return self._fused_table(params, self.all_item_vectors(params)), bias

  def _scoring_table(self, params) -> Tuple[Array, Array]:
    """`eval_table`, with new items' ID embedding and bias set to the mean
    of the trained items' (`new_items`)."""
    if not self.num_new_items:
      return self._table(params, self.eval_table)
    p = nn.meta.unbox(params)
    ids, bias = p["backbone"]["item_embed"]["embedding"], p["backbone"][
        "output_bias"]
    trained = (item_vocab.item_id_mask(self.padded_vocab, self.num_items)
               & ~self._new_items)
    w = trained.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    mean_id = jnp.sum(ids * w[:, None], axis=0) / count
    mean_bias = jnp.sum(bias * w) / count
    new = self._new_items
    bias = jnp.where(new, mean_bias, bias)
    if self.eval_table == "id":
      return jnp.where(new[:, None], mean_id[None], ids), bias
    id_vecs = jnp.where(new[:, None], mean_id[None], ids).astype(
        self.config.backbone.compute_dtype)
    table = self._apply(params, id_vecs, self.all_item_vectors(params),
                        method="fuse")
    return table, bias

  def _table_and_bias(self, params) -> Tuple[Array, Array]:
    """The scoring (and export) table: `eval_table` (new items: above)."""
    return self._scoring_table(params)

  def item_scores_from_hidden(self, params, hidden: Array) -> Array:
    query = self._apply(params, hidden, method="output_query")
    table, bias = self._table_and_bias(params)
    logits = jnp.dot(query.astype(jnp.float32),
                     table.astype(jnp.float32).T) + bias
    valid = item_vocab.item_id_mask(self.padded_vocab, self.num_items)
    logits = jnp.where(valid, logits, layers.LARGE_NEGATIVE)
    return nn.with_logical_constraint(logits, ("batch", "vocab"))

  # -- training --------------------------------------------------------------

  def training_critiques(self, crit_data: Array, targets: Array,
                         slots: Array, rng: Array) -> Array:
    """Critique ids the predicted slots read during training.

    Args:
      crit_data: `[B, L]` data critique ids aligned with the items.
      targets: `[B, L]` the item each critique would be about.
      slots: `[B, L]` bool, the predicted items.
      rng: draws of the data / proxy choice.
    """
    category = jnp.take(self.tables.item_category,
                        jnp.clip(targets, 0, self.padded_vocab - 1))
    ood = jnp.zeros(targets.shape, bool)
    for c in self.ood_critique_ids:
      ood = ood | (category == c)
    u_data, u_proxy = jax.random.uniform(rng, (2,) + targets.shape)
    use_data = (crit_data > 0) & (u_data < self.data_critique_rate)
    use_proxy = (~use_data & (category > 0)
                 & (u_proxy < self.proxy_critique_rate))
    chosen = jnp.where(use_data, crit_data, jnp.where(use_proxy, category, 0))
    return jnp.where(slots & ~ood, chosen, 0).astype(jnp.int32)

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Array]]:
    """Cloze / next-item softmax + w x InfoNCE, as sums (module docstring)."""
    crit_rng = jax.random.PRNGKey(1)
    if dropout_rng is not None:
      dropout_rng, crit_rng = jax.random.split(dropout_rng)
    crit_data = batch.get(CRITIQUE_IDS)
    if self.causal:
      batch, targets, weights = sequence.next_item_batch(batch)
      num = targets.shape[1]
      ids = batch["item_ids"]
      # Item p + 1 is predicted at p: its critique sits at p + 1.
      slots = jnp.concatenate([jnp.zeros_like(weights[:, :1]),
                               weights[:, :-1]], axis=1) > 0
      about = ids
    else:
      targets = batch["targets"].astype(jnp.int32)
      weights = batch["loss_weights"].astype(jnp.float32)
      num = self.max_predictions or targets.shape[1]
      slots = weights > 0
      about = targets
    if crit_data is None:
      crit_data = jnp.zeros(targets.shape, jnp.int32)
    crit = self.training_critiques(crit_data.astype(jnp.int32), about, slots,
                                   crit_rng)
    all_vectors = None
    if self.output_table == "fused":
      all_vectors = self.all_item_vectors(params, dropout_rng)
    hidden, info = self._forward(params, batch, crit, dropout_rng,
                                 all_vectors=all_vectors)
    hidden, targets, weights = sequence.gather_predictions(
        hidden, targets, weights, num)
    query = self._apply(params, hidden, method="output_query")
    if all_vectors is not None:
      table = self._fused_table(params, all_vectors)
      bias = nn.meta.unbox(params)["backbone"]["output_bias"]
    else:
      table, bias = self._table(params, "id")
    loss_sum, weight_sum, correct_sum = losses.tied_softmax_cross_entropy(
        query.reshape(-1, query.shape[-1]), table, bias,
        item_vocab.item_id_mask(self.padded_vocab, self.num_items),
        targets.reshape(-1), weights.reshape(-1), z_loss=self.z_loss,
        constrain=nn.with_logical_constraint,
        chunk_rows=self.loss_chunk_rows)
    nce_sum = nce_weight = jnp.zeros((), jnp.float32)
    if self.infonce_weight > 0:
      values = info["values"]
      has_text = jnp.any(jnp.take(self.tables.item_mask, values, axis=0),
                         axis=-1)
      w = ((values >= 1) & (values <= self.num_items) & has_text)
      id_vecs = self._apply(params, values, method="id_vectors")
      nce_sum, nce_weight = losses.info_nce(
          id_vecs, info["vectors"], self.infonce_temperature,
          weights=w.astype(jnp.float32))
    total = loss_sum + self.infonce_weight * nce_sum
    loss = total / jnp.maximum(weight_sum, 1.0)
    return loss, {base.LOSS_SUM: total, base.WEIGHT_SUM: weight_sum,
                  "correct_sum": correct_sum, INFONCE_SUM: nce_sum,
                  INFONCE_WEIGHT: nce_weight, TEXT_DROPPED: info["dropped"]}
