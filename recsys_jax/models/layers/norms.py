"""Normalisation layers: LayerNorm (Bert4Rec, BERT) and RMSNorm (T5)."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models.layers.axes import Array, DType, logical


def layer_norm(dtype: DType = jnp.float32, name: Optional[str] = None, *,
               epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm with ('embed',) scale and bias; statistics in float32."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)),
                      name=name)


class RMSNorm(nn.Module):
  """T5's layer norm: `x / sqrt(mean(x^2) + eps) * scale`, no bias or mean.

  Statistics in float32; the output is cast to `dtype`.
  """
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale).astype(self.dtype)
