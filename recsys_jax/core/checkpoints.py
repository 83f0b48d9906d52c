"""Orbax checkpointing: `MODEL_DIR/checkpoint_<step>/` with state + metadata.

Every process takes part in save and restore (orbax coordinates multi-host
writes); the JSON metadata (input position, config) is written once.
"""

import json
import logging
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

STEP_PREFIX = "checkpoint"


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      tree, shardings)


class Checkpointer:
  """Keeps the last `keep` checkpoints, saving every `period` steps.

  Attributes:
    directory: the run directory (MODEL_DIR).
  """

  def __init__(self, directory: str, *, keep: Optional[int] = 3,
               period: int = 1000):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=period, step_prefix=STEP_PREFIX,
        create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False
           ) -> bool:
    """Saves state and JSON metadata at `step`; returns whether it saved."""
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)
    self._manager.wait_until_finished()
    if saved:
      logging.info("saved checkpoint %s_%d", STEP_PREFIX, step)
    return saved

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    """Restores (state, meta) at `step` into the shardings of abstract_state."""
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, f"{STEP_PREFIX}_{step}", "meta",
                        "metadata")
    with open(path) as f:
      return json.load(f)

  def close(self):
    self._manager.close()


def save_params(directory: str, params: Any):
  """Writes a params-only pytree checkpoint (used by export)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), params, force=True)
  ckptr.wait_until_finished()


def restore_params(directory: str, abstract_params: Any = None) -> Any:
  """Reads a params-only checkpoint, into `abstract_params` shardings if given."""
  ckptr = ocp.StandardCheckpointer()
  if abstract_params is None:
    return ckptr.restore(os.path.abspath(directory))
  return ckptr.restore(os.path.abspath(directory), abstract_params)


def restore_to_host(directory: str) -> Any:
  """Any pytree checkpoint as NumPy arrays, whatever mesh or process count
  wrote it (read through this process's first device; for inspection and
  tests, not for sharded restore)."""
  ckptr = ocp.PyTreeCheckpointer()
  directory = os.path.abspath(directory)
  tree = ckptr.metadata(directory)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), tree)
  restored = ckptr.restore(directory,
                           args=ocp.args.PyTreeRestore(restore_args=args))
  return jax.tree.map(np.asarray, restored)


ARCHITECTURE_KEY = "architecture"


def check_architecture(saved: Optional[dict], expected: dict, where: str
                       ) -> None:
  """Raises if parameters saved under `saved` do not fit `expected`.

  Both are `model.architecture()` records (JSON). A record missing on
  either side (an older checkpoint, a model without one) is not checked, nor
  is a field the saved record lacks: fields are added to a config later with
  a default that keeps the older behaviour (e.g. `causal=False`), so an
  older checkpoint stays loadable.
  """
  if not saved or not expected:
    return
  diff = sorted(k for k in saved if saved.get(k) != expected.get(k))
  if diff:
    lines = [f"  {k}: saved {saved.get(k)!r}, configured {expected.get(k)!r}"
             for k in diff]
    raise ValueError(
        f"{where} was written by a different model architecture than the "
        "configured one:\n" + "\n".join(lines) + "\nPass the saved values "
        "as --gin.builders.<model>.<field>=... (or use the run's config.gin).")

