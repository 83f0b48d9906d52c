"""The item vocabulary shared by the sequence models (docs/FEATURES.md).

Id 0 is padding, 1..N the items, N + 1 the [MASK] token; tables are padded to
`padded_vocab` rows so the `vocab` axis divides any model-parallel mesh axis.
"""

import jax
import jax.numpy as jnp


def item_id_mask(padded_vocab: int, num_items: int) -> jax.Array:
  """`[padded_vocab]` bool, True exactly at the item ids 1..num_items."""
  ids = jnp.arange(padded_vocab)
  return (ids >= 1) & (ids <= num_items)
