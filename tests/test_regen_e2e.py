"""REGEN end to end through the CLIs on the tiny synthetic dataset.

One pipeline (module fixture `regen_run`): `embed_items` builds a tiny
bert_random item cache (gin/embed/synthetic_random.gin, 8 tokens per text),
`train` runs gin/experiments/synthetic_regen.gin shrunk (T5 d_model 16,
1 + 1 layers, 8 history items, CF dim 8) for 4 steps with an evaluation at
the end; then `predict` and `eval` (shuffled histories, under another
EVAL_NAME) on its checkpoint. What follows from the data alone (the user
split's counts, the test users and their narratives, the items the ALS fit
misses) is computed here from the prepared records with NumPy. Bad input
through the CLI: an unknown narrative field, a missing item-text cache and
a cache of another item count. Last, the soft-token contribution analysis
through `eval` against NumPy over the trained adapter.
"""

import json
import os
import re

import numpy as np
import pytest

from tests import helpers

STEPS = 4
BATCH_SIZE = 8
D_MODEL = 16
MAX_HISTORY = 8
MAX_TARGET_LEN = 24
CF_DIM = 8
TEXT_LEN = 8
EVAL_EXAMPLES = 16
NUM_USERS = 200
NUM_ITEMS = 150
FIELD = "user_summary"
FIELDS = ("user_summary", "purchase_reason", "endorsement")
SPLITS = ("train", "validation", "test")
METRICS = ("bleu", "rouge1", "rouge2", "rougeL")


def _run(module, args):
  return helpers.run_entry(module, args)


class RegenRun:
  """The shared pipeline's paths and what training printed."""

  def __init__(self, root, data_dir):
    self.root = root
    self.data_dir = data_dir
    self.cache = os.path.join(root, "item_text")
    self.model_dir = os.path.join(root, "regen")
    self.manifest = None
    self.train = None

  def flags(self, cache=None, model_dir=None):
    """gin flags of every entry point on this run (shrunk REGEN)."""
    return [
        "--gin_file=gin/experiments/synthetic_regen.gin",
        f"--gin.DATA_DIR='{self.data_dir}'",
        f"--gin.ITEM_TEXT_CACHE='{cache or self.cache}'",
        f"--gin.MODEL_DIR='{model_dir or self.model_dir}'",
        f"--gin.D_MODEL={D_MODEL}",
        f"--gin.MAX_HISTORY={MAX_HISTORY}",
        f"--gin.MAX_TARGET_LEN={MAX_TARGET_LEN}",
        "--gin.builders.t5.num_heads=2",
        "--gin.builders.t5.d_kv=8",
        "--gin.builders.t5.d_ff=32",
        "--gin.builders.t5.num_encoder_layers=1",
        "--gin.builders.t5.num_decoder_layers=1",
        f"--gin.builders.item_soft_tokens.cf_dim={CF_DIM}",
        f"--gin.generation.GenerationEvalConfig.max_examples={EVAL_EXAMPLES}",
        f"--gin.generation.GenerationEvalConfig.batch_size={BATCH_SIZE}",
    ]

  def eval_json(self, name="eval"):
    return os.path.join(self.model_dir, "eval", f"{name}_step{STEPS}.json")


@pytest.fixture(scope="module")
def regen_run(tmp_path_factory):
  run = RegenRun(str(tmp_path_factory.mktemp("regen_e2e")),
                 helpers.prepared_dataset())
  res = _run("recsys_jax.embed_items", [
      "--gin_file=gin/embed/synthetic_random.gin",
      f"--data_dir={run.data_dir}", f"--output_dir={run.cache}",
      "--texts=items", f"--max_text_len={TEXT_LEN}"]).check()
  assert f"embed_items: wrote {run.cache}" in res.stdout, res.stdout
  with open(os.path.join(run.cache, "manifest.json")) as f:
    run.manifest = json.load(f)
  run.train = _run("recsys_jax.train", run.flags() + [
      f"--gin.TRAIN_STEPS={STEPS}", f"--gin.EVAL_EVERY={STEPS}",
      f"--gin.BATCH_SIZE={BATCH_SIZE}",
      "--gin.trainer.TrainLoopConfig.log_every=1"]).check()
  return run


# -- NumPy references from the prepared records -------------------------------


def _users(data_dir):
  """Every user record in file order (the order the narrative source and
  `split_users` count in)."""
  from recsys_jax.data import prepared  # pylint: disable=g-import-not-at-top
  return list(prepared.PreparedDataset(data_dir).iter_sequences())


def _narrative(user, field=FIELD):
  from recsys_jax.data import prepared  # pylint: disable=g-import-not-at-top
  return user[prepared.NARRATIVE_PREFIX + field].decode("utf-8")


def _split_positions(num_users):
  from tasks import narrative_tasks  # pylint: disable=g-import-not-at-top
  # synthetic_narratives.gin: seed 0, 10 % validation, 10 % test.
  return narrative_tasks.split_users(num_users, seed=0,
                                     validation_fraction=0.1,
                                     test_fraction=0.1)


def _cf_missing_count(users):
  """Items 1..N in no user's leave-one-out train part (all but the last
  two items): the ALS fit has no row for them."""
  trained = np.zeros(NUM_ITEMS + 1, bool)
  for u in users:
    trained[np.asarray(u["item_ids"][:-2], np.int64)] = True
  return int(np.sum(~trained[1:]))


def _semantic_missing_count(cache_dir):
  """Cache rows with an all-zero pooled vector or an empty text."""
  from recsys_jax.text import item_text_cache  # pylint: disable=g-import-not-at-top
  cache = item_text_cache.ItemTextCache(cache_dir)
  pooled = np.asarray(cache.pooled)
  missing = ~np.any(pooled != 0, axis=1)
  if cache.texts is not None:
    missing |= np.array([not t.strip() for t in cache.texts], bool)
  return int(np.sum(missing))


# -- train ---------------------------------------------------------------------


def test_train_reports_split_and_tables_and_evaluates(regen_run):
  train = regen_run.train
  users = _users(regen_run.data_dir)
  assert len(users) == NUM_USERS
  # The user split's counts, one line per split (every user has items, so
  # no history is empty in the 'all' mode of user_summary).
  for split, positions in _split_positions(len(users)).items():
    empty = sum(not _narrative(users[p]).strip() for p in positions)
    line = (f"narrative {FIELD!r} (all) {split}: {len(positions) - empty} "
            f"examples of {len(positions)} users, {empty} skipped (empty "
            f"narrative), 0 skipped (empty history); {regen_run.data_dir}")
    assert line in train.stderr, train.stderr[-3000:]
  # The item tables' missing counts.
  cf_line = re.search(rf"^item tables: CF {CF_DIM}-d from als\(dim={CF_DIM},"
                      r"[^\n]*\): (\d+) of (\d+) items missing$",
                      train.stderr, re.M)
  assert cf_line, train.stderr[-3000:]
  assert (int(cf_line.group(1)), int(cf_line.group(2))) == (
      _cf_missing_count(users), NUM_ITEMS)
  text_dim = regen_run.manifest["d_model"]
  sem_line = re.search(rf"^item tables: semantic {text_dim}-d from "
                       rf"{re.escape(regen_run.cache)} \[[^\n]*\]: (\d+) of "
                       r"(\d+) items missing$", train.stderr, re.M)
  assert sem_line, train.stderr[-3000:]
  assert (int(sem_line.group(1)), int(sem_line.group(2))) == (
      _semantic_missing_count(regen_run.cache), NUM_ITEMS)
  # Training ran and was checkpointed with the soft tokens' architecture.
  steps = helpers.progress_steps(train.stdout)
  assert steps == list(range(1, STEPS + 1)), train.stdout[-2000:]
  for m in re.finditer(r"^step \d+/\d+ \| loss (\S+) \|", train.stdout,
                       re.M):
    assert np.isfinite(float(m.group(1)))
  assert helpers.checkpoint_steps(regen_run.model_dir) == [STEPS]
  arch = helpers.checkpoint_meta(regen_run.model_dir, STEPS)["architecture"]
  soft = arch["soft_token_module"]
  assert soft["class"] == "ItemSoftTokens"
  assert soft["tables"] == {"num_items": NUM_ITEMS, "cf_dim": CF_DIM,
                            "semantic_dim": text_dim}
  assert soft["config"]["d_model"] == D_MODEL
  assert soft["config"]["sources"] == "fused"
  assert soft["config"]["next_item"] is True
  assert arch["soft_token_mode"] == "prefix" and arch["d_model"] == D_MODEL
  # The evaluation at step 4: generation metrics of both held-out splits.
  path = regen_run.eval_json()
  assert f"Wrote {path}" in train.stdout, train.stdout[-2000:]
  with open(path) as f:
    results = json.load(f)
  assert results["step"] == STEPS
  for split in ("validation", "test"):
    r = results[split]
    assert r["num_examples"] == EVAL_EXAMPLES, split
    for metric in METRICS:
      assert 0.0 <= r[metric] <= 100.0, (split, metric, r[metric])
    assert np.isfinite(r["loss"]) and r["loss"] > 0, split
    assert (f"[eval step {STEPS}] {split} ({EVAL_EXAMPLES} examples): bleu="
            in train.stdout)


# -- predict and eval on the checkpoint ----------------------------------------


def test_predict_writes_every_test_users_narrative(regen_run):
  res = _run("recsys_jax.predict", regen_run.flags() + [
      f"--gin.runs.predict.batch_size={BATCH_SIZE}"]).check()
  path = os.path.join(regen_run.model_dir, "predict",
                      f"test_step{STEPS}.jsonl")
  users = _users(regen_run.data_dir)
  test_users = [users[p] for p in _split_positions(len(users))["test"]
                if _narrative(users[p]).strip()]
  assert f"Wrote {len(test_users)} generations to {path}" in res.stdout, (
      res.stdout[-2000:])
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert records
  for r in records:
    assert isinstance(r["generated"], str), r
  # The test users of the user-disjoint split, in file order, each with
  # their own user_summary as the reference.
  assert [r["user_id"] for r in records] == [
      u["user_id"].decode() for u in test_users]
  assert [r["reference"] for r in records] == [
      _narrative(u) for u in test_users]
  train_ids = {users[p]["user_id"].decode()
               for p in _split_positions(len(users))["train"]}
  assert not train_ids & {r["user_id"] for r in records}


def test_eval_with_shuffled_histories_keeps_the_training_eval(regen_run):
  trained = regen_run.eval_json()
  with open(trained, "rb") as f:
    trained_bytes = f.read()
  mtime = os.path.getmtime(trained)
  res = _run("recsys_jax.eval", regen_run.flags() + [
      "--gin.narrative_data.NarrativeData.shuffle_histories=True",
      "--gin.EVAL_NAME='eval_shuffled'"]).check()
  path = regen_run.eval_json("eval_shuffled")
  assert f"Wrote {path}" in res.stdout, res.stdout[-2000:]
  with open(path) as f:
    shuffled = json.load(f)
  assert shuffled["step"] == STEPS
  original = json.loads(trained_bytes)
  for split in ("validation", "test"):
    r = shuffled[split]
    assert r["num_examples"] == EVAL_EXAMPLES
    for metric in METRICS:
      assert 0.0 <= r[metric] <= 100.0
    # Same users and narratives, other users' histories: the soft tokens,
    # hence the teacher-forced loss, differ.
    assert r["loss"] != original[split]["loss"], split
  # The training's evaluation is untouched.
  assert os.path.getmtime(trained) == mtime
  with open(trained, "rb") as f:
    assert f.read() == trained_bytes


# -- bad input through the CLI -------------------------------------------------


def _message_lines(stderr, needle):
  """The stderr lines naming `needle` (JAX/absl log lines excluded)."""
  return [l for l in stderr.splitlines() if needle in l]


def test_unknown_narrative_field_names_the_available_fields(regen_run):
  res = _run("recsys_jax.eval", regen_run.flags() + [
      "--gin.NARRATIVE_FIELD='no_such_field'",
      "--gin.EVAL_NAME='eval_bad_field'"])
  assert res.rc != 0, res.stdout[-2000:]
  lines = _message_lines(res.stderr, "no narrative field 'no_such_field'")
  assert lines, res.stderr[-3000:]
  assert regen_run.data_dir in lines[-1]
  for field in FIELDS:
    assert repr(field) in lines[-1], (field, lines[-1])
  # One line naming the file and the flag, no traceback.
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "stats.json" in lines[0] and "NARRATIVE_FIELD" in lines[0]
  assert not os.path.exists(regen_run.eval_json("eval_bad_field"))


def _write_item_cache(path, num_items, dim=4):
  """A complete item-text cache of `num_items` rows (another dataset's)."""
  from recsys_jax.text import item_text_cache  # pylint: disable=g-import-not-at-top
  writer = item_text_cache.CacheWriter(path, {
      "encoder": "test", "checkpoint_fingerprint": "none", "vocab": "none",
      "texts_kind": item_text_cache.ITEMS, "num_items": num_items,
      "max_text_len": 2, "d_model": dim, "dtype": "float32",
      "pooling": "mean", "store_tokens": False, "chunk_size": num_items},
                                       texts=["text"] * num_items)
  writer.write_chunk(0, {
      "mask": np.ones((num_items, 2), bool),
      "token_ids": np.ones((num_items, 2), np.int32),
      "pooled": np.ones((num_items, dim), np.float32)})


@pytest.fixture(scope="module")
def bad_cache_runs(regen_run):
  """{'missing' | 'other_size': (cache path, eval Result)}."""
  missing = os.path.join(regen_run.root, "no_such_cache")
  other = os.path.join(regen_run.root, "item_text_149")
  _write_item_cache(other, NUM_ITEMS - 1)
  out = {}
  for case, cache in (("missing", missing), ("other_size", other)):
    out[case] = (cache, _run("recsys_jax.eval", regen_run.flags(
        cache=cache) + [f"--gin.EVAL_NAME='eval_{case}'"]))
  return out


@pytest.mark.parametrize("case", ["missing", "other_size"])
def test_bad_item_text_cache_fails_naming_it(regen_run, bad_cache_runs,
                                             case):
  cache, res = bad_cache_runs[case]
  assert res.rc != 0, res.stdout[-2000:]
  lines = _message_lines(res.stderr, cache)
  assert lines, res.stderr[-3000:]
  if case == "missing":
    assert "no item-text cache here" in lines[-1], lines
  else:
    assert (f"the cache has {NUM_ITEMS - 1} item rows, the dataset has "
            f"{NUM_ITEMS} items") in lines[-1], lines
  assert "[eval step" not in res.stdout
  assert not os.path.exists(regen_run.eval_json(f"eval_{case}"))


@pytest.mark.parametrize("case", ["missing", "other_size"])
def test_bad_item_text_cache_error_is_one_line(bad_cache_runs, case):
  cache, res = bad_cache_runs[case]
  assert res.rc != 0
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  lines = _message_lines(res.stderr, cache)
  assert len(lines) == 1 and lines[0].startswith("error: "), lines


# -- the soft-token contribution analysis ---------------------------------------


def test_contribution_analysis_through_eval(regen_run):
  """gin/runs/soft_token_contributions.gin: the CF share of every test
  user's history soft tokens, against NumPy over the checkpoint's adapter."""
  from recsys_jax.model_lib import item_embeddings  # pylint: disable=g-import-not-at-top
  res = _run("recsys_jax.eval", regen_run.flags() + [
      "--gin_file=gin/runs/soft_token_contributions.gin",
      "--gin.EVAL_NAME='contributions'"]).check()
  out = os.path.join(regen_run.model_dir, "contributions", "test")
  with open(os.path.join(out, "contributions.json")) as f:
    report = json.load(f)
  with open(regen_run.eval_json("contributions")) as f:
    summary = json.load(f)["test"]
  # Every test user's history items (most recent MAX_HISTORY, each
  # occurrence), from the records.
  users = _users(regen_run.data_dir)
  test = _split_positions(len(users))["test"]
  ids = np.concatenate([np.asarray(users[p]["item_ids"], np.int64)
                        [-MAX_HISTORY:] for p in test])
  assert report["num_items"] == summary["num_soft_tokens"] == len(ids)
  # NumPy: |x_cf W_cf| / (|x_cf W_cf| + |x_sem W_sem|) with the trained
  # kernels and missing vectors.
  soft = helpers.restore_state(regen_run.model_dir, STEPS)["params"][
      "soft_tokens"]
  tables = item_embeddings.load_item_tables(
      regen_run.data_dir, cf="als", item_text_cache=regen_run.cache,
      cf_dim=CF_DIM)
  norms = {}
  for src in ("cf", "semantic"):
    table = np.asarray(getattr(tables, src), np.float64)
    x = table[ids]
    missing = np.asarray(getattr(tables, f"{src}_missing"))[ids]
    x[missing] = soft[f"{src}_missing"]
    x /= np.sqrt(np.sum(x * x, axis=1, keepdims=True) + 1e-12)
    norms[src] = np.linalg.norm(x @ soft[f"{src}_proj"]["kernel"], axis=1)
  share = norms["cf"] / (norms["cf"] + norms["semantic"])
  np.testing.assert_allclose(summary["cf_share_mean"], share.mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(report["cf_share"]["median"],
                             np.median(share), rtol=1e-4)
  assert sum(report["cf_share_histogram"]["counts"]) == len(ids)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert summary["png"] is None and "matplotlib" in report["png"]
  else:
    assert os.path.exists(os.path.join(out, "cf_share_hist.png"))
  assert f"{len(ids)} history soft tokens" in res.stdout
