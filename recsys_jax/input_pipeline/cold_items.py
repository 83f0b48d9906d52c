"""Cold-item protocol: a fixed set of items never seen in training.

A seeded random `fraction` of the catalogue is removed from every train
sequence (`SequenceData(cold_item_fraction=...)`), so a model meets those
items only at evaluation, where the validation/test histories and targets
are left unchanged: a cold item can be the held-out target or appear in the
history of the user being evaluated. Models that see items only through
their ids cannot rank a cold target well; models that also read item text
can. The train item counts (popularity baseline, popularity-sampled
negatives, frequency buckets) count cold items as 0.
"""

import numpy as np


def check_fraction(fraction: float) -> float:
  """`fraction` as a float, or ValueError unless 0 <= fraction < 1."""
  f = float(fraction)
  if not 0.0 <= f < 1.0:
    raise ValueError(f"cold_item_fraction={fraction!r}: expected 0 <= "
                     "fraction < 1 (the share of items removed from training)")
  return f


def cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted int64 ids (in 1..num_items) of the cold items.

  A fixed random subset of round(fraction * num_items) items, drawn with
  `np.random.default_rng([seed, 7])`: the same (num_items, fraction, seed)
  always gives the same set.

  Args:
    num_items: catalogue size N (items 1..N).
    fraction: share of items, 0 <= fraction < 1.
    seed: the draw's seed.
  """
  fraction = check_fraction(fraction)
  n = int(num_items)
  if n < 0:
    raise ValueError(f"num_items={num_items!r}: expected >= 0")
  count = int(round(fraction * n))
  if count == 0:
    return np.zeros([0], np.int64)
  rng = np.random.default_rng([int(seed), 7])
  chosen = rng.choice(n, size=count, replace=False) + 1
  return np.sort(chosen).astype(np.int64)
