"""Multi-host training and evaluation: two processes on loopback vs one.

Every run is the real CLI (`python -m recsys_jax.train` with coordinator flags,
or launch/local.sh --num_processes=2) on the tiny synthetic dataset, with gloo
CPU collectives and 2 emulated devices per process. The runs, made once per
module, in two phases of concurrent runs to keep the wall time down:

  phase 1  REF     1 process x 4 devices, N steps, evaluates at N.
           MP_A    2 processes x 2 devices, host_input='slice', SIGTERM after
                   step 1: both save the same checkpoint_k and stop.
           SHARD   launch/local.sh, 2 x 2, host_input='shard', N steps + eval,
                   with local gradient accumulation (one flat all-reduce a
                   step over gloo).
  phase 2  MP_B    MP_A resumed in 2 processes to N (same process count).
           ONE     a copy of MP_A's checkpoint_k resumed in 1 process x 4
                   devices to N (different process count).

With 'slice' input the batches do not depend on the process count, so the
losses (TensorBoard, float32), final parameters and evaluation metrics of
MP_A + MP_B and of ONE must equal REF's.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import types

import jax
import numpy as np
import pytest

from tests import helpers

N_STEPS = 20
BATCH = 16
SLICE = "--gin.input_pipeline.SequenceData.host_input='slice'"
SHARD = "--gin.input_pipeline.SequenceData.host_input='shard'"
LOCAL_ACCUMULATION = "--gin.trainer.TrainLoopConfig.local_accumulation=True"
# Params after N steps: different all-reduce orders (gloo across processes vs
# one process) differ in the last float32 bits, which Adam carries along.
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flags(data_dir, model_dir, *extra):
  return helpers.train_flags(
      data_dir, model_dir, steps=N_STEPS, checkpoint_every=1000, keep=None,
      batch_size=BATCH, log_every=1,
      extra=[f"--gin.EVAL_EVERY={N_STEPS}", *extra])


def _env(devices):
  # Every run here gets the same (fast-compile) XLA flags: subprocess_env's.
  # (local.sh appends its device count to XLA_FLAGS.)
  return helpers.subprocess_env(devices,
                                extra={"RECSYS_CPU_COLLECTIVES": "gloo"})


def _start_two(data_dir, model_dir, *extra):
  """Two `recsys_jax.train` processes on loopback, logs under model_dir."""
  port = _free_port()
  procs = []
  for i in range(2):
    procs.append(helpers.Background(
        "recsys_jax.train",
        _flags(data_dir, model_dir, *extra) + [
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}"],
        os.path.join(model_dir + "_logs", f"process_{i}"), env=_env(2)))
  return procs


def _wait_all(procs, timeout=600):
  """Waits for all; as soon as one fails, stops the others (they would wait
  forever in a collective) and reports it."""
  deadline = time.time() + timeout
  while any(p.proc.poll() is None for p in procs):
    # A process that raised waits in jax.distributed's shutdown for its peer.
    failed = [p for p in procs if p.proc.poll() not in (None, 0)
              or "Traceback (most recent call last)" in p.stderr()]
    if failed or time.time() > deadline:
      for p in procs:
        p.kill()
      break
    time.sleep(0.5)
  return [p.wait(30).check() for p in procs]


def _scalars(model_dir, tag):
  """{step: value} of one TensorBoard scalar over all event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(model_dir, "events.out.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[int(event.step)] = float(v.simple_value)
  return out


def _eval_json(model_dir, step=N_STEPS):
  with open(os.path.join(model_dir, "eval", f"eval_step{step}.json")) as f:
    return json.load(f)


def _params(model_dir, step=N_STEPS):
  """Saved params on this (1-device) process, whatever mesh wrote them."""
  from recsys_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  state = checkpoints.restore_to_host(
      os.path.join(model_dir, f"checkpoint_{step}", "state"))
  return helpers.flat(state["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data_dir = helpers.prepared_dataset()
  root = str(tmp_path_factory.mktemp("multihost"))
  r = types.SimpleNamespace()  # directories and outputs of the runs
  r.ref_dir, r.mp_dir, r.one_dir, r.shard_dir = (
      os.path.join(root, n) for n in ("ref", "mp", "one", "shard"))
  t0 = time.time()
  started = []
  try:
    _make_runs(r, data_dir, started)
  finally:
    for p in started:  # only after a failure: stop what is still running
      if p.poll() is None:
        p.terminate()
        p.wait(30)
  r.seconds = time.time() - t0
  print(f"multi-host runs took {r.seconds:.0f}s (checkpoint_{r.k})")
  return r


def _make_runs(r, data_dir, started):
  """Phase 1 and 2 of the module docstring; `started` collects the Popens."""
  ref = helpers.Background("recsys_jax.train", _flags(data_dir, r.ref_dir,
                                                       SLICE),
                           r.ref_dir + "_logs", env=_env(4))
  mp_a = _start_two(data_dir, r.mp_dir, SLICE)
  started += [ref.proc] + [p.proc for p in mp_a]
  port = _free_port()
  shard = subprocess.Popen(
      ["bash", os.path.join(helpers.REPO_ROOT, "launch", "local.sh"),
       f"--python={helpers.PYTHON}", "--num_processes=2", "--devices=2",
       f"--port={port}", "--"] + _flags(data_dir, r.shard_dir, SHARD,
                                         LOCAL_ACCUMULATION),
      cwd=helpers.REPO_ROOT, env=_env(None), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  started.append(shard)
  # Both processes of MP_A have passed step 1 (a collective) once process 0
  # reports it, so both have their SIGTERM handler installed.
  mp_a[0].wait_for(lambda: "\nstep 1/" in "\n" + mp_a[0].stdout(),
                   "MP_A step 1")
  for p in mp_a:
    p.proc.send_signal(signal.SIGTERM)
  r.mp_a = _wait_all(mp_a)
  r.ref = ref.wait(600).check()
  r.shard_out = shard.communicate(timeout=600)[0]
  assert shard.returncode == 0, r.shard_out[-3000:] + "".join(
      open(p).read()[-3000:] for p in
      glob.glob(os.path.join(r.shard_dir, "process_*.log")))
  r.k = max(helpers.checkpoint_steps(r.mp_dir))
  assert r.k < N_STEPS, "SIGTERM came after the last step; nothing to resume"

  # Phase 2.
  shutil.copytree(r.mp_dir, r.one_dir,
                  ignore=shutil.ignore_patterns("events.out.*"))
  one = helpers.Background("recsys_jax.train", _flags(data_dir, r.one_dir,
                                                      SLICE),
                           r.one_dir + "_logs", env=_env(4))
  mp_b = _start_two(data_dir, r.mp_dir, SLICE)
  started += [one.proc] + [p.proc for p in mp_b]
  r.mp_b = _wait_all(mp_b)
  r.one = one.wait(600).check()


def test_sigterm_saves_one_checkpoint_on_both_processes(runs):
  for res in runs.mp_a:
    assert f"SIGTERM: saved checkpoint_{runs.k}; exiting." in res.stdout
  assert helpers.checkpoint_steps(runs.mp_dir) == [runs.k, N_STEPS]
  meta = helpers.checkpoint_meta(runs.mp_dir, runs.k)
  assert meta["input_position"] == runs.k and meta["process_count"] == 2


def test_two_processes_equal_one_process(runs):
  """Losses of every step, final params and metrics of MP_A + MP_B = REF."""
  ref_loss = _scalars(runs.ref_dir, "train/loss")
  mp_loss = _scalars(runs.mp_dir, "train/loss")
  assert sorted(ref_loss) == list(range(1, N_STEPS + 1))
  assert sorted(mp_loss) == sorted(ref_loss)
  np.testing.assert_allclose([mp_loss[s] for s in sorted(mp_loss)],
                             [ref_loss[s] for s in sorted(ref_loss)],
                             rtol=1e-5)
  assert f"Resuming from checkpoint_{runs.k}" in runs.mp_b[0].stdout
  ref_p, mp_p = _params(runs.ref_dir), _params(runs.mp_dir)
  assert ref_p.keys() == mp_p.keys()
  at_k = _params(runs.mp_dir, runs.k)
  for k in ref_p:
    np.testing.assert_allclose(mp_p[k], ref_p[k], err_msg=k, **PARAM_TOL)
  assert any(not np.allclose(ref_p[k], at_k[k]) for k in ref_p), (
      "parameters did not change after the resume")
  _assert_same_metrics(_eval_json(runs.mp_dir), _eval_json(runs.ref_dir))


def test_resume_two_process_checkpoint_in_one_process(runs):
  """checkpoint_k of 2 processes restores on 1 process x 4 devices."""
  out = runs.one.stdout
  assert f"Resuming from checkpoint_{runs.k}" in out
  assert f"written by 2 processes, resuming with 1" in out
  ref_p, one_p = _params(runs.ref_dir), _params(runs.one_dir)
  for k in ref_p:
    np.testing.assert_allclose(one_p[k], ref_p[k], err_msg=k, **PARAM_TOL)
  _assert_same_metrics(_eval_json(runs.one_dir), _eval_json(runs.ref_dir))
  ref_loss = _scalars(runs.ref_dir, "train/loss")
  one_loss = _scalars(runs.one_dir, "train/loss")
  assert sorted(one_loss) == list(range(runs.k + 1, N_STEPS + 1))
  np.testing.assert_allclose([one_loss[s] for s in sorted(one_loss)],
                             [ref_loss[s] for s in sorted(one_loss)],
                             rtol=1e-5)


def _assert_same_metrics(got, want):
  assert got.keys() == want.keys()
  for split in ("validation", "test", "validation_popularity",
                "test_popularity"):
    assert got[split]["num_users"] == want[split]["num_users"] == 200, split
    for name, v in want[split].items():
      if isinstance(v, float):
        assert got[split][name] == pytest.approx(v, rel=1e-9, abs=1e-12), (
            split, name)


def test_process_one_is_silent(runs):
  """Only process 0 prints progress, evaluation and summary lines."""
  for res in (runs.mp_a[1], runs.mp_b[1]):
    assert not helpers.progress_steps(res.stdout)
    for marker in ("[eval", "Parameters:", "Resuming", "Trained steps"):
      assert marker not in res.stdout, marker
  assert helpers.progress_steps(runs.mp_b[0].stdout) == list(
      range(runs.k + 1, N_STEPS + 1))
  eval_lines = [l for l in runs.mp_b[0].stdout.splitlines()
                if l.startswith(f"[eval step {N_STEPS}]")
                and "by frequency" not in l]
  # validation and test, each with its popularity, EASE and Markov baselines.
  assert len(eval_lines) == 8


def test_shard_mode_trains_and_evaluates_every_user_once(runs):
  """launch/local.sh, host_input='shard', local gradient accumulation: both
  processes train and evaluate."""
  logs = [open(os.path.join(runs.shard_dir, f"process_{i}.log")).read()
          for i in range(2)]
  with open(os.path.join(runs.shard_dir, "config.gin")) as f:
    assert "local_accumulation = True" in f.read()
  assert helpers.progress_steps(logs[0]) == list(range(1, N_STEPS + 1))
  assert not helpers.progress_steps(logs[1]) and "[eval" not in logs[1]
  loss = _scalars(runs.shard_dir, "train/loss")
  assert sorted(loss) == list(range(1, N_STEPS + 1))
  assert np.all(np.isfinite(list(loss.values())))
  # One TensorBoard file (process 0's) and one evaluation file.
  assert len(glob.glob(os.path.join(runs.shard_dir, "events.out.*"))) == 1
  assert os.listdir(os.path.join(runs.shard_dir, "eval")) == [
      f"eval_step{N_STEPS}.json"]
  got, want = _eval_json(runs.shard_dir), _eval_json(runs.ref_dir)
  for split in ("validation", "test"):
    assert got[split]["num_users"] == 200
    # The popularity baseline ignores the model: equal metrics iff each
    # user was ranked exactly once across the two hosts.
    pop = f"{split}_popularity"
    for name, v in want[pop].items():
      if isinstance(v, float):
        assert got[pop][name] == pytest.approx(v, rel=1e-9), (pop, name)
  # Different (sharded) batches than REF: a different model.
  assert not np.allclose(_params(runs.shard_dir)["['item_embed']['embedding']"],
                         _params(runs.ref_dir)["['item_embed']['embedding']"])


# -- in-process checks (no CLI) ----------------------------------------------


def test_only_process_zero_writes_eval_json_and_events(tmp_path, monkeypatch):
  from recsys_jax.evaluation import evaluator as evaluation  # pylint: disable=g-import-not-at-top
  from recsys_jax.core import metric_writer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metric_writer.MetricWriter(str(tmp_path))
  res = {"test": {"HR@1": 0.5, "num_users": 3}}
  assert evaluation.write_results(str(tmp_path), 7, res, writer) is None
  writer.flush()
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = metric_writer.MetricWriter(str(tmp_path))
  path = evaluation.write_results(str(tmp_path), 7, res, writer)
  writer.close()
  assert path == str(tmp_path / "eval" / "eval_step7.json")
  assert len(glob.glob(str(tmp_path / "events.out.*"))) == 1


def _eval_rows(data):
  """The `item_ids` rows of the real users of this process's test batches."""
  return [tuple(r) for b in data.eval_batches("test", 64)
          for r in b["item_ids"][b["valid"] > 0]]


@pytest.fixture(scope="module")
def one_process_rows():
  """The one-process reference of `test_host_input_rows`, read once: the
  global batches (16 rows) of steps 3 and 4, and every test user's row.

  With one process both host_input modes read the same unsharded stream
  (`SequenceData.train_batches`) and the same evaluation batches, so both
  cases compare against these.
  """
  from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.SequenceData(
      "multihost_rows_one", helpers.prepared_dataset(), max_len=20,
      host_input="slice")
  assert jax.process_count() == 1
  return list(_take(data.train_batches(3, 16), 2)), _eval_rows(data)


@pytest.mark.parametrize("host_input", ["slice", "shard"])
def test_host_input_rows(host_input, one_process_rows, monkeypatch):
  """'slice': process i gets rows [8i, 8i + 8) of the one-process batches;
  'shard': the processes read disjoint users; eval covers every user once."""
  from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.SequenceData(
      f"multihost_rows_{host_input}", helpers.prepared_dataset(), max_len=20,
      host_input=host_input)
  one, all_users = one_process_rows
  per_process, eval_users = [], []
  for i in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    per_process.append(list(_take(data.train_batches(3, 8), 2)))
    eval_users.extend(_eval_rows(data))
  monkeypatch.undo()
  assert len(eval_users) == 200
  assert sorted(eval_users) == sorted(all_users)
  for step in range(2):
    a, b = per_process[0][step], per_process[1][step]
    if host_input == "slice":
      for k in one[step]:
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]]),
                                      one[step][k])
    else:
      assert a["item_ids"].shape == (8, 20)
      assert not np.array_equal(np.concatenate([a["targets"], b["targets"]]),
                                one[step]["targets"])


def _take(it, n):
  for _, x in zip(range(n), it):
    yield x


def test_unknown_host_input_is_an_error():
  from recsys_jax.input_pipeline import sequence_data as input_pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="host_input='rows'.*'shard', 'slice'"):
    input_pipeline.SequenceData("multihost_bad", helpers.prepared_dataset(),
                                host_input="rows")
