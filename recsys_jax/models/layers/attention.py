"""Multi-head dot-product attention for every model family: self and cross.

One module, `MultiHeadAttention`, serves Bert4Rec (scaled, biased
projections, per-head layout), T5 (unscaled, bias-free, relative position
bias, KV cache) and the BERT encoder (scaled, biased). Masks become an
additive logits bias through `mask_bias` with the one `LARGE_NEGATIVE`;
logits, their bias and the softmax are float32 whatever the compute dtype.
"""

import functools
from typing import List, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models.layers.axes import (Array, DType, Initializer,
                                           axis_sharded, logical)
from recsys_jax.models.layers.dropout import Dropout
from recsys_jax.models.layers.linear import default_kernel_init, matmul_2d

# The masked-logit value: finite, so a fully masked row gives a uniform
# softmax instead of NaN, and far enough below any real float32 logit that
# exp underflows to exactly 0 next to one unmasked key. Also used for the
# logits of ids that must never be predicted (Bert4Rec's non-items).
LARGE_NEGATIVE = -1e9

# Per-head activations: `[..., H, D]`, or (per-head layout) H arrays `[..., D]`.
Heads = Union[Array, List[Array]]


class PrefixKV(NamedTuple):
  """Keys and values prepended to one attention layer's own (prefix tuning).

  LANCER's knowledge and reasoning prompts, Li & Liang's prefix tuning: P
  extra key/value positions that every query may attend to (where `mask`
  is True), with no position bias, before the layer's own keys.

  Attributes:
    keys: `[B, P, H, D]`.
    values: `[B, P, H, D]`.
    mask: `[B, P]` bool, False at padded prefix positions.
  """
  keys: Array
  values: Array
  mask: Array


def mask_bias(mask: Array) -> Array:
  """float32 additive logits bias of a bool mask: 0 where True, else -1e9.

  A bias rather than a select: the add fuses into the softmax's passes and
  its gradient is the identity, where a select costs a separate pass forward
  and backward. Masked keys get exactly zero probability either way.
  """
  return jnp.where(mask, jnp.float32(0.0), jnp.float32(LARGE_NEGATIVE))


def make_attention_mask(valid: Array,
                        segment_ids: Optional[Array] = None,
                        causal: bool = False) -> Array:
  """Self-attention mask `[B, 1, L, L]` (True = may attend).

  Args:
    valid: `[B, L]` bool, False at padding (masked as keys and as queries).
    segment_ids: optional `[B, L]` ints; a query attends only to keys of the
      same nonzero segment (packing several users into one row).
    causal: a query attends only to keys at its own or earlier positions.
  """
  mask = valid[:, None, None, :] & valid[:, None, :, None]
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    nonzero = segment_ids[:, None, None, :] != 0
    mask = mask & same & nonzero
  if causal:
    length = valid.shape[1]
    mask = mask & (jnp.arange(length)[:, None] >= jnp.arange(length)[None, :])
  return mask


def key_mask(valid: Array) -> Array:
  """`[B, K]` bool (False at padded keys) -> mask `[B, 1, 1, K]`."""
  return valid.astype(bool)[:, None, None, :]


class HeadsProjection(nn.Module):
  """x `[..., E]` -> per-head queries, keys or values.

  Kernel layouts (`joined_kv`): `[E, H, D]` ('embed', 'heads', 'kv') with a
  `[H, D]` bias, or `[E, H*D]` ('embed', 'joined_kv') with an `[H*D]` bias,
  the layout of T5 and BERT checkpoints. `per_head=False` returns
  `[..., H, D]` (one `[E, H*D]` matmul); `per_head=True` returns a list of H
  arrays `[..., D]`, each from its own 2-D matmul (`MultiHeadAttention`).
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  joined_kv: bool = False
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, *, per_head: bool = False) -> Heads:
    features = x.shape[-1]
    h, d = self.num_heads, self.head_dim
    if self.joined_kv:
      kernel = self.param("kernel", logical(self.kernel_init,
                                            ("embed", "joined_kv")),
                          (features, h * d), jnp.float32)
      kernel = kernel.reshape(features, h, d)
    else:
      kernel = self.param("kernel", logical(self.kernel_init,
                                            ("embed", "heads", "kv")),
                          (features, h, d), jnp.float32)
    bias = None
    if self.use_bias:
      if self.joined_kv:
        bias = self.param("bias", logical(nn.initializers.zeros,
                                          ("joined_kv",)),
                          (h * d,), jnp.float32).reshape(h, d)
      else:
        bias = self.param("bias", logical(nn.initializers.zeros,
                                          ("heads", "kv")),
                          (h, d), jnp.float32)
      bias = bias.astype(self.dtype)
    # Bias adds on the 2-D matmul outputs: XLA:CPU fuses them into the
    # matmul there, not after a reshape.
    rows = x.reshape(-1, features)
    if not per_head:
      y = matmul_2d(rows, kernel.reshape(features, -1), self.dtype)
      if bias is not None:
        y = y + bias.reshape(-1)
      return y.reshape(x.shape[:-1] + (h, d))
    out = []
    for i in range(h):
      y = matmul_2d(rows, kernel[:, i], self.dtype)
      if bias is not None:
        y = y + bias[i]
      out.append(y.reshape(x.shape[:-1] + (d,)))
    return out


class HeadsOutput(nn.Module):
  """Per-head outputs -> `[..., features]`.

  Takes `[..., H, D]` or (per-head layout) a list of H arrays `[..., D]`,
  whose 2-D matmuls with `kernel[h]` are summed. Kernel `[H, D, F]`
  ('heads', 'kv', 'embed') or, with `joined_kv`, `[H*D, F]` ('joined_kv',
  'embed'); bias `[F]` ('embed',).
  """
  use_bias: bool = True
  joined_kv: bool = False
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, heads: Heads, features: int) -> Array:
    per_head = isinstance(heads, (list, tuple))
    num_heads, head_dim = ((len(heads), heads[0].shape[-1]) if per_head
                           else heads.shape[-2:])
    if self.joined_kv:
      kernel = self.param("kernel", logical(self.kernel_init,
                                            ("joined_kv", "embed")),
                          (num_heads * head_dim, features), jnp.float32)
      kernel = kernel.reshape(num_heads, head_dim, features)
    else:
      kernel = self.param("kernel", logical(self.kernel_init,
                                            ("heads", "kv", "embed")),
                          (num_heads, head_dim, features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)),
                        (features,), jnp.float32)
    if per_head:
      lead = heads[0].shape[:-1]
      y = sum(matmul_2d(o.reshape(-1, head_dim), kernel[h], self.dtype)
              for h, o in enumerate(heads))
    else:
      lead = heads.shape[:-2]
      y = matmul_2d(heads.reshape(-1, num_heads * head_dim),
                    kernel.reshape(-1, features), self.dtype)
    if bias is not None:
      # The bias add on the 2-D output fuses into the matmul (as above).
      y = y + bias.astype(self.dtype)
    return y.reshape(lead + (features,))


class MultiHeadAttention(nn.Module):
  """Multi-head attention: queries from `x`, keys/values from `memory`.

  Self-attention when `memory` is None; cross-attention (latents or decoder
  positions attending to an encoder output, a Perceiver's or Q-Former's
  inputs) otherwise, where the memory may be wider or narrower than `x`.

  Masks and biases are additive on float32 logits: `mask` (bool, True = may
  attend) becomes `mask_bias(mask)`; `bias` (float, e.g. T5's relative
  position bias, possibly with a mask bias already added) is added as is.

  Two layouts of the same computation and parameters (`per_head`):
    * heads batched (False): q/k/v `[B, L, H, D]` and einsums batched over
      (B, H); the head axis can be sharded (tensor parallelism), but XLA:CPU
      copies q, k, v and the output to (B, H)-major layouts, forward and
      backward.
    * per head (True): each head's q/k/v `[B, L, D]` from its own 2-D matmul
      with `kernel[:, h]`, einsums batched over B only, outputs summed
      through `out.kernel[h]`. No transposes: the attention layer's forward
      + backward, benchmark sizes (B 256, L 50, E 64, H 2), 2 CPU cores,
      51 -> 30 ms (benchmarks/README.md). Slicing a sharded head axis would
      move data, so this layout is for an unsharded one.
  `per_head=None` (default) picks per head for `[E, H, D]` kernels unless
  the active logical rules map 'heads' to a mesh axis, and heads batched for
  joined `[E, H*D]` kernels, whose per-head column slices XLA copies at
  every call (T5-small's encoder, batch 16 x 64 tokens, 2 CPU cores: 282 ms
  per head against 267 ms batched, 15 interleaved calls, 25th percentiles).
  Cached decoding always uses the batched layout with head-major
  `[B, H, L, D]` keys and values, which the one-position einsums read
  without copies.

  Decoding:
    * self-attention KV cache (`decode=True`): the 'cache' collection holds
      `cached_key` / `cached_value` `[B, H, max_len, D]`. The first call
      (cache absent, e.g. under `init` or `eval_shape`) creates them, zeros,
      from the full-length input and attends normally; later calls take one
      position and write it at `decode_index`.
    * cross-attention: `project_memory(memory)` computes the memory's keys
      and values once per source; pass them as `memory_kv` at every step.

  Prefix keys/values (`prefix`, a `PrefixKV`): prepended to the keys and
  values of self-attention (also in cached decoding, where the cache holds
  only the layer's own keys), with a zero logits bias where `prefix.mask`
  is True and `LARGE_NEGATIVE` elsewhere; the heads-batched layout is used.

  Attributes:
    num_heads: H.
    head_dim: D (H * D need not equal the width of `x`).
    out_features: width of the output; default the width of `x`.
    dropout_rate: dropout on the attention probabilities.
    dtype: compute dtype of the projections and einsums.
    use_bias: biases on the four projections (BERT, Bert4Rec; not T5).
    scale_queries: multiply queries by D**-0.5 (T5 folds it into the
      query initialisation instead).
    joined_kv: kernels `[E, H*D]` / `[H*D, E]` named 'joined_kv' (T5, BERT
      checkpoints) instead of `[E, H, D]` / `[H, D, E]` ('heads', 'kv').
    per_head: the layout (above); None = automatic.
    kernel_init: initialiser of the key and value kernels and, unless given
      their own, of the query and output kernels.
    query_kernel_init: initialiser of the query kernel.
    out_kernel_init: initialiser of the output kernel.
  """
  num_heads: int
  head_dim: int
  out_features: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  use_bias: bool = True
  scale_queries: bool = True
  joined_kv: bool = False
  per_head: Optional[bool] = None
  kernel_init: Initializer = default_kernel_init
  query_kernel_init: Optional[Initializer] = None
  out_kernel_init: Optional[Initializer] = None

  def setup(self):
    proj = functools.partial(HeadsProjection, self.num_heads, self.head_dim,
                             self.use_bias, self.joined_kv, self.dtype)
    self.query = proj(self.query_kernel_init or self.kernel_init,
                      name="query")
    self.key = proj(self.kernel_init, name="key")
    self.value = proj(self.kernel_init, name="value")
    self.out = HeadsOutput(self.use_bias, self.joined_kv, self.dtype,
                           self.out_kernel_init or self.kernel_init,
                           name="out")

  def _use_per_head(self) -> bool:
    if self.per_head is not None:
      return self.per_head
    return not self.joined_kv and not axis_sharded("heads")

  def project_memory(self, memory: Array) -> Tuple[Array, Array]:
    """Keys and values of `memory` `[B, K, M]`, each `[B, H, K, D]`.

    What cached cross-attention reads at every decoding step (`memory_kv`):
    computed once per source instead of once per generated token.
    """
    def head_major(y):
      return jnp.swapaxes(y, -3, -2)
    return head_major(self.key(memory)), head_major(self.value(memory))

  @nn.compact
  def __call__(self, x: Array, memory: Optional[Array] = None, *,
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               memory_kv: Optional[Tuple[Array, Array]] = None,
               prefix: Optional[PrefixKV] = None,
               decode: bool = False, decode_index: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Attends `x` `[B, Q, E]` to `memory` `[B, K, M]` (or to itself).

    Args:
      x: the queries' inputs.
      memory: the keys'/values' inputs; None = self-attention.
      mask: bool, 4-D, broadcastable to `[B, H, Q, K]`; True = may attend.
      bias: float, 4-D, broadcastable to `[B, H, Q, K]`, added to the logits.
      memory_kv: `project_memory(memory)` computed earlier (instead of
        `memory`).
      prefix: keys/values prepended to self-attention's (class docstring).
      decode: self-attention KV cache (class docstring).
      decode_index: int32 scalar, the position written in a cached step.
      deterministic: False applies dropout (needs a 'dropout' rng).

    Returns:
      `[B, Q, out_features]` in `dtype`.
    """
    if memory is not None and memory_kv is not None:
      raise ValueError("pass memory or memory_kv (its project_memory), not "
                       "both")
    if decode and (memory is not None or memory_kv is not None):
      raise ValueError("decode=True caches self-attention keys; cached cross-"
                       "attention takes memory_kv=project_memory(memory)")
    if prefix is not None and (memory is not None or memory_kv is not None):
      raise ValueError("prefix keys/values are for self-attention; got a "
                       "memory (cross-attention)")
    out_features = self.out_features or x.shape[-1]
    per_head = (self._use_per_head() and not decode and memory_kv is None
                and prefix is None)
    logit_bias = None if mask is None else mask_bias(mask)
    if bias is not None:
      bias = bias.astype(jnp.float32)
      logit_bias = bias if logit_bias is None else logit_bias + bias
    if logit_bias is not None and logit_bias.ndim != 4:
      raise ValueError("attention mask/bias must be 4-D, broadcastable to "
                       f"[batch, heads, queries, keys]; got {logit_bias.shape}")

    q = self.query(x, per_head=per_head)
    if memory_kv is not None:
      k, v = memory_kv
      spec = ("bqhd", "bhkd", "bhqk")
    elif decode:
      k, v = self._cached_keys_values(x, decode_index)
      spec = ("bqhd", "bhkd", "bhqk")
    else:
      source = x if memory is None else memory
      k = self.key(source, per_head=per_head)
      v = self.value(source, per_head=per_head)
      spec = ("bqd", "bkd", "bqk") if per_head else ("bqhd", "bkhd", "bhqk")
    if prefix is not None:
      k, v, logit_bias = self._prepend(prefix, k, v, logit_bias,
                                       head_major=spec[1] == "bhkd",
                                       queries=x.shape[1])
    dropout = Dropout(self.dropout_rate)

    def attend(q, k, v, logit_bias):
      if self.scale_queries:
        q = q * self.head_dim**-0.5  # a Python float keeps q's dtype
      qs, ks, out = spec
      logits = jnp.einsum(f"{qs},{ks}->{out}", q, k).astype(jnp.float32)
      if logit_bias is not None:
        logits = logits + logit_bias
      probs = jax.nn.softmax(logits, axis=-1)
      probs = dropout(probs, deterministic=deterministic)
      return jnp.einsum(f"{out},{ks}->{qs}", probs.astype(self.dtype), v)

    if per_head:
      shared = logit_bias is not None and logit_bias.shape[1] == 1
      head_bias = logit_bias[:, 0] if shared else None
      out = [attend(q[h], k[h], v[h],
                    head_bias if shared or logit_bias is None
                    else logit_bias[:, h])
             for h in range(self.num_heads)]
    else:
      out = attend(q, k, v, logit_bias)
    return self.out(out, out_features)

  def _prepend(self, prefix: PrefixKV, k: Array, v: Array,
               logit_bias: Optional[Array], *, head_major: bool,
               queries: int) -> Tuple[Array, Array, Array]:
    """Keys, values and logits bias with `prefix` in front of the keys."""
    pk, pv, pmask = prefix
    want = (k.shape[0], None, self.num_heads, self.head_dim)
    for name, a in (("keys", pk), ("values", pv)):
      if (a.ndim != 4 or a.shape[0] != want[0] or a.shape[2:] != want[2:]):
        raise ValueError(
            f"prefix {name} must be [batch={want[0]}, P, heads="
            f"{self.num_heads}, head_dim={self.head_dim}]; got {a.shape}")
    if pv.shape != pk.shape or pmask.shape != pk.shape[:2]:
      raise ValueError(f"prefix keys {pk.shape}, values {pv.shape} and mask "
                       f"{pmask.shape} do not agree ([B, P, H, D] / [B, P])")
    if head_major:
      pk, pv = jnp.swapaxes(pk, 1, 2), jnp.swapaxes(pv, 1, 2)
    axis = 2 if head_major else 1
    k = jnp.concatenate([pk.astype(k.dtype), k], axis=axis)
    v = jnp.concatenate([pv.astype(v.dtype), v], axis=axis)
    own = k.shape[axis] - pk.shape[axis]
    prefix_bias = mask_bias(pmask.astype(bool))[:, None, None, :]
    if logit_bias is None:
      logit_bias = jnp.zeros((1, 1, 1, own), jnp.float32)
    lead = jnp.broadcast_shapes(logit_bias.shape[:2], prefix_bias.shape[:2])
    lead = lead + (max(queries, logit_bias.shape[2]),)
    logit_bias = jnp.concatenate(
        [jnp.broadcast_to(prefix_bias, lead + prefix_bias.shape[-1:]),
         jnp.broadcast_to(logit_bias, lead + logit_bias.shape[-1:])], axis=-1)
    return k, v, logit_bias

  def _cached_keys_values(self, x: Array, decode_index: Optional[Array]):
    """Self-attention keys/values `[B, H, max_len, D]` through the KV cache."""
    k = jnp.swapaxes(self.key(x), 1, 2)  # [B, H, T, D]
    v = jnp.swapaxes(self.value(x), 1, 2)
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape,
                               k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape,
                                 v.dtype)
    if not initialized:  # creating the cache: attend over the whole input
      return k, v
    if x.shape[1] != 1 or decode_index is None:
      raise ValueError("cached decoding takes one position per call and a "
                       f"decode_index; got inputs of length {x.shape[1]}")
    start = (0, 0, decode_index, 0)
    k = jax.lax.dynamic_update_slice(cached_key.value,
                                     k.astype(cached_key.value.dtype), start)
    v = jax.lax.dynamic_update_slice(cached_value.value,
                                     v.astype(cached_value.value.dtype), start)
    cached_key.value = k
    cached_value.value = v
    return k, v
