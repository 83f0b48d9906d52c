"""Learned embedding tables named by logical axes."""

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from recsys_jax.models.layers.axes import DType, Initializer, logical
from recsys_jax.models.layers.linear import default_kernel_init


def embedding(num_embeddings: int, features: int, axes: Tuple[str, str], *,
              dtype: DType = jnp.float32, name: Optional[str] = None,
              init: Initializer = default_kernel_init) -> nn.Embed:
  """A learned float32 table `[num_embeddings, features]` named by `axes`.

  Lookups are cast to `dtype`; `.attend(x)` gives `x @ table.T` in `dtype`,
  used for tied output layers. Non-integer ids are an error (`nn.Embed`).
  """
  return nn.Embed(num_embeddings=num_embeddings, features=features,
                  dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=logical(init, axes), name=name)
