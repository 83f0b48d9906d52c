"""Builds model wrappers from a prepared dataset and plain hyperparameters.

The catalogue size comes from the dataset, never from a config file, so the
same gin model file serves every dataset.
"""

import math
from typing import Optional

import numpy as np

from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.data import prepared
from recsys_jax.models import bert4rec as bert4rec_lib


def train_item_log_popularity(data_dir: str) -> np.ndarray:
  """log p(item) over training interactions, add-one smoothed."""
  counts = input_pipeline.train_item_counts(data_dir).astype(np.float64) + 1.0
  return np.log(counts / counts.sum()).astype(np.float32)


def bert4rec(*, data_dir: str, max_len: int = 50, hidden: int = 64,
             num_layers: int = 2, num_heads: int = 2, mlp_dim: int = 256,
             dropout_rate: float = 0.2, attention_dropout_rate: float = 0.2,
             loss: str = "full", num_negatives: int = 0,
             mask_prob: Optional[float] = None,
             max_predictions: Optional[int] = None,
             dtype: str = "float32",
             positions_from_end: bool = False, causal: bool = False,
             output_transform: bool = True,
             loss_chunk_rows: Optional[int] = model_lib.DEFAULT_LOSS_CHUNK_ROWS
             ) -> "model_lib.Bert4RecModel":
  """A Bert4Rec wrapper sized for the prepared dataset at `data_dir`.

  Args:
    data_dir: prepared dataset (its item count sizes the tables).
    max_len: maximum sequence length (positions).
    positions_from_end, causal, output_transform: see `Bert4RecConfig`
      (causal=True is SASRec: next-item training at every position).
    loss: 'full' softmax, or 'sampled_uniform' / 'sampled_popularity' /
      'in_batch' for large catalogues.
    num_negatives: negatives per batch for the sampled losses.
    mask_prob, max_predictions: bound the masked positions gathered for the
      loss (defaults to ceil(mask_prob * max_len) + 1 when mask_prob is set).
    loss_chunk_rows: rows per chunk of the full softmax (None: one chunk;
      see `model_lib.Bert4RecModel`).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  num_items = prepared.PreparedDataset(data_dir).num_items
  config = bert4rec_lib.Bert4RecConfig(
      num_items=num_items, max_len=max_len, hidden=hidden,
      num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
      dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate,
      dtype=getattr(jnp, dtype), positions_from_end=positions_from_end,
      causal=causal, output_transform=output_transform)
  if max_predictions is None and mask_prob is not None:
    max_predictions = min(max_len, math.ceil(mask_prob * max_len) + 1)
  log_pop = (train_item_log_popularity(data_dir)
             if loss == "sampled_popularity" else None)
  return model_lib.Bert4RecModel(
      config, loss=loss, num_negatives=num_negatives,
      item_log_popularity=log_pop, max_predictions=max_predictions,
      loss_chunk_rows=loss_chunk_rows)
