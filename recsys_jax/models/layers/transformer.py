"""Residual blocks: self-attention + MLP, and queries cross-attending a memory."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from recsys_jax.models.layers.attention import MultiHeadAttention, key_mask
from recsys_jax.models.layers.axes import BLOCK_AXES, Array, DType, Initializer
from recsys_jax.models.layers.dropout import Dropout
from recsys_jax.models.layers.linear import default_kernel_init
from recsys_jax.models.layers.mlp import Mlp
from recsys_jax.models.layers.norms import layer_norm


def _head_dim(features: int, num_heads: int) -> int:
  if features % num_heads:
    raise ValueError(f"embed size {features} is not divisible by "
                     f"num_heads={num_heads}")
  return features // num_heads


class TransformerBlock(nn.Module):
  """Self-attention + MLP, each with a residual; pre- or post-LayerNorm.

  Pre-LN (`pre_layer_norm=True`): x + f(LN(x)); the stack needs a final LN.
  Post-LN (BERT): LN(x + f(x)).
  `kernel_init` initialises the attention input projections and both MLP
  kernels; `out_kernel_init` (default: `kernel_init`) the attention output.
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  pre_layer_norm: bool = True
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  out_kernel_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """`x` `[B, L, E]` under the self-attention `mask` `[B, 1, L, L]`."""
    x = nn.with_logical_constraint(x, BLOCK_AXES)
    attn = MultiHeadAttention(
        self.num_heads, _head_dim(x.shape[-1], self.num_heads),
        dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        kernel_init=self.kernel_init, out_kernel_init=self.out_kernel_init,
        name="attention")
    mlp = Mlp(self.mlp_dim, self.dropout_rate, self.dtype,
              kernel_init=self.kernel_init, name="mlp")
    drop = Dropout(self.dropout_rate)
    ln_attn = layer_norm(self.dtype, name="attention_norm")
    ln_mlp = layer_norm(self.dtype, name="mlp_norm")
    if self.pre_layer_norm:
      x = x + drop(attn(ln_attn(x), mask=mask, deterministic=deterministic),
                   deterministic=deterministic)
      x = x + drop(mlp(ln_mlp(x), deterministic=deterministic),
                   deterministic=deterministic)
    else:
      x = ln_attn(x + drop(attn(x, mask=mask, deterministic=deterministic),
                           deterministic=deterministic))
      x = ln_mlp(x + drop(mlp(x, deterministic=deterministic),
                          deterministic=deterministic))
    return nn.with_logical_constraint(x, BLOCK_AXES)


class CrossAttentionBlock(nn.Module):
  """Queries attend to a memory, then an MLP; pre-LN residuals.

    q = q + Attn(LN_q(q), LN_m(memory))       (keys masked by memory_mask)
    q = q + MLP(LN(q))

  The block a Perceiver's latents or a Q-Former's learned queries repeat
  over an encoder's output (`memory`, possibly of another width: keys and
  values are projected from M to the queries' width E).

  Attributes:
    num_heads: heads; must divide the queries' width E (head size E / H).
    mlp_dim: width of the GELU MLP.
    dropout_rate: dropout on the residual branches and the MLP hidden.
    attention_dropout_rate: dropout on the attention probabilities.
    dtype: compute dtype; parameters are float32.
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, memory: Array,
               memory_mask: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Updates `queries` `[B, Q, E]` from `memory` `[B, K, M]`.

    Args:
      queries: latents / learned queries (broadcast them to the batch).
      memory: what they read, e.g. encoder hidden states.
      memory_mask: `[B, K]` bool, False at padded memory positions.
      deterministic: False applies dropout (needs a 'dropout' rng).

    Returns:
      `[B, Q, E]` in `dtype`.
    """
    if queries.ndim != 3 or memory.ndim != 3:
      raise ValueError(f"queries [B, Q, E] and memory [B, K, M] expected; got "
                       f"{queries.shape} and {memory.shape}")
    if queries.shape[0] != memory.shape[0]:
      raise ValueError(f"queries batch {queries.shape[0]} != memory batch "
                       f"{memory.shape[0]} (broadcast learned queries first)")
    if memory_mask is not None and memory_mask.shape != memory.shape[:2]:
      raise ValueError(f"memory_mask shape {memory_mask.shape}; expected "
                       f"{memory.shape[:2]}")
    x = nn.with_logical_constraint(queries, BLOCK_AXES)
    drop = Dropout(self.dropout_rate)
    attn = MultiHeadAttention(
        self.num_heads, _head_dim(x.shape[-1], self.num_heads),
        dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        name="attention")
    mask = None if memory_mask is None else key_mask(memory_mask)
    h = attn(layer_norm(self.dtype, name="query_norm")(x),
             layer_norm(self.dtype, name="memory_norm")(memory), mask=mask,
             deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    h = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        layer_norm(self.dtype, name="mlp_norm")(x),
        deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, BLOCK_AXES)
