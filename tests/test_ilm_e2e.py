"""ILM end to end through the CLIs on the tiny synthetic dataset.

One pipeline (module fixture `ilm_run`), every stage the committed gin file
shrunk: the LM to freeze (a random T5, d_model 16, 1 + 1 layers, saved as
a params-only checkpoint like an imported one), Q-Former phase 1 (synthetic_ilm_phase1.gin: hidden 16,
1 layer, 2 queries, CF = ALS dim 8 in 2 chunks), phase 2 from both
(synthetic_ilm_phase2.gin: the LM frozen, the Q-Former initialised from
phase 1) with an evaluation that maps generated titles back to items, then
`predict`. Checked: the frozen LM is bit-identical after phase 2, the
Q-Former started from phase 1 (its trained values moved away from phase
1's, both InitFrom summaries printed), the item metrics (generated titles
mapped to their nearest item under a tiny bert_random item-text cache)
equal what the prediction records give, and the CoLLM MLP
baseline runs through the same path. Bad input: a CF table of another item
count names both counts.
"""

import json
import os

import numpy as np
import pytest

from tests import helpers

STEPS = 2
BATCH_SIZE = 8
EVAL_EXAMPLES = 8
BEAMS = 2
LM_PATTERN = ("token_embedder", "encoder", "decoder", "lm_head")


def _run(module, args):
  return helpers.run_entry(module, args)


def _qformer_flags():
  return ["--gin.builders.qformer_config.hidden=16",
          "--gin.builders.qformer_config.num_layers=1",
          "--gin.builders.qformer_config.num_heads=2",
          "--gin.builders.qformer_config.mlp_dim=32",
          "--gin.CF_CHUNK_DIM=4",
          "--gin.NUM_QUERIES=2", "--gin.CF_CHUNKS=2", "--gin.CF_DIM=8",
          "--gin.CF_EXPORT='als'"]


class ILMRun:

  def __init__(self, root, data_dir):
    self.root, self.data_dir = root, data_dir
    self.lm = os.path.join(root, "lm")
    self.phase1 = os.path.join(root, "phase1")
    self.phase2 = os.path.join(root, "phase2")
    self.cache = os.path.join(root, "item_text")
    self.phase2_out = None

  def common(self, model_dir):
    return [f"--gin.DATA_DIR='{self.data_dir}'",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
            f"--gin.BATCH_SIZE={BATCH_SIZE}",
            "--gin.trainer.TrainLoopConfig.log_every=1"]

  def phase2_flags(self, gin_file="synthetic_ilm_phase2.gin",
                   model_dir=None):
    return ([f"--gin_file=gin/experiments/{gin_file}"]
            + self.common(model_dir or self.phase2) + helpers.TINY_T5_FLAGS
            + ["--gin.D_MODEL=16"]
            + _qformer_flags() + [
                f"--gin.LM_DIR='{self.lm}'",
                f"--gin.PHASE1_DIR='{self.phase1}'",
                "--gin.MAX_HISTORY=3", "--gin.MAX_INPUT_LEN=24",
                f"--gin.EVAL_EVERY={STEPS}",
                "--gin.generation.GenerationEvalConfig.item_vectors_cache="
                f"'{self.cache}'",
                "--gin.generation.GenerationEvalConfig."
                "embedding_similarity=False",
                f"--gin.generation.GenerationEvalConfig.num_beams={BEAMS}",
                "--gin.generation.GenerationEvalConfig.ranking_ks=(1, 2)",
                f"--gin.generation.GenerationEvalConfig.max_examples="
                f"{EVAL_EXAMPLES}",
                f"--gin.generation.GenerationEvalConfig.batch_size="
                f"{BATCH_SIZE}"])


@pytest.fixture(scope="module")
def ilm_run(tmp_path_factory):
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  run = ILMRun(str(tmp_path_factory.mktemp("ilm_e2e")),
               helpers.prepared_dataset())
  # The nearest-item index of the mapping (bert_random, 8 tokens).
  embed_items.build_cache(
      run.data_dir, "bert_random", None, None, run.cache, texts="items",
      max_text_len=8, dtype="float32", log=lambda _: None,
      random_encoder={"hidden_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 32})
  helpers.save_random_t5(run.data_dir, run.lm)
  _run("recsys_jax.train", [
      "--gin_file=gin/experiments/synthetic_ilm_phase1.gin"]
       + run.common(run.phase1) + _qformer_flags()).check()
  run.phase2_out = _run("recsys_jax.train", run.phase2_flags()).check()
  return run


def test_phase2_freezes_the_lm_and_starts_from_phase1(ilm_run):
  out = ilm_run.phase2_out.stdout
  assert f"from {os.path.abspath(ilm_run.lm)}" in out or ilm_run.lm in out
  assert out.count("Initialised ") == 2, out[-3000:]
  lm = helpers.source_params(ilm_run.lm)
  p1 = helpers.source_params(ilm_run.phase1)
  p2 = helpers.source_params(ilm_run.phase2)
  lm_keys = [k for k in p2 if k.split("/")[0] in LM_PATTERN]
  assert lm_keys and set(lm_keys) == {k for k in lm if k in p2}
  for k in lm_keys:  # the frozen LM: bit-identical after phase 2
    np.testing.assert_array_equal(p2[k], lm[k], err_msg=k)
  q2 = {k[len("soft_tokens/"):]: v for k, v in p2.items()
        if k.startswith("soft_tokens/qformer/")}
  assert q2 and set(q2) <= set(p1)
  # Trained from phase 1's values: queries and cross-attention moved, but
  # stay close to their start after 2 small steps.
  moved = [k for k in q2 if not np.array_equal(q2[k], p1[k])]
  assert any("queries" in k for k in moved), moved
  for k in moved:
    assert np.max(np.abs(q2[k] - p1[k])) < 0.05, k


def test_item_metrics_match_prediction_records(ilm_run):
  with open(os.path.join(ilm_run.phase2, "eval",
                         f"eval_step{STEPS}.json")) as f:
    result = json.load(f)
  test = result["test"]
  for name in ("HR@1", "HR@2", "NDCG@1", "NDCG@2", "exact_title_accuracy",
               "match_exact", "match_none"):
    assert name in test, sorted(test)
  res = _run("recsys_jax.predict", ilm_run.phase2_flags() + [
      f"--gin.runs.predict.batch_size={BATCH_SIZE}",
      f"--gin.runs.predict.max_users={EVAL_EXAMPLES}"]).check()
  path = os.path.join(ilm_run.phase2, "predict", f"test_step{STEPS}.jsonl")
  assert os.path.exists(path), res.stdout[-2000:]
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == EVAL_EXAMPLES
  hits1, hits2, ndcg2 = [], [], []
  for r in records:
    ranked = r["ranked_items"]
    assert len(ranked) == 2 and len(r["beams"]) == BEAMS
    target = int(np.ravel(r["target_item"])[0])
    assert r["history_excluded"] is True
    assert r["match"] in ("exact", "nearest")  # the cache maps every title
    assert r["generated_item"] > 0 and 0 not in ranked
    rank = ranked.index(target) if target in ranked else None
    hits1.append(rank == 0)
    hits2.append(rank is not None)
    ndcg2.append(0.0 if rank is None else 1.0 / np.log2(rank + 2))
  # The evaluation's first EVAL_EXAMPLES test rows are the records'.
  assert test["HR@1"] == pytest.approx(np.mean(hits1))
  assert test["HR@2"] == pytest.approx(np.mean(hits2))
  assert test["NDCG@2"] == pytest.approx(np.mean(ndcg2))


def test_collm_baseline_runs_through_the_same_path(ilm_run):
  model_dir = os.path.join(ilm_run.root, "collm")
  res = _run("recsys_jax.train", ilm_run.phase2_flags(
      "synthetic_collm_phase2.gin", model_dir) + [
          "--gin.builders.item_soft_tokens.mlp_dim=16",
          "--gin.EVAL_EVERY=None"]).check()
  assert res.stdout.count("Initialised ") == 1
  p = helpers.source_params(model_dir)
  assert "soft_tokens/cf_proj/kernel" in p and not any(
      "qformer" in k for k in p)


def test_cf_table_of_another_item_count_names_both(ilm_run, tmp_path):
  from recsys_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from recsys_jax.model_lib import builders  # pylint: disable=g-import-not-at-top
  n = prepared.PreparedDataset(ilm_run.data_dir).num_items
  np.save(tmp_path / "item_embeddings.npy",
          np.zeros((n + 5, 8), np.float32))
  with pytest.raises(ValueError) as e:
    builders.ilm_cf_table(ilm_run.data_dir, str(tmp_path))
  msg = str(e.value)
  assert f"({n + 5}, 8)" in msg and f"[{n}, E]" in msg, msg
