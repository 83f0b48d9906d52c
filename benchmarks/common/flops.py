"""Analytic Bert4Rec FLOPs (the MFU numerator) and the measured matmul peak."""

import statistics
import time
from typing import Any, Dict

def bert4rec_flops_per_row(*, length: int, hidden: int, num_layers: int,
                           mlp_dim: int, predictions: int, vocab: int,
                           output_transform: bool = True) -> Dict[str, float]:
  """Forward matmul FLOPs of one Bert4Rec row (2 FLOPs per multiply-add).

  The embedding gather, LayerNorm, softmax, bias adds and other element-wise
  work are not counted (the usual MFU convention; the output bias, which
  `losses.tied_softmax_cross_entropy` folds into the tied matmul as an extra
  table column, is left out too: 2 x V per prediction, 1/E of the output
  layer). Attention is dense over the row
  (padding and packing masks do not save work). The output layer runs only at
  the `predictions` gathered positions, over the padded vocabulary.

  Args:
    length: L, row length.
    hidden: E.
    num_layers: Transformer blocks.
    mlp_dim: F.
    predictions: P, positions per row given logits (max_predictions).
    vocab: V, rows of the (padded) output table.
    output_transform: the Dense E x E head before the tied output.

  Returns:
    {'qkv_out', 'attention', 'mlp', 'output', 'total'} forward FLOPs.
  """
  l, e = length, hidden
  qkv_out = num_layers * 2 * l * e * e * 4          # Q, K, V and O
  attention = num_layers * 2 * 2 * l * l * e        # scores and weighted sum
  mlp = num_layers * 2 * 2 * l * e * mlp_dim        # two Dense layers
  output = 2 * predictions * e * vocab
  if output_transform:
    output += 2 * predictions * e * e
  total = qkv_out + attention + mlp + output
  return {"qkv_out": float(qkv_out), "attention": float(attention),
          "mlp": float(mlp), "output": float(output), "total": float(total)}


def train_flops_per_step(batch_size: int, **kwargs) -> float:
  """Forward + backward FLOPs of one training step (3 x forward)."""
  return 3.0 * batch_size * bert4rec_flops_per_row(**kwargs)["total"]


def measure_matmul_peak(n: int = 4096, repeats: int = 5) -> Dict[str, Any]:
  """Best float32 `jnp.dot` throughput on n x n matrices (GFLOP/s)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n**3
  return {"n": n, "dtype": "float32", "repeats": repeats,
          "best_gflops": flops / min(times) / 1e9,
          "median_gflops": flops / statistics.median(times) / 1e9,
          "times_s": times}
