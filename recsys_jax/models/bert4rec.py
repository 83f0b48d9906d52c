"""BERT4Rec (Sun et al., 2019): a bidirectional Transformer over item sequences.

Item vocabulary (docs/FEATURES.md): 0 = padding, 1..N = items, N+1 = [MASK];
the table is padded to a multiple of `vocab_pad_multiple` rows so the `vocab`
axis divides any model-parallel mesh axis. The output layer is tied to the
item table; pad, [MASK] and padding rows are masked to a large negative logit.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import item_vocab
from recsys_jax.models import layers

Array = jax.Array

# Kernel initialisations (Bert4RecConfig.init).
INITS = ("bert", "fan_in")
# Config fields that do not change the function trained parameters compute:
# left out of the architecture records checked when parameters are restored.
TRAINING_ONLY_FIELDS = ("dropout_rate", "attention_dropout_rate", "dtype",
                        "init")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Bert4RecConfig:
  """Hyperparameters of `Bert4Rec`.

  Attributes:
    num_items: N, the catalogue size (ids 1..N).
    max_len: maximum sequence length (rows of the position table).
    hidden: embedding / model width E.
    num_layers: Transformer blocks.
    num_heads: attention heads (must divide `hidden`).
    mlp_dim: width of each block's GELU MLP.
    dropout_rate: dropout on embeddings, residual branches and MLP hidden.
    attention_dropout_rate: dropout on attention probabilities.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16, or their names);
      parameters are always float32.
    vocab_pad_multiple: the item table has round_up(N + 2, this) rows.
    pre_layer_norm: pre-LN blocks plus a final LayerNorm (stable without
      careful warm-up); False gives BERT's post-LN blocks.
    output_transform: BERT4Rec's Dense + GELU + LayerNorm before the tied
      output layer.
    positions_from_end: number positions from the end of each sequence
      (segment): the last item (or the appended [MASK] being scored) is
      always position 0, the one before it 1, ... . This is what the
      original BERT4Rec gets from left padding; with right padding or
      packing, counting from the start puts the predicted position at a
      different index for every length, and the model must learn "the item
      before me" once per length.
    causal: unidirectional (SASRec-style) attention: each position attends
      only to itself and earlier ones. The model wrapper then trains on the
      next item at every position and scores from the last history item
      (`model_lib.next_item_batch`), so one forward pass gives a prediction
      per interaction instead of one per masked position. Needs positions
      counted from the start (from the end would tell each position how
      many items follow it).
    init: kernel initialisation of the Transformer blocks and the output
      transform: 'bert' (truncated normal, stddev 0.02, as BERT / BERT4Rec)
      or 'fan_in' (variance 1/fan_in, `layers.fan_in_init`). At hidden 64
      the cloze model with 'bert' sits on the popularity plateau for
      hundreds of steps: its masked positions see the other items only
      through attention projections that start 6x below unit gain, and
      (docs/MODELS.md). Embedding tables keep stddev 0.02 either way
      (1/sqrt(E) tables lengthened the plateau).
  """
  num_items: int
  max_len: int = 50
  hidden: int = 64
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  vocab_pad_multiple: int = 128
  pre_layer_norm: bool = True
  output_transform: bool = True
  positions_from_end: bool = False
  causal: bool = False
  init: str = "bert"

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"Bert4RecConfig.init={self.init!r}: expected one of "
                       f"{INITS}")
    for name in ("num_items", "max_len", "hidden", "num_layers", "num_heads",
                 "mlp_dim", "vocab_pad_multiple"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Bert4RecConfig.{name}={getattr(self, name)!r}: "
                         "expected a positive integer")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= float(getattr(self, name)) < 1.0:
        raise ValueError(f"Bert4RecConfig.{name}={getattr(self, name)!r}: "
                         "expected 0 <= rate < 1")
    if self.hidden % self.num_heads:
      raise ValueError(f"Bert4RecConfig.hidden={self.hidden} must be divisible"
                       f" by num_heads={self.num_heads}")
    if self.causal and self.positions_from_end:
      raise ValueError("Bert4RecConfig: causal=True needs positions_from_end="
                       "False (positions counted from the end reveal how many "
                       "items follow each position)")
    if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32),
                                     jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"Bert4RecConfig.dtype={self.dtype!r}: expected "
                       "float32 or bfloat16")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def mask_id(self) -> int:
    return self.num_items + 1

  @property
  def padded_vocab(self) -> int:
    return round_up(self.num_items + 2, self.vocab_pad_multiple)


def positions_from_end(item_ids: Array,
                       segment_ids: Optional[Array] = None) -> Array:
  """`[B, L]` int32: how many tokens of the same sequence follow each token.

  A sequence is a row's nonzero `item_ids` (unpacked rows) or one nonzero
  segment (packed rows); padding gets 0. Works for right padding, left
  padding and packing alike, from the ids alone.
  """
  valid = item_ids != 0
  if segment_ids is None:
    segment_ids = valid.astype(jnp.int32)
  length = item_ids.shape[1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & valid[:, None, :]
  later = jnp.arange(length)[None, :] > jnp.arange(length)[:, None]  # [i, j]
  count = jnp.sum(same & later[None], axis=-1, dtype=jnp.int32)
  return jnp.where(valid, count, 0)


class Bert4Rec(nn.Module):
  """Item + position embeddings -> LayerNorm -> dropout -> Transformer blocks.

  Entry points: `__call__` (hidden states), `output_query` (the transform
  head), `logits` (tied output over the padded vocabulary) and `all_logits`.
  """
  config: Bert4RecConfig

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.item_embed = layers.embedding(cfg.padded_vocab, cfg.hidden,
                                       ("vocab", "embed"), dtype=dtype)
    self.position_embed = layers.embedding(cfg.max_len, cfg.hidden,
                                           ("length", "embed"), dtype=dtype)
    self.embed_norm = layers.layer_norm(dtype)
    self.embed_dropout = layers.Dropout(cfg.dropout_rate)
    kernel_inits = {}
    if cfg.init == "fan_in":
      kernel_inits = dict(kernel_init=layers.fan_in_init(1),
                          out_kernel_init=layers.fan_in_init(-1))
    self.blocks = [
        layers.TransformerBlock(
            num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            dropout_rate=cfg.dropout_rate,
            attention_dropout_rate=cfg.attention_dropout_rate,
            pre_layer_norm=cfg.pre_layer_norm, dtype=dtype,
            **kernel_inits)
        for _ in range(cfg.num_layers)]
    if cfg.pre_layer_norm:
      self.final_norm = layers.layer_norm(dtype)
    if cfg.output_transform:
      # ('embed', 'mlp') rather than ('embed', 'embed'): one logical name used
      # twice would map one mesh axis twice under FSDP-style rules.
      self.transform_dense = nn.Dense(
          cfg.hidden, dtype=dtype, param_dtype=jnp.float32,
          kernel_init=layers.logical(
              kernel_inits.get("kernel_init", layers.default_kernel_init),
              ("embed", "mlp")),
          bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))
      self.transform_norm = layers.layer_norm(dtype)
    self.output_bias = self.param(
        "output_bias", layers.logical(nn.initializers.zeros, ("vocab",)),
        (cfg.padded_vocab,), jnp.float32)

  def __call__(self, item_ids: Array, *, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None,
               item_inputs: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Hidden states `[B, L, E]` of `item_ids` `[B, L]`.

    Args:
      item_ids: `[B, L]` ids; 0 = padding (never attended to).
      segment_ids: optional `[B, L]` packing segments (attention stays inside
        a nonzero segment).
      positions: optional `[B, L]` positions inside each segment; default
        0..L-1 per row. Ignored with `config.positions_from_end` (computed
        from `item_ids` / `segment_ids`).
      item_inputs: optional `[B, L, E]` item representations used instead of
        `item_embed(item_ids)` (a fusion model's ID + text inputs, e.g.
        models/flare.py); `item_ids` still give the attention mask and
        positions.
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    cfg = self.config
    batch, length = item_ids.shape
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds "
                       f"Bert4RecConfig.max_len={cfg.max_len}")
    if cfg.positions_from_end:
      positions = positions_from_end(item_ids, segment_ids)
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    if item_inputs is None:
      item_inputs = self.item_embed(item_ids)
    elif item_inputs.shape != (batch, length, cfg.hidden):
      raise ValueError(f"item_inputs shape {item_inputs.shape}; expected "
                       f"{(batch, length, cfg.hidden)}")
    x = item_inputs.astype(cfg.compute_dtype) + self.position_embed(positions)
    x = self.embed_norm(x)
    x = self.embed_dropout(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, layers.BLOCK_AXES)
    mask = layers.make_attention_mask(item_ids != 0, segment_ids,
                                      causal=cfg.causal)
    for block in self.blocks:
      x = block(x, mask, deterministic=deterministic)
    if cfg.pre_layer_norm:
      x = self.final_norm(x)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)

  def output_query(self, hidden: Array) -> Array:
    """The vector dotted with item embeddings: `[..., E] -> [..., E]`."""
    if not self.config.output_transform:
      return hidden
    # A 2-D matmul: its weight gradient is fast on CPU (layers.matmul_2d).
    flat = hidden.reshape(-1, hidden.shape[-1])
    h = layers.gelu(self.transform_dense(flat))
    return self.transform_norm(h).reshape(hidden.shape)

  def logits(self, hidden: Array) -> Array:
    """Tied output `[..., E] -> [..., padded_vocab]` float32; non-items -1e9."""
    query = self.output_query(hidden)
    # The matmul runs in the compute dtype; bias, mask and softmax in float32.
    logits = self.item_embed.attend(query).astype(jnp.float32)
    logits = logits + self.output_bias
    valid = item_vocab.item_id_mask(self.config.padded_vocab,
                                    self.config.num_items)
    return jnp.where(valid, logits, layers.LARGE_NEGATIVE)

  def all_logits(self, item_ids: Array, **kwargs) -> Array:
    """Logits at every position `[B, L, padded_vocab]` (init and tests)."""
    return self.logits(self(item_ids, **kwargs))
