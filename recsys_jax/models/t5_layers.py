"""T5 building blocks (Flax linen), numerically matching Hugging Face's T5.

Parameters are float32 and carry logical axis names; compute runs in `dtype`
(float32 or bfloat16) with layer-norm statistics and softmax in float32.
T5 specifics: RMS layer norm without bias or mean subtraction, no biases
anywhere, no 1/sqrt(d_kv) scaling of attention logits (it is folded into the
query initialisation), and bucketed relative position biases computed once per
stack and added to every layer's attention logits. Attention, dropout and the
norm are the shared `models.layers` modules.

The modules read their sizes from a config object with `T5Config`'s fields
(see `recsys_jax.models.t5`); they do not import it to avoid a cycle.
"""

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import layers

Array = jax.Array
DType = Any
# Per decoder layer, the encoder output's cross-attention (keys, values),
# each `[B, heads, L, d_kv]` (`Decoder.project_encoded`).
CrossKV = Sequence[Tuple[Array, Array]]
# Per layer of a stack, the prefix keys/values of its self-attention.
Prefixes = Sequence[layers.PrefixKV]


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


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


def dense(features: int, axes: Tuple[str, str], init_std: float,
          dtype: DType, name: str) -> nn.Dense:
  """T5's bias-free Dense with a normal(init_std) float32 kernel."""
  return layers.dense(features, axes, dtype=dtype, use_bias=False,
                      init=_normal(init_std), name=name)


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
    table = self.param("rel_embedding",
                       layers.logical(_normal(self.init_std), ("heads", None)),
                       (self.num_heads, self.num_buckets), jnp.float32)
    rel = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = relative_position_bucket(rel, bidirectional=bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    values = jnp.take(table, buckets, axis=1)  # [H, B, Q, K]
    return jnp.transpose(values, (1, 0, 2, 3))


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
    rows = x.reshape(-1, d_model)  # 2-D matmuls (see `layers.matmul_2d`)
    wi = lambda name: dense(self.d_ff, ("embed", "mlp"), d_model ** -0.5,
                            self.dtype, name)(rows)
    if gated:
      h = act(wi("wi_0")) * wi("wi_1")
    else:
      h = act(wi("wi"))
    h = h.reshape(x.shape[:-1] + (self.d_ff,))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = layers.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = dense(d_model, ("mlp", "embed"), self.d_ff ** -0.5, self.dtype,
              "wo")(h.reshape(-1, self.d_ff))
    return y.reshape(x.shape)


def attention(config, name: str) -> layers.MultiHeadAttention:
  """T5 attention: joined, bias-free kernels and unscaled logits.

  The 1/sqrt(d_kv) is folded into the query initialisation, as in Mesh TF.
  """
  d_model, d_kv, heads = config.d_model, config.d_kv, config.num_heads
  return layers.MultiHeadAttention(
      num_heads=heads, head_dim=d_kv, dropout_rate=config.dropout_rate,
      dtype=config.compute_dtype, use_bias=False, scale_queries=False,
      joined_kv=True, kernel_init=_normal(d_model ** -0.5),
      query_kernel_init=_normal((d_model * d_kv) ** -0.5),
      out_kernel_init=_normal((heads * d_kv) ** -0.5), name=name)


def _mlp(config, name="mlp"):
  return MlpBlock(d_ff=config.d_ff, feed_forward_proj=config.feed_forward_proj,
                  dropout_rate=config.dropout_rate, dtype=config.compute_dtype,
                  name=name)


def _norm(config, name):
  return layers.RMSNorm(epsilon=config.layer_norm_epsilon,
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
    self.attention = attention(self.config, "attention")
    self.pre_mlp_layer_norm = _norm(self.config, "pre_mlp_layer_norm")
    self.mlp = _mlp(self.config)
    self.dropout = layers.Dropout(self.config.dropout_rate)

  def __call__(self, x: Array, bias: Array, *,
               prefix: Optional[layers.PrefixKV] = None,
               deterministic: bool = True) -> Array:
    """`x` `[B, L, D]`; `bias` `[B, H, L, L]`: position bias + key mask;
    `prefix`: this layer's prefix keys/values (prefix tuning)."""
    h = self.pre_attention_layer_norm(x)
    h = self.attention(h, bias=bias, prefix=prefix,
                       deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention and MLP, pre-norm residuals."""
  config: Any

  def setup(self):
    c = self.config
    self.pre_self_attention_layer_norm = _norm(c,
                                               "pre_self_attention_layer_norm")
    self.self_attention = attention(c, "self_attention")
    self.pre_cross_attention_layer_norm = _norm(
        c, "pre_cross_attention_layer_norm")
    self.encoder_decoder_attention = attention(c, "encoder_decoder_attention")
    self.pre_mlp_layer_norm = _norm(c, "pre_mlp_layer_norm")
    self.mlp = _mlp(c)
    self.dropout = layers.Dropout(c.dropout_rate)

  def __call__(self, x: Array, encoded: Optional[Array], self_bias: Array,
               cross_bias: Array, *,
               cross_kv: Optional[Tuple[Array, Array]] = None,
               prefix: Optional[layers.PrefixKV] = None,
               decode: bool = False, decode_index: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """One layer; `cross_kv` (this layer's) replaces `encoded` when given;
    `prefix` (this layer's) is prepended to the self-attention keys."""
    h = self.pre_self_attention_layer_norm(x)
    h = self.self_attention(h, bias=self_bias, prefix=prefix, decode=decode,
                            decode_index=decode_index,
                            deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_cross_attention_layer_norm(x)
    # T5 has no position bias on cross-attention.
    h = self.encoder_decoder_attention(
        h, None if cross_kv is not None else encoded, bias=cross_bias,
        memory_kv=cross_kv, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)


def _check_prefix(prefix: Optional[Prefixes], num_layers: int,
                  stack: str) -> None:
  if prefix is not None and len(prefix) != num_layers:
    raise ValueError(f"the {stack} prefix has {len(prefix)} layers; the "
                     f"{stack} has {num_layers}")


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
    self.dropout = layers.Dropout(c.dropout_rate)

  def __call__(self, x: Array, mask: Array, *,
               prefix: Optional[Prefixes] = None,
               deterministic: bool = True) -> Array:
    """`x` `[B, L, D]` embeddings, `mask` `[B, L]` bool -> `[B, L, D]`;
    `prefix`: one `PrefixKV` per layer (or None)."""
    _check_prefix(prefix, len(self.layers), "encoder")
    length = x.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    # Position bias plus key mask, computed once and shared by all layers
    # (HF: layer 0 owns the table). Key mask only, as HF: padded query rows
    # still produce (unused) outputs.
    bias = (self.relpos_bias(positions, positions, bidirectional=True) +
            layers.mask_bias(layers.key_mask(mask)))
    x = nn.with_logical_constraint(x, layers.BLOCK_AXES)
    x = self.dropout(x, deterministic=deterministic)
    for i, layer in enumerate(self.layers):
      x = layer(x, bias, prefix=None if prefix is None else prefix[i],
                deterministic=deterministic)
    x = self.encoder_norm(x)
    return self.dropout(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Stack of decoder layers; returns the final-normed hidden states.

  In cached decoding the decoder keeps `cache_index/index` (int32 scalar) in
  the 'cache' collection; every other cache leaf has the batch as leading
  axis (the self-attention keys and values, `[B, heads, max_len, d_kv]`).
  The first `decode=True` call (cache absent) creates the cache from a
  full-length `[B, max_len]` input and runs like `decode=False`.
  """
  config: Any

  def setup(self):
    c = self.config
    self.relpos_bias = _relpos(c)
    self.layers = [DecoderLayer(c, name=f"layers_{i}")
                   for i in range(c.num_decoder_layers)]
    self.decoder_norm = _norm(c, "decoder_norm")
    self.dropout = layers.Dropout(c.dropout_rate)
    self.step_counter = StepCounter(name="cache_index")

  def project_encoded(self, encoded: Array) -> CrossKV:
    """Per layer, the cross-attention keys and values of `encoded`.

    `encoded` `[B, L, D]` -> a tuple of (key, value) `[B, heads, L, d_kv]`:
    computed once per source and passed as `cross_kv` to every decoding
    step, instead of projecting the encoder output again at each token.
    """
    return tuple(layer.encoder_decoder_attention.project_memory(encoded)
                 for layer in self.layers)

  def __call__(self, x: Array, encoded: Optional[Array], encoder_mask: Array,
               decoder_positions: Optional[Array] = None, *,
               cross_kv: Optional[CrossKV] = None,
               prefix: Optional[Prefixes] = None, decode: bool = False,
               deterministic: bool = True) -> Array:
    """Runs the stack.

    Args:
      x: `[B, T, D]` embedded decoder inputs (`T == 1` in cached steps).
      encoded: `[B, L, D]` encoder outputs; may be None with `cross_kv`.
      encoder_mask: `[B, L]` bool, False at encoder padding.
      decoder_positions: optional `[B, T]` positions for the relative bias
        (default `0..T-1`); ignored in cached steps.
      cross_kv: `project_encoded(encoded)`, used instead of `encoded`.
      prefix: one `PrefixKV` per layer prepended to its self-attention keys
        (also in cached steps: the cache holds only the generated keys).
      decode: cached decoding (see class docstring).
      deterministic: False applies dropout (needs a 'dropout' rng).

    Returns:
      `[B, T, D]` hidden states after the final layer norm.
    """
    if encoded is None and cross_kv is None:
      raise ValueError("the decoder needs encoded or cross_kv")
    if cross_kv is not None and len(cross_kv) != len(self.layers):
      raise ValueError(f"cross_kv has {len(cross_kv)} layers; the decoder "
                       f"has {len(self.layers)}")
    _check_prefix(prefix, len(self.layers), "decoder")
    length = x.shape[1]
    cross_bias = layers.mask_bias(layers.key_mask(encoder_mask))
    decode_index = None
    stepping = False
    if decode:
      stepping, decode_index = self.step_counter()
    if stepping:
      if length != 1:
        raise ValueError(
            f"cached decoding takes one token per step, got {length}")
      cache_len = self.layers[0].self_attention.get_variable(
          "cache", "cached_key").shape[2]
      key_positions = jnp.arange(cache_len, dtype=jnp.int32)
      bias = self.relpos_bias(decode_index[None, None], key_positions[None],
                              bidirectional=False)
      causal = (key_positions <= decode_index)[None, None, None, :]
    else:
      if decoder_positions is None:
        positions = jnp.arange(length, dtype=jnp.int32)[None]
      else:
        positions = jnp.asarray(decoder_positions, jnp.int32)
      bias = self.relpos_bias(positions, positions, bidirectional=False)
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    self_bias = bias + layers.mask_bias(causal)

    x = nn.with_logical_constraint(x, layers.BLOCK_AXES)
    x = self.dropout(x, deterministic=deterministic)
    for i, layer in enumerate(self.layers):
      x = layer(x, encoded, self_bias, cross_bias,
                cross_kv=None if cross_kv is None else cross_kv[i],
                prefix=None if prefix is None else prefix[i], decode=decode, decode_index=decode_index,
                deterministic=deterministic)
    x = self.decoder_norm(x)
    return self.dropout(x, deterministic=deterministic)
