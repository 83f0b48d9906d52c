"""Orbax checkpointing: `MODEL_DIR/checkpoint_<step>/` with state + metadata.

Every process takes part in save and restore (orbax coordinates multi-host
writes); the JSON metadata (input position, config) is written once.

Unreadable checkpoints (a data file truncated or deleted, the metadata cut
short) raise `CheckpointReadError` naming the checkpoint and the file
(`ocdbt_check.missing_or_truncated` finds them before any array is read).
On resume (`Checkpointer.restore_latest`) the newest readable checkpoint is
used instead, and each newer unreadable one is renamed to
`unreadable_checkpoint_<step>` (kept, never deleted). It must leave the
step namespace: orbax saves nothing at a step at or below its latest one
(`should_save`) and refuses a step that exists, so a bad checkpoint left in
place would silently stop every save of the resumed run until it passed that
step; and `max_to_keep` would count it, deleting readable checkpoints in its
place. Set aside, it is invisible to orbax, and the garbage collection only
ever deletes a readable checkpoint once `keep` newer ones were written.
"""

import json
import logging
import os
import re
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from recsys_jax.core import distributed
from recsys_jax.core import ocdbt_check

STEP_PREFIX = "checkpoint"
UNREADABLE_PREFIX = "unreadable_"


class CheckpointError(ValueError):
  """A checkpoint cannot be used; the message says why, naming the files
  or parameters (the entry points print it without a traceback)."""


class CheckpointReadError(CheckpointError):
  """A checkpoint or export exists but cannot be read (a file of it is
  missing, truncated or corrupt); the message names it in one line."""


# How tensorstore and orbax report a value they could not read; other
# errors (a tree or shape that does not fit the model) are not read errors.
_READ_FAILURE = re.compile(
    r"Error reading \"([^\"]*)\"|Encountered error while reading")


def _error_chain(e: BaseException) -> List[BaseException]:
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _read_failure(e: BaseException, directory: str) -> Optional[str]:
  """Why reading `directory` failed, if `e` is a read failure; else None."""
  for err in _error_chain(e):
    if isinstance(err, json.JSONDecodeError):
      return (f"a JSON metadata file in {directory} is corrupt "
              f"({_one_line(err)})")
    if isinstance(err, FileNotFoundError) and str(directory) in str(err):
      return f"a file is missing ({_one_line(err)})"
  for err in _error_chain(e):
    m = _READ_FAILURE.search(str(err))
    if m and m.group(1):
      array = m.group(1).rsplit("/", 1)[0]
      return f"array {array} in {directory}: {_one_line(err)}"
  for err in _error_chain(e):
    if _READ_FAILURE.search(str(err)):
      return f"an array in {directory} ({_one_line(err, 160)})"
  return None


def read_guarded(what: str, directory: str, read: Callable[[], Any], *,
                 keys: str = "") -> Any:
  """`read()` of the orbax checkpoint in `directory`, or CheckpointReadError.

  Missing and truncated data files (of the arrays whose key starts with
  `keys`, e.g. 'params.') are looked for first, so the error names the file
  and no process starts reading a checkpoint that another cannot finish;
  other read failures are recognised by tensorstore's message. Errors that
  are not about reading (the tree or a shape does not fit) pass unchanged.

  Args:
    what: the checkpoint's name in messages (e.g. 'checkpoint_40 in RUN').
    directory: the orbax item directory (e.g. RUN/checkpoint_40/state).
    read: the restore.
    keys: prefix of the array keys `read` reads ('': all).
  """
  problems = ocdbt_check.missing_or_truncated(directory, keys)
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CheckpointReadError(f"{what} cannot be read: {problems[0]}{more}")
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except
    reason = _read_failure(e, directory)
    if reason is None:
      raise
    raise CheckpointReadError(f"{what} cannot be read: {reason}") from e


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

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, f"{STEP_PREFIX}_{step}")

  def describe(self, step: int) -> str:
    return f"{STEP_PREFIX}_{step} in {self.directory}"

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
    """Restores (state, meta) at `step` into the shardings of abstract_state.

    Raises:
      CheckpointReadError: a file of the checkpoint is missing or damaged.
    """
    def read():
      return self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
    out = read_guarded(self.describe(step),
                       os.path.join(self.step_dir(step), "state"), read)
    return out["state"], dict(out["meta"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the `params` of the TrainState saved at `step` (no optimizer
    state is read), into the shardings of `abstract_params`.

    Raises:
      CheckpointReadError: a file the params need is missing or damaged.
    """
    target = {"params": abstract_params}
    directory = os.path.join(self.step_dir(step), "state")

    def read():
      return ocp.PyTreeCheckpointer().restore(
          directory,
          args=ocp.args.PyTreeRestore(
              item=target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  target),
              partial_restore=True))["params"]
    params = read_guarded(self.describe(step), directory, read,
                          keys="params.")
    missing = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(params)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
      raise CheckpointReadError(
          f"{self.describe(step)} has no value for {len(missing)} parameter"
          f"(s) the configured model has, e.g. params{missing[0]} (written "
          "by an older version of the model, or another model): retrain, or "
          "initialise a new run from it with init_from")
    return params

  def restore_meta(self, step: int) -> dict:
    """The JSON metadata saved at `step` (CheckpointReadError if corrupt)."""
    path = os.path.join(self.step_dir(step), "meta", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointReadError(
          f"{self.describe(step)} cannot be read: {path}: "
          f"{_one_line(e)}") from e

  def restore_latest(self, abstract_state: Any,
                     check_meta: Optional[Callable[[int, dict], None]] = None,
                     warn: Callable[[str], None] = logging.warning
                     ) -> Optional[Tuple[int, Any, dict]]:
    """(step, state, meta) of the newest readable checkpoint, None if none.

    Newer checkpoints that cannot be read are skipped with a warning and,
    once a readable one is found, renamed to `unreadable_checkpoint_<step>`
    (`set_aside`; see the module docstring for why they must leave the step
    namespace). Every process takes the same decision.

    Args:
      abstract_state: target of the restore (shapes, dtypes, shardings).
      check_meta: `check_meta(step, meta)` runs before the state is read;
        what it raises (e.g. an architecture mismatch) propagates.
      warn: where the warnings go (process 0 prints them in the trainer).

    Raises:
      CheckpointReadError: checkpoints exist but none can be read (none is
        renamed then: a rerun meets the same error, not a fresh start).
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        meta = self.restore_meta(step)
        if check_meta is not None:
          check_meta(step, meta)
        state, meta = self.restore(step, abstract_state)
      except CheckpointReadError as e:
        error = str(e)
      if not _all_processes_agree(error is None):
        error = error or (f"{self.describe(step)} cannot be read by another "
                          "process")
      if error is not None:
        unreadable.append((step, error))
        continue
      for bad_step, bad_error in unreadable:
        moved = self.set_aside(bad_step)
        warn(f"{bad_error}. Resuming from the older "
             f"{STEP_PREFIX}_{step} instead; the unreadable checkpoint is "
             f"kept as {moved or 'unreadable_...'} (not deleted).")
      return step, state, meta
    if unreadable:
      raise CheckpointReadError(
          f"no checkpoint in {self.directory} can be read: "
          + "; ".join(e for _, e in unreadable)
          + ". Move the run directory away to train from scratch.")
    return None

  def set_aside(self, step: int) -> Optional[str]:
    """Renames checkpoint_<step> to unreadable_checkpoint_<step>[.<i>] out
    of orbax's sight, keeping its files; returns the new path (process 0;
    None on the others)."""
    moved = None
    if jax.process_index() == 0:
      base = os.path.join(self.directory,
                          f"{UNREADABLE_PREFIX}{STEP_PREFIX}_{step}")
      moved, i = base, 1
      while os.path.exists(moved):
        moved, i = f"{base}.{i}", i + 1
      os.rename(self.step_dir(step), moved)
    distributed.barrier(f"set_aside_{step}")
    self._manager.reload()
    return moved

  def close(self):
    self._manager.close()


def save_params(directory: str, params: Any):
  """Writes a params-only pytree checkpoint (used by export)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), params, force=True)
  ckptr.wait_until_finished()


def restore_params(directory: str, abstract_params: Any = None) -> Any:
  """Reads a params-only checkpoint, into `abstract_params` shardings if given.

  Raises:
    CheckpointReadError: a file of it is missing or damaged.
  """
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  if abstract_params is None:
    read = lambda: ckptr.restore(directory)
  else:
    read = lambda: ckptr.restore(directory, abstract_params)
  return read_guarded(directory, directory, read)


def restore_to_host(directory: str, subtree: Optional[str] = None) -> Any:
  """Any pytree checkpoint as NumPy arrays, whatever mesh or process count
  wrote it (read through this process's first device; for inspection,
  tests and initialising from another run, not for sharded restore).

  Args:
    directory: the orbax pytree checkpoint (e.g. RUN/checkpoint_40/state).
    subtree: a top-level key to read alone (e.g. 'params'); None: all.

  Raises:
    CheckpointReadError: a file it needs is missing or damaged.
  """
  ckptr = ocp.PyTreeCheckpointer()
  directory = os.path.abspath(directory)

  def read():
    tree = ckptr.metadata(directory)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if subtree is None:
      args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device),
                          tree)
      return ckptr.restore(directory,
                           args=ocp.args.PyTreeRestore(restore_args=args))
    if subtree not in tree:
      raise KeyError(f"{directory} has no {subtree!r} (top-level keys: "
                     f"{sorted(tree)})")
    target = {subtree: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                       sharding=device), tree[subtree])}
    return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))[subtree]
  restored = read_guarded(directory, directory, read,
                          keys="" if subtree is None else f"{subtree}.")
  return jax.tree.map(np.asarray, restored)


def _all_processes_agree(ok: bool) -> bool:
  """True on every process iff `ok` is True on all of them."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([ok], np.int32))
  return bool(np.all(flags))


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
    raise CheckpointError(
        f"{where} was written by a different model architecture than the "
        "configured one:\n" + "\n".join(lines) + "\nPass the saved values "
        "as --gin.builders.<model>.<field>=... (or use the run's config.gin).")

