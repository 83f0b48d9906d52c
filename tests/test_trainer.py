"""Robustness of the training loop: resume, preemption, NaN, sharding.

In-process tests drive `trainer.train_loop` with a least-squares fake model
(the wrapper API of model_lib.py); the others run `python -m recsys_jax.train`
on the tiny synthetic dataset and compare against one uninterrupted reference
run (tests/helpers.py). Gradient accumulation (`num_microbatches`) is
compared with the whole-batch step on a tiny Bert4Rec, in process and on 8
emulated devices.
"""

import itertools
import json
import os
import re
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.model_lib import base
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.models import bert4rec as bert4rec_lib
from tests import helpers
from tests.helpers import reference  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

# -- a fake model for the in-process tests -----------------------------------

_BATCH = 4
_TRUE_W = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


class _LinearModel(base.BaseModel):
  """Least squares on 4 features with the wrapper API (get_initial_variables,
  loss_fn, its metric sums); a NaN in the batch makes the loss NaN."""

  def get_initial_variables(self, rng, batch_size=2):
    del batch_size
    return {"params": {"w": jax.random.normal(rng, (4,)) * 0.1,
                       "b": jnp.zeros(())}}

  def loss_fn(self, params, batch, rng):
    del rng
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss_sum = jnp.sum(err ** 2)
    n = jnp.asarray(err.shape[0], jnp.float32)
    correct = jnp.sum((jnp.abs(err) < 0.5).astype(jnp.float32))
    return loss_sum / n, {"loss_sum": loss_sum, "weight_sum": n,
                          "correct_sum": correct}

  def metric_sums(self):
    return ("loss_sum", "weight_sum", "correct_sum")


class _SimulatedCrash(Exception):
  pass


def _batches(*, nan_at=None, crash_at=None, sigterm_at=None, starts=None):
  """`batches(start)` of the fake model; events fire while making the batch
  of (1-based) step `*_at`."""

  def batches(start):
    if starts is not None:
      starts.append(start)
    for i in itertools.count(start):
      step = i + 1
      g = np.random.default_rng(i)
      x = g.normal(size=(_BATCH, 4)).astype(np.float32)
      y = (x @ _TRUE_W).astype(np.float32)
      if step == crash_at:
        raise _SimulatedCrash(f"crash before step {step}")
      if step == nan_at:
        x[0, 0] = np.nan
      if step == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      yield {"x": x, "y": y}

  return batches


def _fake_train(model_dir, batches, *, steps=7, checkpoint_every=3,
                num_microbatches=1, local_accumulation=False):
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  cfg = trainer.TrainLoopConfig(train_steps=steps, batch_size=_BATCH,
                                log_every=1, checkpoint_every=checkpoint_every,
                                keep_checkpoints=None,
                                num_microbatches=num_microbatches,
                                local_accumulation=local_accumulation)
  opt = trainer.OptimizerConfig(learning_rate=0.05, warmup_steps=0,
                                decay="constant")
  return trainer.train_loop(_LinearModel(), opt, batches, cfg,
                            model_dir=str(model_dir), mesh=mesh,
                            rules=partitioning.get_rules("data_parallel"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The fake model trained 7 steps without incident (checkpoints 3, 6, 7)."""
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  _fake_train(model_dir, _batches())
  assert helpers.checkpoint_steps(model_dir) == [3, 6, 7]
  return model_dir


def _assert_same_final_state(model_dir, reference_dir, step):
  helpers.assert_trees_equal(helpers.restore_state(model_dir, step),
                             helpers.restore_state(reference_dir, step),
                             f"checkpoint_{step}")


def test_nonfinite_loss_stops_before_checkpointing(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  # Step 6 is a checkpoint step: the NaN state must not be saved there.
  with pytest.raises(trainer.NonFiniteLossError) as err:
    _fake_train(tmp_path, _batches(nan_at=6))
  msg = str(err.value)
  assert re.search(r"\bat step 6\b", msg), msg
  assert f"{tmp_path}/checkpoint_3" in msg, msg
  assert helpers.checkpoint_steps(tmp_path) == [3]
  assert helpers.checkpoint_meta(tmp_path, 3)["input_position"] == 3
  # The loop cleaned up after itself.
  assert signal.getsignal(signal.SIGTERM) is before


def test_nonfinite_loss_at_first_step_says_no_checkpoint(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError) as err:
    _fake_train(tmp_path, _batches(nan_at=1))
  msg = str(err.value)
  assert re.search(r"\bat step 1\b", msg), msg
  assert "no checkpoint" in msg and "None" not in msg, msg
  assert helpers.checkpoint_steps(tmp_path) == []


def test_crash_then_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                capsys):
  with pytest.raises(_SimulatedCrash):
    _fake_train(tmp_path, _batches(crash_at=5))
  assert helpers.checkpoint_steps(tmp_path) == [3]
  capsys.readouterr()
  starts = []
  state = _fake_train(tmp_path, _batches(starts=starts))
  # The input pipeline is asked for exactly the batches not yet trained on.
  assert starts == [3]
  assert "Resuming from checkpoint_3" in capsys.readouterr().out
  assert int(state.step) == 7
  assert helpers.checkpoint_steps(tmp_path) == [3, 6, 7]
  for step in (6, 7):
    assert helpers.checkpoint_meta(tmp_path, step)["input_position"] == step
    _assert_same_final_state(tmp_path, uninterrupted, step)


def test_resume_rejects_checkpoint_with_wrong_input_position(tmp_path):
  _fake_train(tmp_path, _batches(), steps=3)
  path = os.path.join(tmp_path, "checkpoint_3", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta["input_position"] = 2
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(RuntimeError, match="input position"):
    _fake_train(tmp_path, _batches(), steps=6)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="the SIGTERM handler needs the main thread")
def test_sigterm_in_process_saves_current_step_and_resumes(
    tmp_path, uninterrupted, capsys):
  before = signal.getsignal(signal.SIGTERM)
  state = _fake_train(tmp_path, _batches(sigterm_at=2))
  out = capsys.readouterr().out
  # The step being prepared when the signal came is finished and saved.
  assert int(state.step) == 2
  assert "SIGTERM: saved checkpoint_2" in out
  assert helpers.checkpoint_steps(tmp_path) == [2]
  assert helpers.checkpoint_meta(tmp_path, 2)["input_position"] == 2
  assert signal.getsignal(signal.SIGTERM) is before
  starts = []
  _fake_train(tmp_path, _batches(starts=starts))
  assert starts == [2]
  _assert_same_final_state(tmp_path, uninterrupted, 7)


# -- the real trainer in subprocesses ----------------------------------------


def _assert_matches_reference(model_dir, reference_dir):
  steps = helpers.checkpoint_steps(reference_dir)
  assert steps == [32, 36, 40]
  assert helpers.checkpoint_steps(model_dir) == steps
  for step in steps:
    meta = helpers.checkpoint_meta(model_dir, step)
    assert meta["input_position"] == step and meta["step"] == step
    _assert_same_final_state(model_dir, reference_dir, step)


def test_sigkill_then_resume_equals_uninterrupted(tiny_data, reference,
                                                  tmp_path):
  model_dir = str(tmp_path / "run")
  flags = helpers.train_flags(tiny_data, model_dir)
  first = helpers.Background("recsys_jax.train", flags, str(tmp_path / "log"))
  first.wait_for(
      lambda: any(0 < s < helpers.REF_STEPS
                  for s in helpers.checkpoint_steps(model_dir)),
      "a checkpoint before the last step")
  finished_early = first.proc.poll() is not None
  first.proc.send_signal(signal.SIGKILL)
  killed = first.wait()
  assert not finished_early and killed.rc == -signal.SIGKILL, (
      "the run ended before it could be killed; make it longer")
  saved = helpers.checkpoint_steps(model_dir)
  assert saved and max(saved) < helpers.REF_STEPS, saved

  resumed = helpers.run_entry("recsys_jax.train", flags).check()
  m = re.search(r"Resuming from checkpoint_(\d+)", resumed.stdout)
  assert m, resumed.stdout
  assert int(m.group(1)) == max(saved)
  assert helpers.progress_steps(resumed.stdout)[0] == max(saved) + 1
  _assert_matches_reference(model_dir, reference.model_dir)


def test_sigterm_saves_exits_zero_and_resumes(tiny_data, reference, tmp_path):
  model_dir = str(tmp_path / "run")
  flags = helpers.train_flags(tiny_data, model_dir)
  first = helpers.Background("recsys_jax.train", flags, str(tmp_path / "log"))
  first.wait_for(lambda: helpers.progress_steps(first.stdout()),
                 "the first progress line")
  first.proc.send_signal(signal.SIGTERM)
  stopped = first.wait().check()  # exit status 0
  m = re.search(r"SIGTERM: saved checkpoint_(\d+)", stopped.stdout)
  assert m, stopped.stdout
  step = int(m.group(1))
  assert 0 < step < helpers.REF_STEPS
  # Saved at the step it stopped at, not at the previous periodic checkpoint.
  assert max(helpers.progress_steps(stopped.stdout)) == step
  assert max(helpers.checkpoint_steps(model_dir)) == step
  assert helpers.checkpoint_meta(model_dir, step)["input_position"] == step

  resumed = helpers.run_entry("recsys_jax.train", flags).check()
  assert f"Resuming from checkpoint_{step} " in resumed.stdout
  _assert_matches_reference(model_dir, reference.model_dir)


# -- sharded equals unsharded --------------------------------------------------

_SHARDED_SCRIPT = r'''
"""Trains the same tiny Bert4Rec on 3 meshes; writes scalars and params."""
import json
import os
import sys

import gin
import jax
import numpy as np

from recsys_jax.model_lib import builders
from recsys_jax.cli import gin_utils
from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.core import partitioning
from recsys_jax.core import trainer

data_dir, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == 8, jax.devices()

# The 4x2 (data x model) mesh exactly as the gin file configures it.
gin_utils.parse_gin(["partitioning/vocab_parallel.gin"], [])
vocab_parallel = gin.query_parameter(
    "PARTITIONING/macro.value").scoped_configurable_fn()
gin.clear_config()


class Capture:
  """A metric writer keeping every scalar it is given."""

  def __init__(self):
    self.rows = {}

  def write_scalars(self, step, scalars):
    self.rows[int(step)] = {k: float(v) for k, v in scalars.items()}


# One block: compiling three meshes dominates this test's time.
model = builders.bert4rec(data_dir=data_dir, max_len=20, hidden=16,
                          mlp_dim=32, num_layers=1, mask_prob=0.2)
data = input_pipeline.SequenceData("sharding_test", data_dir, max_len=20,
                                   mask_prob=0.2)
setups = {
    "single": (partitioning.make_mesh(1, devices=jax.devices()[:1]),
               partitioning.get_rules("data_parallel")),
    "data8": (partitioning.make_mesh(1),
              partitioning.get_rules("data_parallel")),
    "data4_model2": (vocab_parallel.make_mesh(),
                     vocab_parallel.logical_rules()),
}
out = {}
for name, (mesh, rules) in setups.items():
  writer = Capture()
  cfg = trainer.TrainLoopConfig(train_steps=steps, batch_size=16, log_every=1,
                                checkpoint_every=1000, keep_checkpoints=1)
  opt = trainer.OptimizerConfig(warmup_steps=0, decay="constant")
  state = trainer.train_loop(
      model, opt, lambda s: data.train_batches(s, 16), cfg,
      model_dir=os.path.join(out_dir, name), mesh=mesh, rules=rules,
      writer=writer)
  emb = state.params["item_embed"]["embedding"]
  out[name] = {
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "steps": sorted(writer.rows),
      "scalars": [writer.rows[s] for s in sorted(writer.rows)],
      "embedding_spec": str(emb.sharding.spec),
      "embedding_distinct_shards": len(
          {str(s.index) for s in emb.addressable_shards}),
  }
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  np.savez(os.path.join(out_dir, name + ".npz"),
           **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
with open(os.path.join(out_dir, "result.json"), "w") as f:
  json.dump(out, f)
'''


def test_sharded_training_equals_single_device(tiny_data, tmp_path):
  steps = 4
  helpers.run_script(_SHARDED_SCRIPT, [tiny_data, str(tmp_path), str(steps)],
                     env=helpers.subprocess_env(xla_devices=8)).check()
  with open(tmp_path / "result.json") as f:
    res = json.load(f)
  single, data8, mixed = res["single"], res["data8"], res["data4_model2"]
  assert single["mesh"] == {"data": 1, "model": 1}
  assert data8["mesh"] == {"data": 8, "model": 1}
  assert mixed["mesh"] == {"data": 4, "model": 2}
  # vocab_parallel really splits the item table over `model`.
  assert mixed["embedding_spec"].startswith("PartitionSpec('model'") or (
      mixed["embedding_spec"].startswith("P('model'")), mixed
  assert mixed["embedding_distinct_shards"] == 2
  assert single["embedding_distinct_shards"] == 1

  params = {k: np.load(tmp_path / f"{k}.npz") for k in res}
  for name in ("data8", "data4_model2"):
    run = res[name]
    assert run["steps"] == single["steps"] == list(range(1, steps + 1))
    for key in ("train/loss", "train/masked_accuracy", "train/grad_norm"):
      np.testing.assert_allclose(
          [s[key] for s in run["scalars"]],
          [s[key] for s in single["scalars"]], rtol=1e-4, atol=1e-5,
          err_msg=f"{name} {key}")
    assert sorted(params[name].files) == sorted(params["single"].files)
    for leaf in params["single"].files:
      np.testing.assert_allclose(params[name][leaf], params["single"][leaf],
                                 rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name} {leaf}")
  # Training moved the (zero-initialised) output bias, so the equality above
  # is not between untouched initial values.
  with np.load(tmp_path / "single.npz") as final:
    assert np.abs(final["['output_bias']"]).max() > 1e-4


def test_check_architecture_fields():
  from recsys_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  now = {"module": "Bert4Rec", "hidden": 16, "causal": False}
  checkpoints.check_architecture(dict(now), now, "ckpt")  # equal: passes
  checkpoints.check_architecture(None, now, "ckpt")  # no record: unchecked
  # An older record without a field added since (with its old default).
  checkpoints.check_architecture({"module": "Bert4Rec", "hidden": 16}, now,
                                 "ckpt")
  with pytest.raises(ValueError, match=r"ckpt was written by a different "
                     r"model architecture[\s\S]*hidden: saved 32, configured "
                     r"16"):
    checkpoints.check_architecture(dict(now, hidden=32), now, "ckpt")
  with pytest.raises(ValueError, match="old_field: saved 1, configured None"):
    checkpoints.check_architecture(dict(now, old_field=1), now, "ckpt")


# -- gradient accumulation: num_microbatches -----------------------------------

_MB_ROWS = 8        # the in-process batch; the sharded one has 32 rows
_MB_EASY_ITEM = 7   # a target the initial state's output bias favours
_MB_METRICS = ("loss", "loss_sum", "weight_sum", "correct_sum", "grad_norm")


def accumulation_case(rows: int = _MB_ROWS):
  """(model, tx, schedule, batch): a tiny Bert4Rec without dropout and a
  batch whose micro-batches (rows i::n for n = 2 and 4) have different
  weight sums and mean losses.

  Row r masks its last 1 + r % 4 positions, so micro-batch i of 4 holds
  (1 + i) * rows / 4 targets and the two of n = 2 hold 8 and 12 (rows = 8).
  Every target of the even rows is `_MB_EASY_ITEM`, which
  `favour_easy_item` makes likely: the even micro-batches have a far lower
  mean loss than the odd ones, so averaging per-micro-batch means would be
  visibly wrong. (Also used by the sharded script below.)
  """
  config = bert4rec_lib.Bert4RecConfig(
      num_items=50, max_len=8, hidden=16, num_layers=1, num_heads=2,
      mlp_dim=32, dropout_rate=0.0, attention_dropout_rate=0.0)
  model = model_lib.Bert4RecModel(config, max_predictions=4)
  length = config.max_len
  gen = np.random.default_rng(0)
  ids = gen.integers(1, config.num_items + 1, (rows, length)).astype(np.int32)
  weights = np.zeros((rows, length), np.float32)
  for r in range(rows):
    weights[r, length - 1 - r % 4:] = 1.0
  ids[::2] = np.where(weights[::2] > 0, _MB_EASY_ITEM, ids[::2])
  ids[1, :2] = 0  # some padding
  batch = {"item_ids": np.where(weights > 0, config.mask_id, ids).astype(
               np.int32),
           "targets": np.where(weights > 0, ids, 0).astype(np.int32),
           "loss_weights": weights}
  # eps = 1e-6 (not 1e-8): Adam's first step is ~lr * g / (|g| + eps), which
  # turns float-rounding differences of a near-zero gradient element (the
  # micro-batches sum in another order) into visible parameter differences.
  tx, schedule = trainer.make_optimizer(
      trainer.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                              decay="constant", eps=1e-6), 10)
  return model, tx, schedule, batch


def favour_easy_item(state):
  """The state with output bias 4 on `_MB_EASY_ITEM` (same sharding)."""
  bias = state.params["output_bias"]
  value = np.asarray(bias).copy()
  value[_MB_EASY_ITEM] = 4.0
  params = dict(state.params,
                output_bias=jax.device_put(value, bias.sharding))
  return state.replace(params=params)


def test_microbatched_step_equals_whole_batch_step():
  model, tx, schedule, batch = accumulation_case()
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  rules = partitioning.get_rules("data_parallel")
  state, _, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0), mesh,
                                   rules)
  state = favour_easy_item(state)
  rng = jax.random.PRNGKey(1)
  out = {}
  for n in (1, 2, 4):
    step = jax.jit(trainer.make_train_step(model, tx, schedule,
                                           num_microbatches=n))
    new_state, metrics = step(state, batch, rng)
    out[n] = (helpers.flat(new_state.params), jax.device_get(metrics),
              int(new_state.step))
  params1, metrics1, step1 = out[1]
  assert step1 == 1
  assert metrics1["correct_sum"] > 0  # the easy targets are found
  loss_fn = jax.jit(model.loss_fn)
  for n in (2, 4):
    params, metrics, step = out[n]
    assert step == 1 and set(metrics) == set(metrics1)
    for k in _MB_METRICS:
      np.testing.assert_allclose(metrics[k], metrics1[k], rtol=1e-5,
                                 atol=1e-6, err_msg=f"n={n} {k}")
    assert metrics["learning_rate"] == metrics1["learning_rate"]
    assert params.keys() == params1.keys()
    for leaf in params1:
      np.testing.assert_allclose(params[leaf], params1[leaf], rtol=1e-5,
                                 atol=1e-6, err_msg=f"n={n} {leaf}")
    # The test can fail: the micro-batches differ in weight sum, and the
    # mean of their mean losses is not the batch's loss.
    per = [loss_fn(state.params, trainer.microbatch(batch, i, n), None)
           for i in range(n)]
    weight_sums = [float(aux["weight_sum"]) for _, aux in per]
    assert len(set(weight_sums)) == n, weight_sums
    assert sum(weight_sums) == metrics1["weight_sum"]
    naive = float(np.mean([float(loss) for loss, _ in per]))
    assert abs(naive - metrics1["loss"]) > 0.05 * metrics1["loss"], (
        n, naive, metrics1["loss"])
  # Training moved the parameters: the equality is not of untouched values.
  before = helpers.flat(state.params)
  assert max(np.abs(params1[k] - before[k]).max() for k in before) > 1e-3


def test_microbatch_takes_strided_rows():
  batch = {"x": np.arange(12).reshape(6, 2), "y": np.arange(6)}
  mb = trainer.microbatch(batch, 1, 3)
  np.testing.assert_array_equal(mb["x"], [[2, 3], [8, 9]])
  np.testing.assert_array_equal(mb["y"], [1, 4])
  # A traced index (as in the step's scan) takes the same rows.
  traced = jax.jit(lambda b, i: trainer.microbatch(b, i, 3))(batch, 1)
  np.testing.assert_array_equal(traced["y"], [1, 4])


def test_num_microbatches_errors_name_the_setting(tmp_path):
  with pytest.raises(ValueError, match=r"TrainLoopConfig\.num_microbatches=3 "
                     r"must divide TrainLoopConfig\.batch_size=16"):
    trainer.TrainLoopConfig(train_steps=1, batch_size=16, num_microbatches=3)
  for bad in (0, -2, 1.5):
    with pytest.raises(ValueError,
                       match=r"TrainLoopConfig\.num_microbatches=.*>= 1"):
      trainer.TrainLoopConfig(train_steps=1, batch_size=16,
                              num_microbatches=bad)
  # Checked again by train_loop (the dataclass is mutable), before any work.
  cfg = trainer.TrainLoopConfig(train_steps=1, batch_size=_BATCH)
  cfg.num_microbatches = 3
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"TrainLoopConfig\.num_microbatches=3 "
                     r"must divide TrainLoopConfig\.batch_size=4"):
    trainer.train_loop(_LinearModel(), trainer.OptimizerConfig(), _batches(),
                       cfg, model_dir=str(tmp_path), mesh=mesh,
                       rules=partitioning.get_rules("data_parallel"))
  assert not os.listdir(tmp_path)
  # The step itself: n >= 1, and n must divide the rows it is given.
  tx, schedule = trainer.make_optimizer(trainer.OptimizerConfig(), 1)
  with pytest.raises(ValueError, match=r"num_microbatches=0: expected"):
    trainer.make_train_step(_LinearModel(), tx, schedule, num_microbatches=0)
  model = _LinearModel()
  params = model.get_initial_variables(jax.random.PRNGKey(0))["params"]
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  step = trainer.make_train_step(model, tx, schedule, num_microbatches=3)
  batch = next(_batches()(0))
  with pytest.raises(ValueError, match=r"num_microbatches=3 must divide the "
                     r"global batch size; batch\['x'\] has 4 rows"):
    jax.jit(step)(state, batch, jax.random.PRNGKey(0))
  # Local accumulation: the mesh is needed, and data shards x n must divide
  # the batch (the model-axis check runs with 8 devices, below).
  with pytest.raises(ValueError, match=r"local_accumulation=True\) needs "
                     r"the mesh"):
    trainer.make_train_step(model, tx, schedule, local_accumulation=True)
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  step = trainer.make_train_step(model, tx, schedule, num_microbatches=3,
                                 local_accumulation=True, mesh=mesh)
  with pytest.raises(ValueError, match=r"num_microbatches=3 micro-batches on "
                     r"each of 1 data shards, so 3 must divide the global "
                     r"batch size; batch\['x'\] has 4 rows"):
    jax.jit(step)(state, batch, jax.random.PRNGKey(0))


@pytest.mark.parametrize("local_accumulation", [False, True])
def test_train_loop_passes_num_microbatches(tmp_path, uninterrupted,
                                            monkeypatch, local_accumulation):
  built = []
  make = trainer.make_train_step

  def recording(*args, **kwargs):
    built.append((kwargs.get("num_microbatches", 1),
                  kwargs.get("local_accumulation", False)))
    return make(*args, **kwargs)

  monkeypatch.setattr(trainer, "make_train_step", recording)
  state = _fake_train(tmp_path, _batches(), num_microbatches=2,
                      local_accumulation=local_accumulation)
  assert built == [(2, local_accumulation)]
  assert int(state.step) == 7
  # The fake model's loss is a sum over rows: the same training, up to
  # float rounding.
  got = helpers.flat(helpers.restore_state(tmp_path, 7))
  want = helpers.flat(helpers.restore_state(uninterrupted, 7))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


_MICROBATCH_SHARDED_SCRIPT = r"""
# n = 1 on one device vs n > 1 on 8 emulated devices; writes the results.
import json
import re
import sys

import jax

from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from tests import helpers
from tests.test_trainer import accumulation_case, favour_easy_item

out_path = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
model, tx, schedule, batch = accumulation_case(rows=32)
rng = jax.random.PRNGKey(1)
# (name, model parallelism (0: one device), rules, n). data8 with n = 8
# leaves 4 rows per micro-batch for 8 devices: those must be resharded.
# "local": make_train_step(local_accumulation=True).
RUNS = [("single", 0, "data_parallel", 1), ("data8", 1, "data_parallel", 2),
        ("data8", 1, "data_parallel", 4), ("data8", 1, "data_parallel", 8),
        ("data4_model2", 2, "vocab_parallel", 4),
        ("data8_local", 1, "data_parallel", 1),
        ("data8_local", 1, "data_parallel", 4)]
result = {}
for name, mp, rules_name, n in RUNS:
  mesh = (partitioning.make_mesh(1, devices=jax.devices()[:1]) if mp == 0
          else partitioning.make_mesh(mp))
  rules = partitioning.get_rules(rules_name)
  state, shardings, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0),
                                           mesh, rules)
  state = favour_easy_item(state)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(model, tx, schedule, num_microbatches=n,
                              local_accumulation=name.endswith("_local"),
                              mesh=mesh),
      shardings, mesh)
  global_batch = partitioning.host_to_global(batch, mesh)
  with partitioning.with_rules(rules, mesh):
    compiled = step_fn.lower(state, global_batch, rng).compile()
    new_state, metrics = compiled(state, global_batch, rng)
  hlo = compiled.as_text()
  # Arrays that collectives move between devices (reductions aside).
  moved = sorted(set(re.findall(
      r"= (\S+) (?:all-gather|all-to-all|collective-permute)(?:-start)?\(",
      hlo)))
  # Each all-reduce: (the computation holding it, its result shape).
  reduces, computation = [], None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = ("ENTRY" if line.startswith("ENTRY")
                     else line.split()[0])
    found = re.search(r"= (.+?) all-reduce(?:-start)?\(", line)
    if found:
      reduces.append([computation, found.group(1)])
  result[f"{name}/{n}"] = {
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
      "params": {k: v.tolist()
                 for k, v in helpers.flat(new_state.params).items()},
      "params_sharding_equal": all(
          a.sharding == b for a, b in zip(jax.tree.leaves(new_state.params),
                                          jax.tree.leaves(shardings.params))),
      "moved": moved,
      "all_reduces": reduces,
  }
# Local accumulation refuses a model axis and a batch that the data shards'
# micro-batches do not divide (named by the loop's settings).
errors = []
try:
  trainer.make_train_step(model, tx, schedule, local_accumulation=True,
                          mesh=partitioning.make_mesh(2))
except ValueError as e:
  errors.append(str(e))
cfg = trainer.TrainLoopConfig(train_steps=1, batch_size=32,
                              num_microbatches=8, local_accumulation=True)
try:
  trainer._check_microbatch_layout(cfg, partitioning.make_mesh(1))
except ValueError as e:
  errors.append(str(e))
result["errors"] = errors
with open(out_path, "w") as f:
  json.dump(result, f)
"""


def test_microbatched_sharded_step_equals_single_device(tmp_path):
  out = tmp_path / "result.json"
  env = helpers.subprocess_env(xla_devices=8)
  helpers.run_script(_MICROBATCH_SHARDED_SCRIPT, [str(out)], env=env,
                     timeout=600).check()
  res = json.loads(out.read_text())
  single = res["single/1"]
  assert single["mesh"] == {"data": 1, "model": 1}
  assert res["data8/2"]["mesh"] == {"data": 8, "model": 1}
  assert res["data4_model2/4"]["mesh"] == {"data": 4, "model": 2}
  for key in ("data8/2", "data8/4", "data8/8", "data4_model2/4",
              "data8_local/1", "data8_local/4"):
    run = res[key]
    assert run["params_sharding_equal"], key
    for k in _MB_METRICS:
      np.testing.assert_allclose(run["metrics"][k], single["metrics"][k],
                                 rtol=1e-5, atol=1e-6, err_msg=f"{key} {k}")
    assert run["params"].keys() == single["params"].keys()
    for leaf, want in single["params"].items():
      np.testing.assert_allclose(run["params"][leaf], want, rtol=1e-5,
                                 atol=1e-6, err_msg=f"{key} {leaf}")
  # Strided micro-batches stay where their rows are: when n divides the 4
  # rows per device, no int32 batch array (item ids, targets) is gathered
  # or permuted between devices; with n = 8 (4 rows per micro-batch for 8
  # devices) they must move, which shows the check can fail.
  def moves_ids(run):
    return [s for s in run["moved"] if s.startswith("s32[")]
  assert not moves_ids(res["data8/2"]), res["data8/2"]["moved"]
  assert not moves_ids(res["data8/4"]), res["data8/4"]["moved"]
  assert moves_ids(res["data8/8"]), res["data8/8"]["moved"]
  # Local accumulation: one all-reduce a step, of one flat float32 buffer
  # (every gradient and the 3 metric sums), in the entry computation; XLA's
  # default reduces a tuple of every parameter's gradient inside the
  # micro-batch loop's body.
  n_params = sum(np.asarray(v).size for v in single["params"].values())
  for key in ("data8_local/1", "data8_local/4"):
    assert res[key]["all_reduces"] == [["ENTRY", f"f32[{n_params + 3}]{{0}}"]], (
        key, res[key]["all_reduces"])
  default = res["data8/4"]["all_reduces"]
  assert default and all(c != "ENTRY" and s.startswith("(")
                         for c, s in default), default
  assert len(res["errors"]) == 2, res["errors"]
  assert "model axis of 2" in res["errors"][0], res["errors"]
  assert ("TrainLoopConfig.batch_size=32 must be a multiple of 64"
          in res["errors"][1]), res["errors"]
