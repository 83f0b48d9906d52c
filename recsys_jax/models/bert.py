"""BERT-family text encoder (e.g. sentence-transformers all-MiniLM-L6-v2).

Mirrors Hugging Face `BertModel` without the pooler: word + position +
token-type embeddings and LayerNorm, then post-LN transformer layers with
biases and exact (erf) GELU. Kernels are stored `[in, out]` (the transpose of
torch's `nn.Linear.weight`) so `checkpoint_import.bert` maps them 1:1.
Attention is the shared `layers.MultiHeadAttention` (joined `[H, H]`
kernels, biases, scaled queries): `layer_{i}/attention/{query,key,value,out}`.

Parameters are float32 with logical axis names; compute runs in `dtype`.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import layers

Array = jax.Array
DType = Any

_SUPPORTED_ACTS = ("gelu",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture of a BERT encoder (HF `BertConfig` field names)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in _SUPPORTED_ACTS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r}; expected "
                       f"one of {_SUPPORTED_ACTS} (exact erf GELU)")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> "BertConfig":
    """Builds from a HF config.json dict; unknown keys are ignored."""
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"config model_type={model_type!r}; expected 'bert'")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"config position_embedding_type={pos!r}; only "
                       "'absolute' is supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if kwargs.get("pad_token_id") is None:
      kwargs.pop("pad_token_id", None)
    return cls(**kwargs)

  def to_hf_config(self) -> dict:
    """The HF config.json dict for this architecture."""
    out = dataclasses.asdict(self)
    out.update(model_type="bert", architectures=["BertModel"],
               position_embedding_type="absolute")
    return out


def _dense(features: int, axes, dtype: DType, name: str) -> nn.Dense:
  return layers.dense(features, axes, dtype=dtype, name=name)


def _layer_norm(eps: float, dtype: DType, name: str) -> nn.LayerNorm:
  return layers.layer_norm(dtype, name, epsilon=eps)


def _embed(num: int, features: int, axes, dtype: DType, name: str) -> nn.Embed:
  return layers.embedding(num, features, axes, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, token_type_ids: Optional[Array] = None, *,
               inputs_embeds: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    shape = tokens.shape if inputs_embeds is None else inputs_embeds.shape
    length = shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    word = _embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                  self.dtype, "word_embeddings")
    if inputs_embeds is None:
      x = word(tokens)
    else:
      x = inputs_embeds.astype(self.dtype)
    pos = _embed(cfg.max_position_embeddings, cfg.hidden_size,
                 ("length", "embed"), self.dtype, "position_embeddings")
    x = x + pos(jnp.arange(length))[None]
    types = _embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"),
                   self.dtype, "token_type_embeddings")
    if token_type_ids is None:
      # HF's default: every position is segment 0.
      x = x + types.embedding[0].astype(self.dtype)
    else:
      x = x + types(token_type_ids)
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x)
    x = layers.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)


class BertLayer(nn.Module):
  """Post-LN layer: LN(x + Attn(x)) then LN(h + FFN(h)), all with biases."""
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, *,
               deterministic: bool = True) -> Array:
    """Runs one layer on `x` `[B, L, H]`; `key_mask` `[B, L]` bool."""
    cfg = self.config
    hidden = x.shape[-1]
    heads = cfg.num_attention_heads
    dropout = layers.Dropout(cfg.hidden_dropout_prob)
    # Like HF: only keys are masked, so padded queries still get (unused)
    # finite outputs.
    attn = layers.MultiHeadAttention(
        heads, hidden // heads, dropout_rate=cfg.attention_probs_dropout_prob,
        dtype=self.dtype, joined_kv=True, name="attention")(
            x, mask=layers.key_mask(key_mask), deterministic=deterministic)
    attn = dropout(attn, deterministic=deterministic)
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "attention_norm")(x + attn)

    shape = x.shape
    rows = x.reshape(-1, hidden)  # 2-D matmuls (see `layers.matmul_2d`)
    y = _dense(cfg.intermediate_size, ("embed", "mlp"), self.dtype,
               "intermediate")(rows)
    y = layers.gelu(y)  # HF 'gelu' is the exact erf form
    y = _dense(hidden, ("mlp", "embed"), self.dtype, "output")(y)
    y = dropout(y.reshape(shape), deterministic=deterministic)
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, "output_norm")(x + y)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)


class BertEncoder(nn.Module):
  """BERT encoder returning the last hidden state `[B, L, hidden_size]`.

  Attributes:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, mask: Optional[Array] = None, *,
               token_type_ids: Optional[Array] = None,
               inputs_embeds: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Encodes `tokens` `[B, L]` int.

    Args:
      tokens: word-piece ids `[B, L]` (ignored when `inputs_embeds` is given
        except for its shape).
      mask: `[B, L]` bool/int, nonzero at real tokens; defaults to all valid.
      token_type_ids: optional `[B, L]` segment ids (default all 0).
      inputs_embeds: optional `[B, L, H]` replacing the word embeddings.
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    if mask is None:
      shape = tokens.shape if inputs_embeds is None else inputs_embeds.shape[:2]
      mask = jnp.ones(shape, bool)
    key_mask = mask.astype(bool)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
        tokens, token_type_ids, inputs_embeds=inputs_embeds,
        deterministic=deterministic)
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(
          x, key_mask, deterministic=deterministic)
    return x


def mean_pool(hidden: Array, mask: Array) -> Array:
  """Mask-weighted mean over length: `[B, L, H]`, `[B, L]` -> `[B, H]` float32.

  Matches sentence-transformers' mean pooling (sum of valid tokens divided by
  max(count, 1e-9)); a row with no valid token pools to zeros.
  """
  m = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) along the last axis (torch F.normalize)."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def sentence_embedding(hidden: Array, mask: Array) -> Array:
  """all-MiniLM-L6-v2's sentence embedding: mean pooling then L2 norm."""
  return l2_normalize(mean_pool(hidden, mask))
