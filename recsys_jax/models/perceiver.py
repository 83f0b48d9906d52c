"""A Perceiver resampler: K learned latents read a variable-length memory.

Jaegle et al. (2021), "Perceiver: General Perception with Iterative
Attention", as FLARE uses it (Hebert et al., 2024): a frozen language model's
token encodings of one text (an item's, a critique's, or both concatenated)
are resampled into a fixed number of latent vectors.

  memory  = Dense(tokens) + type_embed(type_ids)       [U, T, W]
  latents = broadcast(learned [K, W])                   [U, K, W]
  repeat L times:
    latents = CrossAttentionBlock(latents, memory, mask)    (latents read)
    latents = TransformerBlock(latents)                     (latents talk)
  output  = LayerNorm(latents)                          [U, K, W]

Type embeddings tell the modalities apart (0 = item text, 1 = critique
text). Masked (padding) tokens are keys with a -1e9 bias: they never change
the output. A row with no unmasked token gives a well-defined but
meaningless output; callers replace it (models/flare.py uses a learned
"no text" vector).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import layers

Array = jax.Array

ITEM_TEXT, CRITIQUE_TEXT = 0, 1


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
  """Hyperparameters of `Perceiver`.

  Attributes:
    num_latents: K, the output vectors per text.
    num_layers: L, cross-attention + latent self-attention rounds.
    width: W, the latents' (and projected memory's) width.
    num_heads: heads of both attentions (must divide `width`).
    mlp_dim: hidden width of every block's MLP.
    num_types: modalities with a type embedding.
    dropout_rate: dropout on residual branches and MLP hidden.
    dtype: compute dtype (parameters are float32).
  """
  num_latents: int = 4
  num_layers: int = 1
  width: int = 64
  num_heads: int = 2
  mlp_dim: int = 128
  num_types: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("num_latents", "num_layers", "width", "num_heads", "mlp_dim",
                 "num_types"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"PerceiverConfig.{name}={getattr(self, name)!r}: "
                         "expected a positive integer")
    if self.width % self.num_heads:
      raise ValueError(f"PerceiverConfig.width={self.width} must be divisible "
                       f"by num_heads={self.num_heads}")
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f"PerceiverConfig.dropout_rate={self.dropout_rate!r}: "
                       "expected 0 <= rate < 1")


class Perceiver(nn.Module):
  """`(tokens [U, T, D], mask [U, T], type_ids [U, T]) -> [U, K, W]`."""
  config: PerceiverConfig

  @nn.compact
  def __call__(self, tokens: Array, mask: Array,
               type_ids: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Resamples each row's unmasked tokens into K latents.

    Args:
      tokens: `[U, T, D]` frozen token encodings (any float dtype).
      mask: `[U, T]` bool, True at real tokens.
      type_ids: `[U, T]` int modality of each token (default all 0).
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if tokens.ndim != 3 or mask.shape != tokens.shape[:2]:
      raise ValueError(f"Perceiver expects tokens [U, T, D] and mask [U, T]; "
                       f"got {tokens.shape} and {mask.shape}")
    if type_ids is None:
      type_ids = jnp.zeros(mask.shape, jnp.int32)
    proj = layers.dense(cfg.width, ("text_embed", "embed"), dtype=dtype,
                        name="input_projection")
    memory = proj(tokens.astype(dtype).reshape(-1, tokens.shape[-1]))
    memory = memory.reshape(tokens.shape[:2] + (cfg.width,))
    memory = memory + layers.embedding(
        cfg.num_types, cfg.width, (None, "embed"), dtype=dtype,
        name="type_embed")(type_ids)
    latents = self.param(
        "latents", layers.logical(layers.default_kernel_init,
                                  ("latents", "embed")),
        (cfg.num_latents, cfg.width), jnp.float32)
    x = jnp.broadcast_to(latents.astype(dtype)[None],
                         (tokens.shape[0],) + latents.shape)
    for i in range(cfg.num_layers):
      x = layers.CrossAttentionBlock(
          num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
          dropout_rate=cfg.dropout_rate, dtype=dtype,
          name=f"cross_{i}")(x, memory, mask, deterministic=deterministic)
      x = layers.TransformerBlock(
          num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
          dropout_rate=cfg.dropout_rate, dtype=dtype,
          name=f"latent_{i}")(x, None, deterministic=deterministic)
    return layers.layer_norm(dtype, name="final_norm")(x)
