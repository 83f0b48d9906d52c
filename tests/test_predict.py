"""`python -m recsys_jax.predict`: per-user top-k JSONL from a trained run."""

import json
import os

import numpy as np

from recsys_jax.data import prepared
from tests.helpers import model_flags
from tests.helpers import reference  # pylint: disable=unused-import
from tests.helpers import run_entry
from tests.helpers import tiny_data  # pylint: disable=unused-import


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_predict_writes_top_k_that_agree_with_evaluation(reference, tiny_data,
                                                         tmp_path):
  model_dir = str(tmp_path / "run")
  os.symlink(reference.model_dir, model_dir)
  k = 5
  res = run_entry("recsys_jax.predict", model_flags(
      tiny_data, model_dir, [f"--gin.TOP_K={k}"])).check()
  path = os.path.join(model_dir, "predict", "test_step40.jsonl")
  assert f"to {path}" in res.stdout.replace(os.path.realpath(model_dir),
                                            model_dir)
  records = _records(path)
  data = prepared.PreparedDataset(tiny_data)
  users = list(data.iter_sequences())
  assert [r["user_id"] for r in records] == [str(u["user_id"], "utf-8")
                                             if isinstance(u["user_id"], bytes)
                                             else str(u["user_id"])
                                             for u in users]
  titles = [""] + [item.get("title") or item["item_id"]
                   for item in prepared.read_items(tiny_data)]
  for r, u in zip(records, users):
    seq = [int(i) for i in u["item_ids"]]
    assert r["target"] == seq[-1]
    assert r["history"] == seq[:-1][-len(r["history"]):]
    assert len(r["top_k"]) == len(set(r["top_k"])) == k
    assert not set(r["top_k"]) & set(r["history"])
    assert all(1 <= i <= data.num_items for i in r["top_k"])
    assert r["top_k_titles"] == [titles[i] for i in r["top_k"]]
    assert r["target_title"] == titles[r["target"]]
    assert np.all(np.diff(r["scores"]) <= 0)
    hit = r["target"] in r["top_k"]
    assert (r["target_rank_in_top_k"] is not None) == hit

  # Without the exclusion, the top-k hold the target exactly as often as the
  # evaluation's HR@5 of the same checkpoint says (its rank < 5).
  run_entry("recsys_jax.predict", model_flags(
      tiny_data, model_dir, [f"--gin.TOP_K={k}",
                             "--gin.runs.predict.exclude_history=False"])
            ).check()
  unexcluded = _records(path)
  assert any(set(r["top_k"]) & set(r["history"]) for r in unexcluded)
  run_entry("recsys_jax.eval", model_flags(tiny_data, model_dir, [
      "--gin.evaluation.EvalConfig.splits=('test',)",
      "--gin.evaluation.EvalConfig.popularity_baseline=False"])).check()
  with open(os.path.join(model_dir, "eval", "eval_step40.json")) as f:
    evaluated = json.load(f)
  hits = np.mean([r["target"] in r["top_k"] for r in unexcluded])
  np.testing.assert_allclose(hits, evaluated["test"]["HR@5"], atol=1e-6)


def test_predict_max_users_and_validation_split(reference, tiny_data,
                                                tmp_path):
  model_dir = str(tmp_path / "run")
  os.symlink(reference.model_dir, model_dir)
  run_entry("recsys_jax.predict", model_flags(tiny_data, model_dir, [
      "--gin.PREDICT_SPLIT='validation'", "--gin.MAX_USERS=10",
      "--gin.TOP_K=3"])).check()
  records = _records(os.path.join(model_dir, "predict",
                                  "validation_step40.jsonl"))
  # Whole batches (256 rows) hold the 200 users: max_users rounds up.
  assert 10 <= len(records) <= 200
  assert all(len(r["top_k"]) == 3 for r in records)


def test_text_model_trains_evaluates_and_predicts_through_the_entry_points(
    tiny_data, tmp_path):
  """A tiny T5 through `train` (with generation evaluation) and `predict`."""
  from tests.test_text_tasks import SMOKE_BINDINGS  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / "t5")
  flags = ["--gin_file=gin/experiments/synthetic_t5_titles.gin",
           f"--gin.DATA_DIR='{tiny_data}'", f"--gin.MODEL_DIR='{model_dir}'",
           "--gin.TASK_NAME='predict_smoke_text'"] + [
               "--gin." + b.replace(" = ", "=") for b in SMOKE_BINDINGS]
  res = run_entry("recsys_jax.train", flags + [
      "--gin.TRAIN_STEPS=20", "--gin.EVAL_EVERY=20", "--gin.BATCH_SIZE=16",
      "--gin.trainer.TrainLoopConfig.log_every=10"]).check()
  assert "token_accuracy" in res.stdout
  assert "[eval step 20] validation" in res.stdout, res.stdout
  with open(os.path.join(model_dir, "eval", "eval_step20.json")) as f:
    evaluated = json.load(f)
  assert {"bleu", "rougeL", "num_examples"} <= set(evaluated["validation"])
  run_entry("recsys_jax.predict", flags + ["--gin.PREDICT_SPLIT='validation'"]
            ).check()
  records = _records(os.path.join(model_dir, "predict",
                                  "validation_step20.jsonl"))
  assert len(records) == evaluated["validation"]["num_examples"]
  titles = {item["index"]: item["title"]
            for item in prepared.read_items(tiny_data)}
  for r in records:
    assert isinstance(r["generated"], str)
    assert r["reference"] == titles[r["item_index"]]
    assert r["input"] and r["reference"] not in ("",)
