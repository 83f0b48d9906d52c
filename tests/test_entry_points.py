"""The gin entry points end to end: train -> eval -> export -> eval(export).

All share one tiny training run (tests/helpers.reference_run: 40 steps,
checkpoint every 4, keep 3) and one tiny synthetic dataset.
"""

import glob
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests import helpers
from tests.helpers import reference  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

NUM_USERS = 200
NUM_ITEMS = 150
HIDDEN = 16
SPLITS = ("validation", "test", "validation_popularity", "test_popularity")

_PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss (\d+\.\d+) \| masked_accuracy (\d\.\d+) \| "
    r"grad_norm (\d+\.\d+) \| lr (\S+) \| (\d+\.\d+) steps/s \| "
    r"(\d+) seq/s \| ETA (?:\d+h)?\d+m\d\ds$")


def _eval(tiny_data, model_dir, *extra):
  return helpers.run_entry("recsys_jax.eval",
                           helpers.model_flags(tiny_data, model_dir, extra))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _without_timings(record):
  """An eval record without its wall-clock fields (`*_seconds`: how long a
  baseline took to fit and evaluate), which differ between two runs."""
  if isinstance(record, dict):
    return {k: _without_timings(v) for k, v in record.items()
            if not k.endswith("_seconds")}
  return record


@pytest.fixture(scope="module")
def eval_latest(tiny_data, reference):
  res = _eval(tiny_data, reference.model_dir).check()
  path = os.path.join(reference.model_dir, "eval", "eval_step40.json")
  assert os.path.exists(path), res.stdout
  return res, _read_json(path)


@pytest.fixture(scope="module")
def export_dir(tiny_data, reference):
  res = helpers.run_entry(
      "recsys_jax.export",
      helpers.model_flags(tiny_data, reference.model_dir,
                          evaluation=False)).check()
  out = os.path.join(reference.model_dir, "export")
  assert f"Exported step 40 to {out}" in res.stdout, res.stdout
  return out


def test_train_writes_checkpoints_config_and_events(reference):
  model_dir = reference.model_dir
  # keep_checkpoints=3 of the saves at 4, 8, ..., 40 (the last is always kept).
  assert helpers.checkpoint_steps(model_dir) == [32, 36, 40]
  for step in (32, 36, 40):
    assert helpers.checkpoint_meta(model_dir, step)["input_position"] == step
  with open(os.path.join(model_dir, "config.gin")) as f:
    config = f.read()
  # The operative config: values actually used, command-line overrides won.
  assert re.search(r"^TRAIN_STEPS = 40$", config, re.M), config
  assert re.search(r"^MODEL_DIR = '.*reference_run'$", config, re.M), config
  assert re.search(r"builders\.bert4rec\.hidden = 16$", config, re.M), config
  assert re.search(r"TrainLoopConfig\.checkpoint_every = 4$", config, re.M)
  events = glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))
  assert events
  blob = b""
  for path in events:
    with open(path, "rb") as f:
      blob += f.read()
  assert b"train/loss" in blob and b"train/masked_accuracy" in blob


def test_progress_lines(reference):
  out = reference.result.stdout
  lines = [l for l in out.splitlines() if l.startswith("step ")]
  assert len(lines) == 40  # log_every=1
  for i, line in enumerate(lines, start=1):
    m = _PROGRESS_LINE.match(line)
    assert m, f"bad progress line: {line!r}"
    assert int(m.group(1)) == i and int(m.group(2)) == 40
    assert math.isfinite(float(m.group(3))) and 0 <= float(m.group(4)) <= 1
    steps_per_s, seq_per_s = float(m.group(7)), int(m.group(8))
    # seq/s is steps/s times the global batch (16), rounded.
    assert abs(seq_per_s - steps_per_s * 16) <= 1 + 1e-3 * seq_per_s, line
  assert lines[-1].endswith("ETA 0m00s")
  # The parameter count printed is the size of what was checkpointed.
  m = re.search(r"^Parameters: ([\d,]+);", out, re.M)
  assert m, out
  params = helpers.restore_state(reference.model_dir, 40)["params"]
  assert int(m.group(1).replace(",", "")) == sum(
      v.size for v in helpers.flat(params).values())


def test_eval_latest_writes_all_metrics(eval_latest):
  res, results = eval_latest
  assert results["step"] == 40
  for split in SPLITS:
    r = results[split]
    assert r["protocol"] == "full_ranking", split
    assert r["num_users"] == NUM_USERS, split
    for k in (1, 5, 10, 20):
      assert 0.0 <= r[f"NDCG@{k}"] <= r[f"HR@{k}"] <= 1.0, (split, k)
    assert r["HR@1"] <= r["HR@5"] <= r["HR@10"] <= r["HR@20"]
    # HR@1 counts rank-1 hits, each contributing 1 to MRR; others less.
    assert r["HR@1"] <= r["MRR"] <= r["HR@20"] + (1 - r["HR@20"]) / 21 + 1e-9
    assert f"[eval step 40] {split} (full_ranking, {NUM_USERS} users)" in (
        res.stdout)


def test_eval_of_an_older_checkpoint(tiny_data, reference, eval_latest):
  # EVAL_NAME keeps another evaluation of a checkpoint beside the
  # training's own eval_step<N>.json.
  res = _eval(tiny_data, reference.model_dir, "--gin.CHECKPOINT_STEP=32",
              "--gin.EVAL_NAME='older'").check()
  assert "[eval step 32]" in res.stdout
  assert not os.path.exists(os.path.join(reference.model_dir, "eval",
                                         "eval_step32.json"))
  older = _read_json(os.path.join(reference.model_dir, "eval",
                                  "older_step32.json"))
  assert older["step"] == 32
  # Different parameters were evaluated (the popularity baseline is not
  # model-dependent and must not change).
  latest = eval_latest[1]
  assert older["test_popularity"] == latest["test_popularity"]
  assert (older["validation"]["MRR"], older["test"]["MRR"]) != (
      latest["validation"]["MRR"], latest["test"]["MRR"])


def test_eval_of_a_missing_step_lists_available_steps(tiny_data, reference):
  res = _eval(tiny_data, reference.model_dir, "--gin.CHECKPOINT_STEP=33")
  assert res.rc != 0
  assert "checkpoint_33 does not exist" in res.stderr, res.stderr[-3000:]
  assert "available steps: [32, 36, 40]" in res.stderr, res.stderr[-3000:]
  assert not os.path.exists(os.path.join(reference.model_dir, "eval",
                                         "eval_step33.json"))


def test_eval_refuses_a_different_architecture(tiny_data, reference,
                                               export_dir):
  # positions_from_end changes no parameter shape: without the record kept
  # with checkpoints and exports this would evaluate silently wrong.
  flip = "--gin.builders.bert4rec.positions_from_end=False"
  for extra in ((flip,), (flip, f"--gin.EXPORTED_DIR='{export_dir}'")):
    res = _eval(tiny_data, reference.model_dir, *extra)
    assert res.rc != 0, res.stdout[-2000:]
    assert "different model architecture" in res.stderr, res.stderr[-3000:]
    assert "positions_from_end: saved True, configured False" in res.stderr
  manifest = _read_json(os.path.join(export_dir, "export.json"))
  assert manifest["architecture"]["positions_from_end"] is True
  assert manifest["architecture"]["hidden"] == HIDDEN


def test_resume_refuses_a_different_architecture(tiny_data, reference,
                                                 tmp_path):
  # A copy of the finished run, resumed for more steps with causal attention
  # (positions from the start, as causal needs): no parameter shape changes.
  model_dir = str(tmp_path / "run")
  shutil.copytree(reference.model_dir, model_dir)
  res = helpers.run_entry("recsys_jax.train", helpers.train_flags(
      tiny_data, model_dir, steps=44, extra=(
          "--gin.builders.bert4rec.causal=True",
          "--gin.builders.bert4rec.positions_from_end=False")))
  assert res.rc != 0, res.stdout[-2000:]
  assert "different model architecture" in res.stderr, res.stderr[-3000:]
  assert "causal: saved False, configured True" in res.stderr
  assert helpers.checkpoint_steps(model_dir) == helpers.checkpoint_steps(
      reference.model_dir)  # nothing written


def test_export_writes_params_embeddings_and_manifest(reference, export_dir):
  manifest = _read_json(os.path.join(export_dir, "export.json"))
  assert manifest["step"] == 40 and manifest["num_items"] == NUM_ITEMS
  assert manifest["embedding_shape"] == [NUM_ITEMS, HIDDEN]
  assert os.path.isdir(os.path.join(export_dir, "params"))
  assert os.path.exists(os.path.join(export_dir, "config.gin"))
  emb = np.load(os.path.join(export_dir, "item_embeddings.npy"))
  bias = np.load(os.path.join(export_dir, "item_bias.npy"))
  assert emb.shape == (NUM_ITEMS, HIDDEN) and bias.shape == (NUM_ITEMS,)
  # Rows 1..N of the trained item table (row 0 is padding).
  params = helpers.restore_state(reference.model_dir, 40)["params"]
  np.testing.assert_array_equal(
      emb, params["item_embed"]["embedding"][1:NUM_ITEMS + 1])
  np.testing.assert_array_equal(bias, params["output_bias"][1:NUM_ITEMS + 1])
  from recsys_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  helpers.assert_trees_equal(
      checkpoints.restore_params(os.path.join(export_dir, "params")), params,
      "exported params")


def test_eval_of_export_equals_eval_of_checkpoint(tiny_data, reference,
                                                  eval_latest, export_dir):
  res = _eval(tiny_data, reference.model_dir,
              f"--gin.EXPORTED_DIR='{export_dir}'").check()
  exported = _read_json(os.path.join(reference.model_dir, "eval",
                                     "eval_exported_step40.json"))
  assert _without_timings(exported) == _without_timings(eval_latest[1])
  assert "[eval step 40] test" in res.stdout


def test_configuration_mistakes_end_in_one_line(tiny_data, tmp_path):
  """Typos and bad values, as a new user makes them: one line, nothing run.

  The wiring of the entry points; every kind of mistake is checked in
  process through `gin_utils.parse_gin` (tests/test_gin_files.py). The
  processes run concurrently (each only parses, except the last, which builds
  the configs) to keep the test short.
  """
  model_dir = str(tmp_path / "never_written")
  base = ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR='{model_dir}'"]
  cases = [
      ("recsys_jax.train", ["--gin.TRAIN_STEPZ=5"],
       "--gin.TRAIN_STEPZ=5 is not used by anything; did you mean "
       "TRAIN_STEPS?"),
      ("recsys_jax.export",
       ["--gin.trainerr.OptimizerConfig.learning_rate=1"],
       "--gin.trainerr.OptimizerConfig.learning_rate=1: no configurable named"
       " trainerr.OptimizerConfig; did you mean trainer.OptimizerConfig?"),
      # Rejected by the config class when the run builds it.
      ("recsys_jax.train", [
          f"--gin.DATA_DIR='{tiny_data}'", "--gin.TRAIN_STEPS=2",
          "--gin.trainer.TrainLoopConfig.num_microbatches=3",
          f"--gin.MODEL_DIR='{tmp_path / 'validated'}'"],
       "TrainLoopConfig.num_microbatches=3 must divide "
       "TrainLoopConfig.batch_size=64"),
  ]
  procs = [subprocess.Popen([helpers.PYTHON, "-m", module, *base, *extra],
                            cwd=helpers.REPO_ROOT, env=helpers.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for module, extra, _ in cases]
  for proc, (module, extra, expected) in zip(procs, cases):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0, (module, extra)
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("gin configuration error: " + expected), (
        module, extra, stderr[-3000:])
  assert not os.path.exists(model_dir)  # nothing trained, nothing written
  assert not helpers.checkpoint_steps(str(tmp_path / "validated"))
