"""FLARE (Hebert et al., 2024): Bert4Rec whose item inputs carry item text.

"Fusing Language Models and Collaborative Architectures for Recommender
Enhancement": every item's text is encoded once by a frozen language model
(the item-text cache of `embed_items`); a Perceiver (models/perceiver.py)
resamples an item's token encodings into K latents, a projection maps them
to the model width, and the result is combined with the item's ID embedding
before the Transformer:

  text(item)   = Dense(flatten(Perceiver(tokens(item))))       [E]
  input(item)  = id(item) + g text(item)               (fusion 'sum')
               = Dense([id(item); g text(item)])        (fusion 'concat')
  g            = tanh(text_gate), a learned scalar, 0 at init

A predicted slot ([MASK], or in causal mode the last history item) may
carry a critique: its token encodings are concatenated with the slot's own
Perceiver inputs (none for [MASK]) under the critique type embedding.
Padding and a [MASK] without critique get no text (zeros); an item whose
text is empty gets a learned `no_text` vector.

This module is pure: the wrapper (model_lib/flare.py) gathers token
encodings of the distinct items of a batch and scatters the vectors back.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import bert4rec as bert4rec_lib
from recsys_jax.models import layers
from recsys_jax.models import perceiver as perceiver_lib

Array = jax.Array

FUSIONS = ("sum", "concat")


@dataclasses.dataclass(frozen=True)
class FlareConfig:
  """Hyperparameters of `Flare`.

  Attributes:
    backbone: the Bert4Rec (or causal SASRec-mode) sequence model.
    perceiver: the resampler of token encodings.
    text_dim: D, width of the frozen encoder's token encodings.
    fusion: 'sum' (id + text) or 'concat' ([id; text] -> Dense).
  """
  backbone: bert4rec_lib.Bert4RecConfig
  perceiver: perceiver_lib.PerceiverConfig
  text_dim: int
  fusion: str = "sum"

  def __post_init__(self):
    if self.fusion not in FUSIONS:
      raise ValueError(f"FlareConfig.fusion={self.fusion!r}: expected one of "
                       f"{FUSIONS}")
    if int(self.text_dim) < 1:
      raise ValueError(f"FlareConfig.text_dim={self.text_dim!r}: expected a "
                       "positive integer")


class Flare(nn.Module):
  """Bert4Rec + Perceiver text inputs.

  Entry points: `text_vectors` (token encodings -> `[U, E]`), `fuse` (ID and
  text vectors -> input vectors), `__call__` (hidden states given per-
  position text vectors), `output_query`, `logits_from_table`, `id_table`,
  `init_all` (touches every parameter).
  """
  config: FlareConfig

  def setup(self):
    cfg = self.config
    dtype = cfg.backbone.compute_dtype
    hidden = cfg.backbone.hidden
    self.backbone = bert4rec_lib.Bert4Rec(cfg.backbone)
    self.perceiver = perceiver_lib.Perceiver(
        dataclasses.replace(cfg.perceiver, dtype=dtype))
    self.text_projection = layers.dense(hidden, ("mlp", "embed"), dtype=dtype)
    # Flamingo-style gate, tanh(0) = 0 at init: the model starts as its
    # ID-only backbone and lets the text in as it proves useful. Ungated,
    # the text vectors (~5x the ID embeddings' scale at init) drown the item
    # identities and the causal backbone trained far slower than ID-only
    # (docs/FLARE.md). InfoNCE reads the ungated text vectors.
    self.text_gate = self.param("text_gate", layers.logical(
        nn.initializers.zeros, ()), (), jnp.float32)
    self.no_text = self.param(
        "no_text", layers.logical(layers.default_kernel_init, ("embed",)),
        (hidden,), jnp.float32)
    if cfg.fusion == "concat":
      self.fusion_dense = layers.dense(hidden, ("mlp", "embed"), dtype=dtype)

  def text_vectors(self, tokens: Array, mask: Array, type_ids: Array, *,
                   deterministic: bool = True) -> Array:
    """`[U, T, D]` token encodings -> `[U, E]` text vectors.

    Rows with no unmasked token get the learned `no_text` vector.
    """
    latents = self.perceiver(tokens, mask, type_ids,
                             deterministic=deterministic)  # [U, K, W]
    flat = latents.reshape(latents.shape[0], -1)
    vec = self.text_projection(flat)
    has_text = jnp.any(mask, axis=-1, keepdims=True)
    return jnp.where(has_text, vec,
                     self.no_text.astype(vec.dtype)[None, :])

  def fuse(self, id_vectors: Array, text_vectors: Array) -> Array:
    """Combines `[..., E]` ID embeddings with `[..., E]` text vectors
    (gated by tanh(`text_gate`))."""
    text = (jnp.tanh(self.text_gate) * text_vectors).astype(id_vectors.dtype)
    if self.config.fusion == "sum":
      return id_vectors + text
    both = jnp.concatenate([id_vectors, text], axis=-1)
    flat = self.fusion_dense(both.reshape(-1, both.shape[-1]))
    return flat.reshape(id_vectors.shape)

  def id_vectors(self, item_ids: Array) -> Array:
    """ID embeddings of `item_ids` (any shape) in the compute dtype."""
    return self.backbone.item_embed(item_ids)

  def id_table(self) -> Array:
    """The `[padded_vocab, E]` ID embedding table (float32)."""
    return self.backbone.item_embed.embedding

  def output_bias(self) -> Array:
    return self.backbone.output_bias

  def __call__(self, item_ids: Array, text: Array, *,
               segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Hidden states `[B, L, E]`.

    Args:
      item_ids: `[B, L]` (0 padding, N + 1 [MASK]).
      text: `[B, L, E]` per-position text vectors (zeros where none).
      segment_ids, positions, deterministic: as `Bert4Rec.__call__`.
    """
    inputs = self.fuse(self.id_vectors(item_ids), text)
    return self.backbone(item_ids, segment_ids=segment_ids,
                         positions=positions, item_inputs=inputs,
                         deterministic=deterministic)

  def output_query(self, hidden: Array) -> Array:
    return self.backbone.output_query(hidden)

  def init_all(self, item_ids: Array, tokens: Array, mask: Array,
               type_ids: Array) -> Array:
    """Creates every parameter (used by `init`)."""
    vec = self.text_vectors(tokens, mask, type_ids)  # [B * L, E]
    text = vec.reshape(item_ids.shape + (vec.shape[-1],))
    hidden = self(item_ids, text)
    return self.backbone.logits(hidden)
