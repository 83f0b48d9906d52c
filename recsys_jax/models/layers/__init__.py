"""Building blocks shared by the model families, with logical axis names.

Parameters are float32 and boxed with `nn.with_logical_partitioning`; compute
runs in a `dtype` (float32 or bfloat16). No mesh axes appear here.

  axes.py         BLOCK_AXES, `logical`, `axis_sharded`
  linear.py       `matmul_2d`, `dense`, the default initialiser
  dropout.py      `Dropout` (8-bit draws), the one dropout of every family
  norms.py        `layer_norm` (Bert4Rec, BERT), `RMSNorm` (T5)
  embedding.py    `embedding` tables (tied output through `.attend`)
  mlp.py          `gelu`, `Mlp`
  attention.py    `MultiHeadAttention` (self / cross, KV cache), masks
  transformer.py  `TransformerBlock`, `CrossAttentionBlock`

The names below are re-exported so that `layers.X` reads as one namespace.
"""

# pylint: disable=g-importing-member

from recsys_jax.models.layers.attention import HeadsOutput
from recsys_jax.models.layers.attention import HeadsProjection
from recsys_jax.models.layers.attention import key_mask
from recsys_jax.models.layers.attention import LARGE_NEGATIVE
from recsys_jax.models.layers.attention import make_attention_mask
from recsys_jax.models.layers.attention import mask_bias
from recsys_jax.models.layers.attention import MultiHeadAttention
from recsys_jax.models.layers.attention import PrefixKV
from recsys_jax.models.layers.axes import axis_sharded
from recsys_jax.models.layers.axes import BLOCK_AXES
from recsys_jax.models.layers.axes import logical
from recsys_jax.models.layers.dropout import Dropout
from recsys_jax.models.layers.dropout import dropout_threshold
from recsys_jax.models.layers.dropout import DROPOUT_LEVELS
from recsys_jax.models.layers.embedding import embedding
from recsys_jax.models.layers.linear import default_kernel_init
from recsys_jax.models.layers.linear import dense
from recsys_jax.models.layers.linear import fan_in_init
from recsys_jax.models.layers.linear import matmul_2d
from recsys_jax.models.layers.mlp import gelu
from recsys_jax.models.layers.mlp import Mlp
from recsys_jax.models.layers.norms import layer_norm
from recsys_jax.models.layers.norms import RMSNorm
from recsys_jax.models.layers.transformer import CrossAttentionBlock
from recsys_jax.models.layers.transformer import TransformerBlock

__all__ = [
    "BLOCK_AXES", "CrossAttentionBlock", "DROPOUT_LEVELS", "Dropout",
    "HeadsOutput", "HeadsProjection", "LARGE_NEGATIVE", "Mlp",
    "MultiHeadAttention", "PrefixKV", "RMSNorm", "TransformerBlock", "axis_sharded",
    "default_kernel_init", "dense", "dropout_threshold", "embedding",
    "fan_in_init", "gelu",
    "key_mask", "layer_norm", "logical", "make_attention_mask", "mask_bias",
    "matmul_2d",
]
