"""Dense layers and the 2-D matmul they are built on."""

from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from recsys_jax.models.layers.axes import Array, DType, Initializer, logical

# BERT's initialisation: truncated normal, stddev 0.02.
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


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


def dense(features: int, axes: Tuple[str, str], *, dtype: DType = jnp.float32,
          use_bias: bool = True, init: Initializer = default_kernel_init,
          name=None) -> nn.Dense:
  """`nn.Dense` with a float32 kernel named `axes` (and bias `(axes[1],)`).

  Feed it 2-D rows (`x.reshape(-1, x.shape[-1])`) where its weight gradient
  matters on CPU (see `matmul_2d`).
  """
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32, kernel_init=logical(init, axes),
                  bias_init=logical(nn.initializers.zeros, (axes[1],)),
                  name=name)
