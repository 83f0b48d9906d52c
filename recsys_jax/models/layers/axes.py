"""Logical axis names shared by every model family.

Parameters are boxed with `nn.with_logical_partitioning` (`logical`);
block-edge activations are constrained to `BLOCK_AXES`. The mapping of
logical names to mesh axes lives in `core/partitioning.py` and gin; the
constraints are no-ops unless rules and a mesh are in context.
"""

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Activations between blocks: [batch, length, embed].
BLOCK_AXES = ("batch", "length", "embed")


def logical(init: Initializer, axes: Tuple[Optional[str], ...]) -> Initializer:
  """`init` whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, axes)


def axis_sharded(*names: str) -> bool:
  """True when the active logical rules map any of `names` to a mesh axis."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    return False
  return any(nn.logical_to_mesh_axes((name,), rules)[0] is not None
             for name in names)
