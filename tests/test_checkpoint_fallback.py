"""Unreadable checkpoints: resume falls back to the newest readable one (the
bad one kept aside), eval/export name the step and the file in one line.

Damage as a user meets it: half of one data file of a checkpoint cut off
(a full disk, a copy interrupted), found by listing the checkpoint's
`state/.../d/` files as orbax wrote them.
"""

import glob
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.core import checkpoints
from recsys_jax.core import ocdbt_check
from recsys_jax.core import optimizer
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.model_lib import base
from recsys_jax.runs import restore
from tests import helpers
from tests.helpers import reference  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

_FEATURES = 512  # 2 KB of float32: stored in a data file, not inline
_BATCH = 4


class _WideLinear(base.BaseModel):
  """Least squares on 512 features (a model small to compile whose arrays
  orbax writes to data files)."""

  def get_initial_variables(self, rng, batch_size=2):
    del batch_size
    return {"params": {"w": jax.random.normal(rng, (_FEATURES,)) * 0.01}}

  def loss_fn(self, params, batch, rng):
    del rng
    err = batch["x"] @ params["w"] - batch["y"]
    n = jnp.asarray(err.shape[0], jnp.float32)
    return jnp.mean(err ** 2), {"loss_sum": jnp.sum(err ** 2),
                                "weight_sum": n}


def _batches(start):
  for i in range(start, 10_000):
    g = np.random.default_rng(i)
    x = g.normal(size=(_BATCH, _FEATURES)).astype(np.float32)
    yield {"x": x, "y": x[:, :4].sum(axis=1)}


def _mesh():
  return partitioning.make_mesh(1, devices=jax.devices()[:1])


def _train(model_dir, steps, keep=2):
  cfg = trainer.TrainLoopConfig(train_steps=steps, batch_size=_BATCH,
                                log_every=1, checkpoint_every=2,
                                keep_checkpoints=keep)
  opt = optimizer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                  decay="constant")
  return trainer.train_loop(_WideLinear(), opt, _batches, cfg,
                            model_dir=str(model_dir), mesh=_mesh(),
                            rules=partitioning.get_rules("data_parallel"))


def truncate_largest_data_file(directory: str, keys: str = "") -> str:
  """Cuts the largest data file (`**/d/*`) under `directory` to half its
  size; returns its path. With `keys` (e.g. 'params.'), the largest whose
  cut damages an array with such a key (`directory` is then a step's).

  Orbax decides per save which file holds which arrays and b-tree nodes;
  where the cut file also holds the index node above the arrays, the check
  stops there and names the node ("a b-tree node needs N"), not the arrays.
  """
  files = [f for f in glob.glob(os.path.join(directory, "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  assert files, f"no data files under {directory}"
  for path in sorted(files, key=os.path.getsize, reverse=True):
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "r+b") as f:
      f.truncate(len(data) // 2)
    if not keys or ocdbt_check.missing_or_truncated(
        os.path.join(directory, "state"), keys):
      return path
    with open(path, "wb") as f:  # the cut spared those arrays: undo it
      f.write(data)
  raise AssertionError(f"no data file under {directory} holds {keys}* in "
                       "its second half")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """8 uninterrupted steps, checkpoints every 2, the last 2 kept."""
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  _train(model_dir, 8)
  assert helpers.checkpoint_steps(model_dir) == [6, 8]
  return str(model_dir)


def test_resume_falls_back_and_sets_the_unreadable_checkpoint_aside(
    tmp_path, reference_run, capsys):
  _train(tmp_path, 4)
  assert helpers.checkpoint_steps(tmp_path) == [2, 4]
  damaged = truncate_largest_data_file(str(tmp_path / "checkpoint_4"),
                                       "params.")
  damaged_size = os.path.getsize(damaged)
  capsys.readouterr()
  state = _train(tmp_path, 8)
  out = capsys.readouterr().out
  assert int(state.step) == 8
  warning = [l for l in out.splitlines() if l.startswith("Warning:")]
  assert len(warning) == 1, out
  assert re.fullmatch(
      rf"Warning: checkpoint_4 in {re.escape(str(tmp_path))} cannot be "
      rf"read: {re.escape(damaged)} is truncated to {damaged_size} bytes "
      # The cut file holds parameters, Adam moments or the index node above
      # them, depending on how orbax grouped this save; the message names it.
      r"\((?:params\.|opt_state\.|a b-tree node)[\w. ]*.* needs? \d+\)\. "
      r"Resuming from the "
      r"older checkpoint_2 "
      rf"instead; the unreadable checkpoint is kept as "
      rf"{re.escape(str(tmp_path))}/unreadable_checkpoint_4 \(not "
      r"deleted\)\.", warning[0]), warning[0]
  assert "Resuming from checkpoint_2" in out
  # Never deleted: the damaged checkpoint is intact beside the run.
  moved = damaged.replace("/checkpoint_4/", "/unreadable_checkpoint_4/")
  assert os.path.getsize(moved) == damaged_size
  # Steps 3..8 were trained again and saved at 4, 6, 8; keep=2 garbage
  # collection deleted only readable checkpoints, after newer ones existed.
  assert helpers.checkpoint_steps(tmp_path) == [6, 8]
  for step in (6, 8):
    helpers.assert_trees_equal(helpers.restore_state(tmp_path, step),
                               helpers.restore_state(reference_run, step),
                               f"checkpoint_{step}")


def test_no_readable_checkpoint_is_an_error_and_renames_nothing(tmp_path):
  _train(tmp_path, 4)
  bad2 = truncate_largest_data_file(str(tmp_path / "checkpoint_2"))
  os.remove(truncate_largest_data_file(str(tmp_path / "checkpoint_4")))
  with pytest.raises(checkpoints.CheckpointReadError) as err:
    _train(tmp_path, 8)
  msg = str(err.value)
  assert msg.startswith(f"no checkpoint in {tmp_path} can be read: "
                        f"checkpoint_4 in {tmp_path} cannot be read: "), msg
  assert " is missing (needed by " in msg and bad2 in msg, msg
  assert "\n" not in msg
  assert helpers.checkpoint_steps(tmp_path) == [2, 4]
  assert not glob.glob(str(tmp_path / "unreadable_*"))


def test_eval_of_an_unreadable_step_names_step_and_file(tmp_path):
  _train(tmp_path, 4)
  model, mesh = _WideLinear(), _mesh()
  rules = partitioning.get_rules("data_parallel")
  damaged = truncate_largest_data_file(str(tmp_path / "checkpoint_4"),
                                       "params.")
  for step in (4, None):  # explicit, and the latest
    with pytest.raises(checkpoints.CheckpointReadError) as err:
      restore.restore_params(model, str(tmp_path), mesh, rules, step)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint_4 in {tmp_path} cannot be read: "
                          f"{damaged} is truncated to "), msg
    assert re.search(r"\((params\.w|a b-tree node) needs? \d+\)", msg), msg
    assert "\n" not in msg, msg
  # The older checkpoint is read as usual; nothing was moved or deleted.
  params, step = restore.restore_params(model, str(tmp_path), mesh, rules, 2)
  assert step == 2 and params["w"].shape == (_FEATURES,)
  assert helpers.checkpoint_steps(tmp_path) == [2, 4]
  # Corrupt JSON metadata is named too.
  with open(tmp_path / "checkpoint_2" / "meta" / "metadata", "w") as f:
    f.write('{"step": 2, "inp')
  with pytest.raises(checkpoints.CheckpointReadError,
                     match=r"checkpoint_2 in .* cannot be read: "
                     r".*checkpoint_2/meta/metadata: "):
    restore.restore_params(model, str(tmp_path), mesh, rules, 2)


class _WiderLinear(_WideLinear):
  """The same model with one more parameter (a later version of it)."""

  def get_initial_variables(self, rng, batch_size=2):
    params = super().get_initial_variables(rng, batch_size)["params"]
    return {"params": dict(params, gate=jnp.zeros(()))}


def test_a_parameter_the_checkpoint_lacks_is_named(tmp_path):
  _train(tmp_path, 2)
  mesh, rules = _mesh(), partitioning.get_rules("data_parallel")
  with pytest.raises(checkpoints.CheckpointReadError) as err:
    restore.restore_params(_WiderLinear(), str(tmp_path), mesh, rules, 2)
  msg = str(err.value)
  assert "has no value for 1 parameter(s)" in msg and "['gate']" in msg, msg


def test_params_only_checkpoint_names_the_file(tmp_path):
  """An export's params/ (and init-from sources read to the host)."""
  path = str(tmp_path / "params")
  params = {"w": jnp.arange(_FEATURES, dtype=jnp.float32)}
  checkpoints.save_params(path, params)
  np.testing.assert_array_equal(checkpoints.restore_params(path)["w"],
                                params["w"])
  damaged = truncate_largest_data_file(path)
  for read in (checkpoints.restore_params, checkpoints.restore_to_host):
    with pytest.raises(checkpoints.CheckpointReadError) as err:
      read(path)
    assert str(err.value).startswith(
        f"{path} cannot be read: {damaged} is truncated to "), str(err.value)


def test_ocdbt_check_walks_interior_nodes_and_filters_keys(tmp_path):
  """A b-tree several levels deep (small nodes), keys relative to their
  subtree's prefix: the damaged file is found under its full key."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "db")
  store = ts.KvStore.open({
      "driver": "ocdbt", "base": f"file://{directory}/",
      "config": {"max_inline_value_bytes": 4,
                 "max_decoded_node_bytes": 200}}).result()
  for i in range(20):
    for group in ("params", "opt"):
      # One commit per value: each lands in a data file of its own.
      store[f"{group}.layer_{i:02d}.kernel/0"] = bytes(1000)
  manifest = ts.ocdbt.dump(store.base).result()
  assert manifest["versions"][-1]["root_height"] >= 2
  files = ocdbt_check.array_files(directory, "params.layer_13")
  assert list(files.values()) == [["params.layer_13.kernel"]], files
  assert ocdbt_check.missing_or_truncated(directory) == []
  (path,) = files
  with open(path, "r+b") as f:
    f.truncate(10)
  # The commit wrote the value and the b-tree node listing it to that file:
  # the walk stops at the node, and names the file.
  problems = ocdbt_check.missing_or_truncated(directory, "params.")
  assert len(problems) == 1, problems
  assert problems[0].startswith(f"{path} is truncated to 10 bytes ("), problems
  os.remove(path)
  problems = ocdbt_check.missing_or_truncated(directory)
  assert len(problems) == 1, problems
  assert problems[0].startswith(f"{path} is missing (needed by "), problems


def test_cli_eval_and_train_on_a_truncated_checkpoint(tiny_data, reference,
                                                      tmp_path):
  """As a user would: half of one data file of the last checkpoint cut off;
  `eval` ends in one line, `train` resumes from the checkpoint before it and
  ends where the uninterrupted run did."""
  model_dir = str(tmp_path / "run")
  shutil.copytree(reference.model_dir, model_dir)
  # One that the parameters need (eval reads nothing else).
  damaged = truncate_largest_data_file(
      os.path.join(model_dir, f"checkpoint_{helpers.REF_STEPS}"), "params.")

  ev = helpers.run_entry("recsys_jax.eval",
                         helpers.model_flags(tiny_data, model_dir))
  assert ev.rc != 0, ev.stdout
  assert "Traceback" not in ev.stderr, ev.stderr[-3000:]
  last = ev.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint_{helpers.REF_STEPS} in "
                         f"{model_dir} cannot be read: {damaged} is "
                         "truncated to "), ev.stderr[-3000:]

  tr = helpers.run_entry("recsys_jax.train",
                         helpers.train_flags(tiny_data, model_dir)).check()
  assert (f"Warning: checkpoint_{helpers.REF_STEPS} in {model_dir} cannot "
          f"be read: {damaged} is truncated") in tr.stdout, tr.stdout
  assert "Resuming from checkpoint_36 " in tr.stdout, tr.stdout
  assert os.path.exists(os.path.join(
      model_dir, f"unreadable_checkpoint_{helpers.REF_STEPS}"))
  step = helpers.REF_STEPS
  helpers.assert_trees_equal(helpers.restore_state(model_dir, step),
                             helpers.restore_state(reference.model_dir, step),
                             f"checkpoint_{step}")
