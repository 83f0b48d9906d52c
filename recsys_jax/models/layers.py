"""Transformer building blocks with logical axis names on every parameter.

Parameters are float32 and boxed with `nn.with_logical_partitioning`; compute
runs in `dtype` (float32 or bfloat16). Block-edge activations are constrained
to ('batch', 'length', 'embed'); the constraints are no-ops unless logical
axis rules and a mesh are in context. No mesh axes appear here.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

BLOCK_AXES = ("batch", "length", "embed")

# BERT's initialisation: truncated normal, stddev 0.02.
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def large_negative(dtype: DType) -> float:
  """A finite value that vanishes under softmax in `dtype` (-1e9 or less)."""
  return max(-1e9, -0.5 * float(jnp.finfo(dtype).max))


DROPOUT_LEVELS = 256  # 8-bit draws


def dropout_threshold(rate: float) -> int:
  """k with P(drop) = k / 256: round(rate * 256), at least 1 if rate > 0."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate!r}: expected 0 <= rate < 1")
  if rate == 0.0:
    return 0
  return min(DROPOUT_LEVELS - 1, max(1, round(rate * DROPOUT_LEVELS)))


class Dropout(nn.Module):
  """Inverted dropout from 8-bit random draws (`nn.Dropout` draws 32 bits).

  The random bits dominate dropout's cost on CPU (threefry: measured 148 ms
  for a 3.3M-element float32 bernoulli mask against 23 ms here, on one core,
  benchmarks/README.md): one 32-bit word gives four 8-bit draws. The rate is
  quantised to k/256 (`dropout_threshold`: 0.2 -> 51/256 = 0.1992, 0.5
  exact) and kept values are scaled by 256 / (256 - k), so the expectation
  is exactly preserved. Draws are generated with `x`'s leading shape, so they
  shard like `x`. Uses the 'dropout' rng collection, as `nn.Dropout`.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    k = dropout_threshold(self.rate)
    if deterministic or k == 0:
      return x
    rng = self.make_rng("dropout")
    last = x.shape[-1]
    words = jax.random.bits(rng, x.shape[:-1] + (-(-last // 4),), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., w, 4]
    draws = draws.reshape(x.shape[:-1] + (-1,))[..., :last]
    scale = DROPOUT_LEVELS / (DROPOUT_LEVELS - k)
    return jnp.where(draws >= k, x * jnp.asarray(scale, x.dtype),
                     jnp.zeros((), x.dtype))


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, `x / 2 * (1 + erf(x / sqrt 2))`.

  `jax.nn.gelu(approximate=False)` computes it through `erfc`, which XLA
  expands to exponentials and selects; `erf` is one polynomial, ~3x faster
  on CPU (a [12800, 256] forward: 1.4 ms against 4.1 ms). They differ by
  < 5e-7 (absolute; the erfc form keeps more relative precision for x < -4,
  where GELU is below 1e-4).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476,
                                                       x.dtype)))


def matmul_2d(x: Array, kernel: Array, dtype: DType) -> Array:
  """`x [..., K] @ kernel [K, N]` as one 2-D matmul over the flattened rows.

  A `dot_general` of `[B, L, K]` with `[K, N]` has a weight gradient that
  contracts two dims (B and L); XLA:CPU runs that ~4x slower than the same
  2-D matmul (an MLP layer of the benchmark's Bert4Rec, forward + backward:
  95 ms against 23 ms, benchmarks/README.md). Reshapes that merge a sharded
  leading dim with unsharded ones are free under SPMD.
  """
  lead = x.shape[:-1]
  y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
  return y.reshape(lead + (kernel.shape[-1],))


def logical(init: Initializer, axes: Tuple[Optional[str], ...]) -> Initializer:
  return nn.with_logical_partitioning(init, axes)


def embedding(num_embeddings: int, features: int, axes: Tuple[str, str], *,
              dtype: DType = jnp.float32, name: Optional[str] = None,
              init: Initializer = default_kernel_init) -> nn.Embed:
  """A learned table `[num_embeddings, features]` named by logical `axes`.

  `.attend(x)` gives `x @ table.T`, used for the tied output layer.
  """
  return nn.Embed(num_embeddings=num_embeddings, features=features,
                  dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=logical(init, axes), name=name)


def layer_norm(dtype: DType = jnp.float32,
               name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm with ('embed',) scale and bias; statistics in float32."""
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)),
                      name=name)


def make_attention_mask(valid: Array,
                        segment_ids: Optional[Array] = None,
                        causal: bool = False) -> Array:
  """Attention mask `[B, 1, L, L]` (True = may attend).

  Args:
    valid: `[B, L]` bool, False at padding.
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


def heads_sharded() -> bool:
  """True when the active logical rules map 'heads' to a mesh axis."""
  rules = nn.get_logical_axis_rules()
  return (bool(rules) and
          nn.logical_to_mesh_axes(("heads",), rules)[0] is not None)


class HeadsProjection(nn.Module):
  """x `[..., E]` -> per-head q/k/v with a `[E, H, D]` kernel, `[H, D]` bias.

  The kernel is created in its real shape, so its logical-axis constraint
  applies to the right rank.
  `per_head=False` returns `[..., H, D]` (one `[E, H*D]` matmul);
  `per_head=True` returns a list of H arrays `[..., D]`, each from its own
  2-D matmul, so attention needs no head-axis transposes (see
  `MultiHeadSelfAttention`).
  """
  num_heads: int
  head_dim: int
  per_head: bool
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array):
    features = x.shape[-1]
    kernel = self.param("kernel", logical(self.kernel_init,
                                          ("embed", "heads", "kv")),
                        (features, self.num_heads, self.head_dim), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, ("heads", "kv")),
                      (self.num_heads, self.head_dim), jnp.float32)
    bias = bias.astype(self.dtype)
    # Bias adds on the 2-D matmul outputs: XLA:CPU fuses them into the
    # matmul there, not after a reshape.
    rows = x.reshape(-1, features)
    if not self.per_head:
      y = matmul_2d(rows, kernel.reshape(features, -1), self.dtype)
      y = y + bias.reshape(-1)
      return y.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
    return [(matmul_2d(rows, kernel[:, h], self.dtype) + bias[h]).reshape(
        x.shape[:-1] + (self.head_dim,)) for h in range(self.num_heads)]


class HeadsOutput(nn.Module):
  """Per-head outputs -> `[..., E]` with a `[H, D, E]` kernel, `[E]` bias.

  Takes `[..., H, D]` or (per-head layout) a list of H arrays `[..., D]`,
  whose 2-D matmuls with `kernel[h]` are summed.
  """
  features: int
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, heads) -> Array:
    per_head = isinstance(heads, (list, tuple))
    num_heads, head_dim = ((len(heads), heads[0].shape[-1]) if per_head
                           else heads.shape[-2:])
    kernel = self.param("kernel", logical(self.kernel_init,
                                          ("heads", "kv", "embed")),
                        (num_heads, head_dim, self.features), jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)),
                      (self.features,), jnp.float32)
    if per_head:
      lead = heads[0].shape[:-1]
      y = sum(matmul_2d(o.reshape(-1, head_dim), kernel[h], self.dtype)
              for h, o in enumerate(heads))
    else:
      lead = heads.shape[:-2]
      y = matmul_2d(heads.reshape(-1, num_heads * head_dim),
                    kernel.reshape(-1, self.features), self.dtype)
    # The bias add on the 2-D output fuses into the matmul (as above).
    y = y + bias.astype(self.dtype)
    return y.reshape(lead + (self.features,))


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention (bidirectional, masked).

  Kernels: q/k/v ('embed', 'heads', 'kv'), out ('heads', 'kv', 'embed').

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
  `per_head=None` (default) picks per head unless the active logical rules
  map 'heads' to a mesh axis (`heads_sharded`).

  Attributes:
    num_heads: number of heads; the head size is `features // num_heads`.
    dropout_rate: dropout on the attention probabilities.
    dtype: compute dtype (the softmax runs in float32).
    per_head: the layout (above); None = automatic.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  per_head: Optional[bool] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Attends `x` `[B, L, E]` to itself under `mask` `[B, 1, L, L]`."""
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"embed size {features} is not divisible by "
                       f"num_heads={self.num_heads}")
    head_dim = features // self.num_heads
    per_head = (not heads_sharded()) if self.per_head is None else self.per_head

    def proj(name):
      return HeadsProjection(self.num_heads, head_dim, per_head, self.dtype,
                             self.kernel_init, name=name)(x)

    q, k, v = proj("query"), proj("key"), proj("value")
    dropout = Dropout(self.dropout_rate)
    # The mask as an additive bias (0 or a large finite negative, which keeps
    # fully masked padding queries NaN-free): the add fuses into the
    # softmax's passes and its gradient is the identity, where a select
    # costs a separate pass forward and backward. Masked keys get exactly
    # zero probability either way (exp underflows).
    bias = (None if mask is None else
            jnp.where(mask, 0.0, large_negative(jnp.float32)))

    def attend(q, k, v, bias, spec):
      q = q * head_dim**-0.5  # a Python float keeps q's dtype
      qs, ks, out = spec
      scores = jnp.einsum(f"{qs},{ks}->{out}", q, k).astype(jnp.float32)
      if bias is not None:
        scores = scores + bias
      probs = jax.nn.softmax(scores, axis=-1)
      probs = dropout(probs, deterministic=deterministic)
      return jnp.einsum(f"{out},{ks}->{qs}", probs.astype(self.dtype), v)

    if per_head:
      head_bias = None if bias is None else bias[:, 0]
      out = [attend(q[h], k[h], v[h], head_bias, ("bqd", "bkd", "bqk"))
             for h in range(self.num_heads)]
    else:
      out = attend(q, k, v, bias, ("bqhd", "bkhd", "bhqk"))
    return HeadsOutput(features, self.dtype, self.kernel_init,
                       name="out")(out)


class Mlp(nn.Module):
  """Dense ('embed','mlp') -> GELU -> Dense ('mlp','embed')."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    shape = x.shape
    features = shape[-1]
    x = x.reshape(-1, features)  # 2-D matmuls (see `matmul_2d`)
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=logical(self.kernel_init, ("embed", "mlp")),
                 bias_init=logical(nn.initializers.zeros, ("mlp",)),
                 name="wi")(x)
    h = gelu(h)
    h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=logical(self.kernel_init, ("mlp", "embed")),
                 bias_init=logical(nn.initializers.zeros, ("embed",)),
                 name="wo")(h)
    return y.reshape(shape)


class TransformerBlock(nn.Module):
  """Self-attention + MLP, each with a residual; pre- or post-LayerNorm.

  Pre-LN (`pre_layer_norm=True`): x + f(LN(x)); the stack needs a final LN.
  Post-LN (BERT): LN(x + f(x)).
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  pre_layer_norm: bool = True
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    x = nn.with_logical_constraint(x, BLOCK_AXES)
    attn = MultiHeadSelfAttention(self.num_heads, self.attention_dropout_rate,
                                  self.dtype, name="attention")
    mlp = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")
    drop = Dropout(self.dropout_rate)
    ln_attn = layer_norm(self.dtype, name="attention_norm")
    ln_mlp = layer_norm(self.dtype, name="mlp_norm")
    if self.pre_layer_norm:
      x = x + drop(attn(ln_attn(x), mask, deterministic=deterministic),
                   deterministic=deterministic)
      x = x + drop(mlp(ln_mlp(x), deterministic=deterministic),
                   deterministic=deterministic)
    else:
      x = ln_attn(x + drop(attn(x, mask, deterministic=deterministic),
                           deterministic=deterministic))
      x = ln_mlp(x + drop(mlp(x, deterministic=deterministic),
                          deterministic=deterministic))
    return nn.with_logical_constraint(x, BLOCK_AXES)
