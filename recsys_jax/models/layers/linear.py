"""Dense layers and the 2-D matmul they are built on."""

from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from recsys_jax.models.layers.axes import Array, DType, Initializer, logical

# BERT's initialisation: truncated normal, stddev 0.02.
default_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def fan_in_init(input_dims: int = 1) -> Initializer:
  """Truncated normal with variance 1 / fan_in (LeCun), fan_in = the product
  of the kernel's first `input_dims` dims (-1: all but the last).

  Query/key/value kernels `[E, H, D]` or `[E, H*D]` and MLP kernels take
  `input_dims=1`; attention output kernels `[H, D, E]` or `[H*D, E]` take -1.
  At small widths BERT's fixed 0.02 is several times below 1/sqrt(E) (0.125
  at E = 64), so the attention path starts nearly closed; this keeps every
  projection's output at the scale of its input.
  """
  def init(key, shape, dtype=jnp.float32):
    ndim = len(shape)
    n_in = ndim - 1 if input_dims < 0 else input_dims
    if not 0 < n_in < ndim:
      raise ValueError(f"fan_in_init(input_dims={input_dims}) for a kernel of "
                       f"shape {shape}: expected 1 <= input dims < ndim")
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, ndim)))(key, shape, dtype)
  return init


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
