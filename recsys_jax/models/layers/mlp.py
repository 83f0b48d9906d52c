"""The GELU feed-forward block of Bert4Rec-style Transformers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models.layers.axes import Array, DType, Initializer
from recsys_jax.models.layers.dropout import Dropout
from recsys_jax.models.layers.linear import default_kernel_init, dense


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


class Mlp(nn.Module):
  """Dense ('embed','mlp') -> GELU -> dropout -> Dense ('mlp','embed')."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    shape = x.shape
    features = shape[-1]
    x = x.reshape(-1, features)  # 2-D matmuls (see `matmul_2d`)
    h = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
              init=self.kernel_init, name="wi")(x)
    h = gelu(h)
    h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = dense(features, ("mlp", "embed"), dtype=self.dtype,
              init=self.kernel_init, name="wo")(h)
    return y.reshape(shape)
