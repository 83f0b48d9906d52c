"""LANCER's prompts: per-layer prefix keys/values for a T5 (prefix tuning).

LANCER (Li et al. 2023; public code github.com/Gnimixy/lancer,
layer/prefix.py, layer/attention.py, run.py) conditions a language model
with two learned prompts, both prepended to its self-attention keys and
values (`layers.PrefixKV`, one per layer):

  knowledge prompt (the paper's PrefixPrompt), the same for every example:
    e     = table                          [P, hidden]  uniform(+-sqrt(1/P))
    hs    = tanh(e W_h + b_h)              [P, hidden]  the "hidden states"
    kv_k  = dropout(hs W_o + b_o)          [P, layers * 2 * H * D]

  reasoning prompt (the paper's ReasoningAttention), per example:
    x     = frozen item vectors of the user's last W history items
                                           [B, W, item_dim]
    q     = x W_q + b_q                    [B, W, hidden]
    k, v  = hs W_k + b_k, hs W_v + b_v     [P, hidden]
    r     = softmax(q k^T / sqrt(hidden)) v             [B, W, hidden]
    kv_r  = dropout(project(r))            [B, W, layers * 2 * H * D]

  with `project` the knowledge prompt's output layer (W_o, b_o:
  `reasoning_projection='shared'`, so both prompts live in one key/value
  space) or a dense of its own ('own', as the paper's code).

`layers` are those of the stacks listed in `LancerConfig.stacks`, encoder
first; per layer the key then the value, each `[H, D]` (the T5's heads and
d_kv). `mode` picks the prefix: 'knowledge' (P positions, all valid),
'reasoning' (W positions, masked where the window holds no item) or 'both'
(P + W, knowledge first). A stack not listed gets None.

The item vectors are those of REGEN's soft tokens
(`item_soft_tokens.source_vectors`): rows of frozen `ItemTables` ('cf',
'semantic' or both concatenated: `sources`), normalised, a learned vector
where a table misses an item. The history is `history_items` `[B, Hmax]`
int (0 = padding), oldest first; the window holds the last W non-zero
items, oldest first, at positions 0..n-1 (n = min(W, items in the row)),
masked after them. The prefix has no position bias, so where the items sit
inside the window changes nothing.

Parameters (`LancerPrefix`, `params['prefix']` of `EncoderDecoderModel`):

  knowledge/table, knowledge/hidden/{kernel,bias},
  knowledge/output/{kernel,bias}      (modes reading the knowledge keys, or
                                       reasoning_projection='shared')
  reasoning/items/<source>_missing, reasoning/{query,key,value}/...,
  reasoning/output/...                ('own' only)

so that a 'knowledge' run initialises a 'reasoning' / 'both' run through
`init_from` with the mapping `('prefix/knowledge/.*', r'\\g<0>')` (LANCER
trains the knowledge prompt first, on item texts, then the reasoning
prompt on next-item prediction).

Initialisation: dense kernels are fan-in (LeCun) truncated normal, so
outputs keep the scale of their inputs (prefix keys/values near the unit
scale of T5's own at initialisation), biases zero; the query kernel reads
unit-norm source vectors (normalize=True), so it is N(0, 1 / num_sources)
as REGEN's adapter, giving unit-variance queries.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.models import item_soft_tokens
from recsys_jax.models import layers

Array = jax.Array

HISTORY_ITEMS = item_soft_tokens.HISTORY_ITEMS
STACKS = ("encoder", "decoder")
MODES = ("knowledge", "reasoning", "both")
PROJECTIONS = ("shared", "own")
# Features that give the batch size in 'knowledge' mode (no history read).
_BATCH_FEATURES = ("encoder_input_tokens", HISTORY_ITEMS)
# Prefix keys/values `[B, N, layers, 2, H, D]`.
_KV_AXES = ("batch", "length", None, None, "heads", "kv")


def _int_at_least(value, low: int) -> bool:
  return (not isinstance(value, bool) and isinstance(value, (int, np.integer))
          and value >= low)


@dataclasses.dataclass(frozen=True)
class LancerConfig:
  """Hyperparameters of `LancerPrefix` (module docstring).

  Attributes:
    num_heads, d_kv: the T5's heads and key/value width per head.
    num_encoder_layers, num_decoder_layers: the T5's stacks.
    hidden: width of the prompts' hidden states (the paper: the LM's
      width; `for_t5` defaults it to d_model).
    prefix_length: P, knowledge-prompt positions (paper: 20).
    mode: 'knowledge', 'reasoning' or 'both'.
    stacks: the T5 stacks given prefixes, a subset of ('encoder',
      'decoder'), kept in that order (a single name is accepted).
    history_window: W, the last history items the reasoning prompt reads
      (paper: 10).
    sources: item vectors of the reasoning prompt: 'cf', 'semantic' or
      'fused' (both, concatenated), as `ItemSoftTokensConfig.sources`.
    normalize: L2-normalise each source vector.
    dropout_rate: dropout on the prefix keys/values (paper: 0.2).
    reasoning_projection: 'shared' (the knowledge prompt's output layer)
      or 'own' (a dense of the reasoning prompt).
    dtype: compute dtype name; params are float32.
  """
  num_heads: int
  d_kv: int
  num_encoder_layers: int
  num_decoder_layers: int
  hidden: int
  prefix_length: int = 20
  mode: str = "reasoning"
  stacks: Tuple[str, ...] = STACKS
  history_window: int = 10
  sources: str = "semantic"
  normalize: bool = True
  dropout_rate: float = 0.2
  reasoning_projection: str = "shared"
  dtype: str = "float32"

  def __post_init__(self):
    name = type(self).__name__
    for field in ("num_heads", "d_kv", "hidden", "prefix_length",
                  "history_window"):
      value = getattr(self, field)
      if not _int_at_least(value, 1):
        raise ValueError(f"{name}.{field}={value!r}: expected a positive "
                         "integer")
    for field in ("num_encoder_layers", "num_decoder_layers"):
      value = getattr(self, field)
      if not _int_at_least(value, 0):
        raise ValueError(f"{name}.{field}={value!r}: expected an integer "
                         ">= 0")
    for field, allowed in (("mode", MODES),
                           ("sources", item_soft_tokens.SOURCES),
                           ("reasoning_projection", PROJECTIONS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{name}.{field}={getattr(self, field)!r}: expected "
                         f"one of {allowed}")
    stacks = self.stacks
    if isinstance(stacks, str):
      stacks = (stacks,)
    if (not isinstance(stacks, (tuple, list)) or not stacks
        or any(s not in STACKS for s in stacks)
        or len(set(stacks)) != len(stacks)):
      raise ValueError(f"{name}.stacks={self.stacks!r}: expected distinct "
                       f"names out of {STACKS}, at least one")
    object.__setattr__(self, "stacks",
                       tuple(s for s in STACKS if s in stacks))
    if self.num_layers == 0:
      raise ValueError(f"{name}.stacks={self.stacks!r}: the listed stacks "
                       "have no layers (num_encoder_layers="
                       f"{self.num_encoder_layers}, num_decoder_layers="
                       f"{self.num_decoder_layers})")
    if not isinstance(self.normalize, (bool, np.bool_)):
      raise ValueError(f"{name}.normalize={self.normalize!r}: expected "
                       "True or False")
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f"{name}.dropout_rate={self.dropout_rate!r}: "
                       "expected 0 <= rate < 1")
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"{name}.dtype={self.dtype!r}: not a dtype name "
                       "(e.g. 'float32', 'bfloat16')") from e

  @classmethod
  def for_t5(cls, t5_config, *, hidden: Optional[int] = None,
             **fields) -> "LancerConfig":
    """A config sized for `t5_config` (a `T5Config`): its heads, d_kv and
    layers; `hidden` defaults to its d_model, `dtype` to its dtype."""
    fields.setdefault("dtype", t5_config.dtype)
    return cls(num_heads=t5_config.num_heads, d_kv=t5_config.d_kv,
               num_encoder_layers=t5_config.num_encoder_layers,
               num_decoder_layers=t5_config.num_decoder_layers,
               hidden=t5_config.d_model if hidden is None else hidden,
               **fields)

  def architecture_record(self) -> Dict[str, Any]:
    """The fields that define the computed function, as JSON (lists, not
    tuples); dropout and the compute dtype are left out."""
    record = dataclasses.asdict(self)
    del record["dropout_rate"], record["dtype"]
    record["stacks"] = list(self.stacks)
    return record

  @property
  def used_sources(self) -> tuple:
    """('cf', 'semantic'), ('cf',) or ('semantic',)."""
    return item_soft_tokens.used_sources(self.sources)

  @property
  def reads_history(self) -> bool:
    """True when the reasoning prompt (history and item tables) is used."""
    return self.mode != "knowledge"

  def stack_layers(self, stack: str) -> int:
    """Layers of `stack` that get a prefix (0 if not listed)."""
    if stack not in self.stacks:
      return 0
    return (self.num_encoder_layers if stack == "encoder"
            else self.num_decoder_layers)

  @property
  def num_layers(self) -> int:
    """Layers given a prefix, over the listed stacks."""
    return sum(self.stack_layers(s) for s in STACKS)

  @property
  def kv_features(self) -> int:
    """Width of the output layers: layers * 2 (key, value) * H * D."""
    return self.num_layers * 2 * self.num_heads * self.d_kv

  @property
  def prefix_positions(self) -> int:
    """Prefix length per layer: P, W or P + W."""
    return {"knowledge": self.prefix_length,
            "reasoning": self.history_window,
            "both": self.prefix_length + self.history_window}[self.mode]


def history_window(ids: Array, window: int) -> Tuple[Array, Array]:
  """The last `window` items of each row, oldest first.

  Args:
    ids: `[B, H]` int item ids, oldest first; ids <= 0 are padding (skipped
      wherever they are).
    window: W.

  Returns:
    (window ids `[B, W]` (0 where masked), mask `[B, W]` bool): the row's
    last min(W, n) items at positions 0..min(W, n)-1, n its items.
  """
  if ids.ndim != 2 or ids.shape[1] < 1:
    raise ValueError(f"history ids: expected [batch, H >= 1], got shape "
                     f"{ids.shape}")
  is_item = ids > 0
  # Items first, in their order (a stable sort of the padding flags).
  packed = jnp.take_along_axis(
      ids, jnp.argsort(~is_item, axis=1, stable=True), axis=1)
  count = jnp.sum(is_item, axis=1, keepdims=True)          # [B, 1]
  slot = jnp.arange(window)[None, :]                       # [1, W]
  pos = jnp.maximum(count - window, 0) + slot              # [B, W]
  mask = pos < count
  picked = jnp.take_along_axis(packed, jnp.minimum(pos, ids.shape[1] - 1),
                               axis=1)
  return jnp.where(mask, picked, 0), mask


def _symmetric_uniform(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class KnowledgePrompt(nn.Module):
  """The knowledge prompt: `hidden_states()` `[P, hidden]` and `project`
  (the output layer + dropout, also the reasoning prompt's when shared)."""
  config: LancerConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.prefix_length
    self.table = self.param(
        "table", layers.logical(_symmetric_uniform(float(np.sqrt(1.0 / p))),
                                ("latents", "embed")),
        (p, cfg.hidden), jnp.float32)
    self.hidden = layers.dense(cfg.hidden, ("embed", None), dtype=dtype,
                               init=layers.fan_in_init())
    # Created on first use: absent in 'reasoning' mode with an own
    # projection.
    self.output = layers.dense(cfg.kv_features, ("embed", None), dtype=dtype,
                               init=layers.fan_in_init())
    self.dropout = layers.Dropout(cfg.dropout_rate)

  def hidden_states(self) -> Array:
    """tanh(table W_h + b_h): `[P, hidden]`."""
    return jnp.tanh(self.hidden(self.table))

  def project(self, h: Array, *, deterministic: bool) -> Array:
    """`[..., hidden]` -> flat keys/values `[..., kv_features]`."""
    y = self.output(h.reshape(-1, h.shape[-1]))  # 2-D (layers.matmul_2d)
    y = self.dropout(y, deterministic=deterministic)
    return y.reshape(h.shape[:-1] + (y.shape[-1],))


class HistoryItemVectors(nn.Module):
  """Item ids `[...]` -> their frozen source vectors, concatenated
  `[..., item_dim]` (learned `<source>_missing` vectors where missing)."""
  config: LancerConfig
  tables: Any

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    cfg = self.config
    vectors = item_soft_tokens.source_vectors(
        self, self.tables, ids, sources=cfg.sources,
        normalize=cfg.normalize)
    return jnp.concatenate([vectors[s] for s in cfg.used_sources], axis=-1)


class ReasoningPrompt(nn.Module):
  """The reasoning prompt: history items attend over the knowledge
  prompt's hidden states (`attend`); `project` is its own output layer
  ('own')."""
  config: LancerConfig
  tables: Any

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.items = HistoryItemVectors(cfg, self.tables)
    query_init = (nn.initializers.normal(
        stddev=float(1.0 / np.sqrt(len(cfg.used_sources))))
                  if cfg.normalize else layers.fan_in_init())
    self.query = layers.dense(cfg.hidden, (None, "embed"), dtype=dtype,
                              init=query_init)
    self.key = layers.dense(cfg.hidden, ("embed", None), dtype=dtype,
                            init=layers.fan_in_init())
    self.value = layers.dense(cfg.hidden, ("embed", None), dtype=dtype,
                              init=layers.fan_in_init())
    self.output = layers.dense(cfg.kv_features, ("embed", None), dtype=dtype,
                               init=layers.fan_in_init())
    self.dropout = layers.Dropout(cfg.dropout_rate)

  def attend(self, ids: Array, knowledge_states: Array) -> Array:
    """Single-head scaled dot-product attention of the items over the
    knowledge states.

    Args:
      ids: `[B, W]` item ids (the window).
      knowledge_states: `[P, hidden]`.

    Returns:
      `[B, W, hidden]` in the compute dtype.
    """
    x = self.items(ids)                                    # [B, W, item_dim]
    b, w, _ = x.shape
    q = self.query(x.reshape(b * w, -1)).reshape(b, w, -1)  # [B, W, hidden]
    k = self.key(knowledge_states)                         # [P, hidden]
    v = self.value(knowledge_states)                       # [P, hidden]
    q = q * self.config.hidden**-0.5  # a Python float keeps q's dtype
    logits = jnp.einsum("bwh,ph->bwp", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bwp,ph->bwh", probs.astype(v.dtype), v)

  def project(self, h: Array, *, deterministic: bool) -> Array:
    """`[B, W, hidden]` -> flat keys/values `[B, W, kv_features]`."""
    y = self.output(h.reshape(-1, h.shape[-1]))
    y = self.dropout(y, deterministic=deterministic)
    return y.reshape(h.shape[:-1] + (y.shape[-1],))


def _batch_size(batch: Mapping[str, Array]) -> int:
  for name in _BATCH_FEATURES:
    if name in batch:
      return int(np.shape(batch[name])[0])
  raise KeyError(f"LancerPrefix needs one of {_BATCH_FEATURES} for the "
                 f"batch size; got features {sorted(batch)}")


class LancerPrefix(nn.Module):
  """`batch -> (encoder_prefix, decoder_prefix)`, each None or one
  `layers.PrefixKV` per layer (module docstring).

  Attributes:
    config: the prompts' hyperparameters.
    tables: `model_lib.item_embeddings.ItemTables` (frozen constants), read
      by the reasoning prompt; None is fine in 'knowledge' mode.
  """
  config: LancerConfig
  tables: Any = None

  def setup(self):
    cfg = self.config
    self.knowledge = KnowledgePrompt(cfg)
    if cfg.reads_history:
      self.reasoning = ReasoningPrompt(cfg, self.tables)

  def _check_inputs(self, batch: Mapping[str, Array]) -> Array:
    """The history ids `[B, H]` (checked), and the tables."""
    cfg = self.config
    if self.tables is None:
      raise ValueError(f"LancerConfig.mode={cfg.mode!r} reads item tables; "
                       "build LancerPrefix(config, tables) (builders."
                       "lancer_prefix: cf= and/or item_text_cache=)")
    item_soft_tokens.check_tables(cfg, self.tables)
    if HISTORY_ITEMS not in batch:
      raise KeyError(f"LancerConfig.mode={cfg.mode!r} reads batch["
                     f"{HISTORY_ITEMS!r}] ([batch, H] item ids); got "
                     f"features {sorted(batch)}")
    ids = jnp.asarray(batch[HISTORY_ITEMS])
    if ids.ndim != 2 or ids.shape[1] < 1:
      raise ValueError(f"batch[{HISTORY_ITEMS!r}]: expected [batch, H >= 1] "
                       f"item ids, got shape {ids.shape}")
    return ids

  def _per_layer(self, flat: Array, mask: Array
                 ) -> Dict[str, Tuple[layers.PrefixKV, ...]]:
    """Flat keys/values `[B, N, kv_features]` -> per stack, per layer."""
    cfg = self.config
    b, n = flat.shape[:2]
    kv = flat.reshape(b, n, cfg.num_layers, 2, cfg.num_heads, cfg.d_kv)
    kv = nn.with_logical_constraint(kv, _KV_AXES)
    out, first = {}, 0
    for stack in cfg.stacks:
      count = cfg.stack_layers(stack)
      out[stack] = tuple(
          layers.PrefixKV(kv[:, :, i, 0], kv[:, :, i, 1], mask)
          for i in range(first, first + count))
      first += count
    return out

  def __call__(self, batch: Mapping[str, Array], *,
               deterministic: bool = True):
    """The prefixes of a batch.

    Args:
      batch: `history_items` `[B, H]` int (0 = padding, oldest first) unless
        mode='knowledge', which reads only the batch size (of
        `encoder_input_tokens`).
      deterministic: False applies dropout (needs a 'dropout' rng).

    Returns:
      (encoder_prefix, decoder_prefix): per listed stack a tuple of one
      `layers.PrefixKV` per layer, keys/values `[B, N, H, D]` in the
      compute dtype and mask `[B, N]` bool, N = `config.prefix_positions`;
      None for a stack not listed.
    """
    cfg = self.config
    states = self.knowledge.hidden_states()                # [P, hidden]
    parts, masks = [], []
    if cfg.mode in ("knowledge", "both"):
      b = _batch_size(batch)
      flat = self.knowledge.project(states, deterministic=deterministic)
      parts.append(jnp.broadcast_to(flat[None], (b,) + flat.shape))
      masks.append(jnp.ones((b, cfg.prefix_length), bool))
    if cfg.reads_history:
      window_ids, mask = history_window(self._check_inputs(batch),
                                        cfg.history_window)
      r = self.reasoning.attend(window_ids, states)        # [B, W, hidden]
      project = (self.knowledge.project
                 if cfg.reasoning_projection == "shared"
                 else self.reasoning.project)
      flat = project(r, deterministic=deterministic)
      parts.append(jnp.where(mask[..., None], flat, jnp.zeros((), flat.dtype)))
      masks.append(mask)
    flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    mask = masks[0] if len(masks) == 1 else jnp.concatenate(masks, axis=1)
    prefixes = self._per_layer(flat, mask)
    return prefixes.get("encoder"), prefixes.get("decoder")
