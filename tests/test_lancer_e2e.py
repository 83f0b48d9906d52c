"""LANCER end to end through the CLIs on the tiny synthetic dataset.

One pipeline (module fixture `lancer_run`), every stage a committed gin file
shrunk: a random tiny T5 as the LM to freeze (`helpers.save_random_t5`), the
knowledge stage (synthetic_lancer_knowledge.gin: item -> its text, LM
frozen), the reasoning stage from it (synthetic_lancer.gin with CF item
vectors from ALS, LM frozen, evaluated by mapping 2 beams to items through
the LM's pooled token embeddings), `predict`, and the unfrozen stage
(synthetic_lancer_unfrozen.gin). Checked: the frozen LM is bit-identical
after both frozen stages and moves once unfrozen; the knowledge prompt of
stage 2 starts from stage 1's; the item metrics equal what the prediction
records give; the generative table reads the records.
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


class LancerRun:

  def __init__(self, root, data_dir):
    self.root, self.data_dir = root, data_dir
    self.lm = os.path.join(root, "lm")
    self.knowledge = os.path.join(root, "knowledge")
    self.reasoning = os.path.join(root, "reasoning")
    self.unfrozen = os.path.join(root, "unfrozen")
    self.outputs = {}

  def flags(self, gin_file, model_dir, extra=()):
    return ([f"--gin_file=gin/experiments/{gin_file}",
             f"--gin.DATA_DIR='{self.data_dir}'",
             f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
             f"--gin.BATCH_SIZE={BATCH_SIZE}",
             "--gin.trainer.TrainLoopConfig.log_every=1",
             "--gin.builders.t5.d_model=16", f"--gin.LM_DIR='{self.lm}'",
             f"--gin.KNOWLEDGE_DIR='{self.knowledge}'",
             f"--gin.FROZEN_DIR='{self.reasoning}'",
             "--gin.PREFIX_LENGTH=4", "--gin.HISTORY_WINDOW=3",
             "--gin.MAX_INPUT_LEN=64", "--gin.MAX_TARGET_LEN=24",
             "--gin.ITEM_SOURCES='cf'", "--gin.CF_EXPORT='als'",
             "--gin.ITEM_TEXT_CACHE=None",
             "--gin.builders.lancer_prefix.cf_dim=8",
             f"--gin.generation.GenerationEvalConfig.num_beams={BEAMS}",
             "--gin.generation.GenerationEvalConfig.ranking_ks=(1, 2)",
             f"--gin.generation.GenerationEvalConfig.max_examples="
             f"{EVAL_EXAMPLES}",
             f"--gin.generation.GenerationEvalConfig.batch_size={BATCH_SIZE}"]
            + helpers.TINY_T5_FLAGS + list(extra))


@pytest.fixture(scope="module")
def lancer_run(tmp_path_factory):
  run = LancerRun(str(tmp_path_factory.mktemp("lancer_e2e")),
                  helpers.prepared_dataset())
  helpers.save_random_t5(run.data_dir, run.lm)
  train = lambda *a, **k: helpers.run_entry(
      "recsys_jax.train", run.flags(*a, **k)).check()
  run.outputs["knowledge"] = train("synthetic_lancer_knowledge.gin",
                                   run.knowledge, ["--gin.EVAL_EVERY=None"])
  run.outputs["reasoning"] = train("synthetic_lancer.gin", run.reasoning,
                                   [f"--gin.EVAL_EVERY={STEPS}"])
  run.outputs["unfrozen"] = train("synthetic_lancer_unfrozen.gin",
                                  run.unfrozen, ["--gin.EVAL_EVERY=None"])
  return run


def _lm_params(params):
  return {k: v for k, v in params.items() if k.split("/")[0] in LM_PATTERN}


def test_frozen_stages_keep_the_lm_and_unfreezing_moves_it(lancer_run):
  lm = helpers.source_params(lancer_run.lm)
  for stage in (lancer_run.knowledge, lancer_run.reasoning):
    params = _lm_params(helpers.source_params(stage))
    assert params and set(params) == set(lm), stage
    for k, v in params.items():  # bit-identical after a frozen stage
      np.testing.assert_array_equal(v, lm[k], err_msg=f"{stage}: {k}")
  unfrozen = _lm_params(helpers.source_params(lancer_run.unfrozen))
  assert any(not np.array_equal(v, lm[k]) for k, v in unfrozen.items())
  assert "frozen" not in lancer_run.outputs["unfrozen"].stdout.split(
      "Parameters:")[1].split("\n")[0]


def test_reasoning_stage_starts_from_the_knowledge_prompt(lancer_run):
  out = lancer_run.outputs["reasoning"].stdout
  assert out.count("Initialised ") == 2, out[-3000:]
  k1 = helpers.source_params(lancer_run.knowledge)
  k2 = helpers.source_params(lancer_run.reasoning)
  knowledge = [k for k in k1 if k.startswith("prefix/knowledge/")]
  assert knowledge and set(knowledge) <= set(k2)
  assert not any(k.startswith("prefix/reasoning/") for k in k1)
  assert any(k.startswith("prefix/reasoning/") for k in k2)
  for k in knowledge:  # trained on from stage 1's values: close to them
    assert np.max(np.abs(k2[k] - k1[k])) < 0.05, k


def test_item_metrics_match_prediction_records_and_table(lancer_run,
                                                          tmp_path):
  with open(os.path.join(lancer_run.reasoning, "eval",
                         f"eval_step{STEPS}.json")) as f:
    test = json.load(f)["test"]
  res = helpers.run_entry("recsys_jax.predict", lancer_run.flags(
      "synthetic_lancer.gin", lancer_run.reasoning,
      [f"--gin.runs.predict.batch_size={BATCH_SIZE}",
       f"--gin.runs.predict.max_users={EVAL_EXAMPLES}"])).check()
  path = os.path.join(lancer_run.reasoning, "predict",
                      f"test_step{STEPS}.jsonl")
  assert os.path.exists(path), res.stdout[-2000:]
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == EVAL_EXAMPLES
  hits1, hits2 = [], []
  for r in records:
    assert len(r["beams"]) == BEAMS and r["history_excluded"] is True
    assert r["user_id"] and len(r["ranked_items"]) == 2
    target = int(np.ravel(r["target_item"])[0])
    rank = (r["ranked_items"].index(target) if target in r["ranked_items"]
            else None)
    hits1.append(rank == 0)
    hits2.append(rank is not None)
  assert test["HR@1"] == pytest.approx(np.mean(hits1))
  assert test["HR@2"] == pytest.approx(np.mean(hits2))
  # The table of generative and ranking recommenders reads the records.
  from benchmarks import generative_table  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "table")
  assert generative_table.main([f"--entry=LANCER={path}", "--popularity",
                                f"--data_dir={lancer_run.data_dir}",
                                f"--output={out}"]) == 0
  with open(out + ".json") as f:
    table = json.load(f)
  assert table["users"] == EVAL_EXAMPLES
  assert set(table["rows"]) == {"LANCER", "popularity"}
