"""T5 building blocks (Flax linen), numerically matching Hugging Face's T5.

Parameters are float32 and carry logical axis names; compute runs in `dtype`
(float32 or bfloat16) with layer-norm statistics and softmax in float32.
T5 specifics: RMS layer norm without bias or mean subtraction, no biases
anywhere, no 1/sqrt(d_kv) scaling of attention logits (it is folded into the
query initialisation), and bucketed relative position biases computed once per
stack and added to every layer's attention logits.

The modules read their sizes from a config object with `T5Config`'s fields
(see `recsys_jax.models.t5`); they do not import it to avoid a cycle.
"""

import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

BLOCK_AXES = ("batch", "length", "embed")
# A finite "minus infinity" for masked attention logits (kept in float32).
MASK_VALUE = -1e10


def _normal(std: float, axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """Maps `key_position - query_position` to a bucket id, as HF/Mesh TF T5.

  Small distances get their own bucket; larger ones share log-spaced buckets
  up to `max_distance`, beyond which all share the last bucket. In the
  bidirectional case half the buckets are for positive offsets.

  Args:
    relative_position: int array of `key_pos - query_pos`.
    bidirectional: False for causal (decoder) attention: positive offsets
      (the future) all map to bucket 0.
    num_buckets: number of buckets.
    max_distance: distances >= this share the last bucket.

  Returns:
    int32 array of the same shape with values in `[0, num_buckets)`.
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 throughout, in HF's order of operations, so buckets agree exactly;
  # the max(., 1) only avoids log(0) in the lanes `is_small` discards.
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (
      jnp.log(nf / max_exact) / math.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RMSNorm(nn.Module):
  """T5 layer norm: `x / sqrt(mean(x^2) + eps) * scale`, statistics in fp32."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale",
                       nn.with_logical_partitioning(nn.initializers.ones,
                                                    ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale).astype(self.dtype)


class Dense(nn.Module):
  """Bias-free `x @ kernel` with a float32 kernel named by logical axes."""
  features: int
  kernel_axes: Tuple[str, str]
  init_std: float = 1.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _normal(self.init_std, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
  """Token embedding `[vocab, embed]`; `attend` gives the tied output logits."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  init_std: float = 1.0

  def setup(self):
    self.embedding = self.param(
        "embedding", _normal(self.init_std, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """`x @ embedding.T` -> `[..., vocab]`."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype),
                      self.embedding.astype(self.dtype))


class RelativePositionBiases(nn.Module):
  """Learned per-head bias for each relative-position bucket.

  Attributes:
    num_buckets: buckets (HF `relative_attention_num_buckets`).
    max_distance: HF `relative_attention_max_distance`.
    num_heads: attention heads.
    init_std: initialiser stddev (HF: d_model**-0.5).
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  init_std: float = 1.0

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array, *,
               bidirectional: bool) -> Array:
    """Bias `[B|1, heads, Q, K]` (fp32) for positions `[B|1, Q]`, `[B|1, K]`."""
    table = self.param("rel_embedding", _normal(self.init_std, ("heads", None)),
                       (self.num_heads, self.num_buckets), jnp.float32)
    rel = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = relative_position_bucket(rel, bidirectional=bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    values = jnp.take(table, buckets, axis=1)  # [H, B, Q, K]
    return jnp.transpose(values, (1, 0, 2, 3))


class MultiHeadAttention(nn.Module):
  """T5 attention: unscaled dot products plus additive bias, optional KV cache.

  With `decode=True` the layer keeps `cached_key`/`cached_value`
  `[B, max_len, heads, d_kv]` in the 'cache' collection. The first call (cache
  absent, e.g. under `init`) creates them from the full-length input and runs
  normally; later calls take one new position and write it at `decode_index`.

  Attributes:
    num_heads: heads.
    d_kv: size of each head (heads * d_kv need not equal d_model).
    dropout_rate: dropout on the attention probabilities.
    dtype: compute dtype.
  """
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array,
               mask: Optional[Array] = None, bias: Optional[Array] = None, *,
               decode: bool = False, decode_index: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Attends `inputs_q` `[B, Q, D]` to `inputs_kv` `[B, K, D]`.

    Args:
      inputs_q: queries' inputs.
      inputs_kv: keys'/values' inputs.
      mask: bool, broadcastable to `[B, heads, Q, K]`; True = may attend.
      bias: float, broadcastable to `[B, heads, Q, K]`, added to the logits.
      decode: use/create the KV cache (self-attention only).
      decode_index: int scalar, the position written in single-step decoding.
      deterministic: disables dropout.

    Returns:
      `[B, Q, D]` in `dtype`.
    """
    d_model = inputs_q.shape[-1]
    inner = self.num_heads * self.d_kv

    def proj(name, std):
      return Dense(inner, ("embed", "joined_kv"), std, self.dtype, name=name)

    query = proj("query", (d_model * self.d_kv) ** -0.5)(inputs_q)
    key = proj("key", d_model ** -0.5)(inputs_kv)
    value = proj("value", d_model ** -0.5)(inputs_kv)
    split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, self.d_kv))
    query, key, value = split(query), split(key), split(value)

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape,
                                 key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                   value.shape, value.dtype)
      if initialized:
        if query.shape[1] != 1 or decode_index is None:
          raise ValueError(
              "cached decoding takes one position per call and a decode_index;"
              f" got inputs of length {query.shape[1]}")
        start = (0, decode_index, 0, 0)
        key = jax.lax.dynamic_update_slice(cached_key.value,
                                           key.astype(cached_key.value.dtype),
                                           start)
        value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), start)
        cached_key.value = key
        cached_value.value = value

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype),
                     value.astype(self.dtype))
    out = out.reshape(out.shape[:2] + (inner,))
    return Dense(d_model, ("joined_kv", "embed"), inner ** -0.5, self.dtype,
                 name="out")(out)


def _activation(name: str) -> Callable[[Array], Array]:
  # HF maps 'gated-gelu' to gelu_new (tanh approximation), plain 'gelu' to
  # the exact erf form.
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unsupported T5 activation {name!r}")


def parse_feed_forward_proj(feed_forward_proj: str) -> Tuple[bool, str]:
  """'relu' -> (False, 'relu'); 'gated-gelu' -> (True, 'gelu_new') as HF."""
  parts = feed_forward_proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj must be 'ACT' or 'gated-ACT', got "
                     f"{feed_forward_proj!r}")
  gated = len(parts) == 2
  act = parts[-1]
  if feed_forward_proj == "gated-gelu":
    act = "gelu_new"
  _activation(act)  # validates
  return gated, act


class MlpBlock(nn.Module):
  """`wo(act(wi x))`, or gated `wo(act(wi_0 x) * wi_1 x)` (T5 v1.1 / mT5)."""
  d_ff: int
  feed_forward_proj: str = "relu"
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    d_model = x.shape[-1]
    gated, act_name = parse_feed_forward_proj(self.feed_forward_proj)
    act = _activation(act_name)
    wi = lambda name: Dense(self.d_ff, ("embed", "mlp"), d_model ** -0.5,
                            self.dtype, name=name)(x)
    if gated:
      h = act(wi("wi_0")) * wi("wi_1")
    else:
      h = act(wi("wi"))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return Dense(d_model, ("mlp", "embed"), self.d_ff ** -0.5, self.dtype,
                 name="wo")(h)


def _attention(config, name):
  return MultiHeadAttention(num_heads=config.num_heads, d_kv=config.d_kv,
                            dropout_rate=config.dropout_rate,
                            dtype=config.compute_dtype, name=name)


def _mlp(config, name="mlp"):
  return MlpBlock(d_ff=config.d_ff, feed_forward_proj=config.feed_forward_proj,
                  dropout_rate=config.dropout_rate, dtype=config.compute_dtype,
                  name=name)


def _norm(config, name):
  return RMSNorm(epsilon=config.layer_norm_epsilon,
                 dtype=config.compute_dtype, name=name)


def _relpos(config):
  return RelativePositionBiases(
      num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance,
      num_heads=config.num_heads, init_std=config.d_model ** -0.5,
      name="relpos_bias")


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and MLP, each with a residual."""
  config: Any

  def setup(self):
    self.pre_attention_layer_norm = _norm(self.config,
                                          "pre_attention_layer_norm")
    self.attention = _attention(self.config, "attention")
    self.pre_mlp_layer_norm = _norm(self.config, "pre_mlp_layer_norm")
    self.mlp = _mlp(self.config)
    self.dropout = nn.Dropout(self.config.dropout_rate)

  def __call__(self, x, mask, bias, *, deterministic=True):
    h = self.pre_attention_layer_norm(x)
    h = self.attention(h, h, mask, bias, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, BLOCK_AXES)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention and MLP, pre-norm residuals."""
  config: Any

  def setup(self):
    c = self.config
    self.pre_self_attention_layer_norm = _norm(c,
                                               "pre_self_attention_layer_norm")
    self.self_attention = _attention(c, "self_attention")
    self.pre_cross_attention_layer_norm = _norm(
        c, "pre_cross_attention_layer_norm")
    self.encoder_decoder_attention = _attention(c, "encoder_decoder_attention")
    self.pre_mlp_layer_norm = _norm(c, "pre_mlp_layer_norm")
    self.mlp = _mlp(c)
    self.dropout = nn.Dropout(c.dropout_rate)

  def __call__(self, x, encoded, self_mask, self_bias, cross_mask, *,
               decode=False, decode_index=None, deterministic=True):
    h = self.pre_self_attention_layer_norm(x)
    h = self.self_attention(h, h, self_mask, self_bias, decode=decode,
                            decode_index=decode_index,
                            deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_cross_attention_layer_norm(x)
    # T5 has no position bias on cross-attention.
    h = self.encoder_decoder_attention(h, encoded, cross_mask, None,
                                       deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, BLOCK_AXES)


class StepCounter(nn.Module):
  """Scalar int32 decoding position kept in the 'cache' collection."""

  @nn.compact
  def __call__(self) -> Tuple[bool, Array]:
    """Returns (cache existed before, position); advances it if it existed."""
    initialized = self.has_variable("cache", "index")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    current = index.value
    if initialized:
      index.value = current + 1
    return initialized, current


class Encoder(nn.Module):
  """Stack of encoder layers over already-embedded inputs."""
  config: Any

  def setup(self):
    c = self.config
    self.relpos_bias = _relpos(c)
    self.layers = [EncoderLayer(c, name=f"layers_{i}")
                   for i in range(c.num_encoder_layers)]
    self.encoder_norm = _norm(c, "encoder_norm")
    self.dropout = nn.Dropout(c.dropout_rate)

  def __call__(self, x: Array, mask: Array, *,
               deterministic: bool = True) -> Array:
    """`x` `[B, L, D]` embeddings, `mask` `[B, L]` bool -> `[B, L, D]`."""
    length = x.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    # Computed once, shared by all layers (HF: layer 0 owns the table).
    bias = self.relpos_bias(positions, positions, bidirectional=True)
    # Key mask only, as HF: padded query rows still produce (unused) outputs.
    attn_mask = mask.astype(bool)[:, None, None, :]
    x = nn.with_logical_constraint(x, BLOCK_AXES)
    x = self.dropout(x, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, attn_mask, bias, deterministic=deterministic)
    x = self.encoder_norm(x)
    return self.dropout(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Stack of decoder layers; returns the final-normed hidden states.

  In cached decoding the decoder keeps `cache_index/index` (int32 scalar) in
  the 'cache' collection; every other cache leaf has the batch as leading
  axis. The first `decode=True` call (cache absent) creates the cache from a
  full-length `[B, max_len]` input and runs like `decode=False`.
  """
  config: Any

  def setup(self):
    c = self.config
    self.relpos_bias = _relpos(c)
    self.layers = [DecoderLayer(c, name=f"layers_{i}")
                   for i in range(c.num_decoder_layers)]
    self.decoder_norm = _norm(c, "decoder_norm")
    self.dropout = nn.Dropout(c.dropout_rate)
    self.step_counter = StepCounter(name="cache_index")

  def __call__(self, x: Array, encoded: Array, encoder_mask: Array,
               decoder_positions: Optional[Array] = None, *,
               decode: bool = False, deterministic: bool = True) -> Array:
    """Runs the stack.

    Args:
      x: `[B, T, D]` embedded decoder inputs (`T == 1` in cached steps).
      encoded: `[B, L, D]` encoder outputs.
      encoder_mask: `[B, L]` bool, False at encoder padding.
      decoder_positions: optional `[B, T]` positions for the relative bias
        (default `0..T-1`); ignored in cached steps.
      decode: cached decoding (see class docstring).
      deterministic: disables dropout.

    Returns:
      `[B, T, D]` hidden states after the final layer norm.
    """
    length = x.shape[1]
    cross_mask = encoder_mask.astype(bool)[:, None, None, :]
    decode_index = None
    stepping = False
    if decode:
      stepping, decode_index = self.step_counter()
    if stepping:
      if length != 1:
        raise ValueError(
            f"cached decoding takes one token per step, got {length}")
      cache_len = self.layers[0].self_attention.get_variable(
          "cache", "cached_key").shape[1]
      key_positions = jnp.arange(cache_len, dtype=jnp.int32)
      bias = self.relpos_bias(decode_index[None, None], key_positions[None],
                              bidirectional=False)
      self_mask = (key_positions <= decode_index)[None, None, None, :]
    else:
      if decoder_positions is None:
        positions = jnp.arange(length, dtype=jnp.int32)[None]
      else:
        positions = jnp.asarray(decoder_positions, jnp.int32)
      bias = self.relpos_bias(positions, positions, bidirectional=False)
      self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]

    x = nn.with_logical_constraint(x, BLOCK_AXES)
    x = self.dropout(x, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, encoded, self_mask, bias, cross_mask, decode=decode,
                decode_index=decode_index, deterministic=deterministic)
    x = self.decoder_norm(x)
    return self.dropout(x, deterministic=deterministic)

