"""ILM's item-language tokens: CF embedding -> Q-Former -> projection.

Yang et al. (2024), "Item-Language Model for Conversational
Recommendation", phase 2: every item written in an LM's input is replaced
by the outputs of a Q-Former whose N queries cross-attend to the item's
collaborative-filtering embedding (cut into M chunks, `qformer.cf_memory`),
projected to the LM's width:

  memory = chunks(cf[item])                     [M, D / M]
  q      = QFormer(queries | memory)            [N, hidden]   (no text)
  tokens = q W + b                              [N, d_model]

The module reads the items of a batch feature (default `slot_items`
`[B, S]`, 0 = padding, the items in the order their slots appear in the
encoder input) and returns `(embeds [B, S * N, d_model], mask [B, S * N])`
for `EncoderDecoderModel`'s 'slots' mode (item s fills slot tokens
s*N .. s*N + N - 1). The CF table is a constant, never a parameter; the
Q-Former's parameters sit under `qformer/` (the layout of phase 1's
`ILMPretrainModel`, so `init_from` maps `soft_tokens/qformer/(.*)` to
`qformer/\\1`), the projection under `projection/`.

CoLLM's baseline (one soft token per item from an MLP over the CF
embedding) is `item_soft_tokens.ItemSoftTokens(sources='cf',
adapter='mlp', tokens_per_item=1, items_feature='slot_items')`.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.models import layers
from recsys_jax.models import qformer as qformer_lib

Array = jax.Array

SLOT_ITEMS = "slot_items"


class QFormerItemTokens(nn.Module):
  """`batch -> (embeds [B, S * N, d_model], mask [B, S * N])`.

  Attributes:
    qformer: the Q-Former's config (`memory_dim` = D / num_chunks).
    d_model: the LM's embedding width.
    num_chunks: M, chunks of the CF embedding (the cross-attention memory).
    cf_table: `[num_items + 1, D]` CF item embeddings (row 0 = padding).
    items_feature: the batch feature holding the items, `[B, S]`.
  """
  qformer: qformer_lib.QFormerConfig
  d_model: int
  num_chunks: int
  cf_table: Any
  items_feature: str = SLOT_ITEMS

  def setup(self):
    width = int(np.shape(self.cf_table)[1])
    if width % self.num_chunks or width // self.num_chunks != (
        self.qformer.memory_dim):
      raise ValueError(
          f"QFormerItemTokens: CF width {width} / num_chunks "
          f"{self.num_chunks} must equal QFormerConfig.memory_dim="
          f"{self.qformer.memory_dim}")

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], *,
               deterministic: bool = True):
    if self.items_feature not in batch:
      raise KeyError(f"QFormerItemTokens reads batch[{self.items_feature!r}]"
                     f" ([batch, S] item ids); got features {sorted(batch)}")
    ids = jnp.asarray(batch[self.items_feature])
    if ids.ndim != 2:
      raise ValueError(f"batch[{self.items_feature!r}]: expected [batch, S] "
                       f"item ids, got shape {ids.shape}")
    b, s = ids.shape
    n = self.qformer.num_queries
    num_rows = int(np.shape(self.cf_table)[0])
    valid = (ids > 0) & (ids < num_rows)
    flat = jnp.where(valid, ids, 0).reshape(-1)
    memory = qformer_lib.cf_memory(jnp.asarray(self.cf_table, jnp.float32),
                                   flat, self.num_chunks)
    queries = qformer_lib.QFormer(self.qformer, name="qformer")(
        memory, None, deterministic=deterministic)["queries"]  # [B*S, N, h]
    # Unit-variance outputs from the Q-Former's LayerNormed queries: the
    # scale of T5's N(0, 1) token embeddings.
    tokens = layers.dense(
        self.d_model, (None, "embed"), dtype=self.qformer.dtype,
        init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
        name="projection")(
                              queries.reshape(-1, queries.shape[-1]))
    tokens = tokens.reshape(b, s * n, self.d_model)
    mask = jnp.repeat(valid, n, axis=1)
    return jnp.where(mask[..., None], tokens, 0).astype(tokens.dtype), mask
