"""The model wrapper contract (t5x `BaseModel` role): what the core asks of a model.

A wrapper owns the training meaning of an `nn.Module`: how to initialise it,
its loss, which metric sums that loss produces and how to print them, and
what must be recorded with its checkpoints. The trainer (core/trainer.py) and
the runs (runs/) only call these methods; they know nothing of items,
masks or tokens.
"""

import abc
from typing import Any, Dict, Mapping, Optional, Tuple

import jax

Array = jax.Array

# The two sums every loss must report: gradient accumulation differentiates
# LOSS_SUM and divides the summed gradient by max(WEIGHT_SUM, 1)
# (core/trainer.py), so the update is that of the mean loss over the whole
# batch however it is split into micro-batches or shards.
LOSS_SUM = "loss_sum"
WEIGHT_SUM = "weight_sum"


def enable_array_constants():
  """Arrays closed over by jitted functions become arguments, not constants.

  Frozen tables of a model (FLARE's text tables, REGEN's item embeddings:
  hundreds of MB on real catalogues) would otherwise be embedded into every
  compiled program. JAX's own switch; it changes how captured arrays are
  passed, not what is computed.
  """
  jax.config.update("jax_use_simplified_jaxpr_constants", True)


class BaseModel(abc.ABC):
  """A model wrapper as the trainer sees it.

  Subclasses implement `get_initial_variables` and `loss_fn`, and override
  `metric_sums` / `summarize_metrics` when their loss reports more than the
  loss and weight sums, `architecture` when some configuration changes what
  the parameters compute without changing their shapes, and
  `checkpoint_meta` for facts worth recording with every checkpoint.
  """

  @abc.abstractmethod
  def get_initial_variables(self, rng: Array,
                            batch_size: int = 2) -> Dict[str, Any]:
    """`{'params': tree}`; leaves may be `nn.LogicallyPartitioned` boxes."""

  @abc.abstractmethod
  def loss_fn(self, params: Any, batch: Mapping[str, Array],
              dropout_rng: Optional[Array]
              ) -> Tuple[Array, Dict[str, Array]]:
    """`(loss, aux)`: the mean loss and float32 scalar sums over the batch.

    `aux` holds at least every name of `metric_sums()`; each is a sum over
    the batch's rows (never a mean), so that the trainer can add it up over
    micro-batches, data shards and log windows. `loss` must equal
    `aux['loss_sum'] / max(aux['weight_sum'], 1)`. Dropout applies iff
    `dropout_rng` is given.
    """

  def metric_sums(self) -> Tuple[str, ...]:
    """Names of the additive sums in `loss_fn`'s aux that the trainer keeps.

    Must contain `loss_sum` and `weight_sum`.
    """
    return (LOSS_SUM, WEIGHT_SUM)

  def summarize_metrics(self, sums: Mapping[str, float]) -> Dict[str, float]:
    """`{name: value}` to print and log from accumulated `metric_sums`.

    Args:
      sums: each name of `metric_sums()` summed over some steps (Python
        floats).
    """
    return {"loss": sums[LOSS_SUM] / max(sums[WEIGHT_SUM], 1.0)}

  def architecture(self) -> Dict[str, Any]:
    """JSON fields checked when parameters are restored ({}: no check).

    Stored with every checkpoint and export (checkpoints.check_architecture).
    """
    return {}

  def checkpoint_meta(self) -> Dict[str, Any]:
    """JSON fields the model wants written into every checkpoint and export
    (e.g. a catalogue size); {} by default."""
    return {}


def check_metric_sums(model: BaseModel) -> Tuple[str, ...]:
  """`model.metric_sums()`, validated: ValueError unless it names the loss
  and weight sums once each."""
  names = tuple(model.metric_sums())
  missing = [k for k in (LOSS_SUM, WEIGHT_SUM) if k not in names]
  if missing or len(set(names)) != len(names):
    raise ValueError(
        f"{type(model).__name__}.metric_sums() = {names!r}: expected distinct "
        f"names including {LOSS_SUM!r} and {WEIGHT_SUM!r} (the trainer "
        "normalises the summed gradient by the weight sum)")
  return names
